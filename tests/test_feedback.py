"""AI feedback (stages 02-03): sub-sentence closing tokens from sampled ids, verdicts, label aggregation on
hand-built facts, the verifier answer cache and its resume, and sampling that resumes with the same samples."""
import json
import typing

import numpy as np
import pytest
import torch

from fgaif_utils import feedback, language, models, params, segment, stage

torch.set_num_threads(1)

SCENE = {"image_id": 7, "file_name": "images/feedback/7.png",
         "objects": [{"shape": "heart", "colour": "red", "size": "small", "cx": 12.0, "cy": 40.0},
                     {"shape": "star", "colour": "blue", "size": "large", "cx": 45.0, "cy": 20.0}],
         "relations": [{"subject": "heart", "relation": "left", "object": "star"}]}


@pytest.fixture(scope="module")
def tokenizer():
    return models.build_tiny_tokenizer()


def test_response_record_closing_tokens_come_from_the_sampled_ids(tokenizer):
    text = "there is a small red heart , a large blue star and a ring . the heart is left of the star ."
    ids = tokenizer(text, add_special_tokens=False).input_ids
    decode = lambda t: tokenizer.decode(t, skip_special_tokens=True)
    record = feedback.response_record(SCENE, 0, ids, decode(ids), decode)
    words = text.split()
    # sub-sentences: "there is ... heart ," | "a large blue star and a ring ." | "the heart is left of the star ."
    assert [s["text"] for s in record["subsentences"]] == [
        "there is a small red heart ,", "a large blue star and a ring .", "the heart is left of the star ."]
    assert [s["last_token"] for s in record["subsentences"]] == [6, 14, 22]
    assert [words[s["last_token"]] for s in record["subsentences"]] == [",", ".", "."]
    assert record["response_id"] == "7-0" and record["token_ids"] == ids


def test_closing_token_with_eos_and_padding_after_the_text(tokenizer):
    ids = tokenizer("there is a red heart .", add_special_tokens=False).input_ids
    ids = ids + [tokenizer.eos_token_id, tokenizer.pad_token_id]
    decode = lambda t: tokenizer.decode(t, skip_special_tokens=True)
    assert segment.subsentence_end_positions(ids, decode) == [5]


@pytest.mark.parametrize("fact,answer,verdict", [
    ({"type": "object", "subject": "ring", "negated": False}, "yes", True),
    ({"type": "object", "subject": "ring", "negated": False}, "no", False),
    ({"type": "object", "subject": "ring", "negated": True}, "no", True),     # "there is no ring", none there
    ({"type": "object", "subject": "ring", "negated": True}, "yes", False),
    ({"type": "attribute", "subject": "heart", "kind": "colour", "value": "red"}, "unknown", None),
])
def test_verdict_from_answer(fact, answer, verdict):
    assert feedback.verdict_from_answer(fact, answer) is verdict


def _row(fact_id, sub, fact, verdict, truth):
    return {"fact_id": fact_id, "response_id": "7-0", "image_id": 7, "subsentence": sub, "fact": fact,
            "verdict": verdict, "truth": truth}


def _two_subsentence_record():
    return {"response_id": "7-0", "image_id": 7, "text": "x", "token_ids": [1, 2],
            "subsentences": [{"text": "a", "span": [0, 1], "last_token": 0}, {"text": "b", "span": [1, 2], "last_token": 1}]}


def test_label_aggregation_on_two_facts_per_type():
    record = _two_subsentence_record()
    heart = {"type": "object", "subject": "heart", "negated": False}
    ring = {"type": "object", "subject": "ring", "negated": False}
    red = {"type": "attribute", "subject": "heart", "kind": "colour", "value": "red"}
    left = {"type": "relation", "subject": "heart", "relation": "left", "object": "star"}
    rows = [_row("a", 0, heart, True, True), _row("b", 0, ring, False, False),     # one of two objects false -> 1
            _row("c", 0, red, True, True),                                            # attribute true -> 0
            _row("d", 1, heart, True, True), _row("e", 1, left, None, True)]          # relation unknown -> -1
    [labelled] = feedback.label_records([record], rows, {7: SCENE})
    assert [s["labels"] for s in labelled["subsentences"]] == [[1, 0, -1], [0, -1, -1]]
    assert [s["gt_labels"] for s in labelled["subsentences"]] == [[1, 0, -1], [0, -1, 0]]
    assert labelled["subsentences"][0]["fact_ids"] == ["a", "b", "c"]
    assert labelled["subsentences"][1]["last_token"] == 1


def test_fact_rows_ask_one_question_per_fact():
    record = {"response_id": "7-0", "image_id": 7, "text": "there is a red ring .",
              "subsentences": [{"text": "there is a red ring .", "span": [0, 21], "last_token": 5}]}
    extraction = [[{"facts": [{"type": "object", "subject": "ring", "negated": False},
                              {"type": "attribute", "subject": "ring", "kind": "colour", "value": "red"}],
                    "status": "ok", "error": None}]]
    rows = feedback.fact_rows([record], extraction, " answer briefly.")
    assert [r["question"] for r in rows] == ["is there a ring in the image ? answer briefly.",
                                            "is the ring red ? answer briefly."]
    assert [r["fact_id"] for r in rows] == ["7-0-0-0", "7-0-0-1"]


def test_question_for_free_text_facts():
    assert language.question_for_fact({"type": "relation", "subject": "dog", "relation": "next to",
                                       "object": "bench"}) == "Is the dog next to the bench?"
    assert language.question_for_fact({"type": "attribute", "subject": "bench", "kind": "other",
                                       "value": "wooden"}) == "Is the bench wooden?"


class CountingVerifier:
    def __init__(self):
        self.asked = []

    def answer(self, images, questions):
        self.asked += list(questions)
        return ["yes" if "heart" in q else "no" for q in questions]


def test_verifier_cache_resumes_without_asking_again(tmp_path):
    facts = [{"type": "object", "subject": s, "negated": False} for s in ("heart", "ring", "star")]
    rows = [{"fact_id": str(i), "response_id": "7-0", "image_id": 7, "subsentence": 0, "fact": f,
             "question": language.question_for_fact(f)} for i, f in enumerate(facts)]
    load_image = lambda image_id: np.zeros((8, 8, 3), np.uint8)
    first = CountingVerifier()
    feedback.verify_facts(rows[:2], first, load_image, feedback.AnswerCache(tmp_path / "a.jsonl", ["v1"]))
    with open(tmp_path / "a.jsonl", "a") as handle:
        handle.write('{"key": "cut-by-a-ki')                       # a line a kill cut short
    second = CountingVerifier()
    out = feedback.verify_facts(rows, second, load_image, feedback.AnswerCache(tmp_path / "a.jsonl", ["v1"]))
    assert first.asked == [rows[0]["question"], rows[1]["question"]]
    assert second.asked == [rows[2]["question"]]
    assert [r["verdict"] for r in out] == [True, False, False]
    third = CountingVerifier()                                       # another verifier: nothing reused
    feedback.verify_facts(rows, third, load_image, feedback.AnswerCache(tmp_path / "a.jsonl", ["v2"]))
    assert len(third.asked) == 3
    # the cut line was dropped, not glued to the second run's first answer: a reload holds all three
    fourth = CountingVerifier()
    feedback.verify_facts(rows, fourth, load_image, feedback.AnswerCache(tmp_path / "a.jsonl", ["v1"]))
    assert fourth.asked == []
    # the same image id over other pixels (another world seed draws another picture 7): asked again
    fifth = CountingVerifier()
    feedback.verify_facts(rows, fifth, lambda image_id: np.ones((8, 8, 3), np.uint8),
                          feedback.AnswerCache(tmp_path / "a.jsonl", ["v1"]))
    assert len(fifth.asked) == 3


def test_the_answer_cache_id_names_each_verifier_s_answering_code():
    # every verifier the params allow has the modules whose sources key its answers, and they exist
    allowed = set(typing.get_args(params.FeedbackParams.__annotations__["verifier"]))
    assert set(feedback.ANSWERING_MODULES) == allowed
    for modules in feedback.ANSWERING_MODULES.values():
        assert "missing" not in stage.module_sources(modules).values()


def test_a_changed_answer_reader_asks_the_verifier_again(tmp_path, monkeypatch):
    P = params.Params(feedback=params.FeedbackParams(verifier="openai-vision", vision_base_url="http://127.0.0.1:9"))
    _, first = feedback.make_verifier(P, tmp_path, tmp_path / "vision", "models-hash")
    assert first[-1] == stage.module_sources(["llm"])
    monkeypatch.setattr(stage, "module_sources", lambda modules: {name: "edited" for name in modules})
    _, second = feedback.make_verifier(P, tmp_path, tmp_path / "vision", "models-hash")
    assert first != second and first[:-1] == second[:-1]


def test_verifier_asks_each_image_question_pair_once_across_batches(tmp_path):
    # Four responses to image 7 repeat "heart" and "ring"; with batches of 2 the repeats fall into other batches.
    subjects = ["heart", "ring", "heart", "ring", "heart", "star", "ring"]
    rows = [{"fact_id": str(i), "response_id": f"7-{i}", "image_id": 7, "subsentence": 0,
             "fact": {"type": "object", "subject": s, "negated": False},
             "question": language.question_for_fact({"type": "object", "subject": s, "negated": False})}
            for i, s in enumerate(subjects)]
    rows.append(dict(rows[0], fact_id="8", response_id="8-0", image_id=8))   # the same question, another image
    verifier = CountingVerifier()
    out = feedback.verify_facts(rows, verifier, lambda image_id: np.full((8, 8, 3), image_id, np.uint8),
                                feedback.AnswerCache(tmp_path / "a.jsonl", ["v1"]), batch_size=2)
    question = {s: language.question_for_fact({"type": "object", "subject": s, "negated": False})
                for s in ("heart", "ring", "star")}
    assert verifier.asked == [question["heart"], question["ring"], question["star"], question["heart"]]
    assert [r["verdict"] for r in out] == [True, False, True, False, True, False, False, True]
    loads = []   # an image is read once to key its answers, then once per batch that asks about it
    load_image = lambda image_id: loads.append(image_id) or np.full((8, 8, 3), image_id, np.uint8)  # noqa: E731
    feedback.verify_facts(rows, CountingVerifier(), load_image, feedback.AnswerCache(tmp_path / "b.jsonl", ["v1"]),
                          batch_size=3)                          # batches: heart, ring, star of 7 | heart of 8
    assert sorted(loads) == [7, 7, 8, 8]


def test_sampling_resumes_with_identical_samples(tokenizer, tmp_path, monkeypatch):
    arch = params.TinyArchParams(vision_hidden=32, text_hidden=32, text_layers=1, vision_layers=1, heads=2)
    processor = models.build_tiny_processor(tokenizer, 32, 8)
    model = models.build_tiny_llava(arch, 32, tokenizer, seed=0).eval()
    scenes = [dict(SCENE, image_id=i) for i in range(5)]
    images = lambda chunk: [np.full((32, 32, 3), 10 * s["image_id"], np.uint8) for s in chunk]
    sampling = params.SamplingParams(samples_per_image=2, max_new_tokens=12, batch_size=4)
    straight = feedback.sample_responses(model, processor, scenes, images, sampling, 0, tmp_path / "a")
    assert len(straight) == 10 and [r["response_id"] for r in straight[:3]] == ["0-0", "0-1", "1-0"]
    (tmp_path / "a" / "batch_00001.jsonl").unlink()                # as if killed before batch 1 was written
    calls = []
    sample = feedback.rollout.sample
    monkeypatch.setattr(feedback.rollout, "sample", lambda model, processor, chunk, *a, **k: (
        calls.append((len(chunk), k["seed"])), sample(model, processor, chunk, *a, **k))[1])
    resumed = feedback.sample_responses(model, processor, scenes, images, sampling, 0, tmp_path / "a")
    assert resumed == straight
    # 2 images a batch (4 // 2 samples): batches 0 and 2 come from the cache; only batch 1 (images 2 and 3, twice
    # each, seed 0 * 100003 + 1) is sampled again
    assert calls == [(4, 1)]
    image_id = processor.tokenizer.image_token_id
    for record in straight:
        assert image_id not in record["token_ids"]
        decode = lambda t: processor.tokenizer.decode(t, skip_special_tokens=True)
        assert record["text"] == decode(record["token_ids"])
        for sub in record["subsentences"]:
            assert record["text"][sub["span"][0]:sub["span"][1]] == sub["text"]


def test_existence_gate_counts_facts_about_absent_shapes_only_as_object_errors():
    record = _two_subsentence_record()
    ring = {"type": "object", "subject": "ring", "negated": False}
    heart = {"type": "object", "subject": "heart", "negated": False}
    red_ring = {"type": "attribute", "subject": "ring", "kind": "colour", "value": "red"}
    red_heart = {"type": "attribute", "subject": "heart", "kind": "colour", "value": "red"}
    heart_left_of_ring = {"type": "relation", "subject": "heart", "relation": "left", "object": "ring"}
    heart_above_star = {"type": "relation", "subject": "heart", "relation": "above", "object": "star"}
    rows = [_row("a", 0, ring, False, False), _row("b", 0, red_ring, False, None),   # absent ring, "red ring"
            _row("c", 0, heart, True, True), _row("d", 0, red_heart, False, False),  # heart there, not red
            _row("e", 1, heart_left_of_ring, False, None),                            # one side judged absent
            _row("f", 1, heart_above_star, True, True)]                               # star never asked about
    ungated = [s["labels"] for s in feedback.label_records([record], [dict(r) for r in rows])[0]["subsentences"]]
    assert ungated == [[1, 1, -1], [-1, -1, 1]]
    gated_rows = feedback.gate_on_existence([dict(r) for r in rows])
    assert [r["gated_by"] for r in gated_rows] == [None, "ring", None, None, "ring", None]
    assert [r["counts_as"] for r in gated_rows] == [False, None, True, False, None, True]
    assert [r["verdict"] for r in gated_rows] == [r["verdict"] for r in rows]       # the verifier's answer is kept
    labelled = feedback.label_records([record], gated_rows)[0]["subsentences"]
    # sub-sentence 0: the red heart is still an attribute error; sub-sentence 1: only the heart-star relation counts,
    # and it holds (ungated, the relation to the absent ring made it hallucinated)
    assert [s["labels"] for s in labelled] == [[1, 1, -1], [-1, -1, 0]]
    only_ring = [gated_rows[i] for i in (0, 1, 4)]
    assert [s["labels"] for s in feedback.label_records([record], only_ring)[0]["subsentences"]] == \
        [[1, -1, -1], [-1, -1, -1]]


def test_existence_gate_matches_a_shape_by_its_world_name_whatever_the_extractor_wrote():
    # an LLM extractor writes "the donut" for the object and "ring" for its colour: one shape in the world
    donut = {"type": "object", "subject": "the donut", "negated": False}
    red_ring = {"type": "attribute", "subject": "ring", "kind": "colour", "value": "red"}
    rows = [_row("a", 0, donut, False, False), _row("b", 0, red_ring, False, None)]
    assert [r["gated_by"] for r in feedback.gate_on_existence([dict(r) for r in rows], synthetic=True)] == \
        [None, "ring"]
    # elsewhere (COCO) only case and articles are read: "the Dog" and "dog" are one object, "donut" and "ring" two
    assert feedback.gate_name("the Dog") == feedback.gate_name("dog") == "dog"
    assert [r["gated_by"] for r in feedback.gate_on_existence([dict(r) for r in rows])] == [None, None]


def test_existence_gate_reads_negated_existence_and_mixed_answers():
    ring_absent_said = {"type": "object", "subject": "ring", "negated": True}     # "there is no ring"
    red_ring = {"type": "attribute", "subject": "ring", "kind": "colour", "value": "red"}
    rows = feedback.gate_on_existence([_row("a", 0, ring_absent_said, True, True), _row("b", 0, red_ring, False, None)])
    assert rows[1]["gated_by"] == "ring"                  # verifier agreed no ring: attribute not judged
    ring = {"type": "object", "subject": "ring", "negated": False}
    mixed = feedback.gate_on_existence([_row("a", 0, ring, True, True), _row("b", 0, ring_absent_said, False, False),
                                        _row("c", 1, ring, False, True), _row("d", 1, red_ring, False, False)])
    assert mixed[3]["gated_by"] is None and mixed[3]["counts_as"] is False   # answers disagree: no gate


class AnswerKey:
    """A verifier that says yes to exactly the questions of `true_facts`."""
    def __init__(self, true_facts):
        self.yes = {language.question_for_fact(f) for f in true_facts}

    def answer(self, images, questions):
        return ["yes" if q in self.yes else "no" for q in questions]


def test_size_twins_flip_only_size_words_and_get_the_same_feedback(tokenizer, tmp_path):
    decode = lambda t: tokenizer.decode(t, skip_special_tokens=True)
    texts = ["there is a small red heart . there is a little blue star .", "there is a red heart ."]
    records = [feedback.response_record(SCENE, i, tokenizer(t, add_special_tokens=False).input_ids, t, decode)
               for i, t in enumerate(texts)]
    twins = feedback.size_twins(records, tokenizer)
    assert len(twins) == 1                                   # the second response says no size word
    [twin] = twins
    assert twin["text"] == "there is a large red heart . there is a big blue star ."
    assert twin["response_id"] == "7-0~sizes" and twin["twin_of"] == "7-0" and twin["image_id"] == 7
    assert [s["last_token"] for s in twin["subsentences"]] == [s["last_token"] for s in records[0]["subsentences"]]
    # the scene: a small red heart and a large blue star; the verifier is right about all of it
    heart, star = ({"type": "object", "subject": s, "negated": False} for s in ("heart", "star"))
    attribute = lambda shape, kind, value: {"type": "attribute", "subject": shape, "kind": kind, "value": value}
    verifier = AnswerKey([heart, star, attribute("heart", "colour", "red"), attribute("heart", "size", "small"),
                          attribute("star", "colour", "blue"), attribute("star", "size", "large")])
    F = params.FeedbackParams(existence_gate=True)
    extractor = feedback.make_extractor(F, tmp_path / "llm")
    cache = feedback.AnswerCache(tmp_path / "answers.jsonl", ["key"])
    labels = {}
    for name, responses in (("original", records[:1]), ("twin", twins)):
        rows, _ = feedback.judge_responses(responses, extractor, verifier, cache, lambda i: np.zeros((8, 8, 3)), F,
                                           {7: SCENE})
        [labelled] = feedback.label_records(responses, rows, {7: SCENE})
        labels[name] = [(s["labels"], s["gt_labels"]) for s in labelled["subsentences"]]
    # original: heart all right; "little blue star" is a wrong size. Twin: "large red heart" is wrong, the star right
    assert labels["original"] == [([0, 0, -1], [0, 0, -1]), ([0, 1, -1], [0, 1, -1])]
    assert labels["twin"] == [([0, 1, -1], [0, 1, -1]), ([0, 0, -1], [0, 0, -1])]


def test_label_summary_warns_when_the_verifier_answers_neither_yes_nor_no():
    # the paper profile's LLaVA verifier behind a wrong question suffix, or an untrained tiny LVLM, answers "unknown"
    records = [{"subsentences": [{"labels": [-1, -1, -1]}, {"labels": [1, -1, -1]}]}]
    rows = [{"answer": answer} for answer in ("unknown", "unknown", "yes")]
    summary = feedback.label_summary(records, rows, [[{"status": "ok"}, {"status": "ok"}]])
    assert summary["answers"] == {"yes": 1, "no": 0, "unknown": 2}
    assert summary["labels"]["object"] == {"-1": 1, "0": 0, "1": 1}
    first, *others = summary["warnings"]
    assert first.startswith("2 of 3 verifier answers were neither yes nor no") and "feedback.question_suffix" in first
    assert others == [f"no sub-sentence was judged correct or hallucinated for {t}: its reward model has nothing "
                      f"to learn" for t in ("attribute", "relation")]
    healthy = feedback.label_summary([{"subsentences": [{"labels": [0, 1, 0]}]}], [{"answer": "no"}] * 3,
                                     [[{"status": "ok"}]])
    assert healthy["warnings"] == []


def test_hf_verifier_generates_each_distinct_image_question_pair_once(monkeypatch):
    asked = []

    def answer_questions(model, processor, images, questions, batch_size, desc):
        asked.extend(zip([int(image[0, 0, 0]) for image in images], questions))
        return [f"{question} @ {int(image[0, 0, 0])}" for image, question in zip(images, questions)]

    monkeypatch.setattr(feedback.tiny_train, "answer_questions", answer_questions)
    images = np.stack([np.full((4, 4, 3), value, np.uint8) for value in (1, 2, 1, 1, 2)])   # rows: fresh views
    questions = ["is there a star ?", "is there a star ?", "is the star red ?", "is there a star ?", "is there a star ?"]
    answers = feedback.HFVerifier(None, None).answer(images, questions)
    assert answers == ["is there a star ? @ 1", "is there a star ? @ 2", "is the star red ? @ 1",
                       "is there a star ? @ 1", "is there a star ? @ 2"]
    assert asked == [(1, "is there a star ?"), (2, "is there a star ?"), (1, "is the star red ?")]


class FlakyVerifier:
    """Says yes to everything, except that its calls about the questions in `fail` fail (None) the first time."""
    def __init__(self, fail):
        self.fail, self.asked = set(fail), []

    def answer(self, images, questions):
        self.asked += list(questions)
        answers = [None if q in self.fail else "yes" for q in questions]
        self.fail -= set(questions)
        return answers


def _object_rows(subjects):
    facts = [{"type": "object", "subject": s, "negated": False} for s in subjects]
    return [{"fact_id": f"7-0-{i}-0", "response_id": "7-0", "image_id": 7, "subsentence": i, "fact": f,
             "question": language.question_for_fact(f)} for i, f in enumerate(facts)]


def test_a_failed_verifier_call_is_not_cached_and_a_rerun_asks_it_again(tmp_path):
    rows = _object_rows(["heart", "ring"])
    load_image = lambda image_id: np.zeros((8, 8, 3), np.uint8)
    verifier = FlakyVerifier([rows[1]["question"]])
    first = feedback.verify_facts([dict(r) for r in rows], verifier, load_image,
                                  feedback.AnswerCache(tmp_path / "a.jsonl", ["v"]))
    assert [r["answer"] for r in first] == ["yes", None] and [r["verdict"] for r in first] == [True, None]
    assert len((tmp_path / "a.jsonl").read_text().splitlines()) == 1      # only the answer is stored
    record = _two_subsentence_record()
    [labelled] = feedback.label_records([record], first)
    assert [s["labels"] for s in labelled["subsentences"]] == [[0, -1, -1], [None, None, None]]
    assert labelled["subsentences"][1]["label_error"] == "the verifier call failed for facts ['7-0-1-0']"
    assert "label_error" not in labelled["subsentences"][0]
    summary = feedback.label_summary([labelled], first, [[{"status": "ok"}, {"status": "ok"}]])
    assert summary["verification_failed"] == 1 and summary["unlabelled"] == 1
    assert summary["warnings"][0].startswith("1 of 2 sub-sentences carry no label")
    second = feedback.verify_facts([dict(r) for r in rows], verifier, load_image,
                                   feedback.AnswerCache(tmp_path / "a.jsonl", ["v"]))
    assert verifier.asked == [rows[0]["question"], rows[1]["question"], rows[1]["question"]]
    assert [r["answer"] for r in second] == ["yes", "yes"]
    assert [s["labels"] for s in feedback.label_records([record], second)[0]["subsentences"]] == [[0, -1, -1]] * 2


class FlakyExtractor:
    """The rules extractor, except that it fails for sub-sentences holding `failing` (as an LLM backend does)."""
    def __init__(self, failing):
        self.failing = failing

    def extract_many(self, items):
        from fgaif_utils import llm
        results = llm.RulesFactExtractor().extract_many(items)
        for result, (subsentence, _) in zip(results, items):
            if self.failing in subsentence:
                result.update(facts=[], status="failed", error="HTTP 503 after 6 attempts")
        return results


def _responses(tokenizer, texts):
    decode = lambda t: tokenizer.decode(t, skip_special_tokens=True)
    return [feedback.response_record(SCENE, i, tokenizer(t, add_special_tokens=False).input_ids, t, decode)
            for i, t in enumerate(texts)]


def test_a_failed_extraction_leaves_its_sub_sentence_unlabelled(tokenizer, tmp_path):
    records = _responses(tokenizer, ["there is a red heart . there is a ring .", "there is a blue star ."])
    F = params.FeedbackParams(max_failed_fraction=0.5)
    rows, extraction = feedback.judge_responses(records, FlakyExtractor("ring"), AnswerKey([]),
                                                feedback.AnswerCache(tmp_path / "a.jsonl", ["k"]),
                                                lambda i: np.zeros((8, 8, 3), np.uint8), F)
    labelled = feedback.label_records(records, rows, extraction=extraction)
    assert [s["labels"] for r in labelled for s in r["subsentences"]] == [[1, 1, -1], [None, None, None], [1, 1, -1]]
    assert labelled[0]["subsentences"][1]["label_error"] == "fact extraction failed: HTTP 503 after 6 attempts"
    assert feedback.label_summary(labelled, rows, extraction)["extraction_failed"] == 1


def test_stage_03_stops_above_the_failed_share_after_caching_every_answer(tokenizer, tmp_path):
    records = _responses(tokenizer, ["there is a red heart . there is a ring .", "there is a blue star .",
                                     "there is a green ring ."])
    load_image = lambda i: np.zeros((8, 8, 3), np.uint8)
    verifier = CountingVerifier()
    with pytest.raises(RuntimeError) as error:       # 2 of 4 sub-sentences failed: 50% > 25%
        feedback.judge_responses(records, FlakyExtractor("ring"), verifier,
                                 feedback.AnswerCache(tmp_path / "a.jsonl", ["k"]), load_image,
                                 params.FeedbackParams(max_failed_fraction=0.25))
    message = str(error.value)
    assert message.startswith("2 of 4 sub-sentences (50.0%) could not be labelled, more than "
                              "feedback.max_failed_fraction = 0.25")
    assert "response '7-0' sub-sentence 1: fact extraction failed: HTTP 503" in message and "'7-2'" in message
    assert len(verifier.asked) == 4                                # every fact that could be asked was, and kept
    again = CountingVerifier()
    rows, _ = feedback.judge_responses(records, FlakyExtractor("nothing fails"), again,
                                       feedback.AnswerCache(tmp_path / "a.jsonl", ["k"]), load_image,
                                       params.FeedbackParams(max_failed_fraction=0.25))
    assert len(again.asked) == 2 and all("ring" in q for q in again.asked)   # only the failures' facts are new
    assert len(rows) == 7
    feedback.judge_responses(records, FlakyExtractor("ring"), CountingVerifier(),    # at the share: no error
                             feedback.AnswerCache(tmp_path / "a.jsonl", ["k"]), load_image,
                             params.FeedbackParams(max_failed_fraction=0.5))


def test_the_hf_verifier_answer_cache_id_holds_how_it_is_loaded_and_prompted(tokenizer):
    import inspect
    from fgaif_utils import tiny_train
    processor = models.build_tiny_processor(tokenizer, 32, 8)
    m = params.ModelParams()
    base = feedback.hf_verifier_id("models/verifier_lvlm", "h", m, processor)
    assert base == feedback.hf_verifier_id("models/verifier_lvlm", "h", m, processor)
    ids = [feedback.hf_verifier_id("models/verifier_lvlm", "h", params.ModelParams(dtype="bfloat16"), processor),
           feedback.hf_verifier_id("models/verifier_lvlm", "h", params.ModelParams(load_in_4bit=True), processor)]
    other_template = models.build_tiny_processor(tokenizer, 32, 8)
    other_template.chat_template = other_template.chat_template.replace("USER", "HUMAN")
    ids.append(feedback.hf_verifier_id("models/verifier_lvlm", "h", m, other_template))
    assert all(other != base for other in ids) and len({str(i) for i in ids}) == 3
    # the answer length in the id is the one tiny_train.answer_questions generates
    assert f"max_new_tokens={feedback.HF_VERIFIER_MAX_NEW_TOKENS})" in inspect.getsource(tiny_train.answer_questions)
