"""One PPO iteration at the LLaVA-1.5-7B shape with LoRA: seconds and share per phase, and peak GPU memory,
with the rollout engine `generate` and with the CUDA-graph engine, in the same run.

    .venv/bin/python benchmarks/ppo_step.py            # LLaVA-1.5-7B shape on the GPU (random bf16 weights)
    .venv/bin/python benchmarks/ppo_step.py --tiny     # the tiny LLaVA, small batch: runs anywhere (CPU test)

What runs is the project's own PPO (fgaif_utils.ppo.Trainer.step), on the models stage 05 holds:
    policy       the 7B-shaped LLaVA (benchmarks/rollout.py's build_7b: random bf16 weights, built on the GPU, no
                 download) + a trainable LoRA adapter "policy" on the language model;
    reference    the same model with the adapter disabled;
    reward       a second 7B-shaped LLaVA as the shared reward base, with the three reward adapters
                 (object / attribute / relation, reward.RewardModels.create: random LoRA + heads);
    value        a fourth adapter "value" on the reward base, started from the object adapter, + scalar head.
Prompts are the 576 image tokens + a short text (~610 tokens, as benchmarks/rollout.py), images random 336x336.

Phases are the ones Trainer.step times itself (each ends with a host sync, so the GPU work is attributed):
    rollout        sampling `--batch` responses (engine `generate` or `graph`, PpoParams.rollout_engine);
    scoring        sub-sentence ends + the three reward adapters in one mixed-adapter forward;
    reference      log pi (with entropy) and log pi_ref over the sampled sequences, the value forward, rewards, GAE
                   ("reference + old log-probs" in the table);
    update         `--epochs` passes of clipped-PPO minibatch steps (policy adapter + value adapter + head).
`--warmup` untimed steps run before each engine's timed step; the peak memory (torch.cuda.max_memory_allocated)
is reset before the timed step, so it is that step's peak (model weights included).

Responses stop at EOS as in training (Trainer.rollout offers no switch to suppress it), so the mean response
length is printed next to the times; `--suppress-eos` (opt-in) makes every response exactly --max-new-tokens
long by passing stop_at_eos=False to the rollout engine for this process only. On the random 7B weights the
word-level placeholder tokenizer has no punctuation, so each response is one sub-sentence (one reward marker);
the reward forward still covers the whole sequence, which is what costs.

Results: a Markdown table on stdout and, when $OUT is set, $OUT/ppo_step.json.
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
sys.path.insert(0, str(REPO / "benchmarks"))

import rollout as rollout_bench  # noqa: E402  (benchmarks/rollout.py: build_7b, build_tiny, sync)
from fgaif_utils import models, params, ppo, reward, rollout  # noqa: E402

PROMPT_7B = " ".join(f"w{100 + i}" for i in range(18))   # the text build_7b's prompt wraps (placeholder words)
PROMPT_TINY = "Describe this image in detail."
PHASES = (("rollout_s", "rollout"), ("scoring_s", "scoring"), ("reference_s", "reference+old logprobs"),
          ("update_s", "update"))


# ---------------------------------------------------------------------------------------------- models

def build_trainer(args, device):
    """Policy (base + LoRA "policy"), reward base with three reward adapters + "value", and ppo.Trainer."""
    build, prompt_text = (rollout_bench.build_tiny, PROMPT_TINY) if args.tiny else (rollout_bench.build_7b, PROMPT_7B)
    policy_lvlm, processor, _, image_size = build(device)
    rm_lvlm, rm_processor, _, _ = build(device)
    torch.manual_seed(args.seed)
    policy = models.add_lora(policy_lvlm, r=args.lora_r, alpha=args.lora_alpha, adapter_name=ppo.POLICY_ADAPTER)
    if args.gradient_checkpointing:   # on both backbones, as ppo.run_job does: the value adapter trains through rm's
        reward.enable_gradient_checkpointing(policy_lvlm)
        reward.enable_gradient_checkpointing(rm_lvlm)
    rm = reward.RewardModels.create(rm_lvlm, rm_processor, prompt_text, r=args.reward_lora_r,
                                    alpha=args.reward_lora_alpha, seed=args.seed)
    head = ppo.add_value_adapter(rm, "object_reward", seed=args.seed)
    settings = params.PpoParams(steps=1, rollout_batch=args.batch, samples_per_image=1,
                                minibatch_size=args.minibatch, epochs=args.epochs, lora_r=args.lora_r,
                                lora_alpha=args.lora_alpha, max_new_tokens=args.max_new_tokens,
                                gradient_checkpointing=args.gradient_checkpointing, rollout_engine=args.engines[0])
    trainer = ppo.Trainer(policy, processor, rm, head, settings, reward.FACT_TYPES, prompt_text)
    return trainer, image_size


class _RolloutWithoutEos:
    """fgaif_utils.rollout as ppo.Trainer sees it, with stop_at_eos=False (--suppress-eos): every row decodes
    exactly max_new_tokens tokens. Installed on the ppo module of this process only."""

    def __getattr__(self, name):
        return getattr(rollout, name)

    @staticmethod
    def sample(*args, **kwargs):
        return rollout.sample(*args, **{**kwargs, "stop_at_eos": False})


# ---------------------------------------------------------------------------------------------- measure

def timed_step(trainer, images, iteration, seed, device):
    """One Trainer.step between syncs, its peak memory counted from a fresh reset: (log row, batch, seconds, GB)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    rollout_bench.sync(device)
    start = time.perf_counter()
    row, batch = trainer.step(images, list(range(len(images))), iteration, seed=seed)
    rollout_bench.sync(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None
    return row, batch, seconds, peak


def run_engine(trainer, engine, images, warmup, iteration, device):
    trainer.s.rollout_engine = engine
    for _ in range(warmup):
        iteration += 1
        trainer.step(images, list(range(len(images))), iteration, seed=1000 + iteration)
    iteration += 1
    row, batch, seconds, peak = timed_step(trainer, images, iteration, 1000 + iteration, device)
    lengths = [len(ids) for ids in batch.token_ids]
    result = dict(engine=engine, total_s=round(seconds, 3), peak_GB=None if peak is None else round(peak, 2),
                  mean_response_tokens=round(float(np.mean(lengths)), 1), min_response_tokens=min(lengths),
                  max_response_tokens=max(lengths), subsentences=round(row["subsentences"], 2),
                  sequence_tokens=int(batch.input_ids.shape[1]),
                  **{key: round(row[key], 3) for key, _ in PHASES})
    result["share"] = {key: round(row[key] / seconds, 3) for key, _ in PHASES}
    result["other_s"] = round(seconds - sum(row[key] for key, _ in PHASES), 3)   # stats, host work between phases
    del batch
    return result, iteration


# ---------------------------------------------------------------------------------------------- main

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny LLaVA, small batch (CPU test)")
    parser.add_argument("--engines", nargs="+", default=None,
                        help="rollout engines in order (default: generate graph on CUDA, generate static elsewhere)")
    parser.add_argument("--batch", type=int, default=None, help="responses per rollout (default 64; tiny 4)")
    parser.add_argument("--minibatch", type=int, default=None, help="responses per gradient step (default 16; tiny 2)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default 128 (tiny 12)")
    parser.add_argument("--epochs", type=int, default=None, help="PPO epochs per batch (default PpoParams: 2; tiny 1)")
    parser.add_argument("--lora-r", type=int, default=None, help="policy LoRA rank (default PpoParams: 64; tiny 4)")
    parser.add_argument("--lora-alpha", type=int, default=16)
    parser.add_argument("--reward-lora-r", type=int, default=None,
                        help="reward/value LoRA rank (default RewardParams: 64; tiny 4)")
    parser.add_argument("--reward-lora-alpha", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=1, help="untimed PPO steps before each engine's timed step")
    parser.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                        help="on the policy and reward/value backbones, as stage 05 with ppo.gradient_checkpointing "
                             "(default: on for 7B, where minibatch 16 needs it; off for tiny)")
    parser.add_argument("--suppress-eos", action="store_true",
                        help="every response exactly --max-new-tokens long (rollout stop_at_eos=False)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    defaults = dict(batch=(4, 64), minibatch=(2, 16), max_new_tokens=(12, 128), epochs=(1, params.PpoParams.epochs),
                    lora_r=(4, params.PpoParams.lora_r), reward_lora_r=(4, params.RewardParams.lora_r),
                    gradient_checkpointing=(False, True))
    for key, (tiny, full) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, tiny if args.tiny else full)
    return args


def main(argv=None):
    args = parse_args(argv)
    device = models.pick_device(args.device)
    if not args.tiny and device.type != "cuda":
        sys.exit("the 7B shape needs a CUDA GPU; use --tiny on this machine")
    if args.engines is None:
        args.engines = ["generate", "graph"] if device.type == "cuda" else ["generate", "static"]
    if device.type == "cpu":
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if args.suppress_eos:
        ppo.rollout = _RolloutWithoutEos()

    start = time.perf_counter()
    trainer, image_size = build_trainer(args, device)
    rollout_bench.sync(device)
    info = dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                torch=torch.__version__, transformers=__import__("transformers").__version__,
                shape="tiny" if args.tiny else "llava-1.5-7b",
                policy_params_m=round(sum(p.numel() for p in trainer.policy.parameters()) / 1e6, 1),
                trainable_policy_m=round(sum(p.numel() for p in trainer.policy_params.values()) / 1e6, 2),
                trainable_value_m=round(sum(p.numel() for p in trainer.value_params.values()) / 1e6, 2),
                prompt_tokens=len(trainer.prompt), build_s=round(time.perf_counter() - start, 1),
                weights_GB=round(torch.cuda.memory_allocated(device) / 1e9, 2) if device.type == "cuda" else None,
                settings=dict(batch=args.batch, minibatch=args.minibatch, max_new_tokens=args.max_new_tokens,
                              epochs=args.epochs, lora_r=args.lora_r, reward_lora_r=args.reward_lora_r,
                              gradient_checkpointing=args.gradient_checkpointing, warmup=args.warmup,
                              suppress_eos=args.suppress_eos, temperature=trainer.s.temperature,
                              top_p=trainer.s.top_p, engines=args.engines))
    print(json.dumps(info), flush=True)

    images = list(np.random.default_rng(args.seed).integers(0, 256, (args.batch, image_size, image_size, 3),
                                                            dtype=np.uint8))
    results, iteration = dict(info=info, rows=[]), 0
    for engine in args.engines:
        try:
            row, iteration = run_engine(trainer, engine, images, args.warmup, iteration, device)
        except torch.cuda.OutOfMemoryError as err:   # record it and go on: the other engine may still fit
            row = dict(engine=engine, error=f"out of memory: {str(err).splitlines()[0]}",
                       peak_GB=round(torch.cuda.max_memory_allocated(device) / 1e9, 2))
            torch.cuda.empty_cache()
        results["rows"].append(row)
        print(json.dumps(row), flush=True)

    print_table(results["rows"], info)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "ppo_step.json").write_text(json.dumps(results, indent=1))
    return results


def print_table(rows, info):
    s = info["settings"]
    print(f"\n{info['device']}, torch {info['torch']}, transformers {info['transformers']}, {info['shape']} "
          f"({info['policy_params_m']} M params per base), prompt {info['prompt_tokens']} tokens; "
          f"batch {s['batch']}, minibatch {s['minibatch']}, epochs {s['epochs']}, max_new_tokens "
          f"{s['max_new_tokens']}, LoRA r {s['lora_r']} (reward/value r {s['reward_lora_r']}), gradient "
          f"checkpointing {'on' if s['gradient_checkpointing'] else 'off'}")
    print("| engine | rollout s (share) | scoring s (share) | reference+old logprobs s (share) | update s (share) "
          "| total s | peak GB | mean response tokens |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['engine']} | {r['error']} (peak {r['peak_GB']} GB; try a smaller --minibatch) "
                  "| | | | | | |")
            continue
        cells = [f"{r[key]:.2f} ({100 * r['share'][key]:.0f}%)" for key, _ in PHASES]
        peak = "n/a (CPU)" if r["peak_GB"] is None else f"{r['peak_GB']:.1f}"
        print(f"| {r['engine']} | {' | '.join(cells)} | {r['total_s']:.2f} | {peak} | "
              f"{r['mean_response_tokens']:.1f} |")
    eos = ("EOS suppressed: every response is max_new_tokens long" if s["suppress_eos"] else
           "responses stop at EOS as in training, so compare the times with the mean response tokens")
    print(f"\nShares are of the step's wall time; {eos}. Sub-sentences per response: "
          + ", ".join(f"{r['engine']} {r['subsentences']}" for r in rows if "error" not in r)
          + ". 'reference+old logprobs' also holds the value forward, rewards and GAE.")


if __name__ == "__main__":
    main()
