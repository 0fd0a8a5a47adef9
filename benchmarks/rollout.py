"""Decode speed of the rollout engine against transformers `generate`, next to the memory-bandwidth floor.

    .venv/bin/python benchmarks/rollout.py            # LLaVA-1.5-7B shape on the GPU (random bf16 weights)
    .venv/bin/python benchmarks/rollout.py --tiny     # the tiny LLaVA, small batches: runs anywhere (CPU test)

The 7B shape is built from config (CLIP ViT-L/14-336 tower, Llama-2-7B text model: hidden 4096, 32 layers,
32 heads, intermediate 11008, vocabulary 32064) with a locally built word-level tokenizer, so nothing is
downloaded. Prompts are 576 image tokens + a short text, about 600 tokens. For each batch size and engine, the
time of a rollout of `--short` and of `--long` new tokens (sampling, top-p 0.9, EOS suppressed so that every
row decodes every step) is measured; their difference over (long - short) steps is the decode step time, free
of prefill and graph-capture cost. The floor is the bytes one decode step must read (language-model weights
without the embedding table, plus the KV cache at the window's mean context length), divided by the
device-to-device copy bandwidth measured in the same run.

A correctness check runs first: greedy tokens of every engine against `generate` (identical rows, mean common
prefix) and the engine's log-probs against a forward pass over the produced sequences. In bf16 the random
weights give near-flat logits, so rounding differences (other kernels under capture, a cache read in another
order) flip near-ties and rows part after a few tokens, "graph" from "static" too; `--dtype float32 --check-only`
is the exact test, where every engine must give `generate`'s tokens on every row:

    .venv/bin/python benchmarks/rollout.py --dtype float32 --batches 16 --check-only
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from fgaif_utils import models, params, rollout  # noqa: E402

IMAGE_TOKEN_ID = 32000   # llava-1.5's <image> id; <pad> follows it, as in llava-hf's tokenizer


# ---------------------------------------------------------------------------------------------- models

def build_7b_tokenizer(vocab_size=32064):
    """A word-level tokenizer with llava-1.5's vocabulary size and special ids (<unk> 0, <s> 1, </s> 2,
    <image> 32000, <pad> 32001); the words are placeholders."""
    from tokenizers import Tokenizer, models as tok_models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    names = ["<unk>", "<s>", "</s>", "USER", ":", "ASSISTANT"]
    names += [f"w{i}" for i in range(len(names), IMAGE_TOKEN_ID)] + ["<image>", "<pad>"]
    names += [f"x{i}" for i in range(len(names), vocab_size)]
    tok = Tokenizer(tok_models.WordLevel(vocab={n: i for i, n in enumerate(names)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", extra_special_tokens={"image_token": "<image>"},
                                   padding_side="left")


def build_7b(device, dtype=torch.bfloat16):
    """LLaVA-1.5-7B-shaped model (random weights in `dtype`, bf16 by default, built on the device) and a processor."""
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)
    tokenizer = build_7b_tokenizer()
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14, projection_dim=768)
    text = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096,
                       pad_token_id=tokenizer.pad_token_id, bos_token_id=1, eos_token_id=2)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN_ID,
                         projector_hidden_act="gelu", vision_feature_select_strategy="default",
                         vision_feature_layer=-2, image_seq_length=576)
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlavaForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=models.LLAVA15_CHAT_TEMPLATE)
    prompt = models.chat_prompt(processor, " ".join(f"w{100 + i}" for i in range(18)))
    return model.eval(), processor, prompt, 336


def build_tiny(device):
    """The tiny world's LLaVA shape (random weights, float32)."""
    tokenizer = models.build_tiny_tokenizer()
    processor = models.build_tiny_processor(tokenizer, 64, 8)
    model = models.build_tiny_llava(params.TinyArchParams(), 64, tokenizer, seed=0).to(device).eval()
    return model, processor, models.chat_prompt(processor, "Describe this image in detail."), 64


# ---------------------------------------------------------------------------------------------- measures

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def copy_bandwidth(device, nbytes):
    """Device-to-device copy bandwidth in bytes/s (each copy reads and writes nbytes)."""
    source = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    target = torch.empty_like(source)
    for _ in range(3):
        target.copy_(source)
    sync(device)
    start, repeats = time.perf_counter(), 10
    for _ in range(repeats):
        target.copy_(source)
    sync(device)
    return 2 * nbytes * repeats / (time.perf_counter() - start)


def decode_bytes(model, rows, context):
    """Bytes one decode step must read: language-model weights (the embedding table is only gathered from) and
    lm_head, plus every layer's keys and values over `context` tokens."""
    language = model.model.language_model
    weights = sum(p.numel() * p.element_size() for name, p in language.named_parameters()
                  if not name.startswith("embed_tokens"))
    weights += sum(p.numel() * p.element_size() for p in model.lm_head.parameters())
    text = model.config.text_config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    element = next(model.parameters()).element_size()
    kv = 2 * text.num_hidden_layers * rows * text.num_key_value_heads * head_dim * context * element
    return weights, kv


def batch_inputs(processor, prompt, image_size, rows):
    images = np.random.default_rng(rows).integers(0, 256, (rows, image_size, image_size, 3), dtype=np.uint8)
    return images, [prompt] * rows


def time_rollout(model, processor, images, prompts, engine, new_tokens, device):
    sync(device)
    start = time.perf_counter()
    rollout.sample(model, processor, images, prompts, max_new_tokens=new_tokens, do_sample=True, top_p=0.9, seed=0,
                   engine=engine, stop_at_eos=False)
    sync(device)
    return time.perf_counter() - start


def step_time(model, processor, images, prompts, engine, short, long, device):
    """Seconds per decode step: (rollout of `long` - rollout of `short`) / (long - short), after a warm-up."""
    time_rollout(model, processor, images, prompts, engine, 2, device)
    t_short = time_rollout(model, processor, images, prompts, engine, short, device)
    t_long = time_rollout(model, processor, images, prompts, engine, long, device)
    return (t_long - t_short) / (long - short), t_short


def check(model, processor, prompt, image_size, engines, rows, device, new_tokens=32):
    """Greedy agreement with `generate`, and the engine's log-probs against one forward pass."""
    images, prompts = batch_inputs(processor, prompt, image_size, rows)
    runs = {engine: rollout.sample(model, processor, images, prompts, max_new_tokens=new_tokens, engine=engine,
                                   stop_at_eos=False) for engine in engines}
    reference = runs["generate"].token_ids
    result = {}
    for engine, run in runs.items():
        prefixes = [common_prefix(a, b) for a, b in zip(run.token_ids, reference)]
        result[engine] = dict(identical_rows=sum(p == new_tokens for p in prefixes), rows=rows,
                              mean_common_prefix=round(float(np.mean(prefixes)), 1),
                              max_logprob_error=round(logprob_error(model, processor, images, prompts, run), 4))
    if "graph" in runs and "static" in runs:
        result["graph_equals_static"] = runs["graph"].token_ids == runs["static"].token_ids
    return result


def common_prefix(a, b):
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


@torch.no_grad()
def logprob_error(model, processor, images, prompts, run):
    """max |returned log-prob - forward-pass log-prob| over all tokens (every row has the same length here)."""
    batch = rollout.prepare_batch(model, processor, images, prompts)
    response = torch.tensor(run.token_ids, dtype=torch.long, device=batch["input_ids"].device)
    input_ids = torch.cat([batch["input_ids"], response], 1)
    mask = torch.cat([batch["attention_mask"], torch.ones_like(response)], 1)
    logits = model(input_ids=input_ids, attention_mask=mask, pixel_values=batch["pixel_values"],
                   logits_to_keep=response.shape[1] + 1).logits[:, :-1]
    forward = rollout.token_logprobs(logits, response)
    return float((forward - torch.tensor(run.logprobs, device=forward.device)).abs().max())


# ---------------------------------------------------------------------------------------------- main

def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny LLaVA, small batches (CPU test)")
    parser.add_argument("--batches", type=int, nargs="+", default=None, help="default: 16 64 (tiny: 2 4)")
    parser.add_argument("--short", type=int, default=None, help="default 16 (tiny: 4)")
    parser.add_argument("--long", type=int, default=None, help="default 144 (tiny: 20)")
    parser.add_argument("--engines", nargs="+", default=None,
                        help="default: generate static graph on CUDA, generate static elsewhere (compile: opt in)")
    parser.add_argument("--no-check", action="store_true", help="skip the greedy/log-prob correctness check")
    parser.add_argument("--check-only", action="store_true", help="the correctness check alone, no timings")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default=None,
                        help="7B weights (default bfloat16; float32 makes near-ties between engines rare)")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    device = models.pick_device(args.device)
    if not args.tiny and device.type != "cuda":
        sys.exit("the 7B shape needs a CUDA GPU; use --tiny on this machine")
    batches = args.batches or ([2, 4] if args.tiny else [16, 64])
    short, long = args.short or (4 if args.tiny else 16), args.long or (20 if args.tiny else 144)
    engines = args.engines or (["generate", "static", "graph"] if device.type == "cuda" else ["generate", "static"])
    if device.type == "cpu":
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

    bandwidth = copy_bandwidth(device, (1 << 30) if device.type == "cuda" else (64 << 20))
    start = time.perf_counter()
    if args.tiny:
        model, processor, prompt, image_size = build_tiny(device)
    else:
        model, processor, prompt, image_size = build_7b(device, getattr(torch, args.dtype or "bfloat16"))
    sync(device)
    info = dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                torch=torch.__version__, transformers=__import__("transformers").__version__,
                params_m=round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
                dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
                build_s=round(time.perf_counter() - start, 1), copy_GBps=round(bandwidth / 1e9, 1))
    prompt_len = rollout.prepare_batch(model, processor, *batch_inputs(processor, prompt, image_size, 1))[
        "input_ids"].shape[1]
    info["prompt_tokens"] = prompt_len
    print(json.dumps(info), flush=True)

    results = dict(info=info, rows=[])
    if not args.no_check:
        results["check"] = check(model, processor, prompt, image_size, engines, min(batches), device)
        print("check:", json.dumps(results["check"]), flush=True)

    for rows in [] if args.check_only else batches:
        images, prompts = batch_inputs(processor, prompt, image_size, rows)
        weights, kv = decode_bytes(model, rows, prompt_len + (short + long) / 2)
        floor = (weights + kv) / bandwidth
        for engine in engines:
            step, t_short = step_time(model, processor, images, prompts, engine, short, long, device)
            row = dict(batch=rows, engine=engine, ms_per_step=round(step * 1e3, 2), tokens_per_s=round(rows / step),
                       x_floor=round(step / floor, 2), floor_ms=round(floor * 1e3, 2),
                       weights_MB=round(weights / 1e6, 1), kv_MB=round(kv / 1e6, 1), short_rollout_s=round(t_short, 2))
            results["rows"].append(row)
            print(json.dumps(row), flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()

    print_table(results["rows"], info)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "rollout_bench.json").write_text(json.dumps(results, indent=1))


def print_table(rows, info):
    print(f"\n{info['device']}, torch {info['torch']}, transformers {info['transformers']}, "
          f"{info['params_m']} M params, prompt {info['prompt_tokens']} tokens, copy {info['copy_GBps']} GB/s")
    print("| batch | engine | ms/step | tokens/s | floor ms/step (weights + KV read) | x floor | vs generate |")
    print("|---|---|---|---|---|---|---|")
    generate_ms = {r["batch"]: r["ms_per_step"] for r in rows if r["engine"] == "generate"}
    for r in rows:
        speedup = generate_ms.get(r["batch"], float("nan")) / r["ms_per_step"]
        print(f"| {r['batch']} | {r['engine']} | {r['ms_per_step']} | {r['tokens_per_s']} | "
              f"{r['floor_ms']} ({r['weights_MB']} + {r['kv_MB']} MB) | {r['x_floor']} | {speedup:.2f}x |")


if __name__ == "__main__":
    main()
