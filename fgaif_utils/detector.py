"""A detector-style verifier for the tiny world: a small CNN that predicts, for every shape, whether it is in
the image, its colour, its size and its centre, and answers the same yes/no questions as an LVLM verifier.

Hallucination pipelines use detectors beside VQA models as AI judges; here it stands in for LLaVA-1.5 where a
2-core CPU cannot train a tiny LVLM to compare positions (calibration.md, rounds 2-3: relations at chance).
"""
import json
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from . import language


class ShapeDetector(nn.Module):
    """Conv features on an 8x8 grid; per shape, a softmax attention map over the grid gives its centre
    (soft-argmax) and a pooled feature that its colour and size are read from; presence is the max of a
    per-shape logit map."""

    def __init__(self, image_size=64, width=32):
        super().__init__()
        self.config = {"image_size": image_size, "width": width}
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(5, w // 2, 3, stride=2, padding=1), nn.ReLU(),      # 5 = RGB + x/y coordinate channels
            nn.Conv2d(w // 2, w, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(),
            nn.Conv2d(2 * w, 2 * w, 3, stride=2, padding=1), nn.ReLU(),
        )
        n_shapes = len(language.SHAPES)
        self.attention = nn.Conv2d(2 * w, n_shapes, 1)
        self.presence = nn.Conv2d(2 * w, n_shapes, 1)
        self.shape_embedding = nn.Embedding(n_shapes, 2 * w)
        self.colour_head = nn.Linear(2 * w, len(language.COLOURS))
        self.size_head = nn.Linear(2 * w, len(language.SIZES))
        side = image_size // 8
        centres = (torch.arange(side).float() + 0.5) * (image_size / side)
        grid_y, grid_x = torch.meshgrid(centres, centres, indexing="ij")
        self.register_buffer("grid", torch.stack([grid_x.flatten(), grid_y.flatten()], -1), persistent=False)

    def forward(self, pixels):
        """pixels: (B, 3, H, W) in [-1, 1]. Returns presence logits (B, S), colour logits (B, S, C),
        size logits (B, S, 2), centres in pixels (B, S, 2)."""
        batch, _, height, width = pixels.shape
        ys = torch.linspace(-1, 1, height, device=pixels.device).view(1, 1, height, 1).expand(batch, 1, height, width)
        xs = torch.linspace(-1, 1, width, device=pixels.device).view(1, 1, 1, width).expand(batch, 1, height, width)
        feats = self.features(torch.cat([pixels, xs, ys], 1))                    # (B, D, 8, 8)
        flat = feats.flatten(2)                                                    # (B, D, 64)
        weights = self.attention(feats).flatten(2).softmax(-1)                     # (B, S, 64)
        pooled = torch.einsum("bsn,bdn->bsd", weights, flat) + self.shape_embedding.weight
        presence = self.presence(feats).flatten(2).amax(-1)
        centres = weights @ self.grid                                              # (B, S, 2)
        return presence, self.colour_head(pooled), self.size_head(pooled), centres


def detector_targets(scenes):
    """Per scene and shape: present, colour index, size index, centre (x, y)."""
    n, s = len(scenes), len(language.SHAPES)
    present = torch.zeros(n, s)
    colour = torch.zeros(n, s, dtype=torch.long)
    size = torch.zeros(n, s, dtype=torch.long)
    centre = torch.zeros(n, s, 2)
    for i, scene in enumerate(scenes):
        for obj in scene["objects"]:
            j = language.SHAPES.index(obj["shape"])
            present[i, j] = 1
            colour[i, j] = language.COLOURS.index(obj["colour"])
            size[i, j] = language.SIZES.index(obj["size"])
            centre[i, j] = torch.tensor([obj["cx"], obj["cy"]])
    return present, colour, size, centre


def detector_loss(outputs, targets, image_size):
    presence, colour_logits, size_logits, centres = outputs
    present, colour, size, centre = targets
    mask = present.bool()
    loss = F.binary_cross_entropy_with_logits(presence, present)
    loss = loss + F.cross_entropy(colour_logits[mask], colour[mask]) + F.cross_entropy(size_logits[mask], size[mask])
    return loss + 10 * F.l1_loss(centres[mask] / image_size, centre[mask] / image_size)


def train_detector(images, scenes, steps, batch_size=64, lr=2e-3, seed=0, image_size=64, desc="detector"):
    """Train on uint8 images (N, H, W, 3) and their scene graphs. Returns (model, loss log)."""
    from tqdm import tqdm
    from . import models

    torch.manual_seed(seed)
    model = ShapeDetector(image_size=image_size)
    targets = detector_targets(scenes)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    rng = np.random.default_rng(seed)
    log = []
    model.train()
    for step in tqdm(range(steps), desc=desc, mininterval=2.0):
        rows = rng.integers(len(scenes), size=batch_size)
        loss = detector_loss(model(models.pixel_values_from_uint8(images[rows])),
                             [t[rows] for t in targets], image_size)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        log.append((step, "detector", loss.item()))
    model.eval()
    return model, log


@torch.no_grad()
def predict_scenes(model, images, batch_size=256):
    """Predicted scene graphs: [{"objects": [{shape, colour, size, cx, cy, p_present}]}]."""
    from . import models

    predicted = []
    for start in range(0, len(images), batch_size):
        presence, colour, size, centres = model(models.pixel_values_from_uint8(images[start:start + batch_size]))
        probs = presence.sigmoid()
        for i in range(probs.shape[0]):
            objects = []
            for j, shape in enumerate(language.SHAPES):
                if probs[i, j] > 0.5:
                    objects.append({"shape": shape, "colour": language.COLOURS[int(colour[i, j].argmax())],
                                    "size": language.SIZES[int(size[i, j].argmax())],
                                    "cx": float(centres[i, j, 0]), "cy": float(centres[i, j, 1]),
                                    "p_present": float(probs[i, j])})
            predicted.append({"objects": objects})
    return predicted


def parse_question(question):
    """The fact a verifier question asks about (the inverse of language.question_for_fact), or None."""
    words = question.lower().replace("?", " ").split()
    shapes = language.shape_lookup()
    sizes = language.size_lookup()
    if words[:3] == ["is", "there", "a"] and len(words) >= 4 and words[3] in shapes:
        return {"type": "object", "subject": shapes[words[3]][0], "negated": False}
    if words[:2] != ["is", "the"] or len(words) < 4 or words[2] not in shapes:
        return None
    subject, rest = shapes[words[2]][0], words[3:]
    if len(rest) == 1 and rest[0] in language.COLOURS:
        return {"type": "attribute", "subject": subject, "kind": "colour", "value": rest[0]}
    if len(rest) == 1 and rest[0] in sizes:
        return {"type": "attribute", "subject": subject, "kind": "size", "value": sizes[rest[0]]}
    if len(rest) >= 3 and rest[-2] == "the" and rest[-1] in shapes:
        phrase = " ".join(rest[:-2])
        for relation, phrases in language.RELATION_PHRASES.items():
            if phrase in phrases:
                return {"type": "relation", "subject": subject, "relation": relation, "object": shapes[rest[-1]][0]}
    return None


def answer_fact(fact, predicted_scene):
    """'yes' / 'no' for a fact against a predicted scene graph."""
    objects = {o["shape"]: o for o in predicted_scene["objects"]}
    subject = objects.get(fact["subject"])
    if fact["type"] == "object":
        return "yes" if (subject is not None) != fact.get("negated", False) else "no"
    if subject is None:
        return "no"
    if fact["type"] == "attribute":
        return "yes" if subject[fact["kind"]] == fact["value"] else "no"
    other = objects.get(fact["object"])
    if other is None:
        return "no"
    return "yes" if language.relation_holds(subject, fact["relation"], other) else "no"


class DetectorVerifier:
    """The yes/no interface of a verifier, answered from the detector's predicted scene graphs."""

    def __init__(self, model):
        self.model = model

    def answer(self, images, questions):
        # Many questions share an image: run the detector once per distinct image.
        row_of_image, distinct = {}, []
        for image in images:
            key = np.ascontiguousarray(image).tobytes()
            if key not in row_of_image:
                row_of_image[key] = len(distinct)
                distinct.append(image)
        scenes = predict_scenes(self.model, np.stack(distinct)) if distinct else []
        predicted = [scenes[row_of_image[np.ascontiguousarray(image).tobytes()]] for image in images]
        answers = []
        for scene, question in zip(predicted, questions):
            fact = parse_question(question)
            answers.append("unknown" if fact is None else answer_fact(fact, scene))
        return answers


def save_detector(model, folder):
    from safetensors.torch import save_file
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors.tmp")
    os.replace(folder / "model.safetensors.tmp", folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(model.config))


def load_detector(folder):
    from safetensors.torch import load_file
    folder = Path(folder)
    if not (folder / "model.safetensors").is_file():
        raise FileNotFoundError(f"no detector weights in {folder} (expected model.safetensors from stage 01)")
    model = ShapeDetector(**json.loads((folder / "config.json").read_text()))
    model.load_state_dict(load_file(folder / "model.safetensors"))
    model.eval()
    return model
