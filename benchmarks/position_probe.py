"""Do the image tokens carry patch position? A ridge probe on a finished run's stage-01 models.

    .venv/bin/python benchmarks/position_probe.py                                   # params/tiny.yaml's run
    .venv/bin/python benchmarks/position_probe.py --params params/tiny.yaml params/experiments/position-code.yaml

For each model (the policy and the clean-caption "pretrained" model of each run, and the LVLM verifier where one was
trained) the eval split's first `--images` images go through the vision tower and projector, i.e. the tokens the
language model reads. A ridge regression (lambda 1) fitted on two thirds of the images predicts each patch's row and
column from its token; the table gives held-out R^2, over every patch and over the patches under an object's centre.
R^2 near 0 means no layer after the projector can tell "left of" from "right of" (benchmarks/MEASUREMENTS.md "Relations and the position
code"). A one-vs-rest ridge classifier on the object-centre tokens gives the shape and colour accuracy: whether a word
can find its object among the tokens. CPU, a few seconds per model.
"""
import argparse
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from fgaif_utils import language, models, params, stage, world  # noqa: E402

MODEL_FOLDERS = ("policy", "pretrained", "verifier_lvlm")


@torch.no_grad()
def image_tokens(model, images):
    """(images, patches, hidden): the projector's output for uint8 images (N, H, W, 3)."""
    tokens = models.image_features(model, models.pixel_values_from_uint8(np.stack(images)))
    return tokens.double().numpy()


def ridge_r2(features, targets, train_rows, ridge=1.0):
    """Held-out R^2 of a ridge fit on the rows `train_rows` (a boolean mask), scored on the others."""
    x_mean, y_mean = features[train_rows].mean(0), targets[train_rows].mean()
    centred = features[train_rows] - x_mean
    weights = np.linalg.solve(centred.T @ centred + ridge * np.eye(features.shape[1]),
                              centred.T @ (targets[train_rows] - y_mean))
    held_out = ~train_rows
    predicted = (features[held_out] - x_mean) @ weights + y_mean
    residual = ((targets[held_out] - predicted) ** 2).sum()
    return 1 - residual / ((targets[held_out] - targets[held_out].mean()) ** 2).sum()


def ridge_class_accuracy(features, classes, train_rows, ridge=1.0):
    """Held-out accuracy of a one-vs-rest ridge classifier (argmax of the fitted one-hot scores)."""
    one_hot = np.eye(classes.max() + 1)[classes]
    x_mean, y_mean = features[train_rows].mean(0), one_hot[train_rows].mean(0)
    centred = features[train_rows] - x_mean
    weights = np.linalg.solve(centred.T @ centred + ridge * np.eye(features.shape[1]),
                              centred.T @ (one_hot[train_rows] - y_mean))
    predicted = ((features[~train_rows] - x_mean) @ weights + y_mean).argmax(1)
    return float((predicted == classes[~train_rows]).mean())


def patch_position_r2(model, images, scenes=None, patch_size=8):
    """{"all": (row R^2, column R^2), "objects": (...), "identity": (shape accuracy, colour accuracy, majority
    shape share) when scenes are given}, fitted on the first two thirds. The identity columns say whether the token
    under an object's centre tells which shape (and colour) it is: what a word must match to find its object."""
    tokens = image_tokens(model, images)
    n_images, n_patches, hidden = tokens.shape
    side = int(round(n_patches ** 0.5))
    rows, cols = np.divmod(np.arange(n_patches), side)
    train_images = np.arange(n_images) < n_images * 2 // 3
    train = np.repeat(train_images, n_patches)
    flat = tokens.reshape(-1, hidden)
    result = {"all": (ridge_r2(flat, np.tile(rows, n_images).astype(float), train),
                      ridge_r2(flat, np.tile(cols, n_images).astype(float), train))}
    if scenes is not None:
        picked, object_rows, object_cols, object_train, shapes, colours = [], [], [], [], [], []
        for i, scene in enumerate(scenes):
            for obj in scene["objects"]:
                row, col = min(int(obj["cy"] // patch_size), side - 1), min(int(obj["cx"] // patch_size), side - 1)
                picked.append(tokens[i, row * side + col])
                object_rows.append(row), object_cols.append(col), object_train.append(train_images[i])
                shapes.append(language.SHAPES.index(obj["shape"])), colours.append(language.COLOURS.index(obj["colour"]))
        picked, object_train = np.array(picked), np.array(object_train)
        result["objects"] = (ridge_r2(picked, np.array(object_rows, float), object_train),
                             ridge_r2(picked, np.array(object_cols, float), object_train))
        shapes, colours = np.array(shapes), np.array(colours)
        result["identity"] = (ridge_class_accuracy(picked, shapes, object_train),
                              ridge_class_accuracy(picked, colours, object_train),
                              np.bincount(shapes[~object_train]).max() / (~object_train).sum())
    return result


def stage_folder(P, stage_name):
    """The finished folder of `stage_name` for the run of params P (its own, or the run it reuses the stage from)."""
    folder = stage.final_dir(stage.run_of(stage_name, P.run, P), stage_name)
    if stage.read_manifest(folder) is None:
        sys.exit(f"{folder}: stage {stage_name} of run {P.run!r} has not finished")
    return folder


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", nargs="+", default=["params/tiny.yaml"], help="profiles whose stage 01 finished")
    parser.add_argument("--images", type=int, default=300, help="eval images to probe")
    args = parser.parse_args()
    torch.set_num_threads(2)
    print("| run | model | rows R^2 (all patches) | columns R^2 (all) | rows R^2 (object centres) | columns R^2 (objects) | "
          "shape accuracy (object centres; majority) | colour accuracy |")
    print("|---|---|---|---|---|---|---|---|")
    for params_path in args.params:
        P = params.load(params.resolve_params_path(params_path))
        run, models_dir, data_dir = P.run, stage_folder(P, "01_base_models"), stage_folder(P, "00_data")
        scenes = world.load_scenes(data_dir, "eval")[:args.images]
        images = world.load_images(data_dir, scenes)
        for folder in MODEL_FOLDERS:
            path = models_dir / folder
            if not path.is_dir():
                continue
            model, _ = models.load_lvlm(str(path), device="cpu")
            r2 = patch_position_r2(model, images, scenes)
            print(f"| {run} | {folder} | {r2['all'][0]:.3f} | {r2['all'][1]:.3f} | {r2['objects'][0]:.3f} | "
                  f"{r2['objects'][1]:.3f} | {r2['identity'][0]:.3f} ({r2['identity'][2]:.3f}) | {r2['identity'][1]:.3f} |",
                  flush=True)


if __name__ == "__main__":
    main()
