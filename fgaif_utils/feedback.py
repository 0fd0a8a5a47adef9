"""FGAIF step 1, AI feedback: sample responses, split them into sub-sentences, extract typed atomic facts,
ask the verifier one yes/no question per fact, and aggregate the answers into fine-grained labels.

Labels per sub-sentence and type (object existence, attribute, relation): 1 = hallucination (a fact of that
type judged false), 0 = no hallucination (facts of that type exist, all judged true), -1 = not applicable;
null for every type where the sub-sentence could not be judged (its fact extraction or a verifier call failed:
`label_error` says which), which the reward models treat as no target.
Reward positions come from the sampled token ids themselves (`last_token`), never from re-tokenised text.
"""
import hashlib
import json
from pathlib import Path

import numpy as np
from tqdm import tqdm   # text bars: they stream into papermill's live notebook and logs

from . import language, models, rollout, scorer, segment, tiny_train, world

FACT_TYPES = ["object", "attribute", "relation"]
HF_VERIFIER_MAX_NEW_TOKENS = 3   # what tiny_train.answer_questions generates (a test holds the two together)


# ---------------------------------------------------------------------------------------------- 02: sampling

def sample_responses(policy, processor, scenes, load_images, sampling, seed, cache_dir):
    """K sampled responses per image, with their token ids and sub-sentences (span + closing token).

    Works in batches of images; each finished batch is cached in `cache_dir` (keyed by batch index and seeded
    by it), so an interrupted run resumes with the same samples. Returns one record per response.
    """
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    k = sampling.samples_per_image
    images_per_batch = max(1, sampling.batch_size // k)
    prompt = models.chat_prompt(processor, sampling.prompt)
    decode = _decoder(processor.tokenizer)
    records = []
    batches = range(0, len(scenes), images_per_batch)
    for batch_index, start in enumerate(tqdm(batches, desc="sampling", mininterval=2.0)):
        cached = cache_dir / f"batch_{batch_index:05d}.jsonl"
        if cached.exists():
            records += [json.loads(line) for line in cached.read_text().splitlines()]
            continue
        chunk = scenes[start:start + images_per_batch]
        images = load_images(chunk)
        repeated = [image for image in images for _ in range(k)]
        token_ids, texts, _ = rollout.sample(policy, processor, repeated, [prompt] * len(repeated),
                                             max_new_tokens=sampling.max_new_tokens, do_sample=True,
                                             temperature=sampling.temperature, top_p=sampling.top_p,
                                             seed=seed * 100_003 + batch_index, engine=sampling.engine,
                                             with_logprobs=False)
        batch_records = []
        for i, (ids, text) in enumerate(zip(token_ids, texts)):
            scene = chunk[i // k]
            batch_records.append(response_record(scene, i % k, ids, text, decode))
        world.write_jsonl(cached, batch_records)
        records += batch_records
    return records


def _decoder(tokenizer):
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=True)


def response_record(scene, sample_index, token_ids, text, decode):
    """One sampled response with its sub-sentences and the index of the token that closes each."""
    aligned = segment.align_subsentences(token_ids, decode) if token_ids else []
    return {
        "response_id": f"{scene['image_id']}-{sample_index}",
        "image_id": scene["image_id"],
        "file_name": scene["file_name"],
        "sample_index": sample_index,
        "text": text,
        "token_ids": list(token_ids),
        "subsentences": [{"text": text[a["span"][0]:a["span"][1]], "span": list(a["span"]),
                          "last_token": a["last_token"]} for a in aligned],
    }


# ---------------------------------------------------------------------------------------------- 03: facts

def extract_all_facts(records, extractor):
    """Atomic facts of every sub-sentence: list (per record) of lists (per sub-sentence) of extraction
    results {"facts", "status", "error"}; the whole response is passed as context (as the paper does)."""
    items = [(sub["text"], record["text"]) for record in records for sub in record["subsentences"]]
    results = extractor.extract_many(items) if items else []
    nested, position = [], 0
    for record in records:
        n = len(record["subsentences"])
        nested.append(results[position:position + n])
        position += n
    return nested


def fact_rows(records, extraction, question_suffix=""):
    """One row per fact: ids, the fact, and the yes/no question that checks it."""
    rows = []
    for record, per_sub in zip(records, extraction):
        for sub_index, result in enumerate(per_sub):
            for fact_index, fact in enumerate(result["facts"]):
                rows.append({"fact_id": f"{record['response_id']}-{sub_index}-{fact_index}",
                             "response_id": record["response_id"], "image_id": record["image_id"],
                             "subsentence": sub_index, "fact": fact,
                             "question": language.question_for_fact(fact) + question_suffix})
    return rows


def verdict_from_answer(fact, answer):
    """True = the fact holds, False = hallucinated, None = unknown. A negated existence claim ("there is no
    ring") holds when the verifier says there is none."""
    if answer not in ("yes", "no"):
        return None
    holds = answer == "yes"
    return (not holds) if fact.get("negated") else holds


# ---------------------------------------------------------------------------------------------- 03: verify

class AnswerCache:
    """Verifier answers on disk, one JSON line per (verifier, image pixels, question); appended per batch, so a
    killed run loses at most the batch in flight. Keyed by the image's pixels, not its id: a synthetic image id is
    an index, the same for another picture once the world's seed or params change. It holds answers only:
    "unknown" is an answer (the verifier replied neither yes nor no, and would again), a failed call is not
    stored, so a rerun asks it again."""

    def __init__(self, path, verifier_id):
        self.path = Path(path)
        self.verifier_id = verifier_id
        self.answers = {}
        if self.path.exists():
            text = self.path.read_text()
            if text and not text.endswith("\n"):   # a line cut by a kill: drop it, so the next append starts clean
                with open(self.path, "r+") as handle:
                    handle.truncate(len(text[:text.rfind("\n") + 1].encode()))
            for line in text.splitlines():
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    continue          # that answer is asked again
                self.answers[entry["key"]] = entry["answer"]

    def key(self, pixels, question):
        raw = json.dumps([self.verifier_id, pixels, question])
        return hashlib.sha256(raw.encode()).hexdigest()

    def get(self, pixels, question):
        return self.answers.get(self.key(pixels, question))

    def add(self, entries):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as handle:
            for pixels, question, answer in entries:
                key = self.key(pixels, question)
                self.answers[key] = answer
                handle.write(json.dumps({"key": key, "answer": answer}) + "\n")


class HFVerifier:
    """An LVLM loaded through models.load_lvlm, answering one question per prompt, greedily."""

    def __init__(self, model, processor, batch_size=128):
        self.model, self.processor, self.batch_size = model, processor, batch_size

    def answer(self, images, questions):
        from .llm import ask_each_pair_once   # llm imports openai: only where it is needed

        def generate(distinct_images, distinct_questions):
            return tiny_train.answer_questions(self.model, self.processor, distinct_images, distinct_questions,
                                               batch_size=self.batch_size, desc="verifier")
        return ask_each_pair_once(images, questions, generate)


def verify_facts(rows, verifier, load_image, cache, batch_size=512):
    """Fill row["answer"] and row["verdict"] for every fact row, asking only what the cache lacks, and each
    (image, question) pair once: the responses to one image repeat facts, also across batch boundaries.
    verifier.answer gives None for a call that failed; such a row keeps answer None and is not cached."""
    from .llm import image_key   # llm imports openai: only where it is needed
    pixels = {}   # image id -> its pixels' shape and sha256: every image is read once to look its answers up
    for row in rows:
        if row["image_id"] not in pixels:
            shape, digest = image_key(load_image(row["image_id"]))
            pixels[row["image_id"]] = f"{shape}:{digest.hex()}"
    todo = {}
    for row in rows:
        pair = (pixels[row["image_id"]], row["question"])
        if pair not in todo and cache.get(*pair) is None:
            todo[pair] = row
    todo = list(todo.values())
    for start in tqdm(range(0, len(todo), batch_size), desc="verifying", mininterval=2.0):
        batch = todo[start:start + batch_size]
        batch_images = {}   # an image is asked about ~20 questions: decode it once per batch (a COCO JPEG ~10 ms)
        for row in batch:
            if row["image_id"] not in batch_images:
                batch_images[row["image_id"]] = load_image(row["image_id"])
        images = [batch_images[row["image_id"]] for row in batch]
        if len({image.shape for image in images}) == 1:
            images = np.stack(images)
        answers = verifier.answer(images, [row["question"] for row in batch])
        cache.add([(pixels[row["image_id"]], row["question"], answer) for row, answer in zip(batch, answers)
                   if answer is not None])
    for row in rows:
        row["answer"] = cache.get(pixels[row["image_id"]], row["question"])
        row["verdict"] = verdict_from_answer(row["fact"], row["answer"])
    return rows


# ---------------------------------------------------------------------------------------------- 03: labels

def _fact_sides(fact):
    return [fact["subject"]] + ([fact["object"]] if fact["type"] == "relation" else [])


def gate_name(subject, synthetic=False):
    """The name the existence gate matches a shape by: lower case without an article and, in the synthetic world,
    the shape the world's words name, as the ground truth reads them ("the donut" and "ring" are one shape)."""
    canonical = scorer.in_world_words({"type": "object", "subject": subject, "negated": False}) if synthetic else None
    return canonical["subject"] if canonical else scorer.plain_name(subject)


def gate_on_existence(rows, synthetic=False):
    """Set row["counts_as"], the verdict that enters the labels, and row["gated_by"], the shape that gated it.

    An attribute or relation fact about a shape that the verifier judged absent in the same response (every
    existence fact about it says absent) is not judged for its own type: counts_as None, gated_by that shape.
    The object fact already carries that error, as in the ground-truth scorer. Without the gate, "a red ring"
    over an image without a ring is also an attribute hallucination and "the ring is left of the star" a
    relation one, so the attribute and relation reward models mostly learn object existence again (measured
    in benchmarks/MEASUREMENTS.md). Shapes are matched by `gate_name`. Rows keep the verifier's own `verdict`."""
    seen = {}
    for row in rows:
        fact = row["fact"]
        if fact["type"] == "object" and row["verdict"] is not None:
            present = row["verdict"] != bool(fact["negated"])
            seen.setdefault((row["response_id"], gate_name(fact["subject"], synthetic)), set()).add(present)
    for row in rows:
        row["counts_as"], row["gated_by"] = row["verdict"], None
        if row["fact"]["type"] == "object":
            continue
        for side in _fact_sides(row["fact"]):
            if seen.get((row["response_id"], gate_name(side, synthetic))) == {False}:
                row["counts_as"], row["gated_by"] = None, side
                break
    return rows


def _rows_by_subsentence(rows):
    rows_by_sub = {}
    for row in rows:
        rows_by_sub.setdefault((row["response_id"], row["subsentence"]), []).append(row)
    return rows_by_sub


def labelling_failures(records, rows, extraction=None):
    """{(response_id, sub-sentence index): why it cannot be labelled} for the sub-sentences whose fact extraction
    failed (`extraction` as extract_all_facts gives it) or that have a fact whose verifier call failed (answer None).
    Labelling them from what is left would turn a failure into a confident n/a."""
    rows_by_sub = _rows_by_subsentence(rows)
    failures = {}
    for position, record in enumerate(records):
        for index in range(len(record["subsentences"])):
            key = (record["response_id"], index)
            result = extraction[position][index] if extraction is not None else None
            unanswered = [r["fact_id"] for r in rows_by_sub.get(key, []) if "answer" in r and r["answer"] is None]
            if result is not None and result["status"] != "ok":
                failures[key] = f"fact extraction failed: {result['error']}"
            elif unanswered:
                failures[key] = f"the verifier call failed for facts {unanswered}"
    return failures


def check_failed_share(records, failures, max_failed_fraction):
    """RuntimeError naming the first few failed sub-sentences when more than `max_failed_fraction` of the
    sub-sentences of `records` could not be labelled (labelling_failures)."""
    total = sum(len(record["subsentences"]) for record in records)
    if not failures or len(failures) <= max_failed_fraction * total:
        return
    first = "; ".join(f"response {rid!r} sub-sentence {k}: {why}" for (rid, k), why in list(failures.items())[:3])
    raise RuntimeError(f"{len(failures)} of {total} sub-sentences ({len(failures) / total:.1%}) could not be "
                       f"labelled, more than feedback.max_failed_fraction = {max_failed_fraction}; first: {first}. "
                       f"Every answer obtained is cached: rerun stage 03 to retry only the failures")


def label_records(records, rows, scenes_by_id=None, extraction=None):
    """fg_labels records: each sub-sentence with its AI labels [obj, att, rel] (from each row's `counts_as` when
    gate_on_existence ran, else its verdict), its closing token and its fact ids; with scene graphs (synthetic
    world) also the ground-truth labels of the same facts. A sub-sentence that labelling_failures names (pass
    `extraction` so that failed extractions are seen) gets labels [null, null, null] and `label_error`."""
    rows_by_sub = _rows_by_subsentence(rows)
    failures = labelling_failures(records, rows, extraction)
    labelled = []
    for record in records:
        scene = scenes_by_id.get(record["image_id"]) if scenes_by_id else None
        subsentences = []
        for index, sub in enumerate(record["subsentences"]):
            sub_rows = rows_by_sub.get((record["response_id"], index), [])
            ai = {t: [r.get("counts_as", r["verdict"]) for r in sub_rows if r["fact"]["type"] == t]
                  for t in FACT_TYPES}
            entry = dict(sub, labels=scorer.aggregate_labels(ai), fact_ids=[r["fact_id"] for r in sub_rows],
                         gt_labels=None)
            failure = failures.get((record["response_id"], index))
            if failure is not None:
                entry.update(labels=[None] * len(FACT_TYPES), label_error=failure)
            if scene is not None:
                truth = {t: [r["truth"] for r in sub_rows if r["fact"]["type"] == t] for t in FACT_TYPES}
                entry["gt_labels"] = scorer.aggregate_labels(truth)
            subsentences.append(entry)
        labelled.append(dict(record, subsentences=subsentences))
    return labelled


def add_ground_truth(rows, scenes_by_id):
    """Synthetic world: every fact row gets `truth` (True / False / None = not judgeable) from the scene graph; a fact
    an LLM extractor wrote in other words is read in the world's (scorer.in_world_words), None if it has none."""
    for row in rows:
        fact = scorer.in_world_words(row["fact"])
        row["truth"] = None if fact is None else scorer.judge_fact(fact, scenes_by_id[row["image_id"]])
    return rows


def label_summary(labelled, rows, extraction):
    """Counts for the manifest and the notebook."""
    subs = [s for r in labelled for s in r["subsentences"]]
    results = [res for per in extraction for res in per]
    answers = [row["answer"] for row in rows]
    summary = {
        "responses": len(labelled), "subsentences": len(subs), "facts": len(rows),
        "extraction_failed": sum(res["status"] != "ok" for res in results),
        "verification_failed": answers.count(None),
        "unlabelled": sum(None in s["labels"] for s in subs),
        "answers": {a: answers.count(a) for a in ("yes", "no", "unknown")},
        "labels": {t: {str(v): sum(s["labels"][i] == v for s in subs) for v in (-1, 0, 1)}
                   for i, t in enumerate(FACT_TYPES)},
        "mean_subsentences": len(subs) / max(1, len(labelled)),
    }
    summary["warnings"] = label_warnings(summary)
    return summary


def label_warnings(summary, unknown_share=0.5):
    """What a researcher must see before training on these labels: sub-sentences left unlabelled by failures, a
    verifier whose answers are mostly neither yes nor no (each such fact is n/a, so its sub-sentence teaches
    nothing), and a type no sub-sentence was judged for."""
    warnings = []
    if summary["unlabelled"]:
        warnings.append(f"{summary['unlabelled']} of {summary['subsentences']} sub-sentences carry no label (their "
                        f"fact extraction or a verifier call failed: label_error in fg_labels.jsonl); rerun stage 03 "
                        f"with --force to retry only them (every answer obtained is cached)")
    answers = summary["answers"]
    asked = sum(answers.values())
    if asked and answers["unknown"] > unknown_share * asked:
        warnings.append(f"{answers['unknown']} of {asked} verifier answers were neither yes nor no and count as n/a: "
                        f"check the verifier (params feedback.verifier, models.verifier) and feedback.question_suffix")
    for fact_type, counts in summary["labels"].items():
        if summary["subsentences"] and counts["0"] + counts["1"] == 0:
            warnings.append(f"no sub-sentence was judged correct or hallucinated for {fact_type}: its reward model "
                            f"has nothing to learn")
    return warnings


def judge_responses(records, extractor, verifier, cache, load_image, feedback_params, scenes_by_id=None):
    """Fact rows of `records`, judged: extracted facts, the verifier's answer and verdict for each, the existence
    gate when `feedback_params.existence_gate`, and with scene graphs (synthetic world) the truth of each fact.
    Returns (rows, extraction). RuntimeError (check_failed_share) when more than
    `feedback_params.max_failed_fraction` of the sub-sentences cannot be labelled, raised once every answer
    obtained is cached."""
    extraction = extract_all_facts(records, extractor)
    rows = verify_facts(fact_rows(records, extraction, feedback_params.question_suffix), verifier, load_image, cache)
    check_failed_share(records, labelling_failures(records, rows, extraction), feedback_params.max_failed_fraction)
    if feedback_params.existence_gate:
        rows = gate_on_existence(rows, synthetic=scenes_by_id is not None)
    if scenes_by_id is not None:
        rows = add_ground_truth(rows, scenes_by_id)
    else:
        for row in rows:
            row["truth"] = None
    return rows, extraction


# ---------------------------------------------------------------------------------------------- 03: size twins

def word_swaps(tokenizer, words_by_value):
    """{token id: (value, swapped token id)} for one kind of attribute word ({value: [surface forms]}, e.g.
    {"small": ["small", "little"], "large": ["large", "big"]}): each form swapped for the form at the same place
    of the next value, cyclically (small <-> large, little <-> big; red -> blue -> ... -> red). Forms that are not
    one known token of the tokenizer are left out."""
    def one_token(word):
        ids = tokenizer(word, add_special_tokens=False)["input_ids"]
        return ids[0] if len(ids) == 1 and ids[0] != tokenizer.unk_token_id else None

    values = list(words_by_value)
    swaps = {}
    for i, value in enumerate(values):
        other = words_by_value[values[(i + 1) % len(values)]]
        for k, form in enumerate(words_by_value[value]):
            mine, theirs = one_token(form), one_token(other[min(k, len(other) - 1)])
            if mine is not None and theirs is not None and mine != theirs:
                swaps[mine] = (value, theirs)
    return swaps


def size_twins(records, tokenizer):
    """Counterfactual twins (synthetic world): every response that says a size word, copied with each size word
    flipped (small <-> large, little <-> big) and nothing else changed. The twin has the same number of tokens
    and its sub-sentences close at the same tokens; it is labelled by the same extractor and verifier as any
    response (`judge_responses`, `label_records`), so its labels are AI feedback too. A twin's object and relation
    facts are its original's; its size facts are the opposite claims. Trained on beside the originals
    (`reward.twin_share`), they make the size word independent of what else a sub-sentence gets wrong: in the
    policy's samples "small" goes with more colour and existence errors, and a reward model that learns that
    correlation pays the policy to stop saying "small" (benchmarks/MEASUREMENTS.md)."""
    swaps = word_swaps(tokenizer, language.SIZE_WORDS)
    decode = _decoder(tokenizer)
    twins = []
    for record in records:
        if not any(t in swaps for t in record["token_ids"]):
            continue
        flipped = [swaps[t][1] if t in swaps else t for t in record["token_ids"]]
        twin = response_record(record, record["sample_index"], flipped, decode(flipped), decode)
        ends = [s["last_token"] for s in twin["subsentences"]]
        if ends != [s["last_token"] for s in record["subsentences"]]:
            raise ValueError(f"response {record['response_id']!r}: its size-flipped twin splits into sub-sentences "
                             f"closing at tokens {ends}, the response at "
                             f"{[s['last_token'] for s in record['subsentences']]}; a twin must keep them")
        twin.update(response_id=f"{record['response_id']}~sizes", twin_of=record["response_id"])
        twins.append(twin)
    return twins


# ---------------------------------------------------------------------------------------------- backends

def make_extractor(feedback_params, cache_dir):
    """The fact extractor the params ask for ("rules" offline, or an OpenAI-compatible LLM)."""
    from . import llm
    if feedback_params.extractor == "rules":
        return llm.make_fact_extractor("rules")
    f = feedback_params
    return llm.make_fact_extractor("openai", model=f.llm_model, base_url=f.llm_base_url or None,
                                   api_key_env=f.llm_api_key_env, max_tokens=f.llm_max_tokens or None,
                                   cache_dir=cache_dir, concurrency=f.concurrency, max_retries=f.max_retries,
                                   timeout=f.timeout_s)


# The code that turns (image, question) into "yes" / "no" / "unknown" for each verifier: its sources enter the answer
# cache's id, so a changed question parser or answer reader asks again instead of reading the old answers.
ANSWERING_MODULES = {"detector": ("detector", "language"), "hf": ("tiny_train", "models", "llm"),
                     "openai-vision": ("llm",)}


def make_verifier(params, models_dir, cache_dir, models_hash):
    """(verifier, verifier_id): the yes/no judge the params ask for, and an id that keys its answer cache."""
    from .stage import module_sources
    verifier, verifier_id = _make_verifier(params, models_dir, cache_dir, models_hash)
    return verifier, [*verifier_id, module_sources(ANSWERING_MODULES[params.feedback.verifier])]


def _make_verifier(params, models_dir, cache_dir, models_hash):
    from . import detector, llm
    choice = params.feedback.verifier
    if choice == "detector":
        if params.data.world != "synthetic":
            raise ValueError("feedback.verifier 'detector' exists only in the synthetic world; use 'hf' or 'openai-vision'")
        return detector.DetectorVerifier(detector.load_detector(Path(models_dir) / "verifier_detector")), \
            ["detector", models_hash]
    if choice == "hf":
        m = params.models
        path = str(Path(models_dir) / "verifier_lvlm") if m.verifier == "tiny" else \
            models.resolve_checkpoint(m.verifier, m.local_files_only)
        model, processor = models.load_lvlm(path, dtype=m.dtype, device=m.device, load_in_4bit=m.load_in_4bit,
                                            local_files_only=m.local_files_only)
        return HFVerifier(model, processor, params.feedback.verifier_batch_size), \
            hf_verifier_id(path, models_hash, m, processor)
    f = params.feedback
    verifier = llm.OpenAIVisionVerifier(f.vision_model, base_url=f.vision_base_url or None, cache_dir=cache_dir,
                                        api_key_env=f.vision_api_key_env, concurrency=f.concurrency,
                                        max_retries=f.max_retries, timeout=f.timeout_s)
    return verifier, ["openai-vision", verifier.request_settings()]


def hf_verifier_id(path, models_hash, model_params, processor):
    """The answer-cache id of an HF verifier: the checkpoint, how it is loaded, the prompt it is given (its chat
    template around a question) and the answer length tiny_train.answer_questions generates."""
    prompt = models.chat_prompt(processor, "{question}")
    return ["hf", path, models_hash, {"dtype": model_params.dtype, "load_in_4bit": model_params.load_in_4bit,
                                      "prompt_sha256": hashlib.sha256(prompt.encode()).hexdigest(),
                                      "max_new_tokens": HF_VERIFIER_MAX_NEW_TOKENS}]
