"""Stage 06's library: POPE (samplers, parsing, metrics), CHAIR, bootstrap intervals and paired tests, the GPT
judges against the local OpenAI-compatible stub, and one policy evaluated end to end with a tiny random LLaVA."""
import csv
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from fgaif_utils import evaluate as E
from fgaif_utils import models, params, world
from openai_stub import Reply, StubServer

torch.set_num_threads(1)

# ---------------------------------------------------------------------------------------------- POPE

NAMES = {1: "person", 2: "dog", 3: "frisbee", 4: "car", 5: "bus", 6: "cup", 7: "kite"}
IMAGES = {1: ["person", "car"], 2: ["person", "car"], 3: ["person", "car"], 4: ["person", "car", "bus"],
          5: ["person", "cup"], 6: ["dog", "frisbee"], 7: ["dog", "frisbee", "kite"], 8: ["dog", "kite", "cup"]}
# image frequency: person 5, car 4, dog 3, frisbee 2, kite 2, cup 2, bus 1.
# image 8 = {dog, kite, cup}: absent person, car, frisbee, bus. Co-occurrence with its objects:
# frisbee 2 (dog) + 1 (kite) = 3, person 1 (cup), car 0, bus 0.


def instances():
    by_name = {name: i for i, name in NAMES.items()}
    annotations = [{"id": 100 * image + k, "image_id": image, "category_id": by_name[name], "bbox": [0, 0, 1, 1]}
                   for image, names in IMAGES.items() for k, name in enumerate(names)]
    return {"images": [{"id": i, "file_name": f"{i}.png", "width": 8, "height": 8} for i in IMAGES],
            "annotations": annotations, "categories": [{"id": i, "name": n} for i, n in NAMES.items()]}


def test_category_statistics_count_images_not_annotations():
    data = instances()
    data["annotations"].append({"id": 999, "image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1]})  # 2nd person
    frequency, cooccurrence = E.category_statistics(data)
    assert frequency == {"person": 5, "car": 4, "dog": 3, "frisbee": 2, "kite": 2, "cup": 2, "bus": 1}
    assert cooccurrence["dog"] == {"frisbee": 2, "kite": 2, "cup": 1}
    assert cooccurrence["person"]["car"] == 4 and "person" not in cooccurrence["person"]


def test_popular_and_adversarial_draw_the_most_frequent_and_most_co_occurring_absent():
    rows = E.build_pope(instances(), [8], n_objects=2, seed=0)
    by_sampler = {s: [r for r in rows if r["sampler"] == s] for s in E.POPE_SAMPLERS}
    negatives = {s: [r["object"] for r in rs if r["label"] == "no"] for s, rs in by_sampler.items()}
    assert negatives["popular"] == ["person", "car"]            # the two most frequent absent categories
    # adversarial, per positive as Li et al.'s code: the positives drawn are cup, then kite; cup co-occurs with
    # person / dog / kite (1 each; person is the absent one), kite with dog 2, frisbee 1, cup 1 (frisbee absent)
    assert [r["object"] for r in by_sampler["adversarial"] if r["label"] == "yes"] == ["cup", "kite"]
    assert negatives["adversarial"] == ["person", "frisbee"]
    for sampler, rs in by_sampler.items():
        positives = [r["object"] for r in rs if r["label"] == "yes"]
        assert len(positives) == 2 and set(positives) <= {"dog", "kite", "cup"}
        assert len(rs) == 4 and not set(negatives[sampler]) & {"dog", "kite", "cup"}
        assert rs[0]["text"] == f"Is there a {rs[0]['object']} in the image?"
    # the same present objects for every sampler
    assert len({tuple(r["object"] for r in rs if r["label"] == "yes") for rs in by_sampler.values()}) == 1


def test_adversarial_negatives_follow_each_positive_not_their_sum():
    frequency, cooccurrence = E.category_statistics(instances())
    present, categories = ["dog", "kite", "cup"], sorted(NAMES.values())
    draw = lambda positives: E.sample_negatives("adversarial", present, categories, 2, __import__("random").Random(0),  # noqa
                                               frequency, cooccurrence, positives)
    assert draw(["cup", "dog"]) == ["person", "frisbee"]      # cup: person (1); dog: frisbee (2)
    dog_kite = draw(["dog", "kite"])   # dog: frisbee; kite co-occurs with no other absent one: a random unused one
    assert dog_kite[0] == "frisbee" and dog_kite[1] in {"person", "car", "bus"}
    # summed over the present objects both would be frisbee (3), person (1): the sum is not what POPE does


def test_random_negatives_are_absent_uniform_and_seeded():
    seen = {"person": 0, "car": 0, "frisbee": 0, "bus": 0}
    for seed in range(400):
        rows = E.build_pope(instances(), [8], n_objects=2, seed=seed, samplers=["random"])
        for row in rows:
            if row["label"] == "no":
                seen[row["object"]] += 1     # KeyError if a present category were drawn
    assert sum(seen.values()) == 800
    assert all(150 <= count <= 250 for count in seen.values()), seen   # each absent one has p = 1/2
    assert E.build_pope(instances(), [1, 8], seed=3, suffix=" Answer briefly.") == \
        E.build_pope(instances(), [1, 8], seed=3, suffix=" Answer briefly.")


def test_pope_is_balanced_when_an_image_has_few_objects():
    rows = E.build_pope(instances(), [1, 7], n_objects=3, seed=0, samplers=["popular"])
    image1 = [r for r in rows if r["image_id"] == 1]
    assert [r["label"] for r in image1] == ["yes", "yes", "no", "no"]   # 2 present -> 2 absent
    assert [r["object"] for r in image1 if r["label"] == "no"] == ["dog", "cup"]   # dog 3; cup, frisbee, kite 2 -> name
    assert len([r for r in rows if r["image_id"] == 7]) == 6


def test_images_whose_samplers_ask_the_same_absent_objects_are_told_apart():
    def rows_of(image_id, negatives_by_sampler):
        return [{"image_id": image_id, "sampler": sampler, "object": name, "label": label}
                for sampler, negatives in negatives_by_sampler.items()
                for name, label in [("star", "yes")] + [(n, "no") for n in negatives]]
    same = rows_of(1, {"random": ["a", "b"], "popular": ["a", "b"], "adversarial": ["b", "a"]})   # order aside
    differ = rows_of(2, {"random": ["a"], "popular": ["c"], "adversarial": ["a"]})
    assert E.images_whose_samplers_agree(same + differ) == (1, 2)
    assert E.pope_rows_of_an_image_where_samplers_differ(same + differ) == differ
    assert E.pope_rows_of_an_image_where_samplers_differ(same) == same     # none differ: the first image
    assert E.pope_rows_of_an_image_where_samplers_differ([]) == [] and E.images_whose_samplers_agree([]) == (0, 0)


def test_coco_pope_asks_3_plus_3_on_images_with_at_least_3_categories():
    # eligible (3 of the 7 categories present, so 4 absent): images 4, 7 and 8; images 1-3, 5, 6 have two each
    assert E.coco_pope_image_ids(instances(), [1, 8, 2, 4], n=2) == [8, 4]      # the eval scenes' order first
    assert E.coco_pope_image_ids(instances(), [1, 8, 2, 4], n=3) == [8, 4, 7]   # then the others
    with pytest.warns(UserWarning, match="only 3 images have at least 3 annotated categories"):
        assert sorted(E.coco_pope_image_ids(instances(), [], n=5)) == [4, 7, 8]
    rows = E.coco_pope_rows(instances(), [1, 8, 2, 4], n=3)
    for image_id in (8, 4, 7):
        for sampler in E.POPE_SAMPLERS:
            mine = [r for r in rows if r["image_id"] == image_id and r["sampler"] == sampler]
            assert [r["label"] for r in mine] == ["yes"] * 3 + ["no"] * 3
            assert all(r["image"] == f"{image_id}.png" for r in mine)
    assert len(rows) == 3 * 3 * 6


def test_coco_evaluation_inputs_pope_images_load_from_val2014(tiny_setup, tmp_path):
    root, _ = tiny_setup
    coco, data_dir = tmp_path / "coco", tmp_path / "data"
    (coco / "annotations").mkdir(parents=True)
    (coco / "val2014").mkdir()
    data_dir.mkdir()
    (coco / "annotations" / "instances_val2014.json").write_text(json.dumps(instances()))
    for image_id in IMAGES:
        Image.fromarray(np.full((64, 64, 3), 20 * image_id, np.uint8)).save(coco / "val2014" / f"{image_id}.png")
    scenes = [{"image_id": i, "file_name": str(coco / "val2014" / f"{i}.png"), "split": "eval",
               "objects": [{"shape": name} for name in IMAGES[i]]} for i in (1, 8)]
    world.write_jsonl(data_dir / "scenes_eval.jsonl", scenes)
    p = params.Params(data=params.DataParams(world="coco", coco_root=str(coco)),
                      evaluate=params.EvaluateParams(n_images=2, pope_objects=3))
    scenes_by_split, pope_by_split, load_image, vocabulary, synthetic = E.evaluation_inputs(p, data_dir)
    assert not synthetic and [s["image_id"] for s in scenes_by_split["eval"]] == [1, 8]
    pope_ids = list(dict.fromkeys(r["image_id"] for r in pope_by_split["eval"]))
    assert pope_ids[0] == 8 and pope_ids[1] in (4, 7) and len(pope_ids) == 2    # image 1 has only 2 categories
    assert len(pope_by_split["eval"]) == 2 * 3 * 6
    model, processor = E.load_policy(root / "policy", device="cpu")
    records = E.evaluate_policy(model, processor, scenes_by_split, load_image, pope_by_split, vocabulary, synthetic,
                                policy="base", batch_size=4, max_new_tokens=4, progress=False)
    by_id = {r["image_id"]: r for r in records}
    assert sorted(by_id) == sorted([1, 8, pope_ids[1]]) and "description" not in by_id[pope_ids[1]]
    assert not by_id[1]["pope"] and len(by_id[8]["pope"]) == len(by_id[pope_ids[1]]["pope"]) == 18
    assert sum(by_id[pope_ids[1]]["counts"][f"pope_random_{k}"] for k in ("tp", "fp", "tn", "fn")) == 6
    answer_tokens = lambda records: [len(processor.tokenizer(a["raw_answer"], add_special_tokens=False).input_ids)
                                     for r in records for a in r["pope"]]
    assert max(answer_tokens(records)) > 1                         # the default limit (8) lets answers run on
    short = E.evaluate_policy(model, processor, {}, load_image, pope_by_split, vocabulary, synthetic, policy="base",
                              batch_size=4, progress=False, pope_max_new_tokens=1)   # evaluate.pope_max_new_tokens
    assert max(answer_tokens(short)) == 1 and len(answer_tokens(short)) == len(answer_tokens(records))
    # official POPE files naming an image val2014 lacks: refused before any policy generates, the image named
    pope = tmp_path / "pope"
    pope.mkdir()
    for sampler in E.POPE_SAMPLERS:
        (pope / E.POPE_FILE.format(sampler=sampler)).write_text(
            '{"question_id": 1, "image": "8.png", "text": "Is there a cat in the image?", "label": "yes"}\n'
            '{"question_id": 2, "image": "COCO_val2014_000000000099.jpg", "text": "Is there a dog in the image?", '
            '"label": "no"}\n')
    p.evaluate.pope_files = str(pope)
    with pytest.raises(FileNotFoundError, match=r"POPE files in .* name 1 image\(s\) not in .* COCO_val2014_000000000099.jpg"):
        E.evaluation_inputs(p, data_dir)


def test_pope_answer_reading():
    # The rule of POPE's and LLaVA-1.5's scripts, quirks included (the last row: words they read as yes).
    cases = {"Yes": "yes", "Yes, there is a dog in the image.": "yes", "No.": "no", "no": "no",
             "There is not a dog in the image.": "no", "No, there is not.": "no", "No,there is none": "yes",
             "Yes. There is no other dog.": "yes", "": "yes", "Nope": "yes", "Yes.": "yes",
             "NO, it is a cat": "yes", "I don't see one": "yes", "I cannot see any dog.": "yes", "No!": "yes"}
    assert {text: E.pope_answer(text) for text in cases} == cases


def test_pope_metrics_on_a_hand_made_answer_set():
    labels = ["yes", "yes", "yes", "yes", "no", "no", "no", "no", "no", "no"]
    answers = ["yes", "yes", "yes", "no", "yes", "yes", "no", "no", "no", "no"]
    m = E.pope_metrics(labels, answers)
    assert (m["tp"], m["fn"], m["fp"], m["tn"]) == (3, 1, 2, 4)
    assert m["accuracy"] == pytest.approx(7 / 10)
    assert m["precision"] == pytest.approx(3 / 5)
    assert m["recall"] == pytest.approx(3 / 4)
    assert m["f1"] == pytest.approx(2 * 0.6 * 0.75 / (0.6 + 0.75))
    assert m["yes_ratio"] == pytest.approx(5 / 10)
    with pytest.raises(ValueError, match="must be 'yes' or 'no', got 'yes' / 'maybe'"):
        E.pope_metrics(["yes"], ["maybe"])


def test_pope_metrics_through_per_image_counts_match_the_direct_ones():
    labels = ["yes", "no", "yes", "no", "yes", "no"]
    answers = ["yes", "yes", "no", "no", "yes", "no"]
    records = [{"policy": "p", "split": "s", "image_id": i,
                "counts": E._pope_counts([{"sampler": "random", "label": labels[j], "answer": answers[j]}
                                          for j in (2 * i, 2 * i + 1)])} for i in range(3)]
    summary = E.summarise(records, n_resamples=50)["p"]["s"]
    direct = E.pope_metrics(labels, answers)
    for key in ("accuracy", "precision", "recall", "f1", "yes_ratio"):
        assert summary[f"pope_random_{key}"]["value"] == pytest.approx(direct[key])


def test_official_pope_files_are_read(tmp_path):
    lines = [{"question_id": 1, "image": "COCO_val2014_000000310196.jpg", "text": "Is there a snowboard in the image?",
              "label": "yes"},
             {"question_id": 2, "image": "COCO_val2014_000000210789.jpg", "text": "Is there an apple in the image?",
              "label": "no"}]
    for sampler in E.POPE_SAMPLERS:
        (tmp_path / f"coco_pope_{sampler}.json").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    rows = E.read_pope_folder(tmp_path, suffix=" Answer with one word.")
    assert len(rows) == 6 and rows[0]["sampler"] == "random" and rows[-1]["sampler"] == "adversarial"
    assert rows[0]["image_id"] == 310196 and rows[1]["object"] == "apple" and rows[0]["object"] == "snowboard"
    assert rows[1]["text"] == "Is there an apple in the image? Answer with one word." and rows[1]["label"] == "no"
    (tmp_path / "bad.json").write_text(json.dumps({**lines[0], "label": "maybe"}) + "\n")
    with pytest.raises(ValueError, match="bad.json:1"):
        E.read_pope_file(tmp_path / "bad.json", "random")


# ---------------------------------------------------------------------------------------------- CHAIR

def test_chair_on_hand_written_captions():
    vocabulary = E.coco_vocabulary()
    captions = ["A man is holding a frisbee while two dogs run on the grass.",
                "There is no cat in the image, but there is a hot dog on a dining table.",
                "Several people stand near a bus and a traffic light. A bicycle leans on a bench."]
    truths = [{"person", "dog", "frisbee", "car"}, {"hot dog", "dining table"}, {"person", "bus", "bench"}]
    first = E.chair_counts(captions[0], truths[0], vocabulary)
    assert (first["chair_mentioned"], first["chair_hallucinated"], first["chair_covered"]) == (3, 0, 3)
    second = E.chair_counts(captions[1], truths[1], vocabulary)
    assert [(m["category"], m["negated"]) for m in second["mentions"]] == \
        [("cat", True), ("hot dog", False), ("dining table", False)]   # "no cat" is no claim; a hot dog is no dog
    third = E.chair_counts(captions[2], truths[2], vocabulary)
    assert third["hallucinated_objects"] == ["bicycle", "traffic light"]
    m = E.chair_metrics(captions, truths, vocabulary)
    assert (m["chair_mentioned"], m["chair_hallucinated"]) == (10, 2)
    assert m["chair_s"] == pytest.approx(1 / 3)
    assert m["chair_i"] == pytest.approx(2 / 10)
    assert m["recall"] == pytest.approx(8 / 9)


def test_chair_i_counts_every_mention_as_the_original_does():
    # CHAIR_i = hallucinated mentions / mentions (Rohrbach et al.'s script adds len(node_words) per caption): two
    # dogs and a cat against a cat-only image are 2 of 3, not 1 of 2 categories; CHAIR_s and recall stay per category.
    vocabulary = E.coco_vocabulary()
    counts = E.chair_counts("A dog lies next to another dog and a dog bed. A cat sits nearby.", {"cat"}, vocabulary)
    assert (counts["chair_mentioned"], counts["chair_hallucinated"], counts["chair_covered"]) == (3, 2, 1)
    assert counts["hallucinated_objects"] == ["dog"] and counts["chair_caption_hallucinated"] == 1
    m = E.chair_metrics(["A dog lies next to another dog and a dog bed. A cat sits nearby.", "A cat on a couch."],
                        [{"cat"}, {"cat", "couch"}], vocabulary)
    assert m["chair_i"] == pytest.approx(2 / 5) and m["chair_s"] == pytest.approx(1 / 2)
    assert m["recall"] == pytest.approx(3 / 3)


def test_chair_phrases_that_name_one_object_or_none():
    vocabulary = E.coco_vocabulary()
    cats = lambda text: [m["category"] for m in vocabulary.mentions(text)]  # noqa: E731
    assert cats("A large passenger jet beside an adult elephant.") == ["airplane", "elephant"]
    assert cats("A laptop computer and a computer monitor near a stove top oven.") == ["laptop", "tv", "oven"]
    assert cats("A boy in a baseball cap on a football field eats a chicken sandwich.") == ["person", "sandwich"]
    assert cats("A skier wearing gloves; a pizza with sausage.") == ["person", "pizza"]
    assert cats("She holds a carry-on bag and a carry-on.") == ["suitcase", "suitcase"]
    # a jet ski is neither an airplane nor skis; the slope, lift and poles of skiing are not skis
    assert cats("A man on a jet ski; jet skis beside a ski lift.") == ["person"]
    assert cats("Skiers on ski slopes with ski poles and skis.") == ["person", "skis"]


def test_chair_synonyms_plurals_and_negation():
    vocabulary = E.coco_vocabulary()
    cats = lambda text: [(m["category"], m["negated"]) for m in vocabulary.mentions(text)]  # noqa: E731
    assert cats("Two puppies and three kittens near some sofas.") == [("dog", False), ("cat", False), ("couch", False)]
    assert cats("There are no buses, and the knives lie by the sandwiches.") == \
        [("bus", True), ("knife", False), ("sandwich", False)]
    assert cats("People wait at the bus stop beside a baby elephant.") == [("person", False), ("elephant", False)]
    assert cats("The dog is not brown.") == [("dog", False)]
    assert cats("There isn't a zebra or a giraffe and a horse grazes.") == \
        [("zebra", True), ("giraffe", True), ("horse", False)]
    assert cats("A teddy bear sits under traffic lights.") == [("teddy bear", False), ("traffic light", False)]
    assert E.plural("strawberry") == "strawberries" and E.plural("wine glass") == "wine glasses"
    assert len(E.COCO_SYNONYMS) == 80


def test_chair_negation_ends_at_prepositions_participles_and_the_first_object():
    vocabulary = E.coco_vocabulary()
    cats = lambda text: [(m["category"], m["negated"]) for m in vocabulary.mentions(text)]  # noqa: E731
    assert cats("A man without a hat holding a dog.") == [("person", False), ("dog", False)]
    assert cats("A dog with no people around it and a bicycle") == [("dog", False), ("person", True),
                                                                    ("bicycle", False)]
    assert cats("The cat is not on the couch.") == [("cat", False), ("couch", False)]
    assert cats("Neither a dog nor a cat sits on the bench.") == [("dog", True), ("cat", True), ("bench", False)]
    assert cats("There is no sign of any dogs.") == [("dog", True)]
    assert cats("The image does not show a dog") == [("dog", True)]
    assert cats("A man is not wearing a tie.") == [("person", False), ("tie", True)]
    assert cats("There are no sleeping cats.") == [("cat", True)]
    # a noun that names no COCO object does not keep the scope open past a new clause
    assert cats("A man without shoes rides a bicycle.") == [("person", False), ("bicycle", False)]
    assert cats("A room with no windows has a couch.") == [("couch", False)]
    assert cats("The dog is not brown and has a frisbee.") == [("dog", False), ("frisbee", False)]
    assert cats("There is no dog and no cat.") == [("dog", True), ("cat", True)]


def test_chair_reads_hyphens_as_spaces_and_pluralises_x_of_y():
    vocabulary = E.coco_vocabulary()
    text = "Two hot-dogs and a teddy-bear. Two glasses of wine."
    found = [(m["category"], text[m["span"][0]:m["span"][1]]) for m in vocabulary.mentions(text)]
    assert found == [("hot dog", "hot-dogs"), ("teddy bear", "teddy-bear"), ("wine glass", "glasses of wine")]
    assert E.plural("glass of wine") == "glasses of wine" and E.plural("hot dog") == "hot dogs"


def test_chair_on_coco_counts_what_the_reference_captions_name_as_present():
    scene = {"objects": [{"shape": "dog"}], "captions": ["A dog leaps for a frisbee.", "There is no car here."]}
    vocabulary = E.coco_vocabulary()
    assert E.chair_truth(scene, vocabulary, synthetic=False) == {"dog", "frisbee"}     # not the negated car
    record = E.description_record("A dog catches a frisbee near a car.", scene, vocabulary, synthetic=False)
    assert record["hallucinated_objects"] == ["car"]
    assert E.chair_truth(scene, vocabulary, synthetic=True) == {"dog"}     # the synthetic world's truth is exact


def test_chair_with_the_world_vocabulary():
    m = E.chair_counts("there is a large red heart and two boxes . there is no ring .", {"heart", "circle"},
                       E.world_vocabulary())
    assert m["hallucinated_objects"] == ["square"] and (m["chair_mentioned"], m["chair_covered"]) == (2, 1)


# ---------------------------------------------------------------------------------------------- uncertainty

def test_bootstrap_interval_covers_the_true_ratio_at_about_the_nominal_rate():
    rng = np.random.default_rng(0)
    true_rate, hits, simulations = 0.3, 0, 200
    for sim in range(simulations):
        denominators = 1 + rng.poisson(2.0, size=80)
        numerators = rng.binomial(denominators, true_rate)
        result = E.bootstrap_ratio(numerators, denominators, n_resamples=400, confidence=0.95, seed=sim)
        assert result["value"] == pytest.approx(numerators.sum() / denominators.sum())
        hits += result["low"] <= true_rate <= result["high"]
    assert 0.91 <= hits / simulations <= 0.98, hits / simulations


def test_bootstrap_interval_and_paired_p_by_hand():
    """Five hand-written resamples of three items (each row draws three): the percentile interval as numpy's
    linear interpolation gives it by hand, and the two-sided p of the centred differences."""
    weights = np.array([[3, 0, 0], [0, 3, 0], [0, 0, 3], [1, 1, 1], [2, 1, 0]], float)
    a, b, den = [1, 0, 2], [0, 0, 1], [2, 2, 2]
    # a's ratios per resample: 3/6, 0, 6/6, 3/6, 2/6 -> sorted 0, 1/3, 1/2, 1/2, 1; the 25th percentile sits at
    # position 1 (1/3), the 75th at 3 (1/2); the 2.5th at 0.1 (0 + 0.1 * 1/3), the 97.5th at 3.9 (1/2 + 0.9 * 1/2)
    half = E.bootstrap_ratio(a, den, confidence=0.5, weights=weights)
    assert (half["value"], half["low"], half["high"]) == (0.5, pytest.approx(1 / 3), pytest.approx(0.5))
    nominal = E.bootstrap_ratio(a, den, confidence=0.95, weights=weights)
    assert (nominal["low"], nominal["high"]) == (pytest.approx(1 / 30), pytest.approx(0.95))
    # b's ratios 0, 0, 1/2, 1/6, 0: differences 1/2, 0, 1/2, 1/3, 1/3 around the observed 1/2 - 1/6 = 1/3; centred,
    # 1/6, -1/3, 1/6, 0, 0: one is at least 1/3 from 0, so p = (1 + 1) / (5 + 1) (one-sided it would be 1/6)
    paired = E.paired_bootstrap(a, den, b, den, weights=weights)
    assert paired["diff"] == pytest.approx(1 / 3) and paired["p"] == pytest.approx(1 / 3)


def test_paired_test_separates_a_clear_difference_from_none():
    rng = np.random.default_rng(1)
    n = 200
    den = 1 + rng.poisson(3.0, size=n)
    worse, better = rng.binomial(den, 0.30), rng.binomial(den, 0.15)
    clear = E.paired_bootstrap(better, den, worse, den, n_resamples=1000, seed=0)
    assert clear["diff"] < 0 and clear["high"] < 0 and clear["p"] < 0.01
    same = E.paired_bootstrap(worse, den, worse, den, n_resamples=200, seed=0)
    assert same["diff"] == 0 and same["p"] == 1.0
    # under the null (two draws at the same rate) p < 0.05 about 5% of the time
    small = 0
    for sim in range(100):
        d = 1 + rng.poisson(3.0, size=100)
        result = E.paired_bootstrap(rng.binomial(d, 0.3), d, rng.binomial(d, 0.3), d, n_resamples=200, seed=sim)
        small += result["p"] < 0.05
    assert 1 <= small <= 9, small      # Binomial(100, 0.05): P(0) = 0.6%, P(> 9) = 2.8% (seeded: deterministic)


def test_seed_pooled_bootstrap_with_one_seed_each_is_the_paired_bootstrap():
    rng = np.random.default_rng(2)
    den = 1 + rng.poisson(3.0, size=150)
    a, b = rng.binomial(den, 0.2), rng.binomial(den, 0.25)
    weights = E.resample_weights(150, 500, seed=7)
    paired = E.paired_bootstrap(a, den, b, den, weights=weights)
    pooled = E.seed_pooled_bootstrap(a[None], den[None], b[None], den[None], image_weights=weights)
    for key in ("a", "b", "diff", "low", "high", "p"):
        assert pooled[key] == pytest.approx(paired[key]), key


def test_seed_pooled_value_by_hand_and_seed_spread_widens_the_interval():
    # two seeds x two images: seed 0 false 1 of 4 and 0 of 2, seed 1 false 3 of 4 and 1 of 2 -> 5 / 12
    pooled = E.seed_pooled_bootstrap([[1, 0], [3, 1]], [[4, 2], [4, 2]], [[2, 1]], [[4, 2]], n_resamples=50)
    assert pooled["a"] == pytest.approx(5 / 12) and pooled["b"] == pytest.approx(3 / 6)
    assert pooled["diff"] == pytest.approx(5 / 12 - 1 / 2) and (pooled["seeds_a"], pooled["seeds_b"]) == (2, 1)
    # the same pooled counts, once from two agreeing seeds and once from two seeds far apart
    rng = np.random.default_rng(3)
    den = np.full(300, 10)
    low_seed, high_seed, mid = rng.binomial(den, 0.1), rng.binomial(den, 0.3), rng.binomial(den, 0.2)
    reference = rng.binomial(den, 0.2)[None]
    apart = E.seed_pooled_bootstrap(np.stack([low_seed, high_seed]), np.stack([den, den]), reference, den[None],
                                    n_resamples=500)
    agreeing = E.seed_pooled_bootstrap(np.stack([mid, mid]), np.stack([den, den]), reference, den[None],
                                       n_resamples=500)
    assert apart["high"] - apart["low"] > 3 * (agreeing["high"] - agreeing["low"])
    with pytest.raises(ValueError, match="same images"):
        E.seed_pooled_bootstrap([[1, 2]], [[2, 2]], [[1, 2, 3]], [[3, 3, 3]])


def test_seed_pooled_tests_group_the_records_of_each_method():
    records = [_record(policy, i, n_object_judged=4, n_object_false=false)
               for policy, falses in (("base", [2, 2]), ("fgaif", [1, 0]), ("fgaif-s1", [1, 2]))
               for i, false in enumerate(falses)]
    tests = E.seed_pooled_tests(records, {"base": ["base"], "fgaif": ["fgaif", "fgaif-s1"]}, [("fgaif", "base")],
                                "eval", ["object_halluc"], n_resamples=50)
    t = tests[("fgaif", "base")]["object_halluc"]
    assert t["a"] == pytest.approx(4 / 16) and t["b"] == pytest.approx(4 / 8) and t["seeds_a"] == 2
    with pytest.raises(ValueError, match="fgaif-s2"):
        E.seed_pooled_tests(records, {"base": ["base"], "fgaif": ["fgaif-s2"]}, [("fgaif", "base")], "eval",
                            ["object_halluc"])
    elsewhere = [dict(r, image_id=r["image_id"] + 10) for r in records if r["policy"] == "fgaif-s1"]
    with pytest.raises(ValueError, match=r"split 'eval', pair fgaif:base: no image .*'fgaif', 'fgaif-s1', 'base'"):
        E.seed_pooled_tests([r for r in records if r["policy"] != "fgaif-s1"] + elsewhere,
                            {"base": ["base"], "fgaif": ["fgaif", "fgaif-s1"]}, [("fgaif", "base")], "eval",
                            ["object_halluc"])


def test_seed_pooled_tests_leave_out_items_a_policy_has_no_counts_for():
    records = [{"policy": p, "split": "mmhal", "image_id": i, "counts": {} if r is None else
                {"mmhal_rating": r, "mmhal_hallucinated": int(r < 3), "mmhal_rated": 1}}
               for p, ratings in (("base", [5, 1, 4]), ("fgaif", [6, None, 2])) for i, r in enumerate(ratings)]
    t = E.seed_pooled_tests(records, {"base": ["base"], "fgaif": ["fgaif"]}, [("fgaif", "base")], "mmhal",
                            ["mmhal_score"], n_resamples=20)[("fgaif", "base")]["mmhal_score"]
    assert t["n"] == 2 and t["a"] == pytest.approx(8 / 2) and t["b"] == pytest.approx(9 / 2)   # items 0 and 2


def test_main_prints_n_a_for_an_interval_it_cannot_tell(tmp_path, capsys):
    records = [_record(policy, i, n_object_judged=4, n_object_false=false)
               for policy, false in (("base", 2), ("fgaif", 1)) for i in range(3)]
    (tmp_path / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    E.main([str(tmp_path / "records.jsonl"), "--group", "base=base", "--group", "fgaif=fgaif", "--pair",
            "fgaif:base", "--metrics", "object_halluc", "--bootstrap", "0"])   # no resample: no interval
    assert "| object_halluc | 0.250 | 0.500 | -0.250 [n/a, n/a] (p=n/a) |" in capsys.readouterr().out   # no test


def _record(policy, image_id, **counts):
    return {"policy": policy, "split": "eval", "image_id": image_id, "counts": {"images": 1, **counts}}


def test_summarise_and_paired_tests_align_images_and_pool_ratio_of_sums():
    base = [_record("base", i, n_object_judged=4, n_object_false=2 if i % 2 else 1) for i in range(40)]
    tuned = [_record("fgaif", i, n_object_judged=4, n_object_false=0) for i in reversed(range(40))]
    tuned.append(_record("fgaif", 99, n_object_judged=4, n_object_false=4))   # not in base: not paired
    summary = E.summarise(base + tuned, n_resamples=300)
    assert summary["base"]["eval"]["object_halluc"]["value"] == pytest.approx(60 / 160)
    assert summary["fgaif"]["eval"]["object_halluc"]["value"] == pytest.approx(4 / 164)
    assert "attribute_halluc" not in summary["base"]["eval"]          # no attribute counts: no metric
    entry = summary["base"]["eval"]["object_halluc"]
    assert entry["low"] <= entry["value"] <= entry["high"] and entry["n"] == 40
    silent = [_record("terse", i, n_object_judged=4 if i < 30 else 0, n_object_false=1 if i < 30 else 0)
              for i in range(40)]                                   # ten descriptions judge no object at all
    assert E.summarise(silent, n_resamples=50)["terse"]["eval"]["object_halluc"]["n"] == 30
    test = E.paired_tests(base + tuned, "base", n_resamples=300)["fgaif"]["eval"]["object_halluc"]
    assert test["n"] == 40 and test["diff"] == pytest.approx(0 - 60 / 160) and test["p"] < 0.01
    with pytest.raises(ValueError, match="baseline"):
        E.paired_tests(tuned, "base")


def test_paired_tests_pair_each_image_with_itself():
    """Images that differ a lot from each other, a policy a little and evenly better on each: paired by image, the
    resamples see only the small shift, so the interval is narrow and excludes 0. Paired by position (the records
    come in another order) or resampled apart, the images' spread would swamp it."""
    rates = np.linspace(0.0, 1.0, 40)
    base = [_record("base", i, n_object_judged=20, n_object_false=int(20 * rate)) for i, rate in enumerate(rates)]
    same = [_record("copy", i, **base[i]["counts"]) for i in reversed(range(40))]
    better = [_record("fgaif", i, n_object_judged=20, n_object_false=max(int(20 * rate) - 1, 0))
              for i, rate in reversed(list(enumerate(rates)))]
    tests = E.paired_tests(base + same + better, "base", n_resamples=400)
    copy, fgaif = tests["copy"]["eval"]["object_halluc"], tests["fgaif"]["eval"]["object_halluc"]
    assert copy["diff"] == copy["low"] == copy["high"] == 0 and copy["p"] == 1.0
    assert fgaif["high"] < 0 and fgaif["high"] - fgaif["low"] < 0.02 and fgaif["p"] < 0.01
    spread = E.bootstrap_ratio([r["counts"]["n_object_false"] for r in base], [20] * 40, n_resamples=400)
    assert spread["high"] - spread["low"] > 0.15        # what an unpaired interval would carry


def test_a_metric_needs_its_numerator_counts_too():
    """COCO description records carry "images" but no scorer counts: no attribute_errors or size_claims."""
    records = [_record("base", i, chair_caption_hallucinated=0, chair_hallucinated=0, chair_mentioned=2,
                       n_words=10, n_sentences=1) for i in range(3)]
    names = set(E.summarise(records, n_resamples=20)["base"]["eval"])
    assert names == {"chair_s", "chair_i", "words", "sentences"}          # no n_duplicate_sentences: no repeats


def test_each_split_draws_its_own_bootstrap_resamples():
    rows = [dict(_record("base", i, n_object_judged=4, n_object_false=i % 5), split=split)
            for split in E.SYNTHETIC_SPLITS for i in range(30)]
    summary = E.summarise(rows, n_resamples=200)["base"]
    intervals = {split: (summary[split]["object_halluc"]["low"], summary[split]["object_halluc"]["high"])
                 for split in E.SYNTHETIC_SPLITS}
    assert len({summary[split]["object_halluc"]["value"] for split in E.SYNTHETIC_SPLITS}) == 1   # the same data
    assert len(set(intervals.values())) == 3, intervals                                          # other draws
    assert len({E._split_seed(0, split) for split in E.SYNTHETIC_SPLITS}) == 3


def test_paired_tests_pair_only_items_both_policies_have_counts_for():
    records = [{"policy": p, "split": "mmhal", "image_id": i, "counts": {} if r is None else
                {"mmhal_rating": r, "mmhal_hallucinated": int(r < 3), "mmhal_rated": 1}}
               for p, ratings in (("base", [5, 1, 4, 2]), ("fgaif", [6, None, 5, 2])) for i, r in enumerate(ratings)]
    test = E.paired_tests(records, "base", n_resamples=50)["fgaif"]["mmhal"]["mmhal_score"]
    # items 0, 2, 3: fgaif 13 / 3 against base 11 / 3 (not base's 12 / 4 with item 1)
    assert test["n"] == 3 and test["a"] == pytest.approx(13 / 3) and test["b"] == pytest.approx(11 / 3)
    assert test["diff"] == pytest.approx(2 / 3)


def test_attribute_errors_per_description_do_not_depend_on_the_claim_mix():
    """Two descriptions each: the base states 4 attributes (2 of them sizes) with 1 and 2 wrong; the terse policy
    leaves the sizes out and gets 1 of its 2 colours wrong in each. Per claim the terse policy looks worse (2/4
    against 3/8); per description it makes fewer errors (1 against 1.5)."""
    base = [_record("base", i, n_attribute_judged=4, n_attribute_false=1, n_size_judged=2) for i in range(2)]
    terse = [_record("terse", i, n_attribute_judged=2, n_attribute_false=1, n_size_judged=0) for i in range(2)]
    base[1]["counts"]["n_attribute_false"] = 2
    summary = E.summarise(base + terse, n_resamples=50)
    assert summary["base"]["eval"]["attribute_halluc"]["value"] == pytest.approx(3 / 8)
    assert summary["terse"]["eval"]["attribute_halluc"]["value"] == pytest.approx(2 / 4)
    assert summary["base"]["eval"]["attribute_errors"]["value"] == pytest.approx(3 / 2)
    assert summary["terse"]["eval"]["attribute_errors"]["value"] == pytest.approx(2 / 2)
    assert summary["base"]["eval"]["size_claims"]["value"] == pytest.approx(2)
    assert summary["terse"]["eval"]["size_claims"]["value"] == 0


def test_sentences_per_description_in_both_worlds():
    """The same two sentences said as one or as two: the scorer's count (synthetic) and the plain one (COCO) agree,
    and the 'sentences' metric averages them per description."""
    scene = {"objects": [{"shape": "heart", "colour": "red", "size": "large", "cx": 20, "cy": 20, "radius": 14},
                         {"shape": "star", "colour": "yellow", "size": "small", "cx": 45, "cy": 45, "radius": 9}]}
    scene["relations"] = world.scene_relations(scene["objects"])
    joined = "there is a large red heart and a small yellow star ."
    split = "there is a large red heart . there is a small yellow star ."
    for synthetic in (True, False):
        counts = [E.description_record(text, scene, E.world_vocabulary(), synthetic)["counts"]
                  for text in (joined, split)]
        assert [c["n_sentences"] for c in counts] == [1, 2]
    records = [{"policy": "base", "split": "eval", "image_id": 0,
                **E.description_record(joined, scene, E.world_vocabulary(), True)},
               {"policy": "split", "split": "eval", "image_id": 0,
                **E.description_record(split, scene, E.world_vocabulary(), True)}]
    summary = E.summarise(records, n_resamples=20)
    assert summary["base"]["eval"]["sentences"]["value"] == 1 and summary["split"]["eval"]["sentences"]["value"] == 2
    assert summary["base"]["eval"]["coverage"]["value"] == summary["split"]["eval"]["coverage"]["value"] == 1


def test_repeated_sentences_in_both_worlds():
    """Repeating a correct sentence lowers the per-claim rates (every mention is a claim); the share of repeated
    sentences shows it, from the scorer's count (synthetic) and from the text (COCO) alike."""
    scene = {"objects": [{"shape": "heart", "colour": "red", "size": "large", "cx": 20, "cy": 20, "radius": 14},
                         {"shape": "star", "colour": "yellow", "size": "small", "cx": 45, "cy": 45, "radius": 9}]}
    scene["relations"] = world.scene_relations(scene["objects"])
    once = "there is a large red heart . there is a small blue star ."
    thrice = "there is a large red heart . there is a small blue star . there is a large red heart . " \
             "There is a large  red heart ."
    for synthetic in (True, False):
        counts = [E.description_record(text, scene, E.world_vocabulary(), synthetic)["counts"] for text in (once, thrice)]
        assert [(c["n_sentences"], c["n_duplicate_sentences"]) for c in counts] == [(2, 0), (4, 2)]
    records = [{"policy": policy, "split": "eval", "image_id": 0,
                **E.description_record(text, scene, E.world_vocabulary(), True)}
               for policy, text in (("once", once), ("thrice", thrice))]
    summary = E.summarise(records, n_resamples=20)
    assert [summary[p]["eval"]["repeated_sentences"]["value"] for p in ("once", "thrice")] == [0, 0.5]
    assert [summary[p]["eval"]["colour_halluc"]["value"] for p in ("once", "thrice")] == [0.5, 0.25]


def test_tables_figure_and_headline():
    records = [_record(p, i, n_object_judged=4, n_object_false=f, n_covered=2, n_scene_objects=3)
               for p, f in (("base", 2), ("fgaif", 0)) for i in range(10)]
    summary, tests = E.summarise(records, n_resamples=100), E.paired_tests(records, "base", n_resamples=100)
    markdown = E.results_markdown(summary, tests)
    assert "| object_halluc | 0.500 [0.500, 0.500] | 0.000 [0.000, 0.000] | -0.500 (p=" in markdown
    rows = list(csv.DictReader(io.StringIO(E.results_csv(summary, tests))))
    row = next(r for r in rows if r["policy"] == "fgaif" and r["metric"] == "object_halluc")
    assert float(row["value"]) == 0.0 and float(row["diff"]) == -0.5 and float(row["p"]) < 0.05
    assert next(r for r in rows if r["policy"] == "base")["p"] == ""
    fig = E.metrics_figure(summary, "eval", ["object_halluc", "coverage"])
    assert len(fig.axes[0].patches) == 4
    checks = {name: ok for name, ok, _ in E.headline_checks(summary, tests)}
    assert checks["object_halluc lower"] is True and checks["coverage within 5 points"] is True
    assert checks["attribute_halluc lower"] is None


def test_verdicts_read_each_metric_direction():
    assert E.verdict("object_halluc", {"diff": -0.02, "p": 0.01}) == "better"
    assert E.verdict("object_halluc", {"diff": +0.02, "p": 0.01}) == "worse"
    assert E.verdict("coverage", {"diff": -0.02, "p": 0.01}) == "worse"
    assert E.verdict("pope_random_f1", {"diff": +0.02, "p": 0.049}) == "better"
    assert E.verdict("attribute_halluc", {"diff": -0.02, "p": 0.05}) == "n.s."
    assert E.verdict("words", {"diff": -3.0, "p": 0.001}) == ""              # no better direction
    assert E.verdict("pope_random_yes_ratio", {"diff": 0.2, "p": 0.001}) == ""
    assert E.verdict("object_halluc", {"diff": None, "p": None}) == "" and E.verdict("object_halluc", None) == ""
    assert not E.LOWER_IS_BETTER & E.HIGHER_IS_BETTER
    assert (E.LOWER_IS_BETTER | E.HIGHER_IS_BETTER) <= set(E.METRICS)
    # fewer false objects and less coverage: better on one, worse on the other, in the results table
    records = [_record(p, i, n_object_judged=4, n_object_false=f, n_covered=c, n_scene_objects=4)
               for p, f, c in (("base", 2, 4), ("fgaif", 0, 2)) for i in range(20)]
    summary, tests = E.summarise(records, n_resamples=100), E.paired_tests(records, "base", n_resamples=100)
    markdown = E.results_markdown(summary, tests)
    assert "| object_halluc | 0.500 [0.500, 0.500] | 0.000 [0.000, 0.000] | -0.500 (p=0.010) better |" in markdown
    assert "| coverage | 1.000 [1.000, 1.000] | 0.500 [0.500, 0.500] | -0.500 (p=0.010) worse |" in markdown


# ---------------------------------------------------------------------------------------------- judges

SECRET = "sk-test-judge-NEVER-WRITE-ME"
OPENAI_SECRET = "sk-openai-not-for-the-judge-stub"


def judge_reply(body):
    text = body["messages"][-1]["content"]
    if "Model answer:" in text:
        answer = text.split("Model answer:")[1]
        content = ("Informative and correct.\nRating: 5" if "a red bus" in answer else
                   "It invents a dog.\nRating: 1" if "a dog" in answer else "I think it is fine.")
    else:
        answer = text.split("[Assistant 2]")[1]
        content = "8 6\nThe second misses details." if "short" in answer else \
            "7 7\nBoth good." if "good" in answer else "Score: eight and six"
    return Reply(content=content)


@pytest.fixture
def judge_server(monkeypatch):
    monkeypatch.setenv("JUDGE_API_KEY", SECRET)
    monkeypatch.setenv("OPENAI_API_KEY", OPENAI_SECRET)   # for api.openai.com only: never sent to the stub
    with StubServer(default=judge_reply) as server:
        yield server


def _judge(server, cache_dir, concurrency=2):
    ep = params.EvaluateParams(judge_model="judge-stub", judge_base_url=server.url, judge_api_key_env="JUDGE_API_KEY")
    return E.make_judge(ep, cache_dir, concurrency=concurrency, max_retries=1, timeout=5, backoff_base=0.001,
                        progress=False)


def test_mmhal_judge_ratings_malformed_answers_and_cache(judge_server, tmp_path):
    items = [{"question_type": "attribute", "image_content": ["bus", "road"], "question": "What is shown?",
              "gt_answer": "A red bus."}] * 3
    answers = ["It is a red bus.", "It is a dog.", "Hard to say."]
    with pytest.warns(UserWarning, match=r"mmhal: 1 of 3 judge answers for policy 'base' .*'malformed': 1"):
        records = E.judge_mmhal(_judge(judge_server, tmp_path), items, answers, "base")
    assert [r["judge"]["status"] for r in records] == ["ok", "ok", "malformed"]
    assert [r["judge"]["value"] for r in records] == [5, 1, None]
    assert "Rating" in records[2]["judge"]["error"] and records[2]["counts"] == {}
    summary = E.summarise(records, n_resamples=50)["base"]["mmhal"]
    assert summary["mmhal_score"]["value"] == pytest.approx(3.0)
    assert summary["mmhal_halluc"]["value"] == pytest.approx(0.5)
    assert E.judge_status_counts(records) == {"mmhal": {"ok": 2, "malformed": 1}}
    sent = len(judge_server.requests)
    with pytest.warns(UserWarning, match="mmhal: 1 of 3"):
        again = E.judge_mmhal(_judge(judge_server, tmp_path), items, answers, "base")
    assert len(judge_server.requests) == sent and all(r["judge"]["cached"] for r in again)
    assert [r["judge"]["status"] for r in again] == ["ok", "ok", "malformed"]
    assert {r["headers"]["authorization"] for r in judge_server.requests} == {f"Bearer {SECRET}"}
    assert all(SECRET not in path.read_text() for path in tmp_path.rglob("*.json"))


def test_llava_bench_relative_score_and_failed_calls(judge_server, tmp_path):
    items = [{"question_id": k, "context": "A street.", "question": f"Describe {k}.", "reference": "A long answer."}
             for k in range(4)]
    answers = ["short", "good", "???", "short"]
    judge_server.script.append(Reply(status=400, error_message="bad request"))   # the first request (one thread)
    with pytest.warns(UserWarning, match="llava_bench: 2 of 4 judge answers for policy 'base'"):
        records = E.judge_llava_bench(_judge(judge_server, tmp_path, concurrency=1), items, answers, "base")
    assert [r["judge"]["status"] for r in records] == ["failed", "ok", "malformed", "ok"]
    assert "HTTP 400" in records[0]["judge"]["error"] and records[0]["counts"] == {}
    ok = [r for r in records if r["judge"]["status"] == "ok"]
    expected = sum(r["judge"]["value"][1] for r in ok) / sum(r["judge"]["value"][0] for r in ok) * 100
    summary = E.summarise(records, n_resamples=50)["base"]["llava_bench"]
    assert summary["llava_bench_relative"]["value"] == pytest.approx(expected)
    assert E.parse_pair_scores("8 6\nwhy") == ((8.0, 6.0), None)
    assert E.parse_pair_scores("11 3")[0] is None and E.parse_pair_scores("")[0] is None


def _llava_bench_folder(folder, questions):
    (folder / "images").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(folder / "images" / "a.jpg")
    (folder / "context.jsonl").write_text('{"image": "a.jpg", "caption": "A street."}\n')
    (folder / "answers_gpt4.jsonl").write_text('{"question_id": 1, "text": "A long answer."}\n')
    (folder / "questions.jsonl").write_text(questions)
    return folder


def test_a_broken_judged_benchmark_stops_stage_06_before_any_policy_generates(tmp_path, monkeypatch):
    good = _llava_bench_folder(tmp_path / "good", '{"question_id": 1, "image": "a.jpg", "text": "Describe it."}\n')
    assert [i["question_id"] for i in E.check_judged_benchmarks(params.EvaluateParams(llava_bench_path=str(good)))[
        "llava_bench"]] == [1]
    broken = _llava_bench_folder(tmp_path / "broken", '{"question_id": 1, "image": "a.jpg", "text": "Describe."}\n'
                                                      '{"question_id": 2, "image": "a.jpg"}\n')
    with pytest.raises(ValueError, match=r"questions.jsonl:2: no \['text'\]"):
        E.check_judged_benchmarks(params.EvaluateParams(llava_bench_path=str(broken)))
    missing = _llava_bench_folder(tmp_path / "missing", '{"question_id": 1, "image": "b.jpg", "text": "Describe."}\n')
    mmhal = tmp_path / "mmhal"
    mmhal.mkdir()
    (mmhal / "response_template.json").write_text('[{"image_src": "x/a.jpg"}]')
    loaded = []
    monkeypatch.setattr(E, "load_policy", lambda *a, **k: loaded.append(a) or (_ for _ in ()).throw(AssertionError))
    P = params.load(params.REPO_ROOT / "params" / "smoke.yaml")
    for folder, key, message in ((missing, "llava_bench_path", "image 'b.jpg' not found"),
                                 (mmhal, "mmhal_path", r"response_template.json: item 0 has no \['question'\]")):
        P.evaluate = params.EvaluateParams(**{key: str(folder)})
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            E.evaluate_policies({"base": None}, "unused", P, ({}, {}, None, {}, True), tmp_path / "kept",
                                judge=object())
    assert loaded == []   # no policy was loaded, let alone generated with


def test_a_kept_policy_s_failed_judge_calls_are_asked_again_without_generating(judge_server, tmp_path, monkeypatch):
    folder = _llava_bench_folder(tmp_path / "bench", '{"question_id": 1, "image": "a.jpg", "text": "Describe it."}\n')
    P = params.load(params.REPO_ROOT / "params" / "smoke.yaml")
    P.evaluate = params.EvaluateParams(llava_bench_path=str(folder), judge_model="judge-stub",
                                       judge_base_url=judge_server.url)
    judge = _judge(judge_server, tmp_path / "judge_cache", concurrency=1)
    items = E.check_judged_benchmarks(P.evaluate)["llava_bench"]
    judge_server.script.append(Reply(status=400, error_message="the judge was down"))
    with pytest.warns(UserWarning, match="llava_bench: 1 of 1"):
        failed = E.judge_llava_bench(judge, items, ["short"], "base")
    assert failed[0]["judge"]["status"] == "failed"
    kept = tmp_path / "kept"
    name = E.policy_cache_name("base", None, {})
    world.write_jsonl(kept / name, [{"policy": "base", "split": "eval", "image_id": 7, "counts": {}}] + failed)
    monkeypatch.setattr(E, "load_policy", lambda *a, **k: (_ for _ in ()).throw(AssertionError("generated")))
    records = E.evaluate_policies({"base": None}, "unused", P, ({}, {}, None, {}, True), kept, judge=judge)
    assert [r["split"] for r in records] == ["eval", "llava_bench"]
    assert records[1]["judge"]["status"] == "ok" and records[1]["counts"] == {"llava_reference_score": 8.0,
                                                                             "llava_model_score": 6.0}
    assert [json.loads(line)["judge"]["status"] for line in (kept / name).read_text().splitlines()[1:]] == ["ok"]


def test_stage_06_generates_with_the_params_answer_lengths(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(E, "load_policy", lambda *a, **k: (None, None))
    monkeypatch.setattr(E, "evaluate_policy", lambda *a, **k: calls.append(k) or [])
    P = params.load(params.REPO_ROOT / "params" / "smoke.yaml")
    P.evaluate.max_new_tokens, P.evaluate.pope_max_new_tokens = 33, 5
    E.evaluate_policies({"base": None}, "unused", P, ({}, {}, None, {}, True), tmp_path / "kept")
    assert [(k["max_new_tokens"], k["pope_max_new_tokens"]) for k in calls] == [(33, 5)]


def test_pair_scores_need_a_first_line_of_exactly_two_numbers():
    assert E.parse_pair_scores("8 9") == ((8.0, 9.0), None)
    assert E.parse_pair_scores("0 6") == ((0.0, 6.0), None)   # kept: the relative score is a ratio of sums
    assert E.parse_pair_scores("8, 9\nBoth fine.") == ((8.0, 9.0), None)
    assert E.parse_pair_scores("8.5 9") == ((8.5, 9.0), None)
    for content in ("Assistant 1: 8\nAssistant 2: 9", "Scores: 8 9", "8 9 10", "8 and 9", "8/10 9/10"):
        value, problem = E.parse_pair_scores(content)
        assert value is None and "exactly two scores" in problem, content


def test_judge_cache_is_keyed_by_endpoint_and_temperature(judge_server, tmp_path):
    items = [{"question_type": "attribute", "image_content": ["bus"], "question": "What is shown?",
              "gt_answer": "A red bus."}]
    E.judge_mmhal(_judge(judge_server, tmp_path), items, ["It is a red bus."], "base")
    assert len(judge_server.requests) == 1
    assert E.judge_mmhal(_judge(judge_server, tmp_path), items, ["It is a red bus."], "base")[0]["judge"]["cached"]
    warmer = E.make_judge(params.EvaluateParams(judge_model="judge-stub", judge_base_url=judge_server.url), tmp_path,
                          temperature=0.7, max_retries=0, timeout=5, progress=False)
    assert not E.judge_mmhal(warmer, items, ["It is a red bus."], "base")[0]["judge"]["cached"]
    elsewhere = E.make_judge(params.EvaluateParams(judge_model="judge-stub", judge_base_url=judge_server.url + "/"),
                             tmp_path, max_retries=0, timeout=5, progress=False)    # the same server, another URL
    assert not E.judge_mmhal(elsewhere, items, ["It is a red bus."], "base")[0]["judge"]["cached"]
    assert len(judge_server.requests) == 3
    assert E.parse_mmhal_rating("blah\nRating: 7")[0] is None and E.parse_mmhal_rating("**Rating:** 4") == (4, None)


def test_benchmark_folders_are_read(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.jpg").write_bytes(b"x")
    (tmp_path / "response_template.json").write_text(json.dumps([{"image_src": "https://x.org/y/a.jpg",
                                                                  "question": "q", "gt_answer": "g"}]))
    assert E.load_mmhal(tmp_path)[0]["image_path"] == str(tmp_path / "images" / "a.jpg")
    (tmp_path / "questions.jsonl").write_text(json.dumps({"question_id": 0, "image": "a.jpg", "text": "q?",
                                                          "category": "conv"}) + "\n")
    (tmp_path / "context.jsonl").write_text(json.dumps({"id": "a", "image": "a.jpg", "caption": "c"}) + "\n")
    (tmp_path / "answers_gpt4.jsonl").write_text(json.dumps({"question_id": 0, "text": "ref"}) + "\n")
    item = E.load_llava_bench(tmp_path)[0]
    assert (item["question"], item["context"], item["reference"], item["category"]) == ("q?", "c", "ref", "conv")


# ---------------------------------------------------------------------------------------------- one policy, end to end

@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    data = params.DataParams(n_eval=3, n_eval_long=2, n_eval_ood=2)
    world.build_synthetic_world(data, 0, root / "data", splits=E.SYNTHETIC_SPLITS, progress=False)
    arch = params.TinyArchParams(patch_size=16, vision_hidden=32, text_hidden=32, text_layers=1, vision_layers=1,
                                 heads=2)
    tokenizer = models.build_tiny_tokenizer()
    processor = models.build_tiny_processor(tokenizer, 64, 16)
    model = models.build_tiny_llava(arch, 64, tokenizer, seed=0).eval()
    models.save_lvlm(model, processor, root / "policy")
    p = params.Params(data=data, evaluate=params.EvaluateParams(n_images=2, pope_objects=2, max_new_tokens=6))
    return root, p


def test_policy_sources_and_adapter_merge(tiny_setup, tmp_path):
    root, _ = tiny_setup
    base, processor = models.load_lvlm(str(root / "policy"), device="cpu")
    peft_model = models.add_lora(base, r=2)
    with torch.no_grad():
        for name, weight in peft_model.named_parameters():
            if "lora_B" in name:
                weight.normal_(0, 0.5)
    peft_model.save_pretrained(tmp_path / "own" / "policy_adapter")
    batch = processor(images=[np.zeros((64, 64, 3), np.uint8)],
                      text=[models.chat_prompt(processor, "Describe this image in detail.")], return_tensors="pt")
    merged, _ = E.load_policy(root / "policy", tmp_path / "own" / "policy_adapter", device="cpu")
    plain, _ = E.load_policy(root / "policy", None, device="cpu")
    with torch.no_grad():
        expected = peft_model(**batch).logits
        assert torch.allclose(merged(**batch).logits, expected, atol=1e-4)
        assert not torch.allclose(plain(**batch).logits, expected, atol=1e-3)
    assert not hasattr(merged, "peft_config")                     # float32: merged, generates at full speed
    with torch.no_grad():                                         # an update below bf16's resolution
        for name, weight in peft_model.named_parameters():
            if "lora_B" in name:
                weight.normal_(0, 1e-4)
    peft_model.save_pretrained(tmp_path / "small" / "policy_adapter")
    half, _ = E.load_policy(root / "policy", tmp_path / "small" / "policy_adapter", dtype="bfloat16", device="cpu")
    assert hasattr(half, "peft_config")                           # bf16: the adapter stays unmerged
    lora_b = [w for n, w in half.named_parameters() if "lora_B" in n]
    assert lora_b and all(w.abs().max() > 0 for w in lora_b)     # ... and whole (merging would round it away)
    (tmp_path / "runs" / "sparse" / "05_ppo").mkdir(parents=True)
    peft_model.save_pretrained(tmp_path / "runs" / "sparse" / "05_ppo" / "policy_adapter")
    sources, notes = E.policy_sources(tmp_path / "own" / "policy_adapter", ["sparse", "no_object"],
                                      lambda run, stage: tmp_path / "runs" / run / stage)
    assert list(sources) == ["base", "fgaif", "sparse"] and sources["base"] is None
    assert len(notes) == 1 and notes[0].startswith("no_object: no policy adapter")


def test_kept_records_are_named_by_label_adapter_bytes_and_package_versions(tmp_path):
    versions = {"torch": "2.13.0", "transformers": "5.24.0"}
    for folder, weights in (("a", b"\x01\x02"), ("copy_of_a", b"\x01\x02"), ("b", b"\x01\x03")):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "adapter_model.safetensors").write_bytes(weights)
        (tmp_path / folder / "adapter_config.json").write_text('{"r": 2}')
    name = E.policy_cache_name("fgaif", tmp_path / "a", versions)
    assert name.startswith("fgaif.") and name.endswith(".jsonl")
    assert E.policy_cache_name("fgaif", tmp_path / "copy_of_a", versions) == name        # the bytes, not the folder
    assert E.policy_cache_name("fgaif", tmp_path / "b", versions) != name                 # other weights
    assert E.policy_cache_name("sparse", tmp_path / "a", versions) != name
    assert E.policy_cache_name("fgaif", tmp_path / "a", {**versions, "transformers": "5.25.0"}) != name
    assert E.policy_cache_name("base", None, versions) != E.policy_cache_name("base", None, {"torch": "2.11.0"})


def test_a_policy_evaluated_once_is_read_back_and_an_unreadable_file_is_evaluated_again(tmp_path):
    calls = []

    def evaluate_fn():
        calls.append(1)
        return [{"image_id": 7, "policy": "fgaif", "split": "eval", "counts": {"objects": 3, "covered": 2},
                 "description": "a <b>red</b> ring \u00e9"}]

    first, kept_first = E.records_of_policy(tmp_path / "kept", "fgaif.x.jsonl", evaluate_fn)
    second, kept_second = E.records_of_policy(tmp_path / "kept", "fgaif.x.jsonl", evaluate_fn)
    assert (kept_first, kept_second, len(calls)) == (False, True, 1)
    assert second == first
    assert [p.name for p in (tmp_path / "kept").iterdir()] == ["fgaif.x.jsonl"]           # no temporary file left
    (tmp_path / "kept" / "fgaif.x.jsonl").write_text('{"image_id": 7, "coun')              # cut short by hand
    with pytest.warns(UserWarning, match="fgaif.x.jsonl: unreadable kept records"):
        third, kept_third = E.records_of_policy(tmp_path / "kept", "fgaif.x.jsonl", evaluate_fn)
    assert (third, kept_third, len(calls)) == (first, False, 2)
    assert E.records_of_policy(tmp_path / "kept", "fgaif.x.jsonl", evaluate_fn)[1]


def test_evaluate_policy_on_synthetic_splits(tiny_setup):
    root, p = tiny_setup
    scenes_by_split, pope_by_split, load_image, vocabulary, synthetic = E.evaluation_inputs(p, root / "data")
    assert synthetic and [len(scenes_by_split[s]) for s in E.SYNTHETIC_SPLITS] == [2, 2, 2]
    assert {r["image_id"] for r in pope_by_split["eval"]} == {s["image_id"] for s in scenes_by_split["eval"]}
    model, processor = E.load_policy(root / "policy", device="cpu")
    records = []
    for policy in ("base", "fgaif"):
        records += E.evaluate_policy(model, processor, scenes_by_split, load_image, pope_by_split, vocabulary,
                                     synthetic, policy=policy, batch_size=4, max_new_tokens=6, progress=False)
    assert len(records) == 12 and {r["split"] for r in records} == set(E.SYNTHETIC_SPLITS)
    first = records[0]
    assert first["counts"]["n_scene_objects"] == len(scenes_by_split["eval"][0]["objects"])
    assert len(first["pope"]) == len([r for r in pope_by_split["eval"] if r["image_id"] == first["image_id"]])
    assert all(q["answer"] in ("yes", "no") for q in first["pope"])
    n_pope = sum(first["counts"][f"pope_random_{k}"] for k in ("tp", "fp", "tn", "fn"))
    assert n_pope == len([q for q in first["pope"] if q["sampler"] == "random"])
    summary = E.summarise(records, n_resamples=50)
    assert {"object_halluc", "coverage", "chair_i", "pope_adversarial_f1"} <= set(summary["base"]["eval_ood"])
    # the same model, greedy: the same records but for the policy label, so no difference on any metric
    assert [dict(r, policy=None) for r in records[:6]] == [dict(r, policy=None) for r in records[6:]]
    tests = E.paired_tests(records, "base", n_resamples=50)
    assert set(tests) == {"fgaif"} and set(tests["fgaif"]) == set(E.SYNTHETIC_SPLITS)
    diffs = [result["diff"] for split in tests["fgaif"].values() for result in split.values()]
    assert "coverage" in tests["fgaif"]["eval"] and tests["fgaif"]["eval"]["coverage"]["diff"] is not None
    assert all(diff == 0.0 for diff in diffs if diff is not None)
    json.dumps(records)                                                    # records are JSONL-ready
    page = E.examples_html(records, scenes_by_split["eval"], load_image, n=2)
    assert page.count("<img") == 2 and page.count('class="pol"') == 4


def test_examples_html_escapes_model_text_and_names():
    scene = {"image_id": 1, "objects": [{"shape": "dog", "colour": None, "size": None}]}
    text = "<script>alert(1)</script> a dog & a cat"
    record = {"policy": "<b>x</b>", "split": "eval", "image_id": 1, "description": text,
              **{k: v for k, v in E.chair_counts(text, {"dog"}, E.coco_vocabulary()).items() if k == "mentions"}}
    page = E.examples_html([record], [scene])
    assert "<script>" not in page and "&lt;script&gt;" in page and "&lt;b&gt;x&lt;/b&gt;" in page
    assert "#f5b3b3" in page and "#b9f0b4" in page     # the cat is red, the dog green


@pytest.mark.filterwarnings("ignore:.*judge answers for policy:UserWarning")   # the stub rates no random answer
def test_judged_benchmarks_with_a_tiny_policy(tiny_setup, judge_server, tmp_path):
    root, _ = tiny_setup
    folder = tmp_path / "bench"
    (folder / "images").mkdir(parents=True)
    Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(folder / "images" / "a.png")
    (folder / "response_template.json").write_text(json.dumps([{
        "image_src": "https://example.org/a.png", "question_type": "attribute", "image_content": ["star"],
        "question": "what colour is the star ?", "gt_answer": "yellow"}]))
    (folder / "questions.jsonl").write_text(json.dumps({"question_id": 7, "image": "a.png",
                                                        "text": "describe this image in detail ."}) + "\n")
    (folder / "context.jsonl").write_text(json.dumps({"image": "a.png", "caption": "a grey square"}) + "\n")
    (folder / "answers_gpt4.jsonl").write_text(json.dumps({"question_id": 7, "text": "A grey image."}) + "\n")
    ep = params.EvaluateParams(judge_model="judge-stub", judge_base_url=judge_server.url, mmhal_path=str(folder),
                               llava_bench_path=str(folder))
    model, processor = E.load_policy(root / "policy", device="cpu")
    judge = E.make_judge(ep, tmp_path / "cache", concurrency=1, max_retries=0, timeout=5, progress=False)
    records = E.run_judged_benchmarks(model, processor, "base", ep, judge, max_new_tokens=5, progress=False)
    assert [r["split"] for r in records] == ["mmhal", "llava_bench"] and records[1]["image_id"] == 7
    assert all(r["judge"]["status"] in ("ok", "malformed") for r in records)
    sent = [request["body"]["messages"][-1]["content"] for request in judge_server.requests]
    assert f"Model answer: {records[0]['answer']}" in sent[0] and "[Assistant 1]\nA grey image." in sent[1]


def test_ablation_rows_checks_markdown_and_figures():
    records = [_record(p, i, n_object_judged=4, n_object_false=o, n_attribute_judged=2, n_attribute_false=a,
                       n_relation_judged=1, n_relation_false=r, chair_caption_hallucinated=o > 0, chair_mentioned=3,
                       chair_hallucinated=o, chair_covered=2, chair_truth=3)
               for p, o, a, r in (("fgaif", 0, 0, 1), ("sparse", 1, 1, 0)) for i in range(12)]
    vs = {"sparse": E.paired_tests(records, "sparse", n_resamples=100)["fgaif"]}
    (check, passed, detail), = E.ablation_rows(vs)
    assert passed is True and "object_halluc -0.250" in detail and "relation_halluc +1.000" in detail
    # lower point estimates that the paired test cannot tell from noise are not "better"
    noisy = {"sparse": {"eval": {"object_halluc": {"diff": -0.0004, "p": 0.91},
                                 "attribute_halluc": {"diff": -0.005, "p": 0.17},
                                 "relation_halluc": {"diff": -0.03, "p": 0.01}}}}
    assert E.ablation_rows(noisy)[0][1] is False
    noisy["sparse"]["eval"]["attribute_halluc"]["p"] = 0.04
    assert E.ablation_rows(noisy)[0][1] is True
    table = E.checks_markdown([(check, passed, detail), ("x", None, "not measured"), ("y", False, "d")])
    assert table.splitlines()[2].startswith("| fgaif better than sparse on >= 2 of 3 types | yes |")
    assert "| y | **no** | d |" in table
    figs = E.figures(E.summarise(records, n_resamples=50))
    assert sorted(figs) == ["eval_chair.png", "eval_hallucination.png"]


def test_pope_f1_not_lower_means_no_decrease_the_paired_test_can_tell_from_noise():
    value = lambda v: {"value": v, "low": v - 0.02, "high": v + 0.02}  # noqa: E731
    summary = {"base": {"eval": {"pope_random_f1": value(0.503), "pope_popular_f1": value(0.80)}},
               "fgaif": {"eval": {"pope_random_f1": value(0.502), "pope_popular_f1": value(0.70)}}}
    tests = {"fgaif": {"eval": {"pope_random_f1": {"diff": -0.001, "p": 0.95},
                                "pope_popular_f1": {"diff": -0.10, "p": 0.001}}}}
    checks = {name: ok for name, ok, _ in E.headline_checks(summary, tests)}
    assert checks["POPE random F1 not lower"] is True         # a noise-sized dip
    assert checks["POPE popular F1 not lower"] is False       # a real drop


def test_attribute_confusions_by_hand():
    scene = {"image_id": 7, "objects": [
        {"shape": "circle", "colour": "red", "size": "small", "cx": 10, "cy": 10},     # typical circle: yellow
        {"shape": "square", "colour": "blue", "size": "large", "cx": 40, "cy": 40}]}
    texts = {"a": "there is a large blue circle .",   # size and colour both the square's: two binding errors
             "b": "there is a small yellow circle and a small blue square . there is a red triangle ."}
    records = [{"policy": policy, "split": "eval", "image_id": 7,
                **E.description_record(text, scene, E.world_vocabulary(), True)} for policy, text in texts.items()]
    records.append({**records[0], "split": "eval_ood"})                  # another split: not counted
    confusions = E.attribute_confusions(records, [scene], "eval")
    a, b = confusions["a"], confusions["b"]
    assert {k: n for k, n in a.items() if n} == {
        ("objects", "small"): 1, ("objects", "large"): 1, ("mentioned", "small"): 1,
        ("size", "small", "large"): 1, ("binding", "size"): 1, ("colour", "red", "blue"): 1, ("binding", "colour"): 1}
    # yellow is the circle's typical colour and no object's; the absent triangle's colour is not judged
    assert {k: n for k, n in b.items() if n} == {
        ("objects", "small"): 1, ("objects", "large"): 1, ("mentioned", "small"): 1, ("mentioned", "large"): 1,
        ("size", "small", "small"): 1, ("colour", "red", "yellow"): 1, ("colour_typical",): 1,
        ("size", "large", "small"): 1, ("binding", "size"): 1, ("colour", "blue", "blue"): 1}
    table = E.attribute_confusions_markdown(confusions).splitlines()
    assert table[2] == "| a | 1 | 1 | 0 | 1.000 | 1 | 1 | 0.000 | 1.000 | 1.000 | 0.000 |"
    assert table[3] == "| b | 2 | 0 | 1 | 1.000 | 2 | 1 | 1.000 | 0.000 | 1.000 | 1.000 |"
