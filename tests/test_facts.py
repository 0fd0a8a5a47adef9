"""The rule fact parser on hand-written text: every expected fact (with its span) written out by hand."""
import pytest

from fgaif_utils import language
from fgaif_utils.facts import (check_fact, describe_fact, extract_facts_rules, facts_of_type, parse_facts,
                               tokenize)


def at(text, word, nth=0):
    """[start, end] of the nth occurrence of `word` in `text` (a helper to write expected spans)."""
    start = -1
    for _ in range(nth + 1):
        start = text.index(word, start + 1)
    return [start, start + len(word)]


def obj(shape, span, negated=False):
    return {"type": "object", "subject": shape, "negated": negated, "span": span}


def attr(shape, kind, value, span):
    return {"type": "attribute", "subject": shape, "kind": kind, "value": value, "span": span}


def rel(subject, relation, other, span):
    return {"type": "relation", "subject": subject, "relation": relation, "object": other, "span": span}


def keys(facts):
    """Facts without spans, as comparable tuples."""
    return [tuple(sorted((k, v) for k, v in fact.items() if k != "span")) for fact in facts]


def test_existence_sentence_with_opener():
    text = "in this picture , there is a large red heart ."
    assert parse_facts(text) == [attr("heart", "size", "large", at(text, "large")),
                                 attr("heart", "colour", "red", at(text, "red")),
                                 obj("heart", at(text, "heart"))]


def test_existence_list_with_synonyms():
    text = "the image shows a small blue box , a large yellow star and a big orange donut ."
    assert parse_facts(text) == [
        attr("square", "size", "small", at(text, "small")), attr("square", "colour", "blue", at(text, "blue")),
        obj("square", at(text, "box")),
        attr("star", "size", "large", at(text, "large")), attr("star", "colour", "yellow", at(text, "yellow")),
        obj("star", at(text, "star")),
        attr("ring", "size", "large", at(text, "big")), attr("ring", "colour", "orange", at(text, "orange")),
        obj("ring", at(text, "donut")),
    ]


def test_every_lead_and_synonym_is_understood():
    for lead in language.EXISTENCE_LEADS:
        for shape, words in language.SHAPE_WORDS.items():
            for word in words:
                for size, size_words in language.SIZE_WORDS.items():
                    for size_word in size_words:
                        text = f"{lead} a {size_word} purple {word} ."
                        assert keys(parse_facts(text)) == keys([attr(shape, "size", size, None),
                                                                attr(shape, "colour", "purple", None),
                                                                obj(shape, None)]), text


def test_joined_relation_sentence():
    text = "the heart is left of the star , and the ring is above the box ."
    assert parse_facts(text) == [
        obj("heart", at(text, "heart")), rel("heart", "left", "star", at(text, "left of")),
        obj("star", at(text, "star")),
        obj("ring", at(text, "ring")), rel("ring", "above", "square", at(text, "above")),
        obj("square", at(text, "box")),
    ]


def test_relation_phrases_and_under_means_below():
    for relation, phrases in language.RELATION_PHRASES.items():
        for phrase in phrases:
            text = f"the disc is {phrase} the donut ."
            assert parse_facts(text) == [obj("circle", at(text, "disc")), rel("circle", relation, "ring", at(text, phrase)),
                                         obj("ring", at(text, "donut"))], text
    assert keys(parse_facts("the star is under the heart ."))[1] == keys([rel("star", "below", "heart", None)])[0]


def test_attributes_inside_relation_sentence():
    text = "The red heart is left of the small star."
    assert parse_facts(text) == [attr("heart", "colour", "red", at(text, "red")), obj("heart", at(text, "heart")),
                                 rel("heart", "left", "star", at(text, "left of")),
                                 attr("star", "size", "small", at(text, "small")), obj("star", at(text, "star"))]


def test_nps_without_size_or_colour_and_articles():
    text = "there is a heart , a red star and an orange ring ."
    assert parse_facts(text) == [obj("heart", at(text, "heart")), attr("star", "colour", "red", at(text, "red")),
                                 obj("star", at(text, "star")), attr("ring", "colour", "orange", at(text, "orange")),
                                 obj("ring", at(text, "ring"))]


def test_plurals():
    text = "There are two hearts and some stars , and boxes ."
    assert parse_facts(text) == [obj("heart", at(text, "hearts")), obj("star", at(text, "stars")),
                                 obj("square", at(text, "boxes"))]
    text = "i can see three little green discs"
    assert parse_facts(text) == [attr("circle", "size", "small", at(text, "little")),
                                 attr("circle", "colour", "green", at(text, "green")), obj("circle", at(text, "discs"))]


@pytest.mark.parametrize("text, shape, word", [
    ("there is no red circle .", "circle", "circle"),
    ("there is not a star .", "star", "star"),
    ("no hearts", "heart", "hearts"),
    ("There isn't a big ring.", "ring", "ring"),
    ("I cannot see any boxes.", "square", "boxes"),
    ("the image contains no purple disc .", "circle", "disc"),
])
def test_negated_existence_has_no_attributes(text, shape, word):
    assert parse_facts(text) == [obj(shape, at(text, word), negated=True)]


def test_negation_scope_ends_at_clause():
    text = "I can't see any hearts or stars, but there's a ring."
    assert parse_facts(text) == [obj("heart", at(text, "hearts"), True), obj("star", at(text, "stars"), True),
                                 obj("ring", at(text, "ring"))]
    text = "there is no heart and a blue star ."
    assert parse_facts(text) == [obj("heart", at(text, "heart"), True), attr("star", "colour", "blue", at(text, "blue")),
                                 obj("star", at(text, "star"))]
    text = "there is a heart and no star ."
    assert parse_facts(text) == [obj("heart", at(text, "heart")), obj("star", at(text, "star"), True)]


def test_negated_predicate_keeps_existence_but_drops_the_claim():
    text = "the heart is not left of the star ."
    assert parse_facts(text) == [obj("heart", at(text, "heart")), obj("star", at(text, "star"))]
    text = "the star isn't yellow ."
    assert parse_facts(text) == [obj("star", at(text, "star"))]
    text = "the heart is left of no star ."   # a relation with a negated side is dropped
    assert parse_facts(text) == [obj("heart", at(text, "heart")), obj("star", at(text, "star"), True)]
    # An adverb between the copula and "not" keeps the negation on the predicate: no "heart is red" claim,
    # and the star after it is not negated.
    text = "the heart is also not red ."
    assert parse_facts(text) == [obj("heart", at(text, "heart"))]
    text = "the heart is still not left of the star ."
    assert parse_facts(text) == [obj("heart", at(text, "heart")), obj("star", at(text, "star"))]
    text = "there is also no star ."   # no mention before the copula: existence is negated
    assert parse_facts(text) == [obj("star", at(text, "star"), True)]
    # "not" opening a clause before a relation phrase denies the relation, not the ring's existence
    for text in ["the heart is above the star , not below the ring .",
                 "the heart is above the star and not below the ring ."]:
        assert parse_facts(text) == [obj("heart", at(text, "heart")), rel("heart", "above", "star", at(text, "above")),
                                     obj("star", at(text, "star")), obj("ring", at(text, "ring"))], text
    # "n't" written apart is "not"
    text = "the heart is n't red ."
    assert parse_facts(text) == [obj("heart", at(text, "heart"))]
    text = "there is n't a heart ."
    assert parse_facts(text) == [obj("heart", at(text, "heart"), True)]


def test_not_in_the_picture_says_the_subject_is_absent():
    text = "the red star is not in the picture ."
    assert parse_facts(text) == [obj("star", at(text, "star"), True)]   # and no colour claim about it
    text = "the star is not in this image and the heart is red ."
    assert parse_facts(text) == [obj("star", at(text, "star"), True), obj("heart", at(text, "heart")),
                                 attr("heart", "colour", "red", at(text, "red"))]
    text = "the star is not in the picture , it is above the ring ."   # the scope is the clause
    assert [f["negated"] for f in parse_facts(text) if f["type"] == "object"] == [True, False]


def test_attribute_only_sentences():
    text = "the heart is red . the star is small . The box is big and purple in color."
    assert parse_facts(text) == [
        obj("heart", at(text, "heart")), attr("heart", "colour", "red", at(text, "red")),
        obj("star", at(text, "star")), attr("star", "size", "small", at(text, "small")),
        obj("square", at(text, "box")), attr("square", "size", "large", at(text, "big")),
        attr("square", "colour", "purple", at(text, "purple")),
    ]


def test_colour_spelling_and_possessive_subject():
    for text in ["the colour of the star is yellow .", "the color of the star is yellow .",
                 "The star's colour is yellow."]:
        assert parse_facts(text) == [obj("star", at(text, "star")),
                                     attr("star", "colour", "yellow", at(text, "yellow"))], text


def test_predicate_subject_is_the_copulas_subject():
    text = "there is a heart that is red and small"
    assert parse_facts(text) == [obj("heart", at(text, "heart")), attr("heart", "colour", "red", at(text, "red")),
                                 attr("heart", "size", "small", at(text, "small"))]
    text = "the heart is left of the star and above the ring ."
    assert keys(facts_of_type(parse_facts(text), "relation")) == keys([rel("heart", "left", "star", None),
                                                                       rel("heart", "above", "ring", None)])
    text = "the heart is left of the star which is blue"
    assert keys(facts_of_type(parse_facts(text), "attribute")) == keys([attr("star", "colour", "blue", None)])
    # adjectives after a relation phrase with no noun of their own (a cut-off sentence) describe nothing: before,
    # "large red" were claims about the heart
    assert facts_of_type(parse_facts("the heart is left of the large red"), "attribute") == []
    assert keys(facts_of_type(parse_facts("the heart is left of the large red star"), "attribute")) == \
        keys([attr("star", "size", "large", None), attr("star", "colour", "red", None)])


def test_unknown_words_are_ignored():
    text = "wow , a big shiny red heart sits happily under a lovely disc !"
    assert parse_facts(text) == [attr("heart", "size", "large", at(text, "big")),
                                 attr("heart", "colour", "red", at(text, "red")), obj("heart", at(text, "heart")),
                                 rel("heart", "below", "circle", at(text, "under")), obj("circle", at(text, "disc"))]
    assert parse_facts("a dog and a cat are on the sofa .") == []
    assert parse_facts("") == []


def test_broken_output():
    text = "there is a large red heart . there is a large red heart . the heart is left of"
    assert keys(parse_facts(text)) == keys([attr("heart", "size", "large", None), attr("heart", "colour", "red", None),
                                            obj("heart", None)] * 2 + [obj("heart", None)])
    assert parse_facts("there is a large red") == []
    text = "the the heart heart star"
    assert parse_facts(text) == [obj("heart", at(text, "heart")), obj("heart", at(text, "heart", 1)),
                                 obj("star", at(text, "star"))]


def test_extract_facts_rules_spans_are_relative_to_the_subsentence():
    response = "there is a large red heart , a small blue box and a big star ."
    sub = "a small blue box and a big star ."
    assert extract_facts_rules(sub, response) == parse_facts(sub)
    assert extract_facts_rules(sub)[0] == attr("square", "size", "small", [2, 7])


def test_facts_of_type_and_errors():
    facts = parse_facts("the red heart is above the star .")
    assert [f["type"] for f in facts_of_type(facts, "attribute")] == ["attribute"]
    assert len(facts_of_type(facts, "object")) == 2 and len(facts_of_type(facts, "relation")) == 1
    with pytest.raises(ValueError, match="unknown fact type 'objects'"):
        facts_of_type(facts, "objects")
    with pytest.raises(TypeError, match="expects a str"):
        parse_facts(None)


def test_check_fact_and_describe():
    assert check_fact({"type": "object", "subject": "heart", "negated": False})
    with pytest.raises(ValueError, match="not a fact"):
        check_fact({"type": "colour", "subject": "heart"})
    with pytest.raises(ValueError, match=r"without \['value'\]"):
        check_fact({"type": "attribute", "subject": "heart", "kind": "colour"})
    with pytest.raises(ValueError, match="unknown kind 'shape'"):
        check_fact({"type": "attribute", "subject": "heart", "kind": "shape", "value": "x"})
    with pytest.raises(ValueError, match="unknown relation 'near'"):
        check_fact({"type": "relation", "subject": "heart", "relation": "near", "object": "star"})
    assert describe_fact(obj("heart", None, True)) == "no heart"
    assert describe_fact(rel("heart", "below", "star", None)) == "heart below star"
    # an LLM extractor's relation in its own words (stage 03's labels report on COCO): read as written
    assert describe_fact(rel("cat", "lying on", "sofa", None)) == "cat lying on sofa"


def test_question_for_every_parsed_fact():
    text = "the small red heart is to the right of the blue star ."
    questions = [language.question_for_fact(f) for f in parse_facts(text)]
    assert questions == ["is the heart small ?", "is the heart red ?", "is there a heart in the image ?",
                         "is the heart right of the star ?", "is the star blue ?", "is there a star in the image ?"]


def test_tokenize_contractions_keep_spans():
    text = "There’s no 'heart' that isn't red"
    words = [(w, text[s:e]) for w, s, e in tokenize(text)]
    assert words == [("there", "There"), ("is", "’s"), ("no", "no"), ("heart", "heart"), ("that", "that"),
                     ("is", "is"), ("not", "n't"), ("red", "red")]
