"""Torch threads for stage 01's training step: seconds per step of the tiny LLaVA (params.TinyArchParams, batch 32,
64 px images, captions of the world's words) at each thread count, each count in its own process, alternating.

    .venv/bin/python benchmarks/threads.py                    # 1 and 2 threads, 3 runs each
    .venv/bin/python benchmarks/threads.py --threads 1 2 4 --steps 60

What runs is tiny_train.train_phase's step (forward with labels, backward, gradient clipping, AdamW) on batches
built by tiny_train.SequenceBuilder as stage 01 builds them, from random scenes of the world and random pixels.
`num_threads` in a params file sets the count for every stage (tiny: 2, the box's cores). A 2-core VM's timings wander
by 10-20% between runs, so the counts alternate for `--repeats` runs and the table gives the median and the range.
Results: a Markdown table on stdout and, when $OUT is set, $OUT/threads.json.
"""
import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def seconds_per_step(threads, steps, warmup, batch_size, seed):
    """One process's measurement: {"seconds": mean seconds of `steps` timed steps after `warmup` untimed ones,
    "losses": the loss of every step} (the losses show the timed step is a training step: they fall)."""
    import numpy as np
    import torch
    from fgaif_utils import models, params, tiny_train, world

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    arch, image_size = params.TinyArchParams(), 64
    tokenizer = models.build_tiny_tokenizer()
    processor = models.build_tiny_processor(tokenizer, image_size, arch.patch_size)
    builder = tiny_train.SequenceBuilder(processor, (image_size // arch.patch_size) ** 2)
    model = models.build_tiny_llava(arch, image_size, tokenizer, seed=seed)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    rng, text_rng = np.random.default_rng(seed), random.Random(seed)
    scenes = [world.sample_scene(text_rng, params.WorldParams(), image_id=i) for i in range(256)]
    images = rng.integers(0, 256, size=(len(scenes), image_size, image_size, 3), dtype=np.uint8)

    def step():
        rows = rng.integers(len(scenes), size=batch_size)
        batch = builder.collate([builder.caption(world.describe(scenes[i], text_rng)) for i in rows], images[rows])
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        return loss.item()

    losses = [step() for _ in range(warmup)]
    start = time.perf_counter()
    losses += [step() for _ in range(steps)]
    return {"seconds": (time.perf_counter() - start) / steps, "losses": losses}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="thread counts to compare")
    parser.add_argument("--steps", type=int, default=40, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps before them")
    parser.add_argument("--batch", type=int, default=32, help="sequences per step (tiny profile: 32)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each count, alternating")
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)   # a child process's count
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(seconds_per_step(args.one, args.steps, args.warmup, args.batch, seed=0)))
        return
    timings, losses = {threads: [] for threads in args.threads}, {}
    for _ in range(args.repeats):
        for threads in args.threads:
            env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
            done = subprocess.run([sys.executable, __file__, "--one", str(threads), "--steps", str(args.steps),
                                   "--warmup", str(args.warmup), "--batch", str(args.batch)],
                                  env=env, capture_output=True, text=True)
            if done.returncode != 0:
                sys.exit(f"threads.py: the {threads}-thread run failed:\n{done.stderr[-3000:]}")
            result = json.loads(done.stdout.strip().splitlines()[-1])
            timings[threads].append(result["seconds"])
            losses[threads] = result["losses"]
    import torch
    print(f"stage 01 training step, tiny LLaVA, batch {args.batch}, {args.steps} steps per run, {args.repeats} runs "
          f"each, {os.cpu_count()} CPUs, torch {torch.__version__}\n")
    print("| threads | s / step (median) | range | steps / s |")
    print("|---|---|---|---|")
    rows = []
    for threads, values in timings.items():
        values = sorted(values)
        median = values[len(values) // 2]
        rows.append({"threads": threads, "seconds_per_step": values, "median": median, "losses": losses[threads]})
        print(f"| {threads} | {median:.3f} | {values[0]:.3f}-{values[-1]:.3f} | {1 / median:.2f} |")
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "threads.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
