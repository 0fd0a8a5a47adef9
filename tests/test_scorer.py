"""The ground-truth scorer against hand-built scenes, with every expected count computed by hand."""
import random

import pytest

from fgaif_utils import facts as facts_lib
from fgaif_utils import language, world
from fgaif_utils.params import NoiseParams, WorldParams
from fgaif_utils.scorer import (aggregate, aggregate_labels, highlight_html, judge_fact, score_description,
                                score_subsentences)
from fgaif_utils.segment import split_subsentences


def thing(shape, colour, size, cx, cy):
    radius = 14.0 if size == "large" else 9.0
    return {"id": 0, "shape": shape, "colour": colour, "size": size, "cx": cx, "cy": cy, "radius": radius,
            "bbox": [cx - radius, cy - radius, 2 * radius, 2 * radius]}


# Scene A: heart top-left, star top-right, square bottom-left (y grows downwards).
SCENE_A = {"image_id": 1, "objects": [thing("heart", "red", "large", 16, 16), thing("star", "yellow", "small", 48, 16),
                                      thing("square", "blue", "small", 16, 48)], "relations": []}
# Scene B: a yellow star and a purple circle (atypical colour: circles are typically yellow).
SCENE_B = {"image_id": 2, "objects": [thing("star", "yellow", "large", 20, 20), thing("circle", "purple", "small", 44, 44)],
           "relations": []}


def O(shape, negated=False):  # noqa: E743 - short fact builders for the judge tests
    return {"type": "object", "subject": shape, "negated": negated}


def A(shape, kind, value):
    return {"type": "attribute", "subject": shape, "kind": kind, "value": value}


def R(subject, relation, other):
    return {"type": "relation", "subject": subject, "relation": relation, "object": other}


def verdicts(score):
    return [(facts_lib.describe_fact(f), f["correct"]) for f in score["facts"]]


def test_judge_fact_every_type():
    assert judge_fact(O("heart"), SCENE_A) is True
    assert judge_fact(O("ring"), SCENE_A) is False
    assert judge_fact(O("ring", negated=True), SCENE_A) is True
    assert judge_fact(O("heart", negated=True), SCENE_A) is False
    assert judge_fact(A("heart", "colour", "red"), SCENE_A) is True
    assert judge_fact(A("heart", "colour", "blue"), SCENE_A) is False
    assert judge_fact(A("star", "size", "small"), SCENE_A) is True
    assert judge_fact(A("star", "size", "large"), SCENE_A) is False
    assert judge_fact(A("ring", "colour", "orange"), SCENE_A) is None
    assert judge_fact(R("heart", "left", "star"), SCENE_A) is True
    assert judge_fact(R("heart", "right", "star"), SCENE_A) is False
    assert judge_fact(R("heart", "above", "square"), SCENE_A) is True
    assert judge_fact(R("square", "below", "heart"), SCENE_A) is True
    assert judge_fact(R("heart", "left", "square"), SCENE_A) is False      # same column: not left
    assert judge_fact(R("heart", "left", "ring"), SCENE_A) is None
    assert judge_fact(R("ring", "left", "heart"), SCENE_A) is None


def test_judge_relation_uses_the_judge_margin():
    near = {"image_id": 3, "objects": [thing("heart", "red", "small", 20, 20),
                                       thing("star", "red", "small", 20 + language.JUDGE_MARGIN + 0.5, 40)]}
    assert judge_fact(R("heart", "left", "star"), near) is True
    near["objects"][1]["cx"] = 20 + language.JUDGE_MARGIN
    assert judge_fact(R("heart", "left", "star"), near) is False


def test_judge_fact_bad_input():
    with pytest.raises(ValueError, match="not a fact"):
        judge_fact({"type": "colour"}, SCENE_A)
    with pytest.raises(ValueError, match="scene 7: object without 'cx'"):
        judge_fact(O("heart"), {"image_id": 7, "objects": [{"shape": "heart", "colour": "red", "size": "small"}]})
    with pytest.raises(ValueError, match="appears twice"):
        judge_fact(O("heart"), {"image_id": 8, "objects": [thing("heart", "red", "small", 1, 1)] * 2})
    with pytest.raises(ValueError, match="without an 'objects' list"):
        score_description("a heart", {"image_id": 9})


def test_clean_description_with_one_wrong_colour():
    text = "there is a large red heart and a small green star . the heart is left of the star ."
    score = score_description(text, SCENE_A)
    assert verdicts(score) == [("heart is large (size)", True), ("heart is red (colour)", True), ("heart exists", True),
                               ("star is small (size)", True), ("star is green (colour)", False), ("star exists", True),
                               ("heart exists", True), ("heart left of star", True), ("star exists", True)]
    expected = {"n_object": 4, "n_object_judged": 4, "n_object_false": 0, "object_error_rate": 0.0,
                "n_attribute": 4, "n_attribute_judged": 4, "n_attribute_false": 1, "attribute_error_rate": 0.25,
                "n_colour": 2, "n_colour_false": 1, "colour_error_rate": 0.5, "n_size": 2, "size_error_rate": 0.0,
                "n_relation": 1, "n_relation_false": 0, "relation_error_rate": 0.0,
                "mentioned_shapes": ["heart", "star"], "hallucinated_shapes": [], "chair_i": 0.0, "chair_s": 0,
                "n_covered": 2, "n_scene_objects": 3, "coverage": 2 / 3, "n_colour_false_typical": 0,
                "n_sentences": 2, "n_duplicate_sentences": 0, "n_unparseable_sentences": 0, "n_words": 18}
    assert {k: score[k] for k in expected} == expected


def test_object_and_relation_hallucinations_and_absent_shapes():
    # ring is absent: its colour and the relation about it are not judged; "heart below square" is false.
    text = "there is a red heart and a yellow ring . the ring is above the heart . the heart is below the square ."
    score = score_description(text, SCENE_A)
    assert verdicts(score) == [("heart is red (colour)", True), ("heart exists", True),
                               ("ring is yellow (colour)", None), ("ring exists", False),
                               ("ring exists", False), ("ring above heart", None), ("heart exists", True),
                               ("heart exists", True), ("heart below square", False), ("square exists", True)]
    expected = {"n_object": 6, "n_object_false": 2, "object_error_rate": 2 / 6,
                "n_attribute": 2, "n_attribute_judged": 1, "n_attribute_false": 0, "attribute_error_rate": 0.0,
                "n_relation": 2, "n_relation_judged": 1, "n_relation_false": 1, "relation_error_rate": 1.0,
                "hallucinated_shapes": ["ring"], "chair_i": 1 / 3, "chair_s": 1, "n_hallucinated_partner": 0,
                "n_covered": 2, "coverage": 2 / 3}
    assert {k: score[k] for k in expected} == expected


def test_relation_about_an_absent_shape_only():
    score = score_description("the heart is left of the ring .", SCENE_A)
    assert verdicts(score) == [("heart exists", True), ("heart left of ring", None), ("ring exists", False)]
    assert (score["n_relation"], score["n_relation_judged"], score["relation_error_rate"]) == (1, 0, None)
    assert (score["chair_i"], score["chair_s"]) == (0.5, 1)


def test_why_counts_partner_and_typical_colour():
    # heart is absent and is the partner of the present star; the circle is called yellow (its typical
    # colour) but is purple.
    text = "there is a big yellow star , a small yellow circle and a red heart ."
    score = score_description(text, SCENE_B)
    assert verdicts(score) == [("star is large (size)", True), ("star is yellow (colour)", True), ("star exists", True),
                               ("circle is small (size)", True), ("circle is yellow (colour)", False),
                               ("circle exists", True), ("heart is red (colour)", None), ("heart exists", False)]
    assert (score["n_hallucinated"], score["n_hallucinated_partner"]) == (1, 1)
    assert (score["n_colour_false"], score["n_colour_false_typical"]) == (1, 1)
    assert (score["n_attribute"], score["n_attribute_judged"], score["n_attribute_false"]) == (5, 4, 1)


@pytest.mark.parametrize("text, scene, correct", [
    ("there is no red circle .", SCENE_A, True),     # no circle at all
    ("there is no red circle .", SCENE_B, False),    # a (purple) circle is present: "no circle" is false
    ("there are no hearts .", SCENE_A, False),
    ("i can not see a ring .", SCENE_A, True),
])
def test_negations(text, scene, correct):
    score = score_description(text, scene)
    assert [(f["type"], f["negated"], f["correct"]) for f in score["facts"]] == [("object", True, correct)]
    assert (score["n_object"], score["n_object_false"]) == (1, int(not correct))
    # a negated mention is neither mentioned for CHAIR nor coverage, and carries no attribute claim
    assert (score["n_mentioned"], score["chair_i"], score["chair_s"], score["n_covered"]) == (0, None, 0, 0)
    assert score["n_attribute"] == 0


def test_synonyms_and_plurals():
    text = "i can see two little boxes , and the big disc is under the donut ."
    score = score_description(text, SCENE_A)
    assert verdicts(score) == [("square is small (size)", True), ("square exists", True),
                               ("circle is large (size)", None), ("circle exists", False),
                               ("circle below ring", None), ("ring exists", False)]
    assert score["hallucinated_shapes"] == ["circle", "ring"] and score["chair_i"] == 2 / 3


def test_attribute_in_relation_sentence():
    text = "the red heart is left of the large star ."
    score = score_description(text, SCENE_A)
    assert verdicts(score) == [("heart is red (colour)", True), ("heart exists", True), ("heart left of star", True),
                               ("star is large (size)", False), ("star exists", True)]
    assert (score["n_size_false"], score["n_colour_false"], score["n_relation_false"]) == (1, 0, 0)


def test_sentence_counts_duplicates_unparseable_and_length():
    text = "there is a red heart . there is a red heart . There is a red heart."
    score = score_description(text, SCENE_A)
    assert (score["n_sentences"], score["n_duplicate_sentences"], score["n_object"]) == (3, 2, 3)
    text = "in this picture , there is a large red . hello world . in this picture ,"
    score = score_description(text, SCENE_A)
    assert (score["n_sentences"], score["n_unparseable_sentences"], score["n_words"]) == (3, 2, 13)
    score = score_description("there is a large red heart , a small", SCENE_A)   # truncated but parses
    assert (score["n_sentences"], score["n_unparseable_sentences"], score["n_object"]) == (1, 0, 1)
    assert score_description(". .", SCENE_A)["n_unparseable_sentences"] == 2


def test_empty_description_has_no_rates():
    score = score_description("", SCENE_A)
    assert score["facts"] == [] and score["coverage"] == 0.0 and score["chair_s"] == 0
    for key in ("object_error_rate", "attribute_error_rate", "colour_error_rate", "size_error_rate",
                "relation_error_rate", "chair_i"):
        assert score[key] is None, key
    assert score_description("a heart", {"image_id": 4, "objects": []})["coverage"] is None


def test_aggregate_is_ratio_of_sums():
    first = score_description("there is a large red heart and a small green star . the heart is left of the star .",
                              SCENE_A)
    second = score_description("there is a red heart and a yellow ring . the ring is above the heart . "
                               "the heart is below the square .", SCENE_A)
    third = score_description("there is a big yellow star , a small yellow circle and a red heart .", SCENE_B)
    total = aggregate([first, second])
    # objects: 0 + 2 false of 4 + 6; CHAIR_i: (0 + 1) / (2 + 3); attributes: (1 + 0) / (4 + 1 judged);
    # colour (1 + 0) / (2 + 1); size 0 / (2 + 0); relation (0 + 1) / (1 + 1); coverage (2 + 2) / (3 + 3)
    assert total["object_error_rate"] == 0.2 and total["chair_i"] == 0.2 and total["chair_s"] == 0.5
    assert total["attribute_error_rate"] == 0.2 and total["colour_error_rate"] == 1 / 3
    assert total["size_error_rate"] == 0.0 and total["relation_error_rate"] == 0.5
    assert total["coverage"] == 4 / 6 and total["mean_sentences"] == 2.5 and total["n_descriptions"] == 2
    assert total["partner_share"] == 0.0 and total["typical_colour_share"] == 0.0
    with_third = aggregate([first, second, third])
    assert with_third["partner_share"] == 0.5            # ring (no partner present) and heart (star present)
    assert with_third["typical_colour_share"] == 0.5     # green star (atypical) and yellow circle (typical)
    assert with_third["chair_s"] == 2 / 3 and with_third["coverage"] == 6 / 8
    empty = aggregate([])
    assert empty["n_descriptions"] == 0 and empty["object_error_rate"] is None and empty["chair_s"] is None


# The truth table for two facts of one type: (verdict 1, verdict 2) -> label.
TWO_FACT_TABLE = {
    (True, True): 0, (True, False): 1, (True, None): 0,
    (False, True): 1, (False, False): 1, (False, None): 1,
    (None, True): 0, (None, False): 1, (None, None): -1,
}


@pytest.mark.parametrize("pair, label", sorted(TWO_FACT_TABLE.items(), key=str))
@pytest.mark.parametrize("position", [0, 1, 2])
def test_aggregate_labels_truth_table(pair, label, position):
    fact_type = facts_lib.FACT_TYPES[position]
    expected = [-1, -1, -1]
    expected[position] = label
    assert aggregate_labels({fact_type: list(pair)}) == expected


def test_aggregate_labels_single_empty_and_mixed():
    assert aggregate_labels({}) == [-1, -1, -1]
    assert aggregate_labels({"object": [], "attribute": [], "relation": []}) == [-1, -1, -1]
    assert aggregate_labels({"object": [True], "attribute": [None], "relation": [False]}) == [0, -1, 1]
    assert aggregate_labels({"attribute": [False]}) == [-1, 1, -1]
    with pytest.raises(ValueError, match="unknown fact types"):
        aggregate_labels({"colour": [True]})
    with pytest.raises(ValueError, match="True/False/None"):
        aggregate_labels({"object": [1]})


def test_score_subsentences_labels():
    text = ("there is a large red heart , a small green star and a purple ring . "
            "the heart is left of the star , and the star is left of the box .")
    spans = split_subsentences(text)
    scored = score_subsentences(text, spans, SCENE_A)
    assert [s["text"] for s in scored] == ["there is a large red heart ,", "a small green star and a purple ring .",
                                           "the heart is left of the star ,", "and the star is left of the box ."]
    # 2: star ok, ring absent (object 1); small ok, green wrong, purple unjudged (attribute 1)
    # 4: the star is right of the square, not left (relation 1)
    assert [s["labels"] for s in scored] == [[0, 0, -1], [1, 1, -1], [0, -1, 0], [0, -1, 1]]
    assert [len(s["facts"]) for s in scored] == [3, 5, 3, 3]
    # an attribute of an absent shape alone is not applicable
    only_absent = "there is a purple ring ."
    assert score_subsentences(only_absent, split_subsentences(only_absent), SCENE_A)[0]["labels"] == [1, -1, -1]


def test_highlight_html_escapes_and_colours():
    text = 'a red heart <script>alert("x")</script> & a blue ring'
    facts = facts_lib.parse_facts(text)
    judged = [{**f, "correct": judge_fact(f, SCENE_A)} for f in facts]
    page = highlight_html(text, judged)
    assert "<script>" not in page and "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp;" in page
    assert '<span style="background:#b9f0b4" title="heart is red (colour): correct">red</span>' in page
    assert '<span style="background:#f5b3b3" title="ring exists: hallucinated">ring</span>' in page
    assert '<span style="background:#dddddd" title="ring is blue (colour): not judged">blue</span>' in page
    evil = {"type": "object", "subject": 'heart" onmouseover="alert(1)', "negated": False, "span": [2, 5],
            "correct": False}
    page = highlight_html(text, [evil])
    assert 'onmouseover="' not in page and "&quot; onmouseover=&quot;" in page
    with pytest.raises(ValueError, match="outside the text"):
        highlight_html("abc", [{**evil, "span": [1, 9]}])


def test_highlight_html_overlapping_spans():
    facts = [{"type": "object", "subject": "heart", "negated": False, "span": [0, 5], "correct": True},
             {"type": "object", "subject": "star", "negated": False, "span": [3, 8], "correct": False}]
    page = highlight_html("abcdefgh", facts)
    assert page.count("<span") == 3 and 'title="heart exists: correct; star exists: hallucinated">de<' in page


# ---- round trips: reference descriptions parse to exactly the scene's facts, all correct


def scene_fact_keys(scene, relations):
    keys = set()
    for o in scene["objects"]:
        keys |= {("object", o["shape"], False), ("colour", o["shape"], o["colour"]), ("size", o["shape"], o["size"])}
    return keys | {("relation", s, r, t) for s, r, t in relations}


def fact_keys(facts):
    keys = set()
    for f in facts:
        if f["type"] == "object":
            keys.add(("object", f["subject"], f["negated"]))
        elif f["type"] == "attribute":
            keys.add((f["kind"], f["subject"], f["value"]))
        else:
            keys.add(("relation", f["subject"], f["relation"], f["object"]))
    return keys


@pytest.mark.parametrize("text, relations", [
    ("there is a large red heart , a little blue box and a small yellow star . "
     "the heart is left of the star , and the heart is above the box .",
     [("heart", "left", "star"), ("heart", "above", "square")]),
    ("in this picture , i can see a big red heart . the picture contains a small blue square and a little yellow star . "
     "the box is under the heart .", [("square", "below", "heart")]),
    ("on a dark background , the image shows a small yellow star . there is a small blue box . "
     "there is a large red heart . the star is to the right of the heart .", [("star", "right", "heart")]),
])
def test_hand_written_reference_round_trip(text, relations):
    score = score_description(text, SCENE_A)
    assert fact_keys(score["facts"]) == scene_fact_keys(SCENE_A, relations)
    assert all(f["correct"] is True for f in score["facts"])
    assert score["coverage"] == 1.0 and score["n_unparseable_sentences"] == 0


def test_generated_reference_descriptions_are_all_correct():
    world_params = WorldParams()
    rng = random.Random(1234)
    for i in range(200):
        long = i % 4 == 0
        scene = world.sample_scene(rng, world_params, long=long, image_id=i)
        text = world.describe(scene, rng, long=long)
        score = score_description(text, scene)
        relations = [f for f in score["facts"] if f["type"] == "relation"]
        n_stated = sum(word in {"left", "right", "above", "below", "under"} for word, _, _ in facts_lib.tokenize(text))
        stated = {(r["subject"], r["relation"], r["object"]) for r in scene["relations"]}
        assert all(f["correct"] is True for f in score["facts"]), text
        assert fact_keys(score["facts"]) - {k for k in fact_keys(relations)} == scene_fact_keys(scene, []), text
        assert len(relations) == n_stated and fact_keys(relations) <= {("relation",) + s for s in stated}, text
        assert score["coverage"] == 1.0 and score["n_unparseable_sentences"] == 0, text
        # the rules extractor on each sub-sentence finds the same facts as parsing the whole text
        per_sub = [dict(f, span=[f["span"][0] + start, f["span"][1] + start])
                   for start, end in split_subsentences(text)
                   for f in facts_lib.extract_facts_rules(text[start:end], text)]
        assert per_sub == facts_lib.parse_facts(text), text


def test_noisy_descriptions_errors_are_exactly_the_injections():
    world_params = WorldParams()
    noise = NoiseParams(p_object=0.5, p_colour=0.5, p_relation=0.5, sys_colour=0.5)
    rng = random.Random(99)
    seen = set()
    for i in range(200):
        scene = world.sample_scene(rng, world_params, image_id=i)
        text, injections = world.noisy_describe(scene, rng, noise)
        false = [f for f in score_description(text, scene)["facts"] if f["correct"] is False]
        assert {f["subject"] for f in false if f["type"] == "object"} == \
            {j["shape"] for j in injections if j["type"] == "object"}, text
        assert {(f["subject"], f["value"]) for f in false if f["type"] == "attribute"} == \
            {(j["shape"], j["claimed_colour"]) for j in injections if j["type"] in ("colour", "sys_colour")}, text
        assert {(f["subject"], f["relation"], f["object"]) for f in false if f["type"] == "relation"} == \
            {(j["subject"], j["claimed_relation"], j["object"]) for j in injections if j["type"] == "relation"}, text
        seen |= {j["type"] for j in injections}
    assert seen == {"object", "colour", "sys_colour", "relation"}


def test_facts_an_llm_writes_are_read_in_the_world_s_words_or_left_unjudged():
    from fgaif_utils import feedback, scorer
    # every fact the rules extractor finds in the world's own captions is already in the world's words
    rng = random.Random(0)
    for _ in range(30):
        scene = world.sample_scene(rng, WorldParams())
        for fact in facts_lib.parse_facts(world.describe(scene, rng)):
            assert scorer.in_world_words(fact) == fact
    llm_facts = [{"type": "object", "subject": "the Box", "negated": False},           # square: present
                 {"type": "attribute", "subject": "heart", "kind": "size", "value": "big"},   # large: right
                 {"type": "attribute", "subject": "star", "kind": "colour", "value": "Yellow"},
                 {"type": "relation", "subject": "heart", "relation": "to the left of", "object": "a star"},
                 {"type": "relation", "subject": "square", "relation": "under", "object": "heart"},
                 {"type": "attribute", "subject": "heart", "kind": "other", "value": "striped"},  # no such word
                 {"type": "relation", "subject": "heart", "relation": "next to", "object": "star"},
                 {"type": "object", "subject": "dog", "negated": False},
                 # the parser's other relation phrases (facts.EXTRA_RELATION_PHRASES) are the world's words too
                 {"type": "relation", "subject": "heart", "relation": "on top of", "object": "square"},
                 {"type": "relation", "subject": "heart", "relation": "beneath", "object": "square"}]
    rows = feedback.add_ground_truth([{"image_id": 1, "fact": f} for f in llm_facts], {1: SCENE_A})
    assert [row["truth"] for row in rows] == [True, True, True, True, True, None, None, None, True, False]
