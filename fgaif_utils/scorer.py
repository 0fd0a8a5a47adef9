"""The ground-truth hallucination scorer: judge every fact of a description against the exact scene graph.

This is the project's yardstick: the AI feedback, the reward models and PPO are all measured against it.
- judge_fact: one fact -> True (correct) / False (hallucinated) / None (not judged).
- score_description: every fact of a description judged, with per-type counts and rates (CHAIR_s, CHAIR_i,
  attribute / colour / size / relation error rates, coverage, sentence hygiene, length). Rates are None when
  their denominator is 0; raw counts are kept so that aggregate() pools them as ratio-of-sums.
- aggregate_labels: a sub-sentence's three labels from its facts' verdicts (shared with the AI labels).
- score_subsentences: the ground-truth labels of each sub-sentence of a response.
- highlight_html: a description with its facts coloured, for a person to look at.
"""
import functools
import html

from fgaif_utils import facts as facts_lib
from fgaif_utils import language, segment

LABEL_NA, LABEL_CORRECT, LABEL_HALLUCINATED = -1, 0, 1


def _objects_by_shape(scene):
    if not isinstance(scene, dict) or not isinstance(scene.get("objects"), list):
        raise ValueError(f"scene without an 'objects' list: {str(scene)[:200]}")
    by_shape = {}
    for obj in scene["objects"]:
        for key in ("shape", "colour", "size", "cx", "cy"):
            if key not in obj:
                raise ValueError(f"scene {scene.get('image_id')}: object without {key!r}: {obj}")
        if obj["shape"] in by_shape:
            raise ValueError(f"scene {scene.get('image_id')}: shape {obj['shape']!r} appears twice")
        by_shape[obj["shape"]] = obj
    return by_shape


def judge_fact(fact, scene, objects=None):
    """True if the fact holds in the scene, False if it is a hallucination, None if it is not judged: an
    attribute of an absent shape or a relation with an absent side (the object fact carries that error).
    A negated object fact holds when the shape is absent. `objects` ({shape: object}) saves a rebuild."""
    facts_lib.check_fact(fact)
    objects = _objects_by_shape(scene) if objects is None else objects
    subject = objects.get(fact["subject"])
    if fact["type"] == "object":
        return (subject is not None) != bool(fact["negated"])
    if fact["type"] == "attribute":
        if subject is None:
            return None
        return subject[fact["kind"]] == fact["value"]
    other = objects.get(fact["object"])
    if subject is None or other is None:
        return None
    return language.relation_holds(subject, fact["relation"], other)


@functools.cache
def _world_words():
    """(shape forms -> (shape, plural), size forms -> size, relation words and phrases -> relation), built once."""
    relations = {phrase: relation
                 for table in (language.RELATION_PHRASES, facts_lib.EXTRA_RELATION_PHRASES)
                 for relation, phrases in table.items() for phrase in [relation, *phrases]}
    return language.shape_lookup(), language.size_lookup(), relations


def plain_name(value):
    """A name as the world's words are looked up: lower case, single spaces, no leading article
    ("The  Box" -> "box")."""
    text = " ".join(str(value).lower().split())
    for article in ("a ", "an ", "the "):
        text = text.removeprefix(article)
    return text


def in_world_words(fact):
    """The fact in the synthetic world's canonical words, or None when it names something the world has no word for.
    The rules extractor writes canonical facts; an LLM extractor may write "the box", "big", "to the left of" or
    kind "other" ("striped"): those are mapped where the world has the word, else the fact is not judgeable."""
    shapes, sizes, relations = _world_words()
    subject = shapes.get(plain_name(fact.get("subject", "")), (None,))[0]
    if subject is None or fact.get("type") not in facts_lib.FACT_TYPES:
        return None
    if fact["type"] == "object":
        return {**fact, "subject": subject, "negated": bool(fact.get("negated"))}
    if fact["type"] == "attribute":
        value = plain_name(fact.get("value", ""))
        if fact.get("kind") == "colour" and value in language.COLOURS:
            return {**fact, "subject": subject, "value": value}
        if fact.get("kind") == "size" and value in sizes:
            return {**fact, "subject": subject, "value": sizes[value]}
        return None
    relation = relations.get(plain_name(fact.get("relation", "")))
    other = shapes.get(plain_name(fact.get("object", "")), (None,))[0]
    return None if relation is None or other is None else {**fact, "subject": subject, "relation": relation,
                                                            "object": other}


def judge_facts(facts, scene):
    """Copies of the facts with "correct" set by judge_fact."""
    objects = _objects_by_shape(scene)
    return [{**fact, "correct": judge_fact(fact, scene, objects)} for fact in facts]


def _rate(numerator, denominator):
    return numerator / denominator if denominator else None


def _word_count(text):
    return sum(1 for word, _, _ in facts_lib.tokenize(text) if any(c.isalnum() for c in word))


def _is_opener_only(sentence):
    """A sentence made of (part of) an opener and punctuation only, e.g. a truncated "in this picture ,"."""
    words = [word for word, _, _ in facts_lib.tokenize(sentence) if any(c.isalnum() for c in word)]
    return any(opener.split()[:len(words)] == words for opener in language.OPENERS) if words else False


def _sentence_stats(text, facts):
    spans = segment.split_sentences(text)
    seen, n_duplicate, n_unparseable = set(), 0, 0
    for start, end in spans:
        normalised = " ".join(word for word, _, _ in facts_lib.tokenize(text[start:end]))
        n_duplicate += normalised in seen
        seen.add(normalised)
        has_fact = any(start <= fact["span"][0] < end for fact in facts)
        n_unparseable += not has_fact and not _is_opener_only(text[start:end])
    return len(spans), n_duplicate, n_unparseable


def _type_counts(judged, prefix):
    return {f"n_{prefix}": len(judged),
            f"n_{prefix}_judged": sum(f["correct"] is not None for f in judged),
            f"n_{prefix}_false": sum(f["correct"] is False for f in judged)}


def score_description(text, scene):
    """Every fact of `text` judged against `scene`, with counts and rates (see the module docstring).

    Object claims count every mention (a relation sentence mentions its shapes again). CHAIR_i = unique
    hallucinated shapes / unique shapes mentioned (non-negated mentions only; per shape, where stage 06's CHAIR_i
    counts every mention as the original does: the per-mention reading here is the object rate); CHAIR_s = 1 if any.
    Coverage = distinct present shapes mentioned (non-negated) / objects in the scene. Why-counts: how many
    hallucinated shapes are a present shape's PARTNER, how many false colours are the shape's TYPICAL_COLOUR.
    A sentence is unparseable when it yields no fact and is not an opener fragment; a duplicate when its
    tokens repeat an earlier sentence's."""
    objects = _objects_by_shape(scene)
    judged = judge_facts(facts_lib.parse_facts(text), scene)
    objects_claims = facts_lib.facts_of_type(judged, "object")
    attributes = facts_lib.facts_of_type(judged, "attribute")
    colours = [f for f in attributes if f["kind"] == "colour"]
    sizes = [f for f in attributes if f["kind"] == "size"]
    relations = facts_lib.facts_of_type(judged, "relation")

    mentioned = {f["subject"] for f in objects_claims if not f["negated"]}
    hallucinated = {shape for shape in mentioned if shape not in objects}
    covered = mentioned & set(objects)
    n_sentences, n_duplicate, n_unparseable = _sentence_stats(text, judged)
    score = {"facts": judged}
    for group, prefix in ((objects_claims, "object"), (attributes, "attribute"), (colours, "colour"),
                          (sizes, "size"), (relations, "relation")):
        score.update(_type_counts(group, prefix))
        score[f"{prefix}_error_rate"] = _rate(score[f"n_{prefix}_false"], score[f"n_{prefix}_judged"])
    score.update({
        "mentioned_shapes": sorted(mentioned), "hallucinated_shapes": sorted(hallucinated),
        "n_mentioned": len(mentioned), "n_hallucinated": len(hallucinated),
        "chair_i": _rate(len(hallucinated), len(mentioned)), "chair_s": int(bool(hallucinated)),
        "n_hallucinated_partner": sum(language.PARTNER.get(shape) in objects for shape in hallucinated),
        "n_colour_false_typical": sum(f["correct"] is False and f["value"] == language.TYPICAL_COLOUR.get(f["subject"])
                                      for f in colours),
        "n_scene_objects": len(objects), "n_covered": len(covered), "coverage": _rate(len(covered), len(objects)),
        "n_sentences": n_sentences, "n_duplicate_sentences": n_duplicate,
        "n_unparseable_sentences": n_unparseable, "n_words": _word_count(text),
    })
    return score


def aggregate(scores):
    """Ratio-of-sums totals over many score_description results (rates None where nothing was counted)."""
    total = lambda key: sum(score[key] for score in scores)  # noqa: E731
    n = len(scores)
    summary = {"n_descriptions": n}
    for prefix in ("object", "attribute", "colour", "size", "relation"):
        for key in (f"n_{prefix}", f"n_{prefix}_judged", f"n_{prefix}_false"):
            summary[key] = total(key)
        summary[f"{prefix}_error_rate"] = _rate(summary[f"n_{prefix}_false"], summary[f"n_{prefix}_judged"])
    for key in ("n_mentioned", "n_hallucinated", "n_hallucinated_partner", "n_colour_false_typical",
                "n_scene_objects", "n_covered", "n_sentences", "n_duplicate_sentences",
                "n_unparseable_sentences", "n_words"):
        summary[key] = total(key)
    summary.update({
        "chair_s": _rate(total("chair_s"), n),
        "chair_i": _rate(summary["n_hallucinated"], summary["n_mentioned"]),
        "coverage": _rate(summary["n_covered"], summary["n_scene_objects"]),
        "partner_share": _rate(summary["n_hallucinated_partner"], summary["n_hallucinated"]),
        "typical_colour_share": _rate(summary["n_colour_false_typical"], summary["n_colour_false"]),
        "duplicate_sentence_rate": _rate(summary["n_duplicate_sentences"], summary["n_sentences"]),
        "unparseable_sentence_rate": _rate(summary["n_unparseable_sentences"], summary["n_sentences"]),
        "mean_sentences": _rate(summary["n_sentences"], n),
        "mean_words": _rate(summary["n_words"], n),
    })
    return summary


def aggregate_labels(fact_verdicts_by_type):
    """[object, attribute, relation] labels of one sub-sentence from {type: [verdict, ...]}, verdicts True
    (correct), False (hallucinated) or None (unknown, ignored): 1 if any verdict is False, 0 if some are True
    and none False, -1 if there is no known verdict (no fact of that type, or only unknown ones)."""
    unknown_types = set(fact_verdicts_by_type) - set(facts_lib.FACT_TYPES)
    if unknown_types:
        raise ValueError(f"aggregate_labels: unknown fact types {sorted(unknown_types)}")
    labels = []
    for fact_type in facts_lib.FACT_TYPES:
        verdicts = list(fact_verdicts_by_type.get(fact_type, []))
        bad = [v for v in verdicts if v is not True and v is not False and v is not None]
        if bad:
            raise ValueError(f"aggregate_labels: {fact_type} verdicts must be True/False/None, got {bad}")
        if any(v is False for v in verdicts):
            labels.append(LABEL_HALLUCINATED)
        elif any(v is True for v in verdicts):
            labels.append(LABEL_CORRECT)
        else:
            labels.append(LABEL_NA)
    return labels


def verdicts_by_type(judged_facts):
    """{type: [fact["correct"], ...]} for aggregate_labels."""
    grouped = {fact_type: [] for fact_type in facts_lib.FACT_TYPES}
    for fact in judged_facts:
        grouped[fact["type"]].append(fact["correct"])
    return grouped


def score_subsentences(text, spans, scene):
    """For each sub-sentence span (start, end) of `text`: {"span", "text", "facts" (judged, spans into
    `text`), "labels": [object, attribute, relation]}. Facts come from parsing the whole text and belong to
    the sub-sentence where their span starts."""
    judged = judge_facts(facts_lib.parse_facts(text), scene)
    results = []
    for start, end in spans:
        inside = [fact for fact in judged if start <= fact["span"][0] < end]
        results.append({"span": [start, end], "text": text[start:end], "facts": inside,
                        "labels": aggregate_labels(verdicts_by_type(inside))})
    return results


HIGHLIGHT_COLOURS = {True: "#b9f0b4", False: "#f5b3b3", None: "#dddddd"}
VERDICT_WORDS = {True: "correct", False: "hallucinated", None: "not judged"}


def highlight_html(text, facts):
    """`text` as HTML with every fact span coloured (green correct, red hallucinated, grey not judged, from
    fact["correct"], missing = not judged) and a title naming the facts. Overlapping spans are handled (the
    overlap shows every fact; red wins over grey over green). Facts without a span are not shown. Every
    string from the text or the facts is html-escaped: model output is untrusted."""
    placed = [fact for fact in facts if fact.get("span") is not None]
    for fact in placed:
        start, end = fact["span"]
        if not (0 <= start <= end <= len(text)):
            raise ValueError(f"highlight_html: fact span {fact['span']} outside the text ({len(text)} chars): {fact}")
    cuts = sorted({0, len(text)} | {b for fact in placed for b in fact["span"]})
    pieces = []
    for start, end in zip(cuts, cuts[1:]):
        chunk = html.escape(text[start:end])
        covering = [fact for fact in placed if fact["span"][0] <= start and end <= fact["span"][1]]
        if not covering:
            pieces.append(chunk)
            continue
        verdicts = [fact.get("correct") for fact in covering]
        verdict = (False if any(v is False for v in verdicts)
                   else None if any(v is not True for v in verdicts) else True)
        title = "; ".join(f"{facts_lib.describe_fact(fact)}: {VERDICT_WORDS.get(fact.get('correct'), 'not judged')}"
                          for fact in covering)
        pieces.append(f'<span style="background:{HIGHLIGHT_COLOURS[verdict]}" '
                      f'title="{html.escape(title, quote=True)}">{chunk}</span>')
    return '<div style="white-space: pre-wrap">' + "".join(pieces) + "</div>"
