"""FGAIF step 2: three fine-grained reward models (object, attribute, relation) on one shared LVLM backbone.

A reward model reads the LVLM's last hidden state at an end marker (the tokenizer's EOS, as the FGAIF authors
did) inserted after the token that closes each sub-sentence, and a linear head maps it to 3 classes: 0 n/a,
1 correct, 2 hallucinated (the AI labels -1 / 0 / 1 shifted by one). Each type has its own LoRA adapter
(language model only) and its own head; the three are named adapters ("object", "attribute", "relation") of
ONE peft model, so the frozen backbone is held once and scoring all three costs one model's memory plus three
small adapters. peft's mixed-batch forward (`adapter_names=`) computes the three types in one call.

Sequences are built from the sampled token ids, never by re-tokenising text: the chat prompt with the image
tokens expanded as the processor expands them, then the response with an EOS after each sub-sentence's last
token. Batches are right-padded and get no attention mask: under causal attention no real token can see a pad
to its right, so the mask changes nothing that is read, and on CPU the masked SDPA backward is ~8x slower.

Claim words (`reward.claim_words`, optional per type): a head can instead name the value of its type's claim, one
logit per claim word ("left", "right", "above", "below" for relation), beside the n/a logit; where a sub-sentence
states one of those words, p(correct) is the probability of the stated word and p(hallucinated) that of the others
(`three_class_logits`). The comparison with the stated word is then built in and the model learns to name the
relation, which has a gradient from the start; the plain head must learn the XOR of stated word and image, which has
none (benchmarks/MEASUREMENTS.md "Relations: an XOR the gradient does not see").
"""
import contextlib
import json
import math
import multiprocessing
import queue
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm   # text bars: tqdm.auto wants ipywidgets, which the project does not install

from . import models, stage
from . import params as P

FACT_TYPES = ["object", "attribute", "relation"]
CLASS_NAMES = ["n/a", "correct", "hallucinated"]
IGNORE = -100


# ---------------------------------------------------------------------------------------------- sequences

def prompt_ids(processor, prompt_text):
    """Token ids of the chat prompt around one image, image tokens expanded exactly as the processor does."""
    size = getattr(processor.image_processor, "crop_size", None) or {}
    dummy = np.zeros((size.get("height", 336), size.get("width", 336), 3), dtype=np.uint8)
    batch = processor(images=[dummy], text=[models.chat_prompt(processor, prompt_text)], return_tensors="pt")
    return batch["input_ids"][0].tolist()


def marked_sequence(prompt, token_ids, last_tokens, eos_id, where="response"):
    """(input_ids, marker positions): prompt + the response with `eos_id` inserted after each closing token.

    The response is cut after the last marker: under causal attention later tokens change nothing read."""
    if list(last_tokens) != sorted(set(last_tokens)) or (last_tokens and not 0 <= last_tokens[0]) or \
            (last_tokens and last_tokens[-1] >= len(token_ids)):
        raise ValueError(f"{where}: sub-sentence last_token values {list(last_tokens)} must be increasing indices "
                         f"into its {len(token_ids)} token ids")
    ids, positions, cut = list(prompt), [], 0
    for last in last_tokens:
        ids += token_ids[cut:last + 1]
        positions.append(len(ids))
        ids.append(eos_id)
        cut = last + 1
    return ids, positions


def holistic_label(labels):
    """One "any hallucination" label from per-type labels: 1 if any type is hallucinated, 0 if some type is
    judged and none hallucinated, -1 if none applies (the holistic ablation's single reward model); None where the
    labels are None or hold a None (stage 03 could not judge the sub-sentence)."""
    if labels is None or None in labels:
        return None
    return 1 if 1 in labels else 0 if 0 in labels else -1


def holistic_records(records):
    """Copies of fg_labels records whose sub-sentences carry one holistic label (and ground truth) instead of three."""
    out = []
    for record in records:
        subs = [{**sub, "labels": [holistic_label(sub["labels"])],
                 "gt_labels": None if sub.get("gt_labels") is None else [holistic_label(sub["gt_labels"])]}
                for sub in record["subsentences"]]
        out.append({**record, "subsentences": subs})
    return out


def label_index(fact_type):
    """Where a type's label sits in a record's labels: FACT_TYPES order, or 0 for the holistic ablation's one label."""
    return FACT_TYPES.index(fact_type) if fact_type in FACT_TYPES else 0


def check_trainable(records, types, source):
    """Warnings for types that no training sub-sentence labels correct or hallucinated (such a model learns to say
    n/a everywhere, a reward of 0); a ValueError naming `source` when that is every type."""
    empty = [t for t in types if not any(sub["labels"][label_index(t)] in (0, 1)
                                         for record in records for sub in record["subsentences"])]
    if len(empty) == len(types):
        raise ValueError(f"{source}: no training sub-sentence is labelled correct or hallucinated for any type, so "
                         f"no reward model has anything to learn: see stage 03's summary.json (answers, warnings)")
    return [f"{t}: no training sub-sentence is labelled correct or hallucinated; this reward model will learn n/a "
            f"only and give 0 reward" for t in empty]


def claim_indices(token_ids, last_tokens, claim_ids):
    """(K, T) per sub-sentence and type: the index of the claim word of that type the sub-sentence states (its last
    one), or -1. claim_ids: one {token id: word index} per type (empty: the type has no claim words)."""
    claims, start = [], 0
    for last in last_tokens:
        tokens = token_ids[start:last + 1]
        row = []
        for ids in claim_ids:
            found = [ids[t] for t in tokens if t in ids]
            row.append(found[-1] if found else -1)
        claims.append(row)
        start = last + 1
    return claims


def claim_token_ids(tokenizer, claim_words, types):
    """One {token id: word index} per type from `claim_words` ({type: [[surface forms of word 0], ...]}): every
    form must be a single token (with or without a leading space) of the tokenizer, or it is an error."""
    tables = []
    for fact_type in types:
        table = {}
        for index, forms in enumerate((claim_words or {}).get(fact_type) or []):
            for form in forms:
                ids = {tuple(tokenizer.encode(text, add_special_tokens=False)) for text in (form, " " + form)}
                single = [i[0] for i in ids if len(i) == 1 and i[0] != tokenizer.unk_token_id]
                if not single:
                    raise ValueError(f"reward.claim_words.{fact_type}: {form!r} is not one token of the tokenizer "
                                     f"({sorted(ids)})")
                for token in single:
                    table[token] = index
        tables.append(table)
    return tables


def examples_from_records(records, prompt, eos_id, vocab_size=None, n_types=3, claim_ids=None):
    """One training/eval example per fg_labels record that has sub-sentences: ids, marker positions, AI labels
    shifted to classes (K, 3) (a null label, which stage 03 gives a sub-sentence it could not judge, becomes IGNORE:
    no target, and left out of the metrics), ground-truth labels (K, 3) in {-1, 0, 1} or None, and with `claim_ids`
    (claim_token_ids) the stated claim word per sub-sentence and type (K, T), -1 where none."""
    examples = []
    for record in records:
        where = f"fg_labels record {record.get('response_id')!r}"
        for key in ("token_ids", "subsentences", "image_id"):
            if key not in record:
                raise ValueError(f"{where}: no {key!r}")
        subs = record["subsentences"]
        if not subs:
            continue
        if not record["token_ids"]:
            raise ValueError(f"{where}: {len(subs)} sub-sentence(s) but no token ids")
        if vocab_size is not None and max(record["token_ids"]) >= vocab_size:
            raise ValueError(f"{where}: token id {max(record['token_ids'])} is outside the backbone's vocabulary "
                             f"({vocab_size}); the reward backbone must share the policy's tokenizer")
        ids, positions = marked_sequence(prompt, record["token_ids"], [s["last_token"] for s in subs], eos_id, where)
        for k, sub in enumerate(subs):
            if len(sub.get("labels") or []) != n_types or any(v not in (-1, 0, 1, None) for v in sub["labels"]):
                raise ValueError(f"{where}, sub-sentence {k}: labels must be {n_types} values in (-1, 0, 1) or "
                                 f"null, got {sub.get('labels')!r}")
        has_truth = all(sub.get("gt_labels") is not None for sub in subs)
        examples.append({"response_id": record.get("response_id"), "twin_of": record.get("twin_of"),
                         "image_id": record["image_id"], "ids": ids,
                         "positions": positions, "classes": [[IGNORE if v is None else v + 1 for v in sub["labels"]]
                                                             for sub in subs],
                         "gt": [list(sub["gt_labels"]) for sub in subs] if has_truth else None})
        if claim_ids is not None:
            examples[-1]["claims"] = claim_indices(record["token_ids"], [s["last_token"] for s in subs], claim_ids)
    return examples


def collate(examples, pad_id, type_index=None):
    """Right-padded input_ids (B, L); marker positions (B, K) with -1 in empty slots; with `type_index`, token
    labels (B, L): the class of that type at each marker, IGNORE everywhere else; where the examples carry claims,
    token claims (B, L, T): the stated claim word of each type at each marker, -1 everywhere else."""
    width = max(len(e["ids"]) for e in examples)
    slots = max(len(e["positions"]) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    positions = torch.full((len(examples), slots), -1, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for row, e in enumerate(examples):
        input_ids[row, :len(e["ids"])] = torch.tensor(e["ids"])
        positions[row, :len(e["positions"])] = torch.tensor(e["positions"])
        if type_index is not None:
            labels[row, e["positions"]] = torch.tensor([c[type_index] for c in e["classes"]])
    batch = {"input_ids": input_ids, "positions": positions}
    if examples and "claims" in examples[0]:
        claims = torch.full((len(examples), width, len(examples[0]["claims"][0])), -1, dtype=torch.long)
        for row, e in enumerate(examples):
            claims[row, e["positions"]] = torch.tensor(e["claims"])
        batch["claims"] = claims
    if type_index is not None:
        batch["labels"] = labels
    return batch


def pixel_values(processor, images):
    """(B, 3, H, W) float pixel values of uint8 (H, W, 3) images, as the backbone's processor computes them from the
    images padded to squares (models.square_images), as LLaVA-1.5 saw them."""
    squares = models.square_images(images, processor)
    return processor.image_processor(images=[np.asarray(i) for i in squares], return_tensors="pt")["pixel_values"]


class PixelCache:
    """pixels(image_ids) -> (B, 3, H, W): processor pixel values per image id, computed once when `keep` (the
    small synthetic world), else recomputed per call (COCO at 336 px would not fit in memory)."""

    def __init__(self, processor, load_image, keep=True):
        self.processor, self.load_image, self.keep, self.cache = processor, load_image, keep, {}

    def __call__(self, image_ids):
        missing = [i for i in dict.fromkeys(image_ids) if i not in self.cache]
        if missing:
            fresh = pixel_values(self.processor, [self.load_image(i) for i in missing])
            if not self.keep:
                fresh_by_id = dict(zip(missing, fresh))
                return torch.stack([fresh_by_id[i] for i in image_ids])
            self.cache.update(zip(missing, fresh))
        return torch.stack([self.cache[i] for i in image_ids])


class FeatureCache:
    """features(image_ids) -> (B, N, D): what the reward backbone splices in at the N image tokens of each image —
    the output of its frozen vision tower and projector — computed once per image id, `batch_size` images at a
    time. The reward adapters sit on the language model only, so these features are the same for every type and
    every step, and a training step with them skips the tower (synthetic world; at 336 px a COCO feedback set's
    features would not fit in memory, so the real world keeps PixelCache)."""

    def __init__(self, rm, processor, load_image, batch_size=64):
        self.rm, self.processor, self.load_image, self.batch_size = rm, processor, load_image, batch_size
        self.cache = {}

    def __call__(self, image_ids):
        missing = [i for i in dict.fromkeys(image_ids) if i not in self.cache]
        for start in range(0, len(missing), self.batch_size):
            chunk = missing[start:start + self.batch_size]
            pixels = pixel_values(self.processor, [self.load_image(i) for i in chunk])
            self.cache.update(zip(chunk, self.rm.image_features(pixels).cpu().clone()))   # rows of their own
        return torch.stack([self.cache[i] for i in image_ids])

    def save(self, path):
        """Every cached image's features as one safetensors file (keys: the image ids), for StoredFeatures."""
        from safetensors.torch import save_file
        save_file({str(i): features for i, features in self.cache.items()}, str(path))


class StoredFeatures:
    """features(image_ids) -> (B, N, D) read from a file that FeatureCache.save wrote: a training process's copy of
    the stage's features (train_in_processes). An image the file does not hold is an error naming it."""

    def __init__(self, path):
        from safetensors.torch import load_file
        self.path, self.cache = path, load_file(str(path))

    def __call__(self, image_ids):
        missing = [i for i in image_ids if str(i) not in self.cache]
        if missing:
            raise KeyError(f"{self.path}: no features of image {missing[0]!r}")
        return torch.stack([self.cache[str(i)] for i in image_ids])


def image_inputs(images):
    """The forward keyword for a batch of images as the caches give them: (B, 3, H, W) pixel values (PixelCache,
    pixel_values) or (B, N, D) projected vision features (FeatureCache)."""
    return {"image_features" if images.dim() == 3 else "pixel_values": images}


def token_loss(logits, labels, class_weights=None):
    """Token-level cross-entropy over the positions whose label is not IGNORE. logits (B, L, C), labels (B, L).
    Without class weights the mean; with them sum_i w[y_i] * nll_i / sum_i w[y_i]. A batch with no labelled
    position (every sub-sentence unlabelled for this type) has loss 0, not 0 / 0."""
    if not (labels != IGNORE).any():
        return logits.sum() * 0.0
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), weight=class_weights,
                                             ignore_index=IGNORE)


def three_class_logits(logits, claims=None, n_words=None):
    """(..., 3) logits of n/a / correct / hallucinated from a head's outputs (..., C). C = 3: the outputs. C > 3
    (claim words): outputs [n/a, correct, hallucinated, word_0 .. word_{C-4}]; where `claims` (...) names a stated
    word c >= 0, [n/a, word_c, logsumexp of the other words] (softmax: p(correct) is the stated word's share of the
    softmax over n/a and the words), elsewhere the first three outputs. `n_words`: the type's own words, when the
    heads are wider (another type has more); the outputs past them are no word of this type."""
    if logits.shape[-1] == 3 or claims is None:
        return logits[..., :3]
    words = logits[..., 3:] if n_words is None else logits[..., 3:3 + n_words]
    stated = claims.clamp(min=0).to(logits.device)[..., None]
    others = words.scatter(-1, stated, float("-inf")).logsumexp(-1, keepdim=True)
    compare = torch.cat([logits[..., :1], words.gather(-1, stated), others], -1)
    return torch.where((claims >= 0).to(logits.device)[..., None], compare, logits[..., :3])


def balanced_class_weights(examples, fact_type, n_classes=3, cap=10.0, twin_share=0.0):
    """w_c = N / (n_classes * N_c) over one type's training labels, at most `cap` (a class with a handful of
    examples, like object n/a, would otherwise dominate; an absent class gets the cap). Every class then weighs
    as much in the loss as if the classes were equally frequent: the hallucinated class is the rare one for
    attribute and relation once facts about absent shapes do not count. With `twin_share`, the counts are those
    training will see on average: an example with a twin counts (1 - twin_share), its twin twin_share."""
    index = label_index(fact_type)
    counts = np.zeros(n_classes, dtype=np.float64)
    for e in examples:
        seen = [(e, 1.0)] if not (twin_share and e.get("twin")) else [(e, 1.0 - twin_share), (e["twin"], twin_share)]
        for example, share in seen:
            np.add.at(counts, [c[index] for c in example["classes"] if c[index] != IGNORE], share)
    weights = np.minimum(counts.sum() / (n_classes * np.maximum(counts, 1e-9)), cap)
    return torch.tensor(weights, dtype=torch.float32)


def with_twins(chunk, twin_share, rng_key):
    """The batch `chunk` with each example that has a twin replaced by it with probability `twin_share`, drawn
    from a generator seeded by `rng_key` (seed, epoch, batch start: a resumed run draws the same)."""
    if not twin_share:
        return chunk
    use_twin = np.random.default_rng(rng_key).random(len(chunk)) < twin_share
    return [e["twin"] if flip and e.get("twin") else e for e, flip in zip(chunk, use_twin)]


def attach_twins(examples, twin_examples):
    """Give each example whose response has a size-flipped twin (stage 03, `feedback.size_twins`) that twin's
    example as e["twin"]; returns how many got one. A twin must close its sub-sentences where its original does."""
    by_original = {t["twin_of"]: t for t in twin_examples}
    attached = 0
    for e in examples:
        twin = by_original.get(e["response_id"])
        if twin is None:
            continue
        if twin["positions"] != e["positions"]:
            raise ValueError(f"twin {twin['response_id']!r}: end markers at {twin['positions']}, its original "
                             f"{e['response_id']!r} at {e['positions']}")
        e["twin"] = twin
        attached += 1
    return attached


# ---------------------------------------------------------------------------------------------- the model

TINY_BACKBONES = ("pretrained", "policy", "verifier_lvlm")


def backbone_path(backbone, models_dir, local_files_only=True):
    """The folder of the reward backbone: a stage-01 model of the tiny world by name, else a hub id in the local
    cache or a local llava-hf folder (models.resolve_checkpoint). "outputs/..." is a model this project wrote
    outside the stages (a benchmark's `--save`), found under the repo root wherever the notebook runs."""
    if backbone in TINY_BACKBONES:
        folder = Path(models_dir) / backbone
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"reward.backbone {backbone!r}: stage 01 wrote no model {folder}")
        return str(folder)
    if backbone.startswith("outputs/"):
        folder = P.REPO_ROOT / backbone
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"reward.backbone {backbone!r}: no llava-hf model at {folder}; the params "
                                    f"file's header names the command that writes it")
        return str(folder)
    return models.resolve_checkpoint(backbone, local_files_only)


class TokenRewardModel(torch.nn.Module):
    """A llava-hf LVLM's language-model hidden states and a linear head: logits for every token (B, L, C).

    AutoModelForTokenClassification does not accept LLaVA, so this wraps LlavaForConditionalGeneration and reads
    the last hidden state of its `.model` (the lm_head is never used). The head runs in float32."""

    def __init__(self, lvlm, num_labels=3):
        super().__init__()
        self.lvlm = lvlm
        self.score = torch.nn.Linear(lvlm.config.text_config.hidden_size, num_labels, device=lvlm.device)

    def forward(self, input_ids, pixel_values=None, attention_mask=None, image_features=None):
        """Logits from the images as pixel values (B, 3, H, W), or as the features `image_features` computes from
        them (B, N, D), spliced in at the image tokens as the LVLM does it (the same logits, without the tower)."""
        if image_features is None:
            hidden = self.lvlm.model(input_ids=input_ids, pixel_values=pixel_values.to(self.lvlm.dtype),
                                     attention_mask=attention_mask, use_cache=False).last_hidden_state
        else:
            embeds = self.lvlm.get_input_embeddings()(input_ids)
            image_slots = input_ids == self.lvlm.config.image_token_id
            if int(image_slots.sum()) != image_features.shape[0] * image_features.shape[1]:
                raise ValueError(f"{int(image_slots.sum())} image tokens in the batch, but image features for "
                                 f"{image_features.shape[0]} images x {image_features.shape[1]} tokens")
            embeds = embeds.masked_scatter(image_slots[..., None], image_features.to(embeds.device, embeds.dtype))
            hidden = self.lvlm.model(inputs_embeds=embeds, attention_mask=attention_mask,
                                     use_cache=False).last_hidden_state
        return self.score(hidden.float())

    @torch.no_grad()
    def image_features(self, pixel_values):
        """(B, N, D): the frozen vision tower + projector output for the N image tokens of each image."""
        return models.image_features(self.lvlm, pixel_values)


def lora_config(r, alpha, dropout=0.0):
    """LoRA on the language model's projections (models.LORA_TARGETS); the head is trained and saved per adapter."""
    from peft import LoraConfig
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=models.LORA_TARGETS,
                      modules_to_save=["score"])


def param_bytes(module):
    """Bytes held by a module's parameters (each shared tensor counted once)."""
    seen = {}
    for p in module.parameters():
        seen[p.data_ptr()] = p.numel() * p.element_size()
    return sum(seen.values())


def scorer_memory(backbone_bytes, scorer_bytes, n_types):
    """What one base with n_types adapters holds against one backbone, and against n_types separately loaded
    reward models (a backbone and an adapter each)."""
    adapter_bytes = (scorer_bytes - backbone_bytes) / n_types
    return {"backbone_bytes": backbone_bytes, "scorer_bytes": scorer_bytes, "adapter_bytes_each": adapter_bytes,
            "scorer_vs_one_backbone": scorer_bytes / backbone_bytes,
            "separate_models_vs_one_backbone": n_types * (backbone_bytes + adapter_bytes) / backbone_bytes}


class RewardModels:
    """One frozen backbone, one peft adapter + head per fact type, and the sequence layout they all read."""

    def __init__(self, peft_model, processor, prompt_text, types=FACT_TYPES, claim_words=None):
        self.model, self.processor, self.types = peft_model, processor, list(types)
        self.claim_words = {t: [list(forms) for forms in words] for t, words in (claim_words or {}).items()
                            if t in self.types and words}
        self.claim_ids = claim_token_ids(processor.tokenizer, self.claim_words, self.types) if self.claim_words else None
        self.prompt = prompt_ids(processor, prompt_text)
        self.eos = processor.tokenizer.eos_token_id
        pad = processor.tokenizer.pad_token_id
        self.pad = self.eos if pad is None else pad
        self.model.eval()

    @staticmethod
    def head_width(claim_words, types):
        """Outputs of every type's head: 3, or 3 + the most claim words of a type (the heads share one shape)."""
        return 3 + max([len((claim_words or {}).get(t) or []) for t in types] + [0])

    @classmethod
    def create(cls, lvlm, processor, prompt_text, r, alpha, dropout=0.0, types=FACT_TYPES, seed=0, claim_words=None):
        """Fresh adapters and heads (seeded) on a backbone loaded with models.load_lvlm; `claim_words` as
        `reward.claim_words` ({type: [[forms of word 0], ...]}, see three_class_logits)."""
        from peft import get_peft_model
        torch.manual_seed(seed)
        model = get_peft_model(TokenRewardModel(lvlm, cls.head_width(claim_words, types)),
                               lora_config(r, alpha, dropout), adapter_name=types[0])
        for name in types[1:]:
            model.add_adapter(name, lora_config(r, alpha, dropout))
        for name in types:   # a different head per type, from a seed of its own
            torch.manual_seed(seed * 1000 + types.index(name))
            head = model.base_model.model.score.modules_to_save[name]
            head.reset_parameters()
        return cls(model, processor, prompt_text, types, claim_words)

    @classmethod
    def load(cls, lvlm, processor, prompt_text, folder, types=FACT_TYPES):
        """The adapters that `save` wrote into folder/<type>/ (and its claim words, folder/claim_words.json), on one
        backbone."""
        from peft import PeftModel
        folder = Path(folder)
        for name in types:
            if not (folder / name / "adapter_config.json").is_file():
                raise FileNotFoundError(f"no reward-model adapter {name!r} in {folder} (expected {folder / name})")
        claims_file = folder / "claim_words.json"
        saved = json.loads(claims_file.read_text()) if claims_file.is_file() else {}
        claim_words, width = saved.get("claim_words", {}), saved.get("head_width", 3)
        model = PeftModel.from_pretrained(TokenRewardModel(lvlm, width), models.safetensors_adapter(folder / types[0]),
                                          adapter_name=types[0])
        for name in types[1:]:
            model.load_adapter(models.safetensors_adapter(folder / name), adapter_name=name)
        return cls(model, processor, prompt_text, types, claim_words)

    def save(self, folder):
        """Each adapter (LoRA weights + head) as a peft folder folder/<type>/; with claim words, claim_words.json."""
        self.model.save_pretrained(str(folder), selected_adapters=self.types)
        width = self.model.base_model.model.score.original_module.out_features
        if width != 3:
            Path(folder, "claim_words.json").write_text(json.dumps({"claim_words": self.claim_words,
                                                                    "head_width": width}, indent=1))

    def examples(self, records):
        n_labels = 1 if self.types == ["holistic"] else len(FACT_TYPES)
        return examples_from_records(records, self.prompt, self.eos, len(self.processor.tokenizer), n_labels,
                                     self.claim_ids)

    def type_logits(self, head_logits, fact_type, batch):
        """(..., 3) class logits of `fact_type` from its head's outputs over a collated batch (three_class_logits)."""
        claims = batch.get("claims")
        if claims is None:
            return three_class_logits(head_logits)
        n_words = len((self.claim_words or {}).get(fact_type) or []) or None
        return three_class_logits(head_logits, claims[..., self.types.index(fact_type)], n_words)

    @contextlib.contextmanager
    def adapter_kept(self):
        """Inside, adapters may be switched; after, the active adapter and which parameters train are as before.
        peft's set_adapter also makes the adapter it switches to the trainable one: scoring one type after another
        left the last type active and trainable and froze the rest (PPO's value adapter among them)."""
        active = self.model.active_adapter
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        try:
            yield
        finally:
            self.model.set_adapter(active)
            for p in self.model.parameters():
                p.requires_grad_(False)
            for p in trainable:
                p.requires_grad_(True)

    def logits(self, fact_type, input_ids, images):
        """(B, L, C) head outputs of one type's reward model (C = head_width); images as `image_inputs` takes them."""
        self.model.set_adapter(fact_type)
        return self.model(input_ids=input_ids.to(self.device), **image_inputs(images.to(self.device)))

    @property
    def device(self):
        return self.model.base_model.model.lvlm.device

    def image_features(self, pixel_values):
        """(B, N, D): the frozen vision tower + projector features of the shared backbone."""
        return self.model.base_model.model.image_features(pixel_values)

    @torch.no_grad()
    def class_probs(self, batch, images, mixed=True, types=None):
        """(B, K, T, 3) class probabilities at the markers of a collated batch for `types` (default all; empty
        slots hold anything); images as `image_inputs` takes them (pixel values or projected features).

        mixed=True runs the adapters in one forward over the batch repeated once per type (peft's
        `adapter_names=`); mixed=False switches adapters and runs one forward per type. Either way the frozen
        tower sees each image once: pixel values become features before the per-type forwards."""
        self.model.eval()
        types = list(types or self.types)
        if images.dim() == 4 and len(types) > 1:
            images = self.image_features(images)
        input_ids, positions = batch["input_ids"].to(self.device), batch["positions"].clamp(min=0).to(self.device)
        n = len(input_ids)
        if mixed and len(types) > 1:
            names = [name for name in types for _ in range(n)]
            repeated = images.to(self.device).repeat(len(types), *[1] * (images.dim() - 1))
            logits = self.model(input_ids=input_ids.repeat(len(types), 1), **image_inputs(repeated),
                                adapter_names=names)
            per_type = logits.view(len(types), n, *logits.shape[1:])
        else:
            with self.adapter_kept():
                per_type = torch.stack([self.logits(name, input_ids, images) for name in types])
        per_type = torch.stack([self.type_logits(logits, name, batch) for logits, name in zip(per_type, types)])
        index = positions[None, :, :, None].expand(len(types), -1, -1, 3)
        picked = per_type.gather(2, index)                      # (T, B, K, 3)
        return picked.softmax(-1).permute(1, 2, 0, 3).cpu()     # (B, K, T, 3)

    def score(self, images, token_ids, end_positions, batch_size=32, mixed=True):
        """The scoring API for PPO: for each response (uint8 image, sampled token ids, index of the token closing
        each sub-sentence) a dict with "labels" (K, 3) ints in {-1, 0, 1} (types in self.types order) and
        "probs" (K, 3, 3) float32: per sub-sentence and type, probabilities of n/a / correct / hallucinated."""
        if not len(images) == len(token_ids) == len(end_positions):
            raise ValueError(f"score: {len(images)} images, {len(token_ids)} token id lists and "
                             f"{len(end_positions)} end-position lists must be as many")
        results = [None] * len(token_ids)
        todo = []
        for i, (ids, ends) in enumerate(zip(token_ids, end_positions)):
            if len(ends) == 0:
                results[i] = {"labels": np.zeros((0, len(self.types)), np.int64),
                              "probs": np.zeros((0, len(self.types), 3), np.float32)}
            else:
                seq, pos = marked_sequence(self.prompt, list(ids), list(ends), self.eos, f"response {i}")
                todo.append((i, {"ids": seq, "positions": pos}))
                if self.claim_ids is not None:
                    todo[-1][1]["claims"] = claim_indices(list(ids), list(ends), self.claim_ids)
        todo.sort(key=lambda item: len(item[1]["ids"]))   # similar lengths share a batch: less padding
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            batch = collate([e for _, e in chunk], self.pad)
            probs = self.class_probs(batch, pixel_values(self.processor, [images[i] for i, _ in chunk]), mixed)
            for row, (i, e) in enumerate(chunk):
                p = probs[row, :len(e["positions"])].numpy().astype(np.float32)
                results[i] = {"labels": p.argmax(-1) - 1, "probs": p}
        return results

    def predict(self, examples, pixels, batch_size=64, mixed=True, types=None):
        """(N, T) predicted labels in {-1, 0, 1} and (N, T, 3) probabilities over all sub-sentences of `examples`
        in order, for `types` (default all); pixels(image_ids) gives their pixel values or features (the caches)."""
        by_length = sorted(range(len(examples)), key=lambda i: len(examples[i]["ids"]))   # less padding per batch
        probs = [None] * len(examples)
        for start in range(0, len(by_length), batch_size):
            rows = by_length[start:start + batch_size]
            chunk = [examples[i] for i in rows]
            p = self.class_probs(collate(chunk, self.pad), pixels([e["image_id"] for e in chunk]), mixed, types)
            for row, (i, e) in enumerate(zip(rows, chunk)):
                probs[i] = p[row, :len(e["positions"])]
        probs = torch.cat(probs).numpy() if probs else np.zeros((0, len(types or self.types), 3), np.float32)
        return probs.argmax(-1) - 1, probs


@dataclass
class ScorerRecipe:
    """What builds stage 04's reward models from nothing: the backbone, how it loads, and the adapters' settings. The
    stage builds its scorer from it, and so does each training process (train_in_processes), to the same bits."""
    backbone: str
    load: dict                 # models.load_lvlm's keywords (dtype, device, load_in_4bit, local_files_only)
    prompt: str
    lora_r: int
    lora_alpha: int
    lora_dropout: float = 0.0
    types: list = field(default_factory=lambda: list(FACT_TYPES))
    seed: int = 0
    claim_words: dict = field(default_factory=dict)
    gradient_checkpointing: bool = False

    def build(self):
        """(RewardModels with fresh seeded adapters, the backbone's parameter bytes before the adapters)."""
        lvlm, processor = models.load_lvlm(self.backbone, **self.load)
        backbone_bytes = param_bytes(lvlm)
        rm = RewardModels.create(lvlm, processor, self.prompt, self.lora_r, self.lora_alpha, self.lora_dropout,
                                 types=self.types, seed=self.seed, claim_words=self.claim_words)
        if self.gradient_checkpointing:
            enable_gradient_checkpointing(lvlm)
        return rm, backbone_bytes


# ---------------------------------------------------------------------------------------------- data split

def split_by_image(records, dev_fraction, test_fraction, seed):
    """{"train", "dev", "test"}: the records, every image's responses in exactly one split (seeded shuffle)."""
    image_ids = sorted({r["image_id"] for r in records})
    order = [image_ids[i] for i in np.random.default_rng(seed).permutation(len(image_ids))]
    n_test = max(1, round(test_fraction * len(order))) if test_fraction > 0 else 0
    n_dev = max(1, round(dev_fraction * len(order))) if dev_fraction > 0 else 0
    if n_test + n_dev >= len(order):
        raise ValueError(f"{len(order)} images cannot be split into train / dev {dev_fraction} / test {test_fraction}")
    split_of = {i: "test" for i in order[:n_test]}
    split_of.update({i: "dev" for i in order[n_test:n_test + n_dev]})
    splits = {"train": [], "dev": [], "test": []}
    for record in records:
        splits[split_of.get(record["image_id"], "train")].append(record)
    return splits


# ---------------------------------------------------------------------------------------------- metrics

MACRO_MIN_SHARE = 0.01   # a class rarer than this in the reference is left out of macro-F1 (label_metrics)


def label_metrics(predicted, reference):
    """Metrics of labels in {-1, 0, 1} against a reference: confusion (3x3, rows = reference, cols = predicted,
    order -1, 0, 1), accuracy and macro-F1 over all sub-sentences; and over the sub-sentences where the reference
    makes a judgement (!= -1; a predicted n/a there is a miss): `applicable_accuracy` and precision / recall / F1
    of the hallucination class (1). Leaving out reference-n/a rows matters against the ground truth: a claim about
    an absent object has no true attribute or relation (truth n/a) while the AI labels, and so the reward models,
    call it hallucinated. What that leaves out is `na_called_hallucinated`: the share of reference-n/a rows
    predicted hallucinated (in PPO each is a -1 where the reference would give 0). Undefined values are None.
    Macro-F1 averages the classes that make up at least MACRO_MIN_SHARE of the reference: the object type has
    almost no n/a sub-sentences (3 in 5,455), and an n/a class of one or two rows made the dev macro-F1, and so
    early stopping, jump by a third with a single prediction."""
    predicted, reference = np.asarray(predicted, dtype=int), np.asarray(reference, dtype=int)
    confusion = np.zeros((3, 3), dtype=int)
    np.add.at(confusion, (reference + 1, predicted + 1), 1)
    f1s = []
    for c in range(3):
        tp, fp, fn = confusion[c, c], confusion[:, c].sum() - confusion[c, c], confusion[c, :].sum() - confusion[c, c]
        if confusion[c].sum() >= MACRO_MIN_SHARE * confusion.sum() and tp + fp + fn:
            f1s.append(2 * tp / (2 * tp + fp + fn))
    tp, fp, fn = confusion[2, 2], confusion[1, 2], confusion[2, :2].sum()
    n, n_applicable = int(confusion.sum()), int(confusion[1:].sum())
    ratio = lambda a, b: float(a / b) if b else None
    return {"n": n, "accuracy": ratio(np.trace(confusion), n), "macro_f1": float(np.mean(f1s)) if f1s else None,
            "n_applicable": n_applicable, "n_hallucinated": int(confusion[2].sum()),
            "applicable_accuracy": ratio(confusion[1, 1] + confusion[2, 2], n_applicable),
            "precision": ratio(tp, tp + fp), "recall": ratio(tp, tp + fn), "f1": ratio(2 * tp, 2 * tp + fp + fn),
            "na_called_hallucinated": ratio(confusion[0, 2], confusion[0].sum()), "confusion": confusion.tolist()}


def constant_baselines(reference):
    """The best a constant guess can do on the sub-sentences the reference judges (labels 0 / 1): the accuracy of
    always guessing the reference's own majority class, and the hallucination F1 of always guessing
    hallucinated (the highest F1 any constant guess gets: recall 1, precision = the hallucination share; 0 when
    nothing judged is hallucinated, as label_metrics scores that guess). None when the reference judges nothing."""
    judged = [v for v in reference if v != -1]
    halluc = sum(v == 1 for v in judged)
    majority = 1 if 2 * halluc > len(judged) else 0
    return {"n_applicable": len(judged), "majority_class": majority,
            "majority_accuracy": max(halluc, len(judged) - halluc) / len(judged) if judged else None,
            "always_hallucinated_f1": 2 * halluc / (halluc + len(judged)) if judged else None}


def ai_labels(examples):
    """(N, labels per sub-sentence) AI labels in {-1, 0, 1} of all sub-sentences of `examples` in order, IGNORE
    where stage 03 gave none."""
    classes = np.array([c for e in examples for c in e["classes"]], dtype=np.int64)
    if not len(classes):
        classes = np.empty((0, len(FACT_TYPES)), np.int64)
    return np.where(classes == IGNORE, IGNORE, classes - 1)


def evaluate(predicted, examples, types=FACT_TYPES):
    """Per type: label_metrics of the predictions and the constant baselines against the AI labels ("ai",
    "baseline_ai"; sub-sentences without an AI label left out) and, where every example has them, the ground truth
    ("gt", "baseline_gt"). `predicted` (N, T) is in the order of the examples' sub-sentences, its columns in the
    order of `types`."""
    ai = ai_labels(examples)
    gt = np.array([g for e in examples for g in e["gt"]]) if examples and all(e["gt"] for e in examples) else None
    result = {}
    for t, name in enumerate(types):
        entry = {}
        for source, reference in (("ai", ai), ("gt", gt)):
            if reference is None:
                continue
            column = reference[:, label_index(name)]
            labelled = column != IGNORE
            entry[source] = label_metrics(predicted[labelled, t], column[labelled])
            entry[f"baseline_{source}"] = constant_baselines(list(column[labelled]))
        result[name] = entry
    return result


# ---------------------------------------------------------------------------------------------- word-swap probe

def word_swap_probe(rm, records, pixels, swaps, batch_size=64):
    """Does a reward model read the image, or the words? Every sub-sentence of `records` that the ground truth
    calls correct for object and attribute and that holds exactly one word of `swaps` (feedback.word_swaps) is
    scored alone (a one-sub-sentence response) as written and with that word swapped, which makes its attribute
    wrong while the object stays there. A model that looks at the image raises P(hallucinated) of the attribute
    type for the swapped copy; where the object type rises too, it reads a wrong attribute as a sign of a made-up
    object. pixels(image_ids) gives the images as the caches do (FeatureCache: each image through the tower once).
    One row per written value: {"said", "n", type: {"p_written", "p_swapped", "rises"}} with the mean
    P(hallucinated) as written and swapped and the share of swaps that raised it."""
    cases = []   # (written value, image id, written token ids, swapped token ids)
    for record in records:
        start = 0
        for sub in record["subsentences"]:
            tokens = list(record["token_ids"][start:sub["last_token"] + 1])
            start = sub["last_token"] + 1
            truth, hits = sub.get("gt_labels"), [i for i, t in enumerate(tokens) if t in swaps]
            if truth is None or truth[:2] != [0, 0] or len(hits) != 1:
                continue
            value, other = swaps[tokens[hits[0]]]
            cases.append((value, record["image_id"], tokens, tokens[:hits[0]] + [other] + tokens[hits[0] + 1:]))
    if not cases:
        return []
    alone = []   # each case as written, then each as swapped: a one-sub-sentence response with its end marker
    for (_, image_id, _, _), tokens in zip(cases + cases, [c[2] for c in cases] + [c[3] for c in cases]):
        ids, positions = marked_sequence(rm.prompt, tokens, [len(tokens) - 1], rm.eos)
        alone.append({"image_id": image_id, "ids": ids, "positions": positions})
        if rm.claim_ids is not None:   # a claim-word head compares with the stated word, as in scoring
            alone[-1]["claims"] = claim_indices(tokens, [len(tokens) - 1], rm.claim_ids)
    _, probs = rm.predict(alone, pixels, batch_size)
    hallucinated = probs[:, :, 2]                                       # (2N, T)
    written, swapped = hallucinated[:len(cases)], hallucinated[len(cases):]
    rows = []
    for value in dict.fromkeys(c[0] for c in cases):
        mine = np.array([c[0] == value for c in cases])
        row = {"said": value, "n": int(mine.sum())}
        for t, name in enumerate(rm.types):
            row[name] = {"p_written": float(written[mine, t].mean()), "p_swapped": float(swapped[mine, t].mean()),
                         "rises": float((swapped[mine, t] > written[mine, t]).mean())}
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------- training

def enable_gradient_checkpointing(lvlm):
    """Activation recomputation on the backbone (the name transformers 5.17 has; 5.24 calls it deprecated)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        lvlm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _adapter_params(model, name):
    return {n: p for n, p in model.named_parameters() if f".{name}." in n and ("lora_" in n or "modules_to_save" in n)}


CHECKPOINT_FILES = ("adapter.safetensors", "best.safetensors", "average.safetensors", "optimizer.pt")


def _save_state(folder, params, best, optimizer, state, average=None):
    from safetensors.torch import save_file

    def tensors(weights):
        return lambda path: save_file({n: w.detach().cpu().contiguous() for n, w in weights.items()}, path)
    writers = {"adapter.safetensors": tensors(params)}
    for name, weights in (("best", best), ("average", average)):
        if weights is not None:
            writers[f"{name}.safetensors"] = tensors(weights)
    writers["optimizer.pt"] = lambda path: torch.save(optimizer.state_dict(), path)
    state = dict(state, torch_rng=torch.get_rng_state().tolist())
    if torch.cuda.is_available():   # LoRA dropout on a GPU draws from the CUDA generators
        state["cuda_rng"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    stage.write_checkpoint(folder, writers, state)


def _load_state(folder, params, optimizer, average=None):
    """The training state of the checkpoint in `folder` (weights, averages and optimiser restored), and the best
    weights it kept; None when the folder holds no checkpoint."""
    from safetensors.torch import load_file
    checkpoint = stage.read_checkpoint(folder, CHECKPOINT_FILES)
    if checkpoint is None:
        return None
    state, files = checkpoint
    weights = load_file(files["adapter.safetensors"])
    best = load_file(files["best.safetensors"]) if "best.safetensors" in files else None
    _assign(params, weights)
    if average is not None:
        if "average.safetensors" not in files:
            raise ValueError(f"{folder}: a checkpoint without weight averages, resumed with ema_decay > 0")
        _assign(average, load_file(files["average.safetensors"]))
    optimizer.load_state_dict(torch.load(files["optimizer.pt"], weights_only=True))
    torch.set_rng_state(torch.tensor(state.pop("torch_rng"), dtype=torch.uint8))
    cuda_rng = state.pop("cuda_rng", None)
    if cuda_rng is not None and torch.cuda.is_available():
        if len(cuda_rng) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in cuda_rng])
        else:
            warnings.warn(f"{folder}: a checkpoint of {len(cuda_rng)} GPUs resumed with {torch.cuda.device_count()}; "
                          f"the CUDA generators start from the seed, so dropout draws differ from an unbroken run")
    return state, best


def train_type(rm, fact_type, train_examples, dev_examples, pixels, lr, batch_size, epochs, patience, seed,
               checkpoint_dir, checkpoint_every=500, grad_clip=1.0, eval_batch_size=64, stop_after=None,
               class_weights=None, lr_schedule="constant", twin_share=0.0, ema_decay=0.0, after_epoch=None,
               progress=None, show_bar=True):
    """Train one type's adapter and head with Adam on token-level cross-entropy at the markers (weighted per
    class when `class_weights`, a (3,) tensor, is given), at a learning rate that is constant or falls linearly to 0
    at the last step of `epochs` (`lr_schedule`: a function of the step, so a resumed run needs no scheduler state),
    each training example that has a twin (`attach_twins`) replaced by it with probability `twin_share`;
    after every epoch score macro-F1 on the dev examples against their AI labels, keep the best weights, stop after
    `patience` epochs without improvement (or `epochs`), and end with the best weights loaded. With `ema_decay` > 0
    the weights scored and kept are an exponential moving average of the steps' weights (decay warmed up as
    min(ema_decay, (1 + step) / (10 + step)), so the initial adapter fades within the first steps); training goes
    on from the last step's weights. `after_epoch(entry)`, when given, runs after each dev scoring with the scored
    weights loaded and may add keys to that epoch's dev entry (benchmarks/reward_epochs.py scores the test split).
    `progress`, when given, is a shared multiprocessing.Value that holds the step count (a training process tells the
    stage how far it is: train_in_processes); `show_bar` False draws no progress bar.

    Checkpoints (adapter weights, best weights, optimizer, torch RNG and the CUDA RNGs where there is CUDA, logs)
    go into `checkpoint_dir` at every epoch end and every `checkpoint_every` steps; a call finds them and continues the
    same trajectory (batch order comes from (seed, epoch)), or, when training had finished, just loads the result.
    `stop_after` ends after that many steps with a checkpoint (simulates an interruption). Returns the history
    dict: "loss" [[step, loss]], "dev" [{"epoch", "step", "macro_f1", "accuracy", "halluc_f1"}], "best_epoch",
    "stopped_early", "done"."""
    model, type_index = rm.model, label_index(fact_type)
    checkpoint_dir = Path(checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    model.set_adapter(fact_type)
    params = _adapter_params(model, fact_type)
    for n, p in model.named_parameters():
        p.requires_grad_(n in params)
    optimizer = torch.optim.Adam(list(params.values()), lr=lr)
    class_weights = None if class_weights is None else class_weights.to(rm.device)
    state = {"step": 0, "loss": [], "dev": [], "best_f1": -1.0, "best_epoch": None, "bad_epochs": 0,
             "stopped_early": False, "done": False}
    best = None
    average = {n: p.detach().clone() for n, p in params.items()} if ema_decay else None
    torch.manual_seed(seed)
    resumed = _load_state(checkpoint_dir, params, optimizer, average)   # after manual_seed: its RNG states win
    if resumed is not None:
        state, best = resumed
    if progress is not None:
        progress.value = state["step"]
    steps_per_epoch = math.ceil(len(train_examples) / batch_size)
    total_steps = epochs * steps_per_epoch
    bar = tqdm(total=total_steps, initial=state["step"], desc=f"reward model: {fact_type}",
               mininterval=2.0, disable=state["done"] or not show_bar)
    while not state["done"]:
        epoch, offset = divmod(state["step"], steps_per_epoch)
        if epoch >= epochs:
            state["done"] = True
            break
        order = np.random.default_rng([seed, epoch]).permutation(len(train_examples))
        model.train()
        for start in range(offset * batch_size, len(order), batch_size):
            chunk = [train_examples[i] for i in order[start:start + batch_size]]
            chunk = with_twins(chunk, twin_share, [seed, epoch, start])
            batch = collate(chunk, rm.pad, type_index)
            logits = model(input_ids=batch["input_ids"].to(rm.device),
                           **image_inputs(pixels([e["image_id"] for e in chunk]).to(rm.device)))
            loss = token_loss(rm.type_logits(logits, fact_type, batch), batch["labels"].to(rm.device), class_weights)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(list(params.values()), grad_clip)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(lr, lr_schedule, state["step"], total_steps)
            optimizer.step()
            state["step"] += 1
            if average is not None:   # average <- decay * average + (1 - decay) * weights
                decay = min(ema_decay, state["step"] / (9 + state["step"]))
                with torch.no_grad():
                    for n, p in params.items():
                        average[n].lerp_(p, 1.0 - decay)
            state["loss"].append([state["step"], loss.item()])
            bar.update(1)
            if progress is not None:
                progress.value = state["step"]
            if state["step"] % steps_per_epoch == 0:
                with _loaded(params, average):
                    best = _end_epoch(rm, fact_type, dev_examples, pixels, eval_batch_size, params, state, best,
                                      epoch, epochs, patience)
                    if after_epoch is not None:
                        after_epoch(state["dev"][-1])
                bar.set_postfix(dev_macro_f1=f"{state['dev'][-1]['macro_f1']:.3f}")
                _save_state(checkpoint_dir, params, best, optimizer, state, average)
                model.train()
                if state["done"]:
                    break
            elif state["step"] % checkpoint_every == 0:
                _save_state(checkpoint_dir, params, best, optimizer, state, average)
            if stop_after is not None and state["step"] >= stop_after:
                _save_state(checkpoint_dir, params, best, optimizer, state, average)
                bar.close()
                model.eval()
                return _history(state)
    bar.close()
    _save_state(checkpoint_dir, params, best, optimizer, state, average)
    if best is not None:
        _assign(params, best)
    for p in params.values():
        p.requires_grad_(False)
    model.eval()
    return _history(state)


@contextlib.contextmanager
def _loaded(params, weights):
    """`weights` (a dict like params, or None for no change) in the parameters for the block, then the old back."""
    if weights is None:
        yield
        return
    saved = {n: p.detach().clone() for n, p in params.items()}
    _assign(params, weights)
    try:
        yield
    finally:
        _assign(params, saved)


def _assign(tensors, values):
    """Copy values[name] into each of `tensors` in place (to its device), outside autograd."""
    with torch.no_grad():
        for n, t in tensors.items():
            t.copy_(values[n].to(t.device))


def learning_rate(lr, schedule, step, total_steps):
    """The learning rate of optimiser step `step` (0-based) of `total_steps`: lr, or lr * (1 - step / total_steps)."""
    if schedule == "constant":
        return lr
    if schedule == "linear":
        return lr * (1.0 - step / total_steps)
    raise ValueError(f"lr_schedule {schedule!r}: expected 'constant' or 'linear'")


def _end_epoch(rm, fact_type, dev_examples, pixels, eval_batch_size, params, state, best, epoch, epochs, patience):
    """Dev macro-F1 against the AI labels (of the sub-sentences that have one); keep the best weights; decide
    whether training is done."""
    predicted, _ = rm.predict(dev_examples, pixels, eval_batch_size, types=[fact_type])
    reference = ai_labels(dev_examples)[:, label_index(fact_type)]
    labelled = reference != IGNORE
    metrics = label_metrics(predicted[labelled, 0], reference[labelled])
    f1 = metrics["macro_f1"] or 0.0
    # halluc_f1 is recorded, not used: it shows how far the selection rule (macro-F1) and the class PPO rewards part
    state["dev"].append({"epoch": epoch + 1, "step": state["step"], "macro_f1": f1, "accuracy": metrics["accuracy"],
                         "halluc_f1": metrics["f1"]})
    if f1 > state["best_f1"]:
        state.update(best_f1=f1, best_epoch=epoch + 1, bad_epochs=0)
        best = {n: p.detach().cpu().clone() for n, p in params.items()}
    else:
        state["bad_epochs"] += 1
    if state["bad_epochs"] >= patience:
        state.update(done=True, stopped_early=True)
    elif epoch + 1 >= epochs:
        state["done"] = True
    return best


def train_all(rm, examples, pixels, settings, seed, checkpoint_dir, recipe=None, num_threads=1):
    """Stage 04's training: every type's adapter through train_type with the `reward` params `settings` (balanced
    class weights when asked), each checkpointing into checkpoint_dir/<type>. One type after another in this process,
    or, with `settings.train_processes` > 1, side by side in that many processes (train_in_processes: each builds its
    scorer from `recipe`, a ScorerRecipe, and runs num_threads // train_processes torch threads), after which this
    process loads what they trained from their checkpoints; on a GPU, or with pixels per step, one after another.
    With a FeatureCache every image's features are computed first, in one order, so both ways read the same
    numbers. Returns ({type: history}, {type: seconds})."""
    dev_labels = ai_labels(examples["dev"])
    for fact_type in rm.types:
        if not (dev_labels[:, label_index(fact_type)] != IGNORE).any():
            raise ValueError(f"reward models: no sub-sentence of the dev split ({len(examples['dev'])} responses) has an "
                             f"AI {fact_type} label, so early stopping would keep epoch 1 blindly; more feedback "
                             f"images (data.n_feedback) or a larger reward.dev_fraction")
    jobs = []
    for index, fact_type in enumerate(rm.types):
        weights = None
        if settings.class_weights == "balanced":
            weights = balanced_class_weights(examples["train"], fact_type, twin_share=settings.twin_share)
            print(f"{fact_type}: class weights (n/a, correct, hallucinated) {[round(w, 3) for w in weights.tolist()]}")
        jobs.append(dict(
            fact_type=fact_type, train_examples=examples["train"], dev_examples=examples["dev"], lr=settings.lr,
            batch_size=settings.batch_size, epochs=settings.epochs_of(fact_type), patience=settings.patience,
            seed=seed * 100 + index, checkpoint_dir=Path(checkpoint_dir) / fact_type,
            checkpoint_every=settings.checkpoint_every, eval_batch_size=settings.eval_batch_size,
            class_weights=weights, lr_schedule=settings.lr_schedule, twin_share=settings.twin_share,
            ema_decay=settings.ema_decay))
    if isinstance(pixels, FeatureCache):
        pixels(sorted({e["image_id"] for name in ("train", "dev") for e in examples[name]}))   # twins: same images
    seconds, processes = {}, min(settings.train_processes, len(jobs))   # one type (holistic): this process
    if processes > 1 and _why_not_in_processes(pixels):
        print(f"reward.train_processes {processes}: {_why_not_in_processes(pixels)}; training one type after another "
              f"in this process")
        processes = 1
    if processes > 1:
        if recipe is None:
            raise ValueError("reward.train_processes > 1 needs the ScorerRecipe that builds the reward models")
        seconds = train_in_processes(recipe, jobs, pixels, processes, max(1, num_threads // processes))
    histories = {}
    for job in jobs:
        t0 = time.monotonic()
        histories[job["fact_type"]] = h = train_type(rm, pixels=pixels, **job)   # after processes: their result
        seconds.setdefault(job["fact_type"], round(time.monotonic() - t0, 1))   # loaded here: the processes' time
        print(f"{job['fact_type']}: {h['step']} steps, best dev macro-F1 {h['best_f1']:.3f} at epoch "
              f"{h['best_epoch']}{' (stopped early)' if h['stopped_early'] else ''}, {seconds[job['fact_type']]} s")
    return histories, {t: seconds[t] for t in histories}


def train_in_processes(recipe, jobs, features, processes, threads):
    """Train each job's type (train_type's keywords) in a process of its own, at most `processes` at a time, each with
    `threads` torch threads, its own copy of the backbone built from `recipe`, and the stage's image features (a
    FeatureCache, handed over as a file). The tiny models' small matrices keep a second thread of one process half
    idle: on 2 cores stage 04's three types train in 264 s in two one-thread processes and in 330 s one after
    another with two threads, to the same bits (benchmarks/MEASUREMENTS.md). Types whose
    checkpoint says finished are left to the caller. Every process checkpoints as train_type does; if one fails,
    the others are stopped and the error names the type and carries its traceback; a rerun resumes from the
    checkpoints. Returns {type: seconds}."""
    if _why_not_in_processes(features):
        raise ValueError(f"reward.train_processes > 1: {_why_not_in_processes(features)} (train_processes: 1 trains "
                         f"the types one after another)")
    waiting = [job for job in jobs if not _finished(job["checkpoint_dir"])]
    if not waiting:
        return {}
    context = multiprocessing.get_context("spawn")   # fork would copy a Jupyter kernel's threads and sockets
    errors, running, seconds, tracebacks = context.Queue(), {}, {}, {}
    steps = {job["fact_type"]: job["epochs"] * math.ceil(len(job["train_examples"]) / job["batch_size"])
             for job in waiting}
    done_steps = {t: context.Value("q", 0) for t in steps}
    bar = tqdm(total=sum(steps.values()), desc=f"reward models ({processes} processes)", mininterval=2.0)
    with tempfile.TemporaryDirectory(prefix="fgaif-features-") as folder:
        features_file = Path(folder) / "features.safetensors"
        features.save(features_file)
        try:
            while waiting or running:
                while waiting and len(running) < processes:
                    job = waiting.pop(0)
                    process = context.Process(target=_train_type_process, name=f"reward-{job['fact_type']}",
                                              args=(recipe, features_file, job, threads, done_steps[job["fact_type"]],
                                                    errors), daemon=True)
                    process.start()
                    running[job["fact_type"]] = (process, time.monotonic(), job["checkpoint_dir"])
                time.sleep(0.5)
                tracebacks.update(_drain(errors))   # read now: a child with a long report waits at exit for it
                bar.update(sum(v.value for v in done_steps.values()) - bar.n)
                bar.set_postfix_str(" · ".join(f"{t} {v.value}/{steps[t]}" for t, v in done_steps.items()),
                                    refresh=False)
                for fact_type, (process, t0, checkpoint_dir) in list(running.items()):
                    if process.is_alive():
                        continue
                    process.join()
                    if process.exitcode != 0:
                        tracebacks.update(_drain(errors, timeout=2))
                        detail = tracebacks.get(fact_type, f"(no traceback: exit code {process.exitcode})")
                        raise RuntimeError(f"reward model {fact_type!r}: its training process failed; the checkpoints "
                                           f"under {Path(checkpoint_dir).parent} are kept and a rerun resumes from "
                                           f"them.\n{detail}")
                    seconds[fact_type] = round(time.monotonic() - t0, 1)
                    del running[fact_type]
        finally:
            for process, *_ in running.values():
                process.terminate()
                process.join()
            bar.close()
    return seconds


def _why_not_in_processes(images):
    """Why the types cannot train in processes of their own with these `images` (what train_type reads them from),
    or None: the processes share the stage's cached features on CPU cores."""
    if not isinstance(images, FeatureCache):
        return "no feature cache to share, the images are read as pixels at every step (as on COCO)"
    if images.rm.device.type != "cpu":
        return f"the processes train on CPU cores and the backbone is on {images.rm.device}"
    return None


def _drain(reports, timeout=0.0):
    """{type: traceback} of what the training processes have put in the `reports` queue so far (waiting up to
    `timeout` seconds for the first)."""
    found = {}
    with contextlib.suppress(queue.Empty):
        while True:
            fact_type, text = reports.get(timeout=timeout) if timeout else reports.get_nowait()
            found[fact_type] = text
    return found


def _finished(checkpoint_dir):
    """Whether `checkpoint_dir` holds the checkpoint of a finished train_type run."""
    checkpoint = stage.read_checkpoint(checkpoint_dir, CHECKPOINT_FILES)
    return checkpoint is not None and checkpoint[0]["done"]


def _train_type_process(recipe, features_file, job, threads, done_steps, errors):
    """A training process's work (train_in_processes): build the scorer, read the features, train one type."""
    try:
        from transformers.utils import logging as transformers_logging
        transformers_logging.disable_progress_bar()   # the stage draws one bar for all processes
        torch.set_num_threads(threads)
        rm, _ = recipe.build()
        train_type(rm, pixels=StoredFeatures(features_file), progress=done_steps, show_bar=False, **job)
    except BaseException:
        errors.put((job["fact_type"], traceback.format_exc()))
        raise


def _history(state):
    return {key: state[key] for key in ("loss", "dev", "best_epoch", "best_f1", "stopped_early", "done", "step")}
