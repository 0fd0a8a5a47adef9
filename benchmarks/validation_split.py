"""What PPO's validation split says of its policies, beside what an eval split says of the same policies.

    .venv/bin/python benchmarks/validation_split.py                      # tiny and its seeds 1-2 (make seeds)
    .venv/bin/python benchmarks/validation_split.py --runs tiny tiny-sparse --splits validation eval --images 300 1000

Stage 05 chooses beta, the KL budget and when to stop on the validation split, never on eval; this re-describes both
splits greedily with each run's final policy (stage 06's loader) and prints, per run and split, FGAIF − base on
object hallucination and on coverage with paired bootstrap intervals (images resampled). On tiny's draw of
2026-12-07 the 300 validation images showed about half the coverage cost the eval images did, for every seed
(README "A 1,000-image eval split"). CPU, about 5 s per policy and split.
"""
import argparse
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from fgaif_utils import evaluate, params, scorer, stage, tiny_train, world  # noqa: E402

COUNTS = ("n_covered", "n_scene_objects", "n_object_false", "n_object_judged")


def per_image_counts(base_folder, adapter, scenes, images, prompt):
    model, processor = evaluate.load_policy(base_folder, adapter)
    _, texts = tiny_train.describe_images(model, processor, images, False, 0, 100, 64, prompt=prompt, progress=False)
    scores = [scorer.score_description(text, scene) for text, scene in zip(texts, scenes)]
    return {key: np.array([score[key] for score in scores], float) for key in COUNTS}


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
    print("| split | run | coverage, base -> policy | coverage (points) [95%] (p) | object [95%] (p) |")
    print("|---|---|---|---|---|")
    for split, n in zip(args.splits, args.images):
        scenes = world.load_scenes(data_dir, split)[:n]
        images = world.load_images(data_dir, scenes)
        base = per_image_counts(base_folder, None, scenes, images, P.sampling.prompt)
        for run in args.runs:
            mine = per_image_counts(base_folder, stage.final_dir(run, "05_ppo") / "policy_adapter", scenes, images,
                                    P.sampling.prompt)
            cov = evaluate.paired_bootstrap(mine["n_covered"], mine["n_scene_objects"], base["n_covered"],
                                            base["n_scene_objects"], args.bootstrap)
            obj = evaluate.paired_bootstrap(mine["n_object_false"], mine["n_object_judged"], base["n_object_false"],
                                            base["n_object_judged"], args.bootstrap)
            print(f"| {split} ({len(scenes)}) | {run} | {cov['b']:.3f} -> {cov['a']:.3f} | {100 * cov['diff']:+.1f} "
                  f"[{100 * cov['low']:+.1f}, {100 * cov['high']:+.1f}] ({cov['p']:.3f}) | {obj['diff']:+.3f} "
                  f"[{obj['low']:+.3f}, {obj['high']:+.3f}] ({obj['p']:.3f}) |", flush=True)


if __name__ == "__main__":
    main()
