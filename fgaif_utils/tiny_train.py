"""Training the tiny world's LVLMs from scratch on 2 CPU cores (stage 01, embedded default only).

Recipe (../shared/notes/calibration.md, round 2): one clean-caption pre-training shared by both models, then
  - the base policy: noisy captions (with systematic prior noise) mixed with packed yes/no questions,
  - the LVLM verifier: clean captions mixed 50/50 with packed multi-turn yes/no questions.
Step counts, not wall-clock budgets, so the same params give the same weights. Each phase checkpoints into
the stage cache and resumes from there after an interruption.
"""
import math
import random
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm   # text bars: they stream into papermill's live notebook and logs

from . import language, models, scorer, stage

IGNORE = -100


# ---------------------------------------------------------------------------------------------- questions

def qa_pairs(scene, rng, per_type=2, types=("object", "colour", "size", "relation")):
    """Balanced yes/no questions about one scene: [(question, answer, type)].

    Negatives follow the language priors, so that the hard cases are the ones a prior-driven model gets
    wrong: an absent co-occurrence partner, the shape's typical colour, a flipped relation.
    """
    present = {o["shape"]: o for o in scene["objects"]}
    absent = [s for s in language.SHAPES if s not in present]
    pairs = []
    for _ in range(per_type):
        if "object" in types:
            if rng.random() < 0.5 or not absent:
                shape = rng.choice(sorted(present))
                pairs.append((language.QUESTION_TEMPLATES["object"].format(shape=shape), "yes", "object"))
            else:
                partners = [language.PARTNER[s] for s in present if language.PARTNER[s] in absent]
                shape = rng.choice(partners) if partners and rng.random() < 0.7 else rng.choice(absent)
                pairs.append((language.QUESTION_TEMPLATES["object"].format(shape=shape), "no", "object"))
        obj = present[rng.choice(sorted(present))]
        if "colour" in types:
            if rng.random() < 0.5:
                colour, answer = obj["colour"], "yes"
            else:
                typical = language.TYPICAL_COLOUR[obj["shape"]]
                wrong = [c for c in language.COLOURS if c != obj["colour"]]
                colour = typical if typical != obj["colour"] and rng.random() < 0.5 else rng.choice(wrong)
                answer = "no"
            pairs.append((language.QUESTION_TEMPLATES["colour"].format(shape=obj["shape"], colour=colour),
                          answer, "colour"))
        if "size" in types:
            answer = "yes" if rng.random() < 0.5 else "no"
            size = obj["size"] if answer == "yes" else [s for s in language.SIZES if s != obj["size"]][0]
            pairs.append((language.QUESTION_TEMPLATES["size"].format(shape=obj["shape"], size=size), answer, "size"))
        if "relation" in types and scene["relations"]:
            rel = scene["relations"][rng.integers(len(scene["relations"]))]
            answer = "yes" if rng.random() < 0.5 else "no"
            relation = rel["relation"] if answer == "yes" else language.OPPOSITE[rel["relation"]]
            pairs.append((language.QUESTION_TEMPLATES["relation"].format(
                shape=rel["subject"], other=rel["object"], relation=language.RELATION_PHRASES[relation][0]),
                answer, "relation"))
    return pairs


def parse_yes_no(text):
    """'yes' / 'no' from the start of an answer, else 'unknown' (as the common POPE scripts do)."""
    words = text.strip().lower().replace(",", " ").replace(".", " ").split()
    if not words:
        return "unknown"
    if words[0] in ("yes", "no"):
        return words[0]
    if "yes" in words[:3] and "no" not in words[:3]:
        return "yes"
    if ("no" in words[:3] or "not" in words[:3]) and "yes" not in words[:3]:
        return "no"
    return "unknown"


# ---------------------------------------------------------------------------------------------- sequences

class SequenceBuilder:
    """Token ids and loss labels for the tiny LLaVA, built by hand (no processor in the training loop)."""

    def __init__(self, processor, n_image_tokens):
        self.tokenizer = processor.tokenizer
        self.n_image_tokens = n_image_tokens
        self.eos = self.tokenizer.eos_token_id
        self.pad = self.tokenizer.pad_token_id
        self._prompt_cache = {}
        template = models.chat_prompt(processor, "{TEXT}")
        self.prompt_template = template.replace("<image>", "<image>" * n_image_tokens)

    def words(self, text):
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def prompt(self, text):
        if text not in self._prompt_cache:
            self._prompt_cache[text] = self.tokenizer(self.prompt_template.replace("{TEXT}", text)).input_ids
        return self._prompt_cache[text]

    def caption(self, caption, prompt_text=language.DESCRIBE_PROMPT):
        prompt = self.prompt(prompt_text)
        answer = self.words(caption) + [self.eos]
        return prompt + answer, [IGNORE] * len(prompt) + answer

    def packed_qa(self, qa):
        """One multi-turn sequence: "USER: <image>\\nq1 ASSISTANT: a1</s>USER: q2 ASSISTANT: a2</s>..."; loss on
        the answers and their EOS only."""
        ids, labels = [], []
        for i, (question, answer, _) in enumerate(qa):
            turn = self.prompt(question) if i == 0 else self.words(f"USER: {question} ASSISTANT:")
            reply = self.words(answer) + [self.eos]
            ids += turn + reply
            labels += [IGNORE] * len(turn) + reply
        return ids, labels

    def collate(self, sequences, images):
        """Right-padded batch: input_ids, labels, pixel_values.

        No attention mask, on purpose: with right padding and causal attention no real token can see a pad,
        so the mask changes nothing the loss reads, while on CPU the masked SDPA backward is ~8x slower
        (1.5 s vs 0.18 s a step for the 0.45M model at batch 32)."""
        width = max(len(ids) for ids, _ in sequences)
        input_ids = torch.full((len(sequences), width), self.pad, dtype=torch.long)
        labels = torch.full((len(sequences), width), IGNORE, dtype=torch.long)
        for row, (ids, lab) in enumerate(sequences):
            input_ids[row, :len(ids)] = torch.tensor(ids)
            labels[row, :len(lab)] = torch.tensor(lab)
        return dict(input_ids=input_ids, labels=labels, pixel_values=models.pixel_values_from_uint8(images))


# ---------------------------------------------------------------------------------------------- the loop

def lr_at(step, total, peak, warmup=50):
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def train_phase(model, make_batch, steps, peak_lr, seed, checkpoint_dir, desc, checkpoint_every=400, stop_after=None):
    """Train `model` for `steps` AdamW steps on batches from `make_batch(rng) -> (batch, kind)`.

    Checkpoints every `checkpoint_every` steps and at the end into `checkpoint_dir`, and resumes from there:
    an interrupted phase continues where it stopped, a finished one is loaded instead of retrained (the
    caller keys the folder by the stage fingerprint, so changed params never reuse it). Returns the loss log
    [(step, kind, loss)]. `stop_after` ends the loop early after a checkpoint (simulates an interruption).
    """
    from safetensors.torch import load_file, save_file

    checkpoint_dir = Path(checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=peak_lr,
                                  weight_decay=0.01)
    rng = np.random.default_rng(seed)
    log, start = [], 0
    checkpoint = stage.read_checkpoint(checkpoint_dir, ("model.safetensors", "optimizer.pt"))
    if checkpoint is not None:
        state, files = checkpoint
        model.load_state_dict(load_file(files["model.safetensors"]), strict=False)
        optimizer.load_state_dict(torch.load(files["optimizer.pt"], weights_only=True))
        rng.bit_generator.state = state["rng"]
        torch.set_rng_state(torch.tensor(state["torch_rng"], dtype=torch.uint8))
        log, start = [tuple(x) for x in state["log"]], state["step"]
    model.train()
    bar = tqdm(range(start, steps), desc=desc, initial=start, total=steps, mininterval=2.0)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, peak_lr)
        batch, kind = make_batch(rng)
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        log.append((step, kind, loss.item()))
        if step % 50 == 0:
            bar.set_postfix(loss=f"{np.mean([x[2] for x in log[-50:]]):.3f}")
        if (step + 1) % checkpoint_every == 0 or step + 1 == steps:
            _save_checkpoint(model, optimizer, rng, log, step + 1, checkpoint_dir, save_file)
        if stop_after is not None and step + 1 >= stop_after:
            _save_checkpoint(model, optimizer, rng, log, step + 1, checkpoint_dir, save_file)
            break
    model.eval()
    return log


def _save_checkpoint(model, optimizer, rng, log, step, folder, save_file):
    tensors = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    state = {"step": step, "rng": rng.bit_generator.state, "torch_rng": torch.get_rng_state().tolist(), "log": log}
    stage.write_checkpoint(folder, {"model.safetensors": lambda path: save_file(tensors, path),
                                    "optimizer.pt": lambda path: torch.save(optimizer.state_dict(), path)}, state)


# ---------------------------------------------------------------------------------------------- batches

def caption_batches(builder, images, scenes, describe, batch_size):
    """Clean reference descriptions drawn fresh for every batch (many phrasings of the same scene)."""
    def make_batch(rng):
        rows = rng.integers(len(scenes), size=batch_size)
        text_rng = random.Random(int(rng.integers(2 ** 62)))   # the world's writers take a random.Random
        seqs = [builder.caption(describe(scenes[i], text_rng)) for i in rows]
        return builder.collate(seqs, images[rows]), "caption"
    return make_batch


def noisy_caption_batches(builder, images, row_of_image, noisy_records, batch_size):
    def make_batch(rng):
        picks = rng.integers(len(noisy_records), size=batch_size)
        rows = np.array([row_of_image[noisy_records[i]["image_id"]] for i in picks])
        seqs = [builder.caption(noisy_records[i]["caption"]) for i in picks]
        return builder.collate(seqs, images[rows]), "noisy_caption"
    return make_batch


def qa_batches(builder, images, scenes, batch_size, per_type=2):
    def make_batch(rng):
        rows = rng.integers(len(scenes), size=batch_size)
        seqs = []
        for i in rows:
            qa = qa_pairs(scenes[i], rng, per_type=per_type)
            order = rng.permutation(len(qa))
            seqs.append(builder.packed_qa([qa[j] for j in order]))
        return builder.collate(seqs, images[rows]), "qa"
    return make_batch


def mixture(first, second, second_share):
    def make_batch(rng):
        return second(rng) if rng.random() < second_share else first(rng)
    return make_batch


# ---------------------------------------------------------------------------------------------- evaluation

def describe_images(model, processor, images, do_sample, seed, batch_size=100, max_new_tokens=64,
                    temperature=1.0, top_p=1.0, prompt=language.DESCRIBE_PROMPT, desc="describe", progress=True):
    prompt_text = models.chat_prompt(processor, prompt)
    token_ids, texts = [], []
    for start in tqdm(range(0, len(images), batch_size), desc=desc, disable=not progress, mininterval=2.0):
        chunk = images[start:start + batch_size]
        ids, txt = models.generate(model, processor, chunk, [prompt_text] * len(chunk), max_new_tokens=max_new_tokens,
                                   do_sample=do_sample, temperature=temperature, top_p=top_p, seed=seed + start)
        token_ids += ids
        texts += txt
    return token_ids, texts


def hallucination_profile(model, processor, scenes, images, seed):
    """What the ground-truth scorer says of a policy's descriptions of `images`, greedy and sampled:
    ({mode: scorer.aggregate}, {mode: [(text, score)]})."""
    profile, examples = {}, {}
    for mode in ("greedy", "sampled"):
        _, texts = describe_images(model, processor, images, do_sample=(mode == "sampled"), seed=seed,
                                   desc=f"describe ({mode})")
        scores = [scorer.score_description(text, scene) for text, scene in zip(texts, scenes)]
        profile[mode] = scorer.aggregate(scores)
        examples[mode] = list(zip(texts, scores))
    return profile, examples


def answer_questions(model, processor, images, questions, batch_size=200, desc="answer"):
    """Greedy yes/no answers of an LVLM, one question per prompt: list of 'yes' / 'no' / 'unknown'."""
    answers = []
    for start in tqdm(range(0, len(questions), batch_size), desc=desc, mininterval=2.0):
        qs = questions[start:start + batch_size]
        prompts = [models.chat_prompt(processor, q) for q in qs]
        _, texts = models.generate(model, processor, images[start:start + batch_size], prompts, max_new_tokens=3)
        answers += [parse_yes_no(t) for t in texts]
    return answers


def eval_questions(scenes, seed, per_type=1):
    """A fixed, balanced set of held-out questions: [(scene index, question, answer, type)]."""
    rng = np.random.default_rng(seed)
    rows = []
    for i, scene in enumerate(scenes):
        for question, answer, qtype in qa_pairs(scene, rng, per_type=per_type):
            rows.append((i, question, answer, qtype))
    return rows


def accuracy_by_type(rows, answers):
    """Accuracy per question type, plus the share of 'unknown' answers; rows as from eval_questions."""
    table = {}
    for (_, _, truth, qtype), answer in zip(rows, answers):
        entry = table.setdefault(qtype, {"n": 0, "correct": 0, "unknown": 0, "yes": 0})
        entry["n"] += 1
        entry["correct"] += int(answer == truth)
        entry["unknown"] += int(answer == "unknown")
        entry["yes"] += int(answer == "yes")
    for entry in table.values():
        entry["accuracy"] = entry["correct"] / entry["n"]
        entry["yes_ratio"] = entry["yes"] / entry["n"]
    total = sum(e["n"] for e in table.values())
    table["all"] = {"n": total, "accuracy": sum(e["correct"] for e in table.values()) / max(1, total)}
    return table
