"""Stage 06: POPE, CHAIR, the synthetic world's exact metrics, bootstrap intervals, paired tests, GPT-judged
benchmarks and the side-by-side comparison of every policy.

Everything a metric needs is kept per image, as counts ("per-image records"), so that one resampling of images
gives an interval for every metric and a paired test between two policies on the same images:
- every metric is a ratio of sums over images, numerator / denominator, each a weighted sum of counts
  (POPE F1 = 2 TP / (2 TP + FP + FN), CHAIR_i = hallucinated / mentioned, coverage = covered / objects ...);
- a bootstrap resample draws images with replacement (a multinomial weight per image) and recomputes every
  ratio of sums with the same weights; intervals are percentile intervals at `confidence`;
- the paired test resamples the images two policies share, with the same weights for both, and reports the
  difference, its interval and a two-sided p-value (the bootstrap distribution of the difference, shifted to
  mean zero, compared with the observed difference).

POPE (Li et al. 2023): per image k present categories and k absent ones, k = min(pope_objects, present, absent),
absent ones drawn three ways: random (uniform among absent categories), popular (the absent categories that
occur in the most images of the annotation set), adversarial (the absent categories that co-occur most often
with the image's present ones). On COCO the images are those with at least pope_objects annotated categories, so
every image gets pope_objects + pope_objects questions per sampler (coco_pope_image_ids). An answer is "no" when
its first sentence holds the word "No", "no" or "not", else "yes", exactly as in the common POPE scripts.

CHAIR (Rohrbach et al. 2018): object words of a description matched against the image's objects through a
synonym table (the COCO one in coco_synonyms, the world's shape words in the synthetic world), longest phrase
first, negated mentions ("there is no dog") not counted. CHAIR_s = descriptions with a hallucinated object /
descriptions; CHAIR_i = hallucinated mentions / object mentions (every non-negated mention counts, as in the
original: "a dog next to another dog" is two); recall = distinct true categories mentioned / true categories.

GPT-judged benchmarks (real profile): MMHal-Bench (a 0-6 rating per answer, hallucination = rating < 3) and
LLaVA-Bench in-the-wild (the judge scores the reference answer and the model's answer 1-10; relative score =
sum of model scores / sum of reference scores * 100), through any OpenAI-compatible endpoint, each item cached.
A judge answer that cannot be read is an item with status "malformed" (JSON / regex parsing only, never eval).
"""
import csv
import gc
import hashlib
import html
import io
import json
import random
import re
import warnings
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from PIL import Image
from tqdm import tqdm

from fgaif_utils import facts as facts_lib
from fgaif_utils import language, llm, models, scorer, segment, world
from fgaif_utils.coco_synonyms import COCO_SYNONYMS, IRREGULAR_PLURALS, NOT_OBJECTS
from fgaif_utils.report import image_tag
from fgaif_utils.stage import shown_path

SYNTHETIC_SPLITS = ["eval", "eval_long", "eval_ood"]
POPE_SAMPLERS = ["random", "popular", "adversarial"]
POPE_TEMPLATE = "Is there a {object} in the image?"
POPE_MAX_NEW_TOKENS = 8   # evaluate.pope_max_new_tokens' default: the answer is read from its first sentence
POPE_FILE = "coco_pope_{sampler}.json"
NEGATORS = {"no", "not", "without", "none", "neither", "nor", "never", "zero"}
VERB_NEGATORS = {"not", "never"}   # "not wearing a tie": a participle after them stays in the negation
CLAUSE_BREAKS = {".", "!", "?", ",", ";", ":", "(", ")", "\n", "but", "while", "whereas", "although", "however"}
# After a noun-phrase negator ("no", "without" ...), a verb that starts a new clause: "a room with no windows has a
# couch" claims the couch ("windows" names no COCO object, so nothing else closed the scope).
CLAUSE_VERBS = {"is", "are", "was", "were", "has", "have", "had", "can", "could", "will", "would", "may", "might",
                "seems", "seem", "appears", "appear", "sits", "sit", "stands", "stand", "lies", "lie", "rides",
                "ride", "holds", "hold", "looks", "look", "shows", "show", "contains", "contain", "wears", "wear"}
SCOPE_PREPOSITIONS = {"on", "in", "under", "near", "next", "beside", "behind", "above", "below", "at", "by", "with",
                      "inside", "into", "onto", "over", "across", "along", "around", "through", "from", "to",
                      "against", "between", "among", "atop", "underneath"}   # every preposition but "of"


# ============================================================================================ POPE

def _category_names(instances):
    return {c["id"]: c["name"] for c in instances["categories"]}


def objects_per_image(instances):
    """{image_id: set of category names present} for every image of a COCO instances dict."""
    names = _category_names(instances)
    present = {image["id"]: set() for image in instances["images"]}
    for annotation in instances["annotations"]:
        present.setdefault(annotation["image_id"], set()).add(names[annotation["category_id"]])
    return present


def category_statistics(instances):
    """Image frequency of every category ({name: images containing it}) and co-occurrence counts
    ({name: {other: images containing both}}) over the whole annotation set."""
    present = objects_per_image(instances)
    frequency = Counter({name: 0 for name in _category_names(instances).values()})
    cooccurrence = defaultdict(Counter)
    for categories in present.values():
        for name in categories:
            frequency[name] += 1
            for other in categories - {name}:
                cooccurrence[name][other] += 1
    return dict(frequency), {name: dict(counts) for name, counts in cooccurrence.items()}


def sample_negatives(sampler, present, categories, k, rng, frequency=None, cooccurrence=None, positives=None):
    """k categories absent from the image (`present`): random = uniform; popular = the most frequent in the
    annotation set; adversarial = as Li et al.'s code: for each positive asked about (`positives`, default the
    first k present) in turn, the absent category that co-occurs with it most often and is not drawn yet, a random
    unused absent one when none co-occurs. Ties break by frequency, then by name."""
    absent = sorted(set(categories) - set(present))
    if sampler == "random":
        return rng.sample(absent, min(k, len(absent)))
    frequency = frequency or {}
    if sampler == "popular":
        return sorted(absent, key=lambda c: (-frequency.get(c, 0), c))[:k]
    if sampler != "adversarial":
        raise ValueError(f"unknown POPE sampler {sampler!r}; expected one of {POPE_SAMPLERS}")
    cooccurrence, drawn = cooccurrence or {}, []
    for positive in (sorted(present) if positives is None else positives)[:k]:
        together = cooccurrence.get(positive, {})
        candidates = [c for c in absent if c not in drawn and together.get(c, 0) > 0]
        if candidates:
            drawn.append(min(candidates, key=lambda c: (-together[c], -frequency.get(c, 0), c)))
        elif len(drawn) < len(absent):
            drawn.append(rng.choice([c for c in absent if c not in drawn]))
    return drawn


def pope_question(name, suffix=""):
    return POPE_TEMPLATE.format(object=name) + suffix


def build_pope(instances, image_ids, n_objects=3, seed=0, suffix="", samplers=POPE_SAMPLERS, statistics=None):
    """POPE questions for `image_ids` from a COCO instances dict: per image and sampler, k present and k absent
    categories, k = min(n_objects, present, absent) (the present ones are the same for every sampler).
    Frequencies and co-occurrences come from the whole annotation set (or `statistics` = category_statistics
    of a larger one). Rows: {question_id, image_id, sampler, object, label, text}. Seeded per image."""
    present_of = objects_per_image(instances)
    categories = sorted(_category_names(instances).values())
    frequency, cooccurrence = statistics or category_statistics(instances)
    rows = []
    for image_id in image_ids:
        if image_id not in present_of:
            raise ValueError(f"POPE: image {image_id} is not in the annotation set")
        present = sorted(present_of[image_id])
        k = min(n_objects, len(present), len(categories) - len(present))
        positives = random.Random(f"fgaif-pope:{seed}:{image_id}:present").sample(present, k)
        for sampler in samplers:
            rng = random.Random(f"fgaif-pope:{seed}:{image_id}:{sampler}")
            negatives = sample_negatives(sampler, present, categories, k, rng, frequency, cooccurrence, positives)
            for name, label in [(p, "yes") for p in positives] + [(n, "no") for n in negatives]:
                rows.append({"question_id": len(rows), "image_id": image_id, "sampler": sampler, "object": name,
                             "label": label, "text": pope_question(name, suffix)})
    return rows


def coco_pope_image_ids(instances, preferred, n, n_objects=3, seed=0):
    """n images of a COCO instances dict for POPE as Li et al. 2023 choose them: images with at least n_objects
    annotated categories (and n_objects absent ones). The eligible `preferred` ids (the eval scenes) come first, in
    their order, then the other eligible images in a seeded random order; fewer than n (with a warning) when
    fewer are eligible."""
    present_of = objects_per_image(instances)
    n_categories = len(instances["categories"])
    eligible = {i for i, present in present_of.items() if n_objects <= len(present) <= n_categories - n_objects}
    first = [i for i in dict.fromkeys(preferred) if i in eligible]
    rest = sorted(eligible - set(first))
    random.Random(f"fgaif-pope-images:{seed}").shuffle(rest)
    chosen = (first + rest)[:n]
    if len(chosen) < n:
        warnings.warn(f"POPE: only {len(chosen)} images have at least {n_objects} annotated categories "
                      f"(evaluate.n_images = {n})")
    return chosen


def coco_pope_rows(instances, preferred, n, n_objects=3, seed=0, suffix=""):
    """POPE rows (build_pope) for coco_pope_image_ids' images, each row with its image's file name ("image", as
    the official POPE files have it), so an image outside the eval scenes loads like an official POPE image."""
    file_name_of = {image["id"]: image["file_name"] for image in instances["images"]}
    image_ids = coco_pope_image_ids(instances, preferred, n, n_objects, seed)
    rows = build_pope(instances, image_ids, n_objects, seed, suffix)
    return [{**row, "image": file_name_of[row["image_id"]]} for row in rows]


def _negatives_by_image(rows):
    """{image_id: {sampler: frozenset of the absent objects asked about}}, images in the rows' order."""
    negatives = {}
    for row in rows:
        sets = negatives.setdefault(row["image_id"], {})
        sets.setdefault(row["sampler"], set())
        if row["label"] == "no":
            sets[row["sampler"]].add(row["object"])
    return {image: {sampler: frozenset(objects) for sampler, objects in sets.items()}
            for image, sets in negatives.items()}


def images_whose_samplers_agree(rows):
    """(images whose samplers asked about the same absent objects, images): where they agree, the samplers' rows
    of a split measure the same questions (few categories: the synthetic world's six shapes)."""
    negatives = _negatives_by_image(rows)
    return sum(len(set(sets.values())) == 1 for sets in negatives.values()), len(negatives)


def pope_rows_of_an_image_where_samplers_differ(rows):
    """The POPE rows of the first image whose samplers drew different absent objects (of the first image when
    none did)."""
    negatives = _negatives_by_image(rows)
    differing = [image for image, sets in negatives.items() if len(set(sets.values())) > 1]
    chosen = differing[0] if differing else next(iter(negatives), None)
    return [row for row in rows if row["image_id"] == chosen]


def _image_id_from_name(name):
    digits = re.findall(r"\d+", Path(name).stem)
    return int(digits[-1]) if digits else None


def read_pope_file(path, sampler, suffix=""):
    """An official POPE question file (one JSON object a line: question_id, image, text, label) as POPE rows;
    the image file name is kept, image_id is its last number, object is read from the question."""
    rows = []
    for number, item in _read_benchmark_jsonl(path, ("question_id", "image", "text", "label")):
        label = str(item["label"]).strip().lower()
        if label not in ("yes", "no"):
            raise ValueError(f"{path}:{number}: the label must be yes or no, got {item['label']!r}")
        found = re.search(r"is there an? (.+?) in the im", item["text"], flags=re.IGNORECASE)
        rows.append({"question_id": item["question_id"], "image_id": _image_id_from_name(item["image"]),
                     "image": item["image"], "sampler": sampler, "object": found.group(1) if found else None,
                     "label": label, "text": item["text"] + suffix})
    return rows


def read_pope_folder(folder, suffix="", samplers=POPE_SAMPLERS):
    """coco_pope_{random,popular,adversarial}.json of an official POPE folder, as one list of rows."""
    rows = []
    for sampler in samplers:
        path = Path(folder) / POPE_FILE.format(sampler=sampler)
        if not path.is_file():
            raise FileNotFoundError(f"POPE file {path} not found (evaluate.pope_files = {folder})")
        rows += read_pope_file(path, sampler, suffix)
    return rows


def pope_answer(text):
    """'yes' or 'no' exactly as the common POPE scripts (POPE's and LLaVA-1.5's) read an answer, so that scores
    compare with published ones: the first sentence (up to the first "."), commas removed, split on spaces; 'no'
    when a word is "No", "no" or "not", else 'yes'. Their quirks are kept: "NO", "No!", "isn't" and "cannot" read
    as yes (POPE prompts with the one-word suffix make them rare)."""
    words = (text or "").split(".")[0].replace(",", "").split(" ")
    return "no" if {"No", "no", "not"} & set(words) else "yes"


def confusion_counts(labels, answers):
    """{tp, fp, tn, fn} with 'yes' as the positive class."""
    counts = {"tp": 0, "fp": 0, "tn": 0, "fn": 0}
    for label, answer in zip(labels, answers, strict=True):
        if label not in ("yes", "no") or answer not in ("yes", "no"):
            raise ValueError(f"labels and answers must be 'yes' or 'no', got {label!r} / {answer!r}")
        counts[("t" if label == answer else "f") + ("p" if answer == "yes" else "n")] += 1
    return counts


def _ratio(numerator, denominator):
    return numerator / denominator if denominator else None


def pope_metrics(labels, answers):
    """Accuracy, precision, recall, F1 and yes-ratio ('yes' positive), with the counts and n."""
    c = confusion_counts(labels, answers)
    n = sum(c.values())
    return {**c, "n": n, "accuracy": _ratio(c["tp"] + c["tn"], n), "precision": _ratio(c["tp"], c["tp"] + c["fp"]),
            "recall": _ratio(c["tp"], c["tp"] + c["fn"]), "f1": _ratio(2 * c["tp"], 2 * c["tp"] + c["fp"] + c["fn"]),
            "yes_ratio": _ratio(c["tp"] + c["fp"], n)}


# ============================================================================================ CHAIR

def plural(word):
    """The plural of a noun or noun phrase (last word; "X of Y" pluralises X: "glasses of wine"): irregular table,
    else -es after s/x/z/ch/sh, -ies after a consonant + y, else -s."""
    noun, of, rest = word.partition(" of ")
    if of:
        return plural(noun) + of + rest
    head, _, last = word.rpartition(" ")
    if last in IRREGULAR_PLURALS:
        last = IRREGULAR_PLURALS[last]
    elif last.endswith(("s", "x", "z", "ch", "sh")):
        last += "es"
    elif len(last) > 1 and last.endswith("y") and last[-2] not in "aeiou":
        last = last[:-1] + "ies"
    else:
        last += "s"
    return f"{head} {last}" if head else last


def _phrase(text):
    return tuple(word for word, _, _ in facts_lib.tokenize(text))


def _unhyphenated(text):
    """text with every hyphen between two letters a space ("hot-dogs" -> "hot dogs"); the same length."""
    return re.sub(r"(?<=[^\W\d_])-(?=[^\W\d_])", " ", text)


def _ends_negation(word, previous, negator):
    """Whether `word` (not an object name; `previous` the word before it) closes the negation `negator` opened: a
    preposition other than "of", or, after a noun-phrase negator ("no", "without" ...), a participle that starts
    a new phrase (not one right after the negator or an article: "no sleeping cats" denies the cats)."""
    noun_phrase = negator not in VERB_NEGATORS
    return word in SCOPE_PREPOSITIONS or (noun_phrase and previous not in NEGATORS | {"a", "an", "the", "any"}
                                          and (word.endswith("ing") or word in CLAUSE_VERBS))


class ObjectVocabulary:
    """Phrases (token tuples) that name object categories, matched longest first. `phrases`:
    {category: [singular phrases]}; plurals are added by `plural` unless `add_plurals` is False; `ignore`
    phrases are matched and dropped (they contain a category word but do not mention the object)."""

    def __init__(self, phrases, add_plurals=True, ignore=()):
        self.categories = sorted(phrases)
        self.table = {}
        for category, forms in phrases.items():
            for form in forms:
                for variant in ([form, plural(form)] if add_plurals else [form]):
                    self.table.setdefault(_phrase(_unhyphenated(variant)), category)
        for form in ignore:
            for variant in (form, plural(form)):
                self.table[_phrase(_unhyphenated(variant))] = None
        self.longest = max(len(key) for key in self.table)

    def mentions(self, text):
        """Every mention in text order: {"category", "span": [start, end], "negated"}. Hyphens between letters
        count as spaces ("hot-dogs" are hot dogs, not dogs). A negation word (NEGATORS) opens a scope, and a
        mention inside it is negated. The scope ends (a) at a clause break (punctuation, "but", "and": "the dog is
        not brown and has a frisbee" claims the frisbee); (b) at a preposition other than "of" ("the cat is not on
        the couch": the couch is claimed; "no sign of any dogs": no dog); (c) after a noun-phrase negator ("no",
        "without", ...) also at a word that names no object and starts a new phrase, a participle ("without a hat
        holding a dog") or a clause verb (CLAUSE_VERBS: "a man without shoes rides a bicycle"), unless it follows
        the negator or an article ("no sleeping cats"), and never after "not" / "never" ("not wearing a tie" denies
        the tie); (d) right after the first object mentioned in it, unless "or" / "nor" follows ("there isn't a
        zebra or a giraffe" denies both)."""
        tokens = facts_lib.tokenize(_unhyphenated(text))
        found, negator, i = [], None, 0   # negator: the word that opened the current scope, None outside one
        while i < len(tokens):
            word = tokens[i][0]
            if word in CLAUSE_BREAKS or word == "and":
                negator, i = None, i + 1
                continue
            length = self._match(tokens, i)
            if not length:
                if word in NEGATORS:
                    negator = word
                elif negator and _ends_negation(word, tokens[i - 1][0], negator):
                    negator = None
                i += 1
                continue
            category = self.table[tuple(t[0] for t in tokens[i:i + length])]
            if category is not None:
                found.append({"category": category, "span": [tokens[i][1], tokens[i + length - 1][2]],
                              "negated": negator is not None})
                after = tokens[i + length][0] if i + length < len(tokens) else ""
                if after not in ("or", "nor"):
                    negator = None
            i += length
        return found

    def _match(self, tokens, i):
        for length in range(min(self.longest, len(tokens) - i), 0, -1):
            if tuple(t[0] for t in tokens[i:i + length]) in self.table:
                return length
        return 0


def coco_vocabulary():
    """CHAIR's vocabulary for real images: the 80 COCO categories (coco_synonyms)."""
    return ObjectVocabulary(COCO_SYNONYMS, ignore=NOT_OBJECTS)


def world_vocabulary():
    """CHAIR's vocabulary for the synthetic world: its shape words and their plurals (language)."""
    forms = {shape: language.SHAPE_WORDS[shape] + language.SHAPE_PLURALS[shape] for shape in language.SHAPES}
    return ObjectVocabulary(forms, add_plurals=False)


def chair_counts(text, truth, vocabulary):
    """CHAIR counts of one description against the set of true categories: non-negated object mentions and the
    hallucinated ones among them (every mention, for CHAIR_i), the distinct true categories mentioned and the
    true ones (recall), and the mentions themselves (for highlighting)."""
    mentions = vocabulary.mentions(text)
    claimed = [m["category"] for m in mentions if not m["negated"]]
    truth = set(truth)
    hallucinated = [category for category in claimed if category not in truth]
    return {"chair_mentioned": len(claimed), "chair_hallucinated": len(hallucinated),
            "chair_caption_hallucinated": int(bool(hallucinated)), "chair_truth": len(truth),
            "chair_covered": len(set(claimed) & truth), "hallucinated_objects": sorted(set(hallucinated)),
            "mentions": [{**m, "correct": None if m["negated"] else m["category"] in truth} for m in mentions]}


def chair_metrics(texts, truths, vocabulary):
    """CHAIR_s, CHAIR_i and recall over descriptions (ratio of sums), with the counts."""
    rows = [chair_counts(text, truth, vocabulary) for text, truth in zip(texts, truths, strict=True)]
    total = {key: sum(r[key] for r in rows) for key in ("chair_mentioned", "chair_hallucinated",
                                                        "chair_caption_hallucinated", "chair_truth", "chair_covered")}
    return {**total, "n": len(rows), "chair_s": _ratio(total["chair_caption_hallucinated"], len(rows)),
            "chair_i": _ratio(total["chair_hallucinated"], total["chair_mentioned"]),
            "recall": _ratio(total["chair_covered"], total["chair_truth"])}


# ============================================================================================ metrics as ratios

def _pope_metric_defs(sampler):
    c = {key: f"pope_{sampler}_{key}" for key in ("tp", "fp", "tn", "fn")}
    every = {c["tp"]: 1, c["fp"]: 1, c["tn"]: 1, c["fn"]: 1}
    return {f"pope_{sampler}_accuracy": ({c["tp"]: 1, c["tn"]: 1}, every),
            f"pope_{sampler}_precision": ({c["tp"]: 1}, {c["tp"]: 1, c["fp"]: 1}),
            f"pope_{sampler}_recall": ({c["tp"]: 1}, {c["tp"]: 1, c["fn"]: 1}),
            f"pope_{sampler}_f1": ({c["tp"]: 2}, {c["tp"]: 2, c["fp"]: 1, c["fn"]: 1}),
            f"pope_{sampler}_yes_ratio": ({c["tp"]: 1, c["fp"]: 1}, every)}


# name -> (numerator weights, denominator weights) over per-image count keys; "images" counts 1 per description.
METRICS = {
    "object_halluc": ({"n_object_false": 1}, {"n_object_judged": 1}),
    "attribute_halluc": ({"n_attribute_false": 1}, {"n_attribute_judged": 1}),
    "colour_halluc": ({"n_colour_false": 1}, {"n_colour_judged": 1}),
    "size_halluc": ({"n_size_false": 1}, {"n_size_judged": 1}),
    "relation_halluc": ({"n_relation_false": 1}, {"n_relation_judged": 1}),
    "coverage": ({"n_covered": 1}, {"n_scene_objects": 1}),
    "chair_s": ({"chair_caption_hallucinated": 1}, {"images": 1}),
    "chair_i": ({"chair_hallucinated": 1}, {"chair_mentioned": 1}),
    "chair_recall": ({"chair_covered": 1}, {"chair_truth": 1}),
    "words": ({"n_words": 1}, {"images": 1}),
    # Sentences per description: rewarded policies write "a X. a Y." for "a X and a Y" (benchmarks/MEASUREMENTS.md "Split sentences").
    "sentences": ({"n_sentences": 1}, {"images": 1}),
    # Share of sentences that repeat an earlier one of the description word for word: every mention is a claim of the
    # rates above, so a policy that says a correct sentence again lowers its rates without saying anything new.
    "repeated_sentences": ({"n_duplicate_sentences": 1}, {"n_sentences": 1}),
    # Per description, not per claim: a policy that states fewer sizes changes the attribute rate's mix of
    # colour and size claims; its wrong attributes per description do not depend on that mix.
    "attribute_errors": ({"n_attribute_false": 1}, {"images": 1}),
    "size_claims": ({"n_size_judged": 1}, {"images": 1}),
    **{name: d for sampler in POPE_SAMPLERS for name, d in _pope_metric_defs(sampler).items()},
    "mmhal_score": ({"mmhal_rating": 1}, {"mmhal_rated": 1}),
    "mmhal_halluc": ({"mmhal_hallucinated": 1}, {"mmhal_rated": 1}),
    "llava_bench_relative": ({"llava_model_score": 100}, {"llava_reference_score": 1}),
}
# Which way is better, for the verdicts of the comparison tables; the rest (words, sentences, size claims, POPE
# yes-ratio) have no better direction.
LOWER_IS_BETTER = {"object_halluc", "attribute_halluc", "colour_halluc", "size_halluc", "relation_halluc",
                   "attribute_errors", "chair_s", "chair_i", "mmhal_halluc"}
HIGHER_IS_BETTER = {"coverage", "chair_recall", "mmhal_score", "llava_bench_relative",
                    *(f"pope_{sampler}_{key}" for sampler in POPE_SAMPLERS
                      for key in ("accuracy", "precision", "recall", "f1"))}
SCORER_COUNT_KEYS = ("n_object_judged", "n_object_false", "n_attribute_judged", "n_attribute_false",
                     "n_colour_judged", "n_colour_false", "n_size_judged", "n_size_false", "n_relation_judged",
                     "n_relation_false", "n_covered", "n_scene_objects", "n_words", "n_sentences",
                     "n_duplicate_sentences")


def _count_matrix(records, keys):
    return np.array([[float(r["counts"].get(key, 0)) for key in keys] for r in records]).reshape(len(records),
                                                                                                    len(keys))


def _weights(definition, keys):
    vector = np.zeros(len(keys))
    for key, weight in definition.items():
        vector[keys.index(key)] = weight
    return vector


def _metric_arrays(counts, keys, name):
    """Per-image (numerators, denominators) of metric `name` from a count matrix whose columns are `keys`."""
    numerator, denominator = METRICS[name]
    return counts @ _weights(numerator, keys), counts @ _weights(denominator, keys)


def resample_weights(n, n_resamples, seed):
    """(n_resamples, n) bootstrap weights: how often each of n items is drawn in each resample."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n, np.full(n, 1.0 / n), size=n_resamples).astype(float)


def _divide_or_nan(top, bottom):
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(bottom > 0, top / np.where(bottom > 0, bottom, 1), np.nan)


def _ratio_draws(weights, numerators, denominators):
    """Ratio of weighted sums per resample (nan where the denominator is 0)."""
    return _divide_or_nan(weights @ numerators, weights @ denominators)


def _interval(draws, confidence):
    draws = draws[~np.isnan(draws)]
    if not len(draws):
        return None, None
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(draws, [tail, 100 - tail])
    return float(low), float(high)


def bootstrap_ratio(numerators, denominators, n_resamples=1000, confidence=0.95, seed=0, weights=None):
    """sum(numerators) / sum(denominators) over items, with its percentile bootstrap interval (items resampled
    with replacement): {"value", "low", "high", "n"}; value None when the denominator is 0; n: the items that carry
    the metric (denominator > 0: a description with no attribute claim adds nothing to the attribute rate)."""
    numerators, denominators = np.asarray(numerators, float), np.asarray(denominators, float)
    weights = resample_weights(len(numerators), n_resamples, seed) if weights is None else weights
    low, high = _interval(_ratio_draws(weights, numerators, denominators), confidence)
    return {"value": _ratio(float(numerators.sum()), float(denominators.sum())), "low": low, "high": high,
            "n": int(np.count_nonzero(denominators > 0))}


def paired_bootstrap(numerators_a, denominators_a, numerators_b, denominators_b, n_resamples=1000,
                     confidence=0.95, seed=0, weights=None):
    """Difference of a ratio metric, policy a minus policy b, on the same items (aligned arrays), with its
    interval and a two-sided p-value: the share of resampled differences, centred on the observed one, at least
    as far from it as the observed difference is from 0 ((count + 1) / (resamples + 1))."""
    arrays = [np.asarray(x, float) for x in (numerators_a, denominators_a, numerators_b, denominators_b)]
    n = len(arrays[0])
    weights = resample_weights(n, n_resamples, seed) if weights is None else weights
    value_a, value_b = _ratio(arrays[0].sum(), arrays[1].sum()), _ratio(arrays[2].sum(), arrays[3].sum())
    if value_a is None or value_b is None:
        return {"a": value_a, "b": value_b, "diff": None, "low": None, "high": None, "p": None, "n": n}
    draws = _ratio_draws(weights, arrays[0], arrays[1]) - _ratio_draws(weights, arrays[2], arrays[3])
    return {"a": float(value_a), "b": float(value_b), **_difference(value_a - value_b, draws, confidence), "n": n}


def _p_text(p):
    return "n/a" if p is None else f"{p:.3f}"


def _difference(diff, draws, confidence):
    """The observed difference, its percentile interval and two-sided p from resampled differences."""
    draws = draws[~np.isnan(draws)]
    low, high = _interval(draws, confidence)
    if not len(draws):   # no resample (bootstrap 0, or none defined): no test was run
        return {"diff": float(diff), "low": None, "high": None, "p": None}
    extreme = np.sum(np.abs(draws - diff) >= abs(diff) - 1e-12)
    return {"diff": float(diff), "low": low, "high": high, "p": float((extreme + 1) / (len(draws) + 1))}


def _metric_names(records):
    """The METRICS measured on `records`: every key of the numerator and the denominator is in their counts."""
    present = set().union(*(r["counts"] for r in records)) if records else set()
    return [name for name, (num, den) in METRICS.items() if set(num) | set(den) <= present]


def _by_policy_split(records):
    grouped = defaultdict(lambda: defaultdict(list))
    for record in records:
        grouped[record["policy"]][record["split"]].append(record)
    return grouped


def _split_seed(seed, split):
    return int(hashlib.sha256(f"{seed}:{split}".encode()).hexdigest()[:8], 16)


def summarise(records, n_resamples=1000, confidence=0.95, seed=0):
    """{policy: {split: {metric: {"value", "low", "high", "n"}}}} for every metric whose counts the records of
    that split carry. One set of resampling weights per (policy, split) serves every metric."""
    summary = {}
    for policy, splits in _by_policy_split(records).items():
        summary[policy] = {}
        for split, rows in splits.items():
            rows = sorted(rows, key=lambda r: str(r["image_id"]))
            names = _metric_names(rows)
            keys = sorted({key for name in names for part in METRICS[name] for key in part})
            counts = _count_matrix(rows, keys)
            weights = resample_weights(len(rows), n_resamples, _split_seed(seed, split))
            summary[policy][split] = {name: bootstrap_ratio(*_metric_arrays(counts, keys, name),
                                                            confidence=confidence, weights=weights)
                                      for name in names}
    return summary


def paired_tests(records, baseline, n_resamples=1000, confidence=0.95, seed=0):
    """{policy: {split: {metric: paired_bootstrap(policy vs baseline)}}} for every other policy, on the images
    both have in that split with counts (a judged item whose answer could not be read has none; the same
    resampling weights for both)."""
    grouped = _by_policy_split(records)
    if baseline not in grouped:
        raise ValueError(f"paired_tests: baseline policy {baseline!r} has no records (policies: {sorted(grouped)})")
    tests = {}
    for policy, splits in grouped.items():
        if policy == baseline:
            continue
        tests[policy] = {}
        for split, rows in splits.items():
            base_rows = {r["image_id"]: r for r in grouped[baseline].get(split, [])}
            pairs = sorted(((r, base_rows[r["image_id"]]) for r in rows
                            if r["image_id"] in base_rows and r["counts"] and base_rows[r["image_id"]]["counts"]),
                           key=lambda pair: str(pair[0]["image_id"]))
            if not pairs:
                continue
            mine, theirs = [p[0] for p in pairs], [p[1] for p in pairs]
            names = [n for n in _metric_names(mine) if n in _metric_names(theirs)]
            keys = sorted({key for name in names for part in METRICS[name] for key in part})
            a, b = _count_matrix(mine, keys), _count_matrix(theirs, keys)
            weights = resample_weights(len(pairs), n_resamples, _split_seed(seed, split))
            tests[policy][split] = {
                name: paired_bootstrap(*_metric_arrays(a, keys, name), *_metric_arrays(b, keys, name),
                                       confidence=confidence, weights=weights) for name in names}
    return tests


def seed_pooled_bootstrap(numerators_a, denominators_a, numerators_b, denominators_b, n_resamples=1000,
                          confidence=0.95, seed=0, image_weights=None):
    """Difference of a ratio metric between two methods, each trained with several seeds, on the same images:
    arrays of shape (seeds, images), every method's seeds pooled (counts summed over seeds). A resample draws the
    images with replacement (the same weights for both methods: paired) and, independently per method, its seeds
    with replacement, so the interval and the two-sided p (as in paired_bootstrap) carry seed-to-seed variation
    as well as image sampling. With one seed per method this is paired_bootstrap."""
    arrays = [np.atleast_2d(np.asarray(x, float)) for x in (numerators_a, denominators_a, numerators_b, denominators_b)]
    n_images = arrays[0].shape[1]
    if any(a.shape[1] != n_images for a in arrays):
        raise ValueError(f"seed_pooled_bootstrap: every array needs the same images, got shapes "
                         f"{[a.shape for a in arrays]}")
    rng = np.random.default_rng([seed, 1])   # the seeds' draws: a stream of its own beside the images' (seed)
    image_weights = resample_weights(n_images, n_resamples, seed) if image_weights is None else image_weights

    def pooled_draws(numerators, denominators):
        n_seeds = len(numerators)
        seed_weights = rng.multinomial(n_seeds, np.full(n_seeds, 1.0 / n_seeds), size=len(image_weights))
        return _divide_or_nan(np.einsum("rs,rn,sn->r", seed_weights, image_weights, numerators),
                              np.einsum("rs,rn,sn->r", seed_weights, image_weights, denominators))

    value_a, value_b = _ratio(arrays[0].sum(), arrays[1].sum()), _ratio(arrays[2].sum(), arrays[3].sum())
    result = {"a": value_a, "b": value_b, "seeds_a": len(arrays[0]), "seeds_b": len(arrays[2]), "n": n_images}
    if value_a is None or value_b is None:
        return dict(result, diff=None, low=None, high=None, p=None)
    draws = pooled_draws(arrays[0], arrays[1]) - pooled_draws(arrays[2], arrays[3])
    return dict(result, a=float(value_a), b=float(value_b), **_difference(value_a - value_b, draws, confidence))


def seed_pooled_tests(records, groups, pairs, split, metrics, n_resamples=1000, confidence=0.95, seed=0):
    """{(a, b): {metric: seed_pooled_bootstrap}} for each (a, b) in `pairs`, where `groups` maps a method to the
    policy labels of its seeds in `records` (stage 06's records.jsonl), on the images of `split` every policy of
    the two methods has with counts. ValueError when there is no such image."""
    by_policy = defaultdict(dict)
    for record in records:
        if record["split"] == split:
            by_policy[record["policy"]][record["image_id"]] = record
    missing = sorted({p for g in groups.values() for p in g} - set(by_policy))
    if missing:
        raise ValueError(f"seed_pooled_tests: no {split!r} records of the policies {missing} "
                         f"(policies present: {sorted(by_policy)})")
    keys = sorted({key for name in metrics for part in METRICS[name] for key in part})
    out = {}
    for a, b in pairs:
        policies = groups[a] + groups[b]
        image_ids = sorted(set.intersection(*({i for i, r in by_policy[p].items() if r["counts"]} for p in policies)),
                           key=str)
        if not image_ids:
            raise ValueError(f"seed_pooled_tests: split {split!r}, pair {a}:{b}: no image with counts that every "
                             f"policy of the pair has (policies {policies})")
        arrays = {p: _count_matrix([by_policy[p][i] for i in image_ids], keys) for p in policies}
        weights = resample_weights(len(image_ids), n_resamples, _split_seed(seed, split))
        out[(a, b)] = {}
        for name in metrics:
            per_seed = {p: _metric_arrays(arrays[p], keys, name) for p in policies}
            stack = lambda group, part: np.stack([per_seed[p][part] for p in groups[group]])
            out[(a, b)][name] = seed_pooled_bootstrap(stack(a, 0), stack(a, 1), stack(b, 0), stack(b, 1), n_resamples,
                                                      confidence, seed, image_weights=weights)
    return out


# ============================================================================================ evaluating a policy

def load_policy(base_folder, adapter_folder=None, dtype="float32", device="auto", load_in_4bit=False,
                local_files_only=True):
    """(model, processor): the base LVLM, with a PEFT LoRA adapter folder merged in when one is given and the
    weights are float32; kept as an unmerged adapter on half-precision or 4-bit weights, where merging would round
    a small update away (at the paper's learning rate most of a LoRA update is below bf16's resolution)."""
    model, processor = models.load_lvlm(str(base_folder), dtype=dtype, device=device, load_in_4bit=load_in_4bit,
                                        local_files_only=local_files_only)
    if adapter_folder is not None:
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, str(models.safetensors_adapter(adapter_folder)))
        if dtype == "float32" and not load_in_4bit:
            model = model.merge_and_unload()
        model.eval()
    return model, processor


def policy_cache_name(label, adapter_folder, versions):
    """The file name a policy's records are kept under between runs of this stage: its label and a hash of its
    adapter's files and of the package versions. The folder holding it is named by the stage's fingerprint
    (params, code, inputs), which does not cover a compare run's adapter or the installed packages."""
    digest = hashlib.sha256(json.dumps(versions, sort_keys=True).encode())
    if adapter_folder is not None:
        for path in sorted(p for p in Path(adapter_folder).iterdir() if p.is_file()):
            with open(path, "rb") as f:
                digest.update(path.name.encode() + b"\0" + hashlib.file_digest(f, "sha256").digest())
    return f"{label}.{digest.hexdigest()[:16]}.jsonl"


def records_of_policy(cache_folder, name, evaluate_fn):
    """(records, kept): one policy's per-image records, read back from cache_folder / name when an earlier run of
    this stage finished that policy (the run was interrupted later, or forced to run again), else evaluate_fn()'s,
    written there atomically before they are returned. An unreadable file is evaluated again, with a warning."""
    path = Path(cache_folder) / name
    if path.is_file():
        try:
            return _read_jsonl_file(path), True
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            warnings.warn(f"{path}: unreadable kept records ({err}); evaluating the policy again")
    records = evaluate_fn()
    world.write_jsonl(path, records)
    return records, False


def evaluate_policies(sources, base_path, params, inputs, kept_records, judge=None, versions=None):
    """Every policy of `sources` ({label: adapter folder or None}) on the same images and questions, one in memory
    at a time: its records read back from `kept_records` when an earlier run of this stage finished it, else
    evaluated (evaluate_policy, and the judged benchmarks when `judge` is given) and kept there. `inputs`:
    evaluation_inputs' (scenes_by_split, pope_by_split, load_image, vocabulary, synthetic). Returns the records of
    all policies, in the order of `sources`."""
    scenes_by_split, pope_by_split, load_image, vocabulary, synthetic = inputs
    P, EP = params, params.evaluate
    benchmarks = check_judged_benchmarks(EP) if judge is not None else {}   # before any policy generates

    def evaluate_one(label, adapter):
        model, processor = load_policy(base_path, adapter, P.models.dtype, P.models.device, P.models.load_in_4bit,
                                       P.models.local_files_only)
        rows = evaluate_policy(model, processor, scenes_by_split, load_image, pope_by_split, vocabulary, synthetic,
                               policy=label, prompt=P.sampling.prompt, batch_size=EP.batch_size,
                               max_new_tokens=EP.max_new_tokens, pope_max_new_tokens=EP.pope_max_new_tokens)
        if judge is not None:
            rows += run_judged_benchmarks(model, processor, label, EP, judge, EP.batch_size, benchmarks=benchmarks)
        return rows

    records = []
    for label, adapter in sources.items():
        name = policy_cache_name(label, adapter, versions or {})
        rows, kept = records_of_policy(kept_records, name, lambda: evaluate_one(label, adapter))
        if kept:
            print(f"{label}: {len(rows)} records kept from an earlier run of this stage ({name})")
            if judge is not None and any(row.get("judge", {}).get("status") == "failed" for row in rows):
                rows = judge_failed_again(rows, benchmarks, judge, label)
                world.write_jsonl(Path(kept_records) / name, rows)
        records += rows
        gc.collect()
    return records


def policy_sources(own_adapter, compare_runs, final_dir, problem=None):
    """{label: adapter folder or None}: "base" (no adapter), "fgaif" (this run's adapter) and each compare run
    (its 05_ppo/policy_adapter, labelled by the run name), plus notes for the ones left out: missing, or what
    `problem(run)` says is wrong with it (stage.compare_run_problem: stale, or another base policy).
    final_dir(run, stage) locates a stage's outputs (stage.final_dir)."""
    sources, notes = {"base": None}, []
    candidates = [("fgaif", Path(own_adapter))] + [(run, Path(final_dir(run, "05_ppo")) / "policy_adapter")
                                                   for run in compare_runs]
    for label, folder in candidates:
        why = problem(label) if problem is not None and label != "fgaif" else None
        if label in sources:
            notes.append(f"{label}: the label is taken, skipped")
        elif not (folder / "adapter_config.json").is_file():
            notes.append(f"{label}: no policy adapter at {shown_path(folder)}, skipped")
        elif why:
            notes.append(f"{label}: {why}; skipped")
        else:
            sources[label] = folder
    return sources, notes


def _batched_generate(model, processor, images, prompts, batch_size, max_new_tokens, desc, progress):
    texts = []
    for start in tqdm(range(0, len(prompts), batch_size), desc=desc, disable=not progress, mininterval=2.0):
        _, chunk = models.generate(model, processor, images[start:start + batch_size],
                                   prompts[start:start + batch_size], max_new_tokens=max_new_tokens)
        texts += chunk
    return texts


def describe(model, processor, images, prompt=language.DESCRIBE_PROMPT, batch_size=100, max_new_tokens=64,
             desc="describe", progress=True):
    """Greedy descriptions, one per image."""
    text = models.chat_prompt(processor, prompt)
    return _batched_generate(model, processor, list(images), [text] * len(images), batch_size, max_new_tokens,
                             desc, progress)


def answer_open_questions(model, processor, images, questions, batch_size=100, max_new_tokens=64,
                          desc="answer", progress=True):
    """Greedy answers, one per (image, question) (MMHal-Bench, LLaVA-Bench, POPE)."""
    prompts = [models.chat_prompt(processor, question) for question in questions]
    return _batched_generate(model, processor, list(images), prompts, batch_size, max_new_tokens, desc, progress)


def _pope_counts(rows):
    counts = {}
    for sampler in POPE_SAMPLERS:
        mine = [r for r in rows if r["sampler"] == sampler]
        if mine:
            for key, value in confusion_counts([r["label"] for r in mine], [r["answer"] for r in mine]).items():
                counts[f"pope_{sampler}_{key}"] = value
    return counts


def chair_truth(scene, vocabulary, synthetic):
    """The objects CHAIR counts as present: the scene's objects; on COCO also the objects its reference captions
    name (Rohrbach et al. 2018 take the union: the instance annotations miss objects the captions see)."""
    truth = {obj["shape"] for obj in scene["objects"]}
    if not synthetic:
        truth |= {m["category"] for caption in scene.get("captions", []) for m in vocabulary.mentions(caption)
                  if not m["negated"]}
    return truth


def description_record(text, scene, vocabulary, synthetic):
    """Per-image counts of one description: CHAIR (both worlds) and the ground-truth scorer (synthetic)."""
    truth = chair_truth(scene, vocabulary, synthetic)
    chair = chair_counts(text, truth, vocabulary)
    counts = {"images": 1, **{k: v for k, v in chair.items() if k not in ("mentions", "hallucinated_objects")}}
    record = {"description": text, "mentions": chair["mentions"], "hallucinated_objects": chair["hallucinated_objects"]}
    if synthetic:
        score = scorer.score_description(text, scene)
        counts.update({key: score[key] for key in SCORER_COUNT_KEYS})
        record["facts"] = score["facts"]
    else:
        sentences = [" ".join(text[start:end].lower().split()) for start, end in segment.split_sentences(text)]
        counts["n_words"] = len(text.split())
        counts["n_sentences"] = len(sentences)
        counts["n_duplicate_sentences"] = len(sentences) - len(set(sentences))
    record["counts"] = counts
    return record


def evaluate_policy(model, processor, scenes_by_split, load_image, pope_by_split=None, vocabulary=None,
                    synthetic=True, policy="policy", prompt=language.DESCRIBE_PROMPT, batch_size=100,
                    max_new_tokens=64, progress=True, pope_max_new_tokens=POPE_MAX_NEW_TOKENS):
    """One policy on every split: greedy descriptions (CHAIR; synthetic also the scorer's per-type counts) and
    POPE answers. Returns per-image records {"policy", "split", "image_id", "description", "counts", "pope",
    ...}. pope_by_split: {split: POPE rows}; a row whose image is not among the split's scenes (official POPE
    files) gets its own record, its image loaded from the row (load_image gets {"image_id", "file_name"})."""
    vocabulary = vocabulary or (world_vocabulary() if synthetic else coco_vocabulary())
    records = []
    for split in sorted(set(scenes_by_split) | set(pope_by_split or {}),
                        key=lambda s: (SYNTHETIC_SPLITS + [s]).index(s)):
        scenes = scenes_by_split.get(split, [])
        texts = describe(model, processor, [load_image(s) for s in scenes], prompt, batch_size, max_new_tokens,
                         desc=f"{policy} describe {split}", progress=progress)
        by_id = {}
        for scene, text in zip(scenes, texts):
            by_id[scene["image_id"]] = {"policy": policy, "split": split, "image_id": scene["image_id"],
                                        **description_record(text, scene, vocabulary, synthetic), "pope": []}
        _add_pope(model, processor, (pope_by_split or {}).get(split, []), by_id, scenes, load_image, policy, split,
                  batch_size, pope_max_new_tokens, progress)
        records += list(by_id.values())
    return records


def _add_pope(model, processor, rows, by_id, scenes, load_image, policy, split, batch_size, max_new_tokens,
              progress):
    if not rows:
        return
    scene_of = {scene["image_id"]: scene for scene in scenes}
    sources = [scene_of.get(row["image_id"]) or {"image_id": row["image_id"], "file_name": row.get("image")}
               for row in rows]
    images, cache = [], {}
    for source in sources:
        key = (source["image_id"], source.get("file_name"))
        if key not in cache:
            cache[key] = load_image(source)
        images.append(cache[key])
    raw = answer_open_questions(model, processor, images, [row["text"] for row in rows], batch_size,
                                max_new_tokens, desc=f"{policy} POPE {split}", progress=progress)
    for row, text in zip(rows, raw):
        record = by_id.setdefault(row["image_id"], {"policy": policy, "split": split, "image_id": row["image_id"],
                                                    "counts": {}, "pope": []})
        record["pope"].append({**row, "raw_answer": text, "answer": pope_answer(text)})
    for record in by_id.values():
        record["counts"].update(_pope_counts(record["pope"]))


def evaluation_inputs(params, data_dir, n_images=None):
    """What every policy is evaluated on: ({split: scenes}, {split: POPE rows}, load_image, vocabulary,
    synthetic). Synthetic world: the first n_images of eval, eval_long and eval_ood, POPE from each split's
    instances file. COCO: the first n_images of eval (val2014) and POPE from the official files
    (evaluate.pope_files) or built from val2014's annotations on n_images images with at least
    evaluate.pope_objects categories (coco_pope_rows; split "eval": an image that is not an eval scene gets a
    record of its own, with POPE counts only)."""
    ep = params.evaluate
    n = ep.n_images if n_images is None else n_images
    synthetic = params.data.world == "synthetic"
    splits = SYNTHETIC_SPLITS if synthetic else ["eval"]
    scenes_by_split = {split: world.load_scenes(data_dir, split)[:n] for split in splits}
    pope_by_split = {}
    coco_images = Path(params.data.coco_root) / "val2014"
    if synthetic:
        for split, scenes in scenes_by_split.items():
            instances = json.loads((Path(data_dir) / "annotations" / f"instances_{split}.json").read_text())
            pope_by_split[split] = build_pope(instances, [s["image_id"] for s in scenes], ep.pope_objects,
                                              params.seed, ep.pope_suffix)
    elif ep.pope_files:
        pope_by_split["pope"] = read_pope_folder(ep.pope_files, ep.pope_suffix)
        # found before any policy generates (they are read after each policy's descriptions, all from val2014)
        missing = sorted({row["image"] for row in pope_by_split["pope"] if not (coco_images / row["image"]).is_file()})
        if missing:
            raise FileNotFoundError(f"the POPE files in {ep.pope_files} name {len(missing)} image(s) not in "
                                    f"{coco_images}: {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
    else:
        instances = json.loads((Path(params.data.coco_root) / "annotations" / "instances_val2014.json").read_text())
        pope_by_split["eval"] = coco_pope_rows(instances, [s["image_id"] for s in scenes_by_split["eval"]], n,
                                               ep.pope_objects, params.seed, ep.pope_suffix)

    def load_image(source):
        name = source.get("file_name")
        if name and not synthetic and not Path(name).is_absolute():
            source = {**source, "file_name": str(coco_images / name)}
        return world.load_image(data_dir, source)

    vocabulary = world_vocabulary() if synthetic else coco_vocabulary()
    return scenes_by_split, pope_by_split, load_image, vocabulary, synthetic


# ============================================================================================ GPT judges

MMHAL_SYSTEM = ("You are a careful judge of answers that a vision-language model gave about images. You cannot "
                "see the image; you are given the objects annotated in it, the question, a human reference answer "
                "and the model's answer.")
MMHAL_SCALE = """Judge the model's answer for informativeness and for hallucination (a claim about the image that
the annotated contents or the reference answer contradict, or that they do not support). Rate it:
6 - very informative with good analysis or reasoning, no hallucination
5 - very informative, no hallucination
4 - somewhat informative, no hallucination
3 - not informative, no hallucination
2 - very informative, with hallucination
1 - somewhat informative, with hallucination
0 - not informative, with hallucination
Explain briefly, then end with a last line of the form "Rating: <0-6>"."""

LLAVA_SYSTEM = "You are a helpful and precise assistant for checking the quality of the answer."
LLAVA_RULE = """Above are a question about an image, described by its context, and the answers of two AI
assistants. Rate the helpfulness, relevance, accuracy and level of detail of each answer with an overall score from
1 to 10, where a higher score means a better answer. On the first line write only the two scores, Assistant 1's and
Assistant 2's, separated by a space. From the next line on, explain your judgement, avoiding any bias from the order
in which the answers were given."""


def mmhal_messages(item, answer):
    """The judge request for one MMHal-Bench item (question_type, image_content, question, gt_answer)."""
    contents = ", ".join(str(c) for c in item.get("image_content", [])) or "(none given)"
    user = (f"Question type: {item.get('question_type', '')}\nImage contents: {contents}\n\n"
            f"Question: {item['question']}\n\nReference answer: {item['gt_answer']}\n\nModel answer: {answer}\n\n"
            f"{MMHAL_SCALE}")
    return [{"role": "system", "content": MMHAL_SYSTEM}, {"role": "user", "content": user}]


def parse_mmhal_rating(content):
    """(rating 0-6, None) from the judge's last "Rating: N", else (None, what is wrong)."""
    found = re.findall(r"rating\s*[:=]?\s*\**\s*(-?\d+(?:\.\d+)?)", content or "", flags=re.IGNORECASE)
    if not found:
        return None, 'no "Rating: N" line in the judge answer'
    value = float(found[-1])
    if value != int(value) or not 0 <= value <= 6:
        return None, f"rating {found[-1]} is not an integer from 0 to 6"
    return int(value), None


def llava_bench_messages(context, question, reference, answer):
    """The judge request for one LLaVA-Bench item: the reference (GPT-4) answer is Assistant 1, the model's 2."""
    user = (f"[Context]\n{context}\n\n[Question]\n{question}\n\n[Assistant 1]\n{reference}\n\n"
            f"[End of Assistant 1]\n\n[Assistant 2]\n{answer}\n\n[End of Assistant 2]\n\n[System]\n{LLAVA_RULE}\n\n")
    return [{"role": "system", "content": LLAVA_SYSTEM}, {"role": "user", "content": user}]


def parse_pair_scores(content):
    """((reference score, model score), None) from the judge's first line, else (None, what is wrong). As in
    LLaVA's own script, the first line, commas read as spaces, must be exactly two numbers ("8 9", "8, 9"). A
    reference scored 0 is kept: the relative score is a ratio of sums over items, not of each item's scores."""
    lines = [line for line in (content or "").strip().splitlines() if line.strip()]
    if not lines:
        return None, "the judge answer is empty"
    numbers = lines[0].replace(",", " ").split()
    if len(numbers) != 2 or not all(re.fullmatch(r"-?\d+(?:\.\d+)?", x) for x in numbers):
        return None, f"the first line must be exactly two scores, got {lines[0][:80]!r}"
    scores = tuple(float(x) for x in numbers)
    if not all(0 <= s <= 10 for s in scores):
        return None, f"scores must be from 0 to 10, got {scores}"
    return scores, None


PARSERS = {"mmhal": parse_mmhal_rating, "llava_bench": parse_pair_scores}


class Judge(llm.ChatBackend):
    """An OpenAI-compatible judge with the shared client, retries, concurrency and a per-item disk cache.

    The judge's raw answer is cached (failed calls are not), and parsed on every read: a parser fix never needs
    a new call, and a malformed answer stays a per-item status "malformed" with the reason."""

    def __init__(self, model, base_url=None, cache_dir=None, max_tokens=512, **knobs):
        super().__init__(model, base_url=base_url, cache_dir=cache_dir, **knobs)
        self.max_tokens = max_tokens

    def judge_many(self, kind, message_lists):
        """One {"value", "status" ("ok" | "malformed" | "failed"), "error", "raw", "cached"} per request."""
        if kind not in PARSERS:
            raise ValueError(f"unknown judge kind {kind!r}; expected one of {sorted(PARSERS)}")
        return self._run_parallel(lambda messages: self.judge_one(kind, messages), [(m,) for m in message_lists],
                                  desc=f"judge {kind} ({self.model})")

    def judge_one(self, kind, messages):
        # Everything that can change the answer: the endpoint and every knob _create sends.
        key = llm.request_key({"model": self.model, "base_url": self.base_url, "temperature": self.temperature,
                               "messages": messages, "max_tokens": self.max_tokens})
        cached = self.cache.load(key)
        if cached is not None:
            self._count(cache_hits=1)
            raw = cached["raw"]
        else:
            try:
                raw = self._create(messages=messages, max_tokens=self.max_tokens)
            except llm.CallFailed as error:
                self._count(failures=1)
                return {"value": None, "status": "failed", "error": str(error), "raw": None, "cached": False}
            self.cache.save(key, {"model": self.model, "kind": kind, "raw": raw})
        value, problem = PARSERS[kind](raw)
        return {"value": value, "status": "ok" if problem is None else "malformed", "error": problem, "raw": raw,
                "cached": cached is not None}


def make_judge(ep, cache_dir, **knobs):
    """The judge of EvaluateParams: judge_model at judge_base_url, with the key of the variable judge_api_key_env
    names (by default OPENAI_API_KEY for the OpenAI API and no key for a judge_base_url)."""
    return Judge(ep.judge_model, base_url=ep.judge_base_url or None, api_key_env=ep.judge_api_key_env,
                 cache_dir=cache_dir, **knobs)


def _find_image(folder, name):
    for candidate in (Path(folder) / "images" / name, Path(folder) / name):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"image {name!r} not found in {Path(folder) / 'images'} or {folder}")


def load_mmhal(folder):
    """MMHal-Bench items (response_template.json) with "image_path": images/<basename of image_src>."""
    path = Path(folder) / "response_template.json"
    try:
        items = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not a readable MMHal-Bench template ({err})") from err
    if not isinstance(items, list):
        raise ValueError(f"{path}: expected a JSON list of items, got {type(items).__name__}")
    for n, item in enumerate(items):
        missing = [key for key in ("image_src", "question") if not isinstance(item, dict) or key not in item]
        if missing:
            raise ValueError(f"{path}: item {n} has no {missing}")
    return [{**item, "image_path": str(_find_image(folder, Path(str(item["image_src"])).name))} for item in items]


def _read_jsonl_file(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _read_benchmark_jsonl(path, keys):
    """[(line number, object)] of a benchmark's JSONL file, every line an object with `keys`; errors name the file
    and the line."""
    rows = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: not a JSON object ({error.msg})") from None
        missing = [key for key in keys if not isinstance(row, dict) or key not in row]
        if missing:
            raise ValueError(f"{path}:{number}: no {missing} in {line[:200]}")
        rows.append((number, row))
    return rows


def load_llava_bench(folder):
    """LLaVA-Bench in-the-wild items: question (questions.jsonl), context caption (context.jsonl, by image),
    reference answer (answers_gpt4.jsonl, by question_id) and "image_path"."""
    folder = Path(folder)
    context = {c["image"]: c["caption"]
               for _, c in _read_benchmark_jsonl(folder / "context.jsonl", ("image", "caption"))}
    reference = {a["question_id"]: a["text"]
                 for _, a in _read_benchmark_jsonl(folder / "answers_gpt4.jsonl", ("question_id", "text"))}
    items = []
    for _, q in _read_benchmark_jsonl(folder / "questions.jsonl", ("question_id", "image", "text")):
        if q["question_id"] not in reference:
            raise ValueError(f"{folder / 'answers_gpt4.jsonl'}: no reference answer for question {q['question_id']}")
        items.append({"question_id": q["question_id"], "image": q["image"], "question": q["text"],
                      "category": q.get("category"), "context": context.get(q["image"], ""),
                      "reference": reference[q["question_id"]], "image_path": str(_find_image(folder, q["image"]))})
    return items


def _warn_unjudged(records, split, policy):
    """A warning when some judge answers are not "ok": their items have no counts and are left out."""
    statuses = Counter(r["judge"]["status"] for r in records if r["judge"]["status"] != "ok")
    if statuses:
        warnings.warn(f"{split}: {sum(statuses.values())} of {len(records)} judge answers for policy {policy!r} "
                      f"were not usable ({dict(statuses)}); those items are left out of its averages and of the "
                      "paired tests")


def judge_mmhal(judge, items, answers, policy):
    """Per-item records (split "mmhal") with the rating; counts only for readable ratings (a warning for the
    others)."""
    results = judge.judge_many("mmhal", [mmhal_messages(item, answer) for item, answer in zip(items, answers,
                                                                                              strict=True)])
    records = []
    for index, (item, answer, result) in enumerate(zip(items, answers, results)):
        rating = result["value"]
        counts = {} if rating is None else {"mmhal_rating": rating, "mmhal_hallucinated": int(rating < 3),
                                            "mmhal_rated": 1}
        records.append({"policy": policy, "split": "mmhal", "image_id": index, "question": item["question"],
                        "answer": answer, "judge": result, "counts": counts})
    _warn_unjudged(records, "mmhal", policy)
    return records


def judge_llava_bench(judge, items, answers, policy):
    """Per-item records (split "llava_bench") with the judge's (reference, model) scores; counts only for readable
    scores (a warning for the others)."""
    results = judge.judge_many("llava_bench", [
        llava_bench_messages(item["context"], item["question"], item["reference"], answer)
        for item, answer in zip(items, answers, strict=True)])
    records = []
    for item, answer, result in zip(items, answers, results):
        counts = {} if result["value"] is None else {"llava_reference_score": result["value"][0],
                                                     "llava_model_score": result["value"][1]}
        records.append({"policy": policy, "split": "llava_bench", "image_id": item["question_id"],
                        "category": item.get("category"), "question": item["question"], "answer": answer,
                        "judge": result, "counts": counts})
    _warn_unjudged(records, "llava_bench", policy)
    return records


def _load_image_file(path):
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def check_judged_benchmarks(ep):
    """{benchmark: items} of the judged benchmarks' folders that are set, read and every image found: called before
    any policy generates, so a malformed file or a missing image stops the stage before hours of generation, with
    the file (and line or item) named."""
    return {name: load(path) for name, path, load in (("mmhal", ep.mmhal_path, load_mmhal),
                                                       ("llava_bench", ep.llava_bench_path, load_llava_bench)) if path}


JUDGES = {"mmhal": judge_mmhal, "llava_bench": judge_llava_bench}   # benchmark (and record split) -> its judging


def run_judged_benchmarks(model, processor, policy, ep, judge, batch_size=8, max_new_tokens=512, progress=True,
                          benchmarks=None):
    """MMHal-Bench and LLaVA-Bench (the folders of EvaluateParams that are set; `benchmarks`, check_judged_benchmarks'
    items, when already read): the policy's greedy answers, judged. Returns per-item records (splits "mmhal" and
    "llava_bench")."""
    records = []
    for name, items in (check_judged_benchmarks(ep) if benchmarks is None else benchmarks).items():
        answers = answer_open_questions(model, processor, [_load_image_file(i["image_path"]) for i in items],
                                        [i["question"] for i in items], batch_size, max_new_tokens,
                                        desc=f"{policy} {name}", progress=progress)
        records += JUDGES[name](judge, items, answers, policy)
    return records


def judge_failed_again(records, benchmarks, judge, policy):
    """A kept policy's records with each judged benchmark (`benchmarks`: check_judged_benchmarks' items) judged again
    where a call had failed (an outage, a rotated key: failures are never cached, so only they are asked again; the
    policy's stored answers are judged, nothing is generated)."""
    again = [record for record in records if record["split"] not in JUDGES]
    for name, judge_items in JUDGES.items():
        mine = [record for record in records if record["split"] == name]
        if any(record["judge"]["status"] == "failed" for record in mine) and len(benchmarks.get(name, [])) == len(mine):
            mine = judge_items(judge, benchmarks[name], [record["answer"] for record in mine], policy)
        again += mine
    return again


def judge_status_counts(records):
    """{split: {status: n}} over judged records."""
    table = defaultdict(Counter)
    for record in records:
        if "judge" in record:
            table[record["split"]][record["judge"]["status"]] += 1
    return {split: dict(counts) for split, counts in table.items()}


# ============================================================================================ comparison

def verdict(metric, test, alpha=0.05):
    """"better" or "worse" for the first of the two compared (a − b) when the paired p is under `alpha` and the
    metric has a better direction; "n.s." when p >= alpha; "" when the metric has no direction or was not measured."""
    if not test or test.get("diff") is None or test.get("p") is None:
        return ""
    sign = -1 if metric in LOWER_IS_BETTER else 1 if metric in HIGHER_IS_BETTER else 0
    if sign == 0:
        return ""
    if test["p"] >= alpha:
        return "n.s."
    return "better" if sign * test["diff"] > 0 else "worse"


def _fmt(value, digits=3):
    return "–" if value is None else f"{value:.{digits}f}"


def _signed(value):
    return "n/a" if value is None else f"{value:+.3f}"


def _verdict_suffix(metric, test):
    word = verdict(metric, test)
    return f" {word}" if word in ("better", "worse") else ""


def _cell(entry):
    if entry is None or entry["value"] is None:
        return "–"
    return f"{_fmt(entry['value'])} [{_fmt(entry['low'])}, {_fmt(entry['high'])}]"


def _splits_and_metrics(summary):
    splits = {}
    for per_split in summary.values():
        for split, metrics in per_split.items():
            names = splits.setdefault(split, [])
            names += [m for m in metrics if m not in names]
    return {split: [m for m in METRICS if m in names] for split, names in splits.items()}


def results_markdown(summary, tests=None, confidence=0.95):
    """Per split, a table: one row per metric, one column per policy, "value [low, high]"; with `tests`
    (paired_tests against the baseline), a column per compared policy with the difference, p and, where p < 0.05,
    whether the policy is better or worse than the baseline on that metric."""
    tests = tests or {}
    lines = [f"Values with {confidence:.0%} bootstrap intervals (images resampled); Δ = policy − baseline, "
             f"p = paired bootstrap, two-sided; \"better\" / \"worse\" where p < 0.05."]
    for split, names in _splits_and_metrics(summary).items():
        policies = [p for p in summary if split in summary[p]]
        compared = [p for p in tests if split in tests[p]]
        header = ["metric"] + policies + [f"Δ {p} (p)" for p in compared]
        lines += ["", f"**{split}**", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for name in names:
            cells = [_cell(summary[p][split].get(name)) for p in policies]
            for p in compared:
                t = tests[p][split].get(name)
                cells.append("–" if not t or t["diff"] is None else
                             f"{t['diff']:+.3f} (p={_p_text(t['p'])})" + _verdict_suffix(name, t))
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def results_csv(summary, tests=None):
    """Long format: policy, split, metric, value, low, high, n, and against the baseline diff, diff_low,
    diff_high, p (empty for the baseline)."""
    tests = tests or {}
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["policy", "split", "metric", "value", "low", "high", "n", "diff", "diff_low", "diff_high", "p"])
    for policy, per_split in summary.items():
        for split, metrics in per_split.items():
            for name, entry in metrics.items():
                t = tests.get(policy, {}).get(split, {}).get(name) or {}
                writer.writerow([policy, split, name] + [entry.get(k) for k in ("value", "low", "high", "n")]
                                + [t.get(k) for k in ("diff", "low", "high", "p")])
    return out.getvalue()


def metrics_figure(summary, split, metrics, title=None):
    """Grouped bars: one group per metric, one bar per policy, error bars = the bootstrap interval."""
    policies = [p for p in summary if split in summary[p]]
    fig = Figure(figsize=(max(5.0, 1.2 * len(metrics) * max(1, len(policies)) ** 0.5 + 2), 3.4))
    ax = fig.subplots()
    width = 0.8 / max(1, len(policies))
    x = np.arange(len(metrics))
    for i, policy in enumerate(policies):
        entries = [summary[policy][split].get(m) or {"value": None} for m in metrics]
        values = np.array([e["value"] if e["value"] is not None else np.nan for e in entries])
        low = np.array([e.get("low") if e.get("low") is not None else np.nan for e in entries])
        high = np.array([e.get("high") if e.get("high") is not None else np.nan for e in entries])
        errors = np.nan_to_num(np.vstack([values - low, high - values]), nan=0.0).clip(min=0)
        ax.bar(x + i * width, np.nan_to_num(values), width, yerr=errors, capsize=3, label=policy,
               edgecolor="black", linewidth=0.5)
    ax.set_xticks(x + width * (len(policies) - 1) / 2)
    ax.set_xticklabels(metrics, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("value")
    ax.set_title(title or split, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _highlighted(record):
    """The description with its facts (synthetic) or CHAIR mentions (COCO) coloured; everything escaped."""
    if "facts" in record:
        return scorer.highlight_html(record["description"], record["facts"])
    marks = [{"type": "object", "subject": m["category"], "negated": m["negated"], "span": m["span"],
              "correct": m["correct"]} for m in record.get("mentions", [])]
    return scorer.highlight_html(record["description"], marks)


def _truth_text(scene):
    return ", ".join(" ".join(str(v) for v in (o.get("size"), o.get("colour"), o["shape"]) if v)
                     for o in scene["objects"])


EXAMPLES_CSS = ("body{font-family:sans-serif;font-size:13px;max-width:1200px} .ex{display:flex;gap:12px;"
                "border-bottom:1px solid #ccc;padding:8px 0} .pol{margin:4px 0} .name{font-weight:bold}")


def examples_html(records, scenes, load_image=None, n=12, split="eval", title="Policies side by side"):
    """A self-contained page: for the first n images of `split` that every policy described, the image, the
    true objects and each policy's description with hallucinations red, correct claims green. All model text,
    names and labels are escaped."""
    by_policy = _by_policy_split([r for r in records if "description" in r])
    policies = [p for p in by_policy if split in by_policy[p]]
    described = {p: {r["image_id"]: r for r in by_policy[p][split]} for p in policies}
    shown = [s for s in scenes if all(s["image_id"] in described[p] for p in policies)][:n]
    blocks = []
    for scene in shown:
        image = image_tag(load_image(scene), style="width:160px;image-rendering:pixelated") if load_image else ""
        rows = "".join(f'<div class="pol"><span class="name">{html.escape(p)}</span>: '
                       f"{_highlighted(described[p][scene['image_id']])}</div>" for p in policies)
        blocks.append(f'<div class="ex">{image}<div><div>image {html.escape(str(scene["image_id"]))} — truth: '
                      f"{html.escape(_truth_text(scene))}</div>{rows}</div></div>")
    return (f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{EXAMPLES_CSS}</style></head><body><h1>{html.escape(title)}</h1>"
            f"<p>Green: correct claim; red: hallucination; grey: not judged.</p>\n" + "\n".join(blocks)
            + "\n</body></html>\n")


def headline_checks(summary, tests, policy="fgaif", baseline="base", split="eval"):
    """The issue's headline for one comparison, as (check, passed or None when it cannot be told, detail) rows:
    object and attribute hallucination lower (disjoint intervals or p < 0.05), relation lower, coverage within
    5 points, POPE F1 (every sampler) not lower (higher, or a decrease with paired p >= 0.05)."""
    mine, base = summary.get(policy, {}).get(split, {}), summary.get(baseline, {}).get(split, {})
    test = tests.get(policy, {}).get(split, {})
    rows = []
    for metric in ("object_halluc", "attribute_halluc", "relation_halluc"):
        a, b, t = mine.get(metric), base.get(metric), test.get(metric)
        if not a or not b or a["value"] is None or b["value"] is None or not t or t["p"] is None:
            rows.append((f"{metric} lower", None, "not measured"))
            continue
        disjoint = a["high"] is not None and b["low"] is not None and a["high"] < b["low"]
        rows.append((f"{metric} lower", a["value"] < b["value"] and (disjoint or t["p"] < 0.05),
                     f"{a['value']:.3f} vs {b['value']:.3f}, p={t['p']:.3f}"))
    cov_a, cov_b = mine.get("coverage"), base.get("coverage")
    if cov_a and cov_b and cov_a["value"] is not None and cov_b["value"] is not None:
        rows.append(("coverage within 5 points", abs(cov_a["value"] - cov_b["value"]) <= 0.05,
                     f"{cov_a['value']:.3f} vs {cov_b['value']:.3f}"))
    for sampler in POPE_SAMPLERS:   # "not lower": no decrease the paired test can tell from noise
        a, b = mine.get(f"pope_{sampler}_f1"), base.get(f"pope_{sampler}_f1")
        p = (test.get(f"pope_{sampler}_f1") or {}).get("p")
        if a and b and a["value"] is not None and b["value"] is not None:
            rows.append((f"POPE {sampler} F1 not lower", a["value"] >= b["value"] or (p is not None and p >= 0.05),
                         f"{a['value']:.3f} vs {b['value']:.3f}" + (f", p={p:.3f}" if p is not None else "")))
    return rows


def ablation_rows(vs_ablations, split="eval", types=("object_halluc", "attribute_halluc", "relation_halluc")):
    """FGAIF against each ablation run at the same PPO steps ({run: paired_tests(...)["fgaif"]}): one row per
    run, passed when FGAIF's rate is lower on at least two of the three types with paired p < 0.05, the bar the
    base comparison sets (a point estimate of -0.000 is no "better"; the detail gives each difference and its p)."""
    rows = []
    for run, per_split in vs_ablations.items():
        tests = per_split.get(split, {})
        measured = {t: tests[t] for t in types if tests.get(t) and tests[t]["diff"] is not None}
        lower = [t for t, test in measured.items() if test["diff"] < 0 and test["p"] is not None and test["p"] < 0.05]
        detail = ", ".join(f"{t} {test['diff']:+.3f} (p={test['p']:.3f})" for t, test in measured.items())
        rows.append((f"fgaif better than {run} on >= 2 of 3 types", len(lower) >= 2 if measured else None,
                     detail or "not measured"))
    return rows


def checks_markdown(rows):
    """A Markdown table of (check, passed, detail) rows."""
    mark = {True: "yes", False: "**no**", None: "–"}
    lines = ["| check | passed | detail |", "|---|---|---|"]
    lines += [f"| {check} | {mark[passed]} | {detail} |" for check, passed, detail in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- attribute words

def attribute_confusions(records, scenes, split="eval"):
    """Which attribute words each policy gets wrong, and how (synthetic world, one split): a Counter per policy of
    ("size", true, said) and ("colour", true, said) over the judged attribute facts; ("binding", kind) for wrong
    values that another object of the scene has (the right word, the wrong shape); ("colour_typical",) for wrong
    colours that are the shape's typical colour (the caption noise of stage 00); ("mentioned", size) and
    ("objects", size) for the scene objects a description mentions (a correct, non-negated object fact), by size."""
    by_id = {scene["image_id"]: {obj["shape"]: obj for obj in scene["objects"]} for scene in scenes}
    counts = defaultdict(Counter)
    for record in records:
        if record.get("split") != split or "facts" not in record or record.get("image_id") not in by_id:
            continue
        objects, policy = by_id[record["image_id"]], counts[record["policy"]]
        for obj in objects.values():
            policy[("objects", obj["size"])] += 1
        mentioned = {f["subject"] for f in record["facts"]
                     if f["type"] == "object" and not f["negated"] and f["correct"]}
        for shape in mentioned:
            policy[("mentioned", objects[shape]["size"])] += 1
        for fact in record["facts"]:
            if fact["type"] != "attribute" or fact["correct"] is None:
                continue
            kind, subject = fact["kind"], objects[fact["subject"]]
            policy[(kind, subject[kind], fact["value"])] += 1
            if not fact["correct"]:
                others = [obj for shape, obj in objects.items() if shape != fact["subject"]]
                policy[("binding", kind)] += any(obj[kind] == fact["value"] for obj in others)
                if kind == "colour":
                    policy[("colour_typical",)] += fact["value"] == language.TYPICAL_COLOUR[fact["subject"]]
    return dict(counts)


def attribute_confusions_markdown(confusions):
    """One row per policy: size errors by direction, colour errors, the share of errors that are binding errors,
    and how many of the scene's small and large objects the descriptions mention."""
    def share(top, bottom):
        return f"{top / bottom:.3f}" if bottom else "–"

    lines = ["| policy | size facts | small said large | large said small | size errors: another object's size "
             "| colour facts | colour errors | of them the shape's typical colour | another object's colour "
             "| small objects mentioned | large objects mentioned |", "|---" * 11 + "|"]
    for policy, c in confusions.items():
        n_size = sum(n for key, n in c.items() if key[0] == "size")
        n_colour = sum(n for key, n in c.items() if key[0] == "colour")
        small_large, large_small = c[("size", "small", "large")], c[("size", "large", "small")]
        colour_wrong = sum(n for key, n in c.items() if key[0] == "colour" and key[1] != key[2])
        lines.append(
            f"| {html.escape(str(policy))} | {n_size} | {small_large} | {large_small} "
            f"| {share(c[('binding', 'size')], small_large + large_small)} | {n_colour} | {colour_wrong} "
            f"| {share(c[('colour_typical',)], colour_wrong)} | {share(c[('binding', 'colour')], colour_wrong)} "
            f"| {share(c[('mentioned', 'small')], c[('objects', 'small')])} "
            f"| {share(c[('mentioned', 'large')], c[('objects', 'large')])} |")
    return "\n".join(lines)


METRIC_GROUPS = {
    "hallucination": ["object_halluc", "attribute_halluc", "colour_halluc", "size_halluc", "relation_halluc",
                      "coverage"],
    "chair": ["chair_s", "chair_i", "chair_recall"],
    "pope": [f"pope_{sampler}_{key}" for key in ("f1", "accuracy", "yes_ratio") for sampler in POPE_SAMPLERS],
    "mmhal": ["mmhal_score"],
    "judged_rates": ["mmhal_halluc"],
    "llava_bench": ["llava_bench_relative"],
}


def figures(summary):
    """{"<split>_<group>.png": Figure} for every split and metric group (METRIC_GROUPS) that has values."""
    out = {}
    for split, names in _splits_and_metrics(summary).items():
        for group, members in METRIC_GROUPS.items():
            shown = [m for m in members if m in names]
            if shown:
                out[f"{split}_{group}.png"] = metrics_figure(summary, split, shown, f"{split}: {group}")
    return out


def main(argv=None):
    """Seed-pooled comparisons from a records.jsonl, e.g.
    python -m fgaif_utils.evaluate outputs/tiny-seeds/06_evaluate/records.jsonl \\
        --group base=base --group fgaif=fgaif,tiny-s1,tiny-s2 --group sparse=tiny-sparse,tiny-sparse-s1,tiny-sparse-s2 \\
        --pair fgaif:base --pair fgaif:sparse"""
    import argparse
    parser = argparse.ArgumentParser(description="Seed-pooled paired comparisons of stage 06 records.")
    parser.add_argument("records")
    parser.add_argument("--group", action="append", required=True, help="method=policy,policy,...")
    parser.add_argument("--pair", action="append", required=True, help="a:b (a minus b)")
    parser.add_argument("--split", default="eval")
    parser.add_argument("--metrics", default="object_halluc,attribute_halluc,colour_halluc,size_halluc,"
                                             "relation_halluc,coverage")
    parser.add_argument("--bootstrap", type=int, default=2000)
    args = parser.parse_args(argv)
    groups = {}
    for entry in args.group:
        method, _, policies = entry.partition("=")
        if not policies:
            parser.error(f"--group {entry!r}: expected method=policy,policy,...")
        groups[method] = policies.split(",")
    pairs = []
    for entry in args.pair:
        a, _, b = entry.partition(":")
        if a not in groups or b not in groups:
            parser.error(f"--pair {entry!r}: both sides must name a --group (groups: {sorted(groups)})")
        pairs.append((a, b))
    records = [json.loads(line) for line in Path(args.records).read_text().splitlines() if line.strip()]
    tests = seed_pooled_tests(records, groups, pairs, args.split, args.metrics.split(","), args.bootstrap)
    print(f"split {args.split}; pooled over seeds; interval and p resample images (paired) and seeds; "
          "better / worse: the first of the pair, where p < 0.05")
    print("| metric | " + " | ".join(f"{a} | {b} | {a} − {b} [95%] (p)" for a, b in pairs) + " |")
    print("|---|" + "---|---|---|" * len(pairs))
    for name in args.metrics.split(","):
        cells = []
        for pair in pairs:
            t = tests[pair][name]
            difference = "–" if t["diff"] is None else (f"{t['diff']:+.3f} [{_signed(t['low'])}, "
                                                        f"{_signed(t['high'])}] (p={_p_text(t['p'])})"
                                                        + _verdict_suffix(name, t))
            cells += [_fmt(t["a"]), _fmt(t["b"]), difference]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
