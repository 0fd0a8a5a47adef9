"""What PPO's validation split says of its policies, beside what an eval split says of the same policies.

    .venv/bin/python benchmarks/validation_split.py                      # tiny and its seeds 1-2 (make seeds)
    .venv/bin/python benchmarks/validation_split.py --runs tiny tiny-sparse --splits validation eval --images 300 1000

Stage 05 chooses beta, the KL budget and when to stop on the validation split, never on eval; this re-describes both
splits greedily with each run's final policy (stage 06's loader) and prints, per run and split, FGAIF − base on
object hallucination and on coverage with paired bootstrap intervals (images resampled). On tiny's draw of
2026-12-07 the 300 validation images showed about half the coverage cost the eval images did, for every seed
(benchmarks/MEASUREMENTS.md "A 1,000-image eval split"). CPU, about 5 s per policy and split.
"""
import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from fgaif_utils import evaluate, params, stage, world  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params/tiny.yaml", help="the profile whose run made stages 00-01")
    parser.add_argument("--runs", nargs="+", default=["tiny", "tiny-s1", "tiny-s2"], help="runs with a stage 05")
    parser.add_argument("--splits", nargs="+", default=["validation", "eval"])
    parser.add_argument("--images", nargs="+", type=int, default=[300, 500], help="first N images of each split")
    parser.add_argument("--bootstrap", type=int, default=20000)
    args = parser.parse_args()
    if len(args.images) != len(args.splits):
        parser.error("--images needs one number per split")
    P = params.load(REPO / args.params if not Path(args.params).is_absolute() else args.params)
    torch.set_num_threads(P.num_threads)
    data_dir = stage.final_dir(P.run, "00_data")
    base_folder = stage.final_dir(P.run, "01_base_models") / "policy"
    scenes_by_split = {split: world.load_scenes(data_dir, split)[:n] for split, n in zip(args.splits, args.images)}
    records = []
    for label in ["base"] + args.runs:   # stage 06's loader and per-image records, one policy in memory at a time
        adapter = None if label == "base" else stage.final_dir(label, "05_ppo") / "policy_adapter"
        model, processor = evaluate.load_policy(base_folder, adapter)
        records += evaluate.evaluate_policy(model, processor, scenes_by_split, lambda s: world.load_image(data_dir, s),
                                            policy=label, prompt=P.sampling.prompt, progress=False)
    tests = evaluate.paired_tests(records, "base", n_resamples=args.bootstrap)
    print("| split | run | coverage, base -> policy | coverage (points) [95%] (p) | object [95%] (p) |")
    print("|---|---|---|---|---|")
    for split, scenes in scenes_by_split.items():
        for run in args.runs:
            cov, obj = tests[run][split]["coverage"], tests[run][split]["object_halluc"]
            print(f"| {split} ({len(scenes)}) | {run} | {cov['b']:.3f} -> {cov['a']:.3f} | {100 * cov['diff']:+.1f} "
                  f"[{100 * cov['low']:+.1f}, {100 * cov['high']:+.1f}] ({cov['p']:.3f}) | {obj['diff']:+.3f} "
                  f"[{obj['low']:+.3f}, {obj['high']:+.3f}] ({obj['p']:.3f}) |")


if __name__ == "__main__":
    main()
