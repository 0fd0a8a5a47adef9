"""Reward-model training steps on the tiny LLaVA: the images as pixel values (reward.PixelCache, the tower runs at
every step) against the frozen tower's features computed once per image (reward.FeatureCache), in the same run.

    .venv/bin/python benchmarks/reward_step.py                 # 2 threads, as the tiny profile on 2 cores
    .venv/bin/python benchmarks/reward_step.py --threads 1 --steps 50

What runs is stage 04's own training function, reward.train_type, for one epoch of `--steps` steps of batch
`--batch` on the tiny profile's shapes (params.TinyArchParams, 64 px images, LoRA r=3 / alpha=6 on the three
adapters): random 64x64 images, responses of world words with sub-sentences closed by '.', random labels. Both
runs start from the same adapters and batch order, so the training losses must agree to float rounding; the table
prints the largest difference. The dev pass at the epoch end (`--dev` examples) is inside the timed call, as in the
stage. A 2-core VM's timings wander by 10-20% between runs of a few seconds, so the two kinds alternate for
`--repeats` runs each and the table gives the median and the range. Results: a Markdown table on stdout and, when
$OUT is set, $OUT/reward_step.json.
"""
import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fgaif_utils import models, params, reward  # noqa: E402

PROMPT = "Describe this image in detail."
EVAL_BATCH = 64   # the tiny profile's reward.eval_batch_size: dev scoring and feature batches, as in stage 04
WORDS = ("there is a small red heart . a large blue square is left of the green ring . the star is above the "
         "yellow triangle . a purple circle is below the orange cross")


def fake_records(tokenizer, n, n_images, seed):
    """fg_labels-like records: 15-45 world words, '.' closing each sub-sentence and the response, random labels."""
    rng = np.random.default_rng(seed)
    words = tokenizer(WORDS, add_special_tokens=False).input_ids
    period = tokenizer(".", add_special_tokens=False).input_ids[0]
    records = []
    for i in range(n):
        ids = [int(w) for w in rng.choice(words, size=int(rng.integers(15, 46)))]
        ids[-1] = period
        subs = [{"last_token": k, "labels": [int(v) for v in rng.integers(-1, 2, 3)]}
                for k, t in enumerate(ids) if t == period]
        records.append({"response_id": f"r{i}", "image_id": i % n_images, "token_ids": ids, "subsentences": subs})
    return records


def run(cache_kind, args, folder, processor, images, train, dev):
    # a fresh backbone per run: peft injects the adapters into the model it is given
    rm = reward.RewardModels.create(models.load_lvlm(folder, device="cpu")[0], processor, PROMPT, r=3, alpha=6, seed=0)
    load_image = images.__getitem__
    cache = (reward.FeatureCache(rm, processor, load_image, EVAL_BATCH) if cache_kind == "features"
             else reward.PixelCache(processor, load_image, keep=True))
    with tempfile.TemporaryDirectory() as checkpoints:
        start = time.perf_counter()
        history = reward.train_type(rm, "object", rm.examples(train), rm.examples(dev), cache, lr=1e-3,
                                    batch_size=args.batch, epochs=1, patience=1, seed=0, checkpoint_dir=checkpoints,
                                    checkpoint_every=10 ** 9, eval_batch_size=EVAL_BATCH)
        seconds = time.perf_counter() - start
    return seconds, [loss for _, loss in history["loss"]]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100, help="training steps (one epoch)")
    parser.add_argument("--batch", type=int, default=8, help="responses per step (tiny profile: 8)")
    parser.add_argument("--images", type=int, default=200, help="distinct images (each is seen several times)")
    parser.add_argument("--dev", type=int, default=64, help="dev examples scored at the epoch end")
    parser.add_argument("--repeats", type=int, default=5, help="runs of each kind, alternating")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the target machine has 2 cores)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    arch = params.TinyArchParams()
    tokenizer = models.build_tiny_tokenizer()
    processor = models.build_tiny_processor(tokenizer, 64, arch.patch_size)
    images = np.random.default_rng(1).integers(0, 256, (args.images, 64, 64, 3), dtype=np.uint8)
    records = fake_records(tokenizer, args.steps * args.batch + args.dev, args.images, seed=2)
    train, dev = records[:args.steps * args.batch], records[args.steps * args.batch:]

    runs = {"pixels": [], "features": []}
    losses = {}
    with tempfile.TemporaryDirectory() as folder:
        models.save_lvlm(models.build_tiny_llava(arch, 64, tokenizer, seed=0), processor, folder)
        for _ in range(args.repeats):
            for cache_kind in runs:
                seconds, losses[cache_kind] = run(cache_kind, args, folder, processor, images, train, dev)
                runs[cache_kind].append(seconds)
    loss_gap = max(abs(a - b) for a, b in zip(losses["pixels"], losses["features"]))
    median = {kind: float(np.median(seconds)) for kind, seconds in runs.items()}

    print(f"reward.train_type, one epoch: {args.steps} steps x batch {args.batch}, {args.images} images, "
          f"{args.dev} dev examples, {args.threads} threads, {args.repeats} runs each, torch {torch.__version__}\n")
    print("| images as | median s | ms / step (median) | range s | speed-up (medians) |")
    print("|---|---:|---:|---:|---:|")
    for cache_kind, label in (("pixels", "pixel values (PixelCache)"), ("features", "tower features (FeatureCache)")):
        print(f"| {label} | {median[cache_kind]:.2f} | {1000 * median[cache_kind] / args.steps:.1f} | "
              f"{min(runs[cache_kind]):.2f}-{max(runs[cache_kind]):.2f} | "
              f"{median['pixels'] / median[cache_kind]:.2f}x |")
    print(f"\nlargest training-loss difference between the two kinds: {loss_gap:.2e}")
    if os.environ.get("OUT"):
        summary = {kind: {"seconds": seconds, "median_s": median[kind],
                          "ms_per_step": 1000 * median[kind] / args.steps} for kind, seconds in runs.items()}
        Path(os.environ["OUT"], "reward_step.json").write_text(
            json.dumps({"args": vars(args), "results": summary, "loss_gap": loss_gap}, indent=1))

if __name__ == "__main__":
    main()
