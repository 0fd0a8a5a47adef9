"""Held-out F1 of the reward models after every epoch, on a finished run's stages 00-03: what the epoch count and the
selection rule (dev macro-F1 against the AI labels) cost against the test split's ground truth.

    .venv/bin/python benchmarks/reward_epochs.py                                   # outputs/tiny, params/tiny.yaml
    .venv/bin/python benchmarks/reward_epochs.py --types object attribute --epochs 4 --ema-decay 0 0.999

For each `--ema-decay` and type this trains stage 04's reward model with stage 04's own call (reward.train_type,
the profile's settings and seeds, so decay 0 repeats stage 04's trajectory), for `--epochs` epochs without early
stopping, and after each epoch scores the dev split (the selection rule's input) and the test split (what stage 04
reports) with the weights training would keep at that epoch (the moving average when the decay is > 0). "kept" marks
the epoch the profile's rule (its epochs and patience on dev macro-F1) would keep. One process, one type at a time:
run nothing else on a 2-core box meanwhile. Results: a Markdown table on stdout and, when $OUT is set,
$OUT/reward_epochs.json.
"""
import argparse
import functools
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fgaif_utils import models, params, reward, stage, world  # noqa: E402


def kept_epoch(dev_entries, epochs, patience):
    """The epoch train_type keeps under `epochs` and `patience`, from a longer run's dev entries."""
    best_f1, best, bad = -1.0, None, 0
    for entry in dev_entries[:epochs]:
        if entry["macro_f1"] > best_f1:
            best_f1, best, bad = entry["macro_f1"], entry["epoch"], 0
        else:
            bad += 1
        if bad >= patience:
            break
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default="params/tiny.yaml", help="the profile whose stages 00-03 finished")
    parser.add_argument("--run", default=None, help="run name (default: the profile's)")
    parser.add_argument("--types", nargs="+", default=["object", "attribute"], choices=reward.FACT_TYPES)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--ema-decay", type=float, nargs="+", default=[0.0, 0.999])
    args = parser.parse_args()

    P = params.load(params.resolve_params_path(args.params))
    R = P.reward
    torch.set_num_threads(P.num_threads)
    run = args.run or P.run
    folder = {name: stage.final_dir(stage.run_of(name, run, P), name) for name in ("00_data", "01_base_models",
                                                                                  "03_ai_feedback")}
    for name, path in folder.items():
        if stage.read_manifest(path) is None:
            sys.exit(f"{path}: stage {name} of run {run!r} has not finished (make run, or the pipeline with --stages 00-03)")
    data_dir, models_dir = folder["00_data"], folder["01_base_models"]
    records = stage.read_jsonl(folder["03_ai_feedback"] / "fg_labels.jsonl")
    scenes_by_id = {s["image_id"]: s for s in world.load_scenes(data_dir, "feedback")}
    load_image = functools.lru_cache(maxsize=4096)(lambda image_id: world.load_image(data_dir, scenes_by_id[image_id]))
    splits = reward.split_by_image(records, R.dev_fraction, R.test_fraction, P.seed)
    print(f"run {run}: " + ", ".join(f"{n} {len(rs)} responses" for n, rs in splits.items()), file=sys.stderr)

    rows = []
    for ema_decay in args.ema_decay:
        for fact_type in args.types:
            lvlm, processor = models.load_lvlm(reward.backbone_path(R.backbone, models_dir, True), dtype=P.models.dtype,
                                               device=P.models.device, local_files_only=True)
            rm = reward.RewardModels.create(lvlm, processor, P.sampling.prompt, R.lora_r, R.lora_alpha, R.lora_dropout,
                                            types=reward.FACT_TYPES, seed=P.seed,   # stage 04's initialisation
                                            claim_words=vars(R.claim_words))
            cache = reward.FeatureCache(rm, processor, load_image, R.eval_batch_size)
            examples = {name: rm.examples(rs) for name, rs in splits.items()}
            weights = (reward.balanced_class_weights(examples["train"], fact_type)
                       if R.class_weights == "balanced" else None)

            def score_test(entry):
                predicted, _ = rm.predict(examples["test"], cache, R.eval_batch_size, types=[fact_type])
                metrics = reward.evaluate(predicted, examples["test"], [fact_type])[fact_type]
                entry.update(test_f1_gt=metrics["gt"]["f1"], test_f1_ai=metrics["ai"]["f1"],
                             test_accuracy_gt=metrics["gt"]["applicable_accuracy"],
                             majority_gt=metrics["baseline_gt"]["majority_accuracy"], wall=time.monotonic())

            t0 = time.monotonic()
            with tempfile.TemporaryDirectory() as checkpoints:
                history = reward.train_type(
                    rm, fact_type, examples["train"], examples["dev"], cache, lr=R.lr, batch_size=R.batch_size,
                    epochs=args.epochs, patience=args.epochs + 1, seed=P.seed * 100 + reward.label_index(fact_type),
                    checkpoint_dir=checkpoints, checkpoint_every=10**9, eval_batch_size=R.eval_batch_size,
                    class_weights=weights, lr_schedule=R.lr_schedule, ema_decay=ema_decay, after_epoch=score_test)
            kept = kept_epoch(history["dev"], R.epochs_of(fact_type), R.patience)
            previous = t0
            for entry in history["dev"]:
                rows.append({"ema_decay": ema_decay, "type": fact_type, "kept": entry["epoch"] == kept,
                             "seconds": round(entry.pop("wall") - previous, 1), **entry})
                previous += rows[-1]["seconds"]
            del rm, lvlm, cache

    print(f"\nreward models per epoch, run {run} ({args.params}), {R.epochs} epochs by the profile; "
          "test = held-out images, F1 of the hallucination class\n")
    print("| ema decay | type | epoch | dev macro-F1 (AI) | dev halluc. F1 (AI) | test F1 vs truth | test F1 vs AI | test accuracy vs truth (majority) | s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        mark = " (kept)" if row["kept"] else ""
        print(f"| {row['ema_decay']:g} | {row['type']} | {row['epoch']}{mark} | {row['macro_f1']:.3f} | "
              f"{row['halluc_f1']:.3f} | **{row['test_f1_gt']:.3f}** | {row['test_f1_ai']:.3f} | "
              f"{row['test_accuracy_gt']:.3f} ({row['majority_gt']:.3f}) | {row['seconds']} |")
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "reward_epochs.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
