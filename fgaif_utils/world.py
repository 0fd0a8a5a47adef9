"""The synthetic scene world: sample scene graphs, draw them, describe them (clean and noisy), write the splits.

A scene is a dict (the format every later stage reads):
    {"image_id", "file_name": "images/<split>/<image_id:012d>.png", "split", "width", "height",
     "objects": [{"id", "shape", "colour", "size", "cx", "cy", "radius", "bbox": [x, y, w, h]}],
     "relations": [{"subject", "relation", "object"}],   # every ordered pair language.stated_relation states
     "captions": [clean reference descriptions], "fog": bool}
`build_synthetic_world` writes, per split, the PNGs, COCO-2014 style `instances_<split>.json` and
`captions_<split>.json`, `scenes_<split>.jsonl`, and for sft the noisy training captions. Every random draw
comes from generators seeded by (seed, split, purpose), so each split is reproducible on its own and the same
seed gives byte-identical files.
"""
import io
import json
import math
import os
import random
import shutil
import time
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from fgaif_utils.params import WORLD_SPLITS
from fgaif_utils.stage import read_jsonl

from fgaif_utils.language import (COLOURS, EXISTENCE_LEADS, OPENERS, OPPOSITE, PARTNER, RELATION_PHRASES,
                                  RELATIONS, SHAPE_WORDS, SHAPES, SIZE_WORDS, SIZES, TYPICAL_COLOUR,
                                  stated_relation)

SPLITS = list(WORLD_SPLITS)
SPLIT_SIZE_KEYS = {"sft": "n_sft", "feedback": "n_feedback", "ppo": "n_ppo", "validation": "n_validation",
                   "eval": "n_eval", "eval_long": "n_eval_long", "eval_ood": "n_eval_ood"}
IMAGE_ID_STRIDE = 1_000_000  # image_id = (split index + 1) * stride + index: unique across splits

# Layout
BOX_GAP = 2.0        # pixels between any two bounding boxes
REJECTION_TRIES = 8  # random grid points tried for one object before enumerating the free ones
LAYOUT_TRIES = 20    # sequential layouts tried before the scene drops its last object

# Text
CANONICAL_P = 0.8    # surface form: the canonical word, else a synonym
OPENER_P = 0.25
JOIN_P = 0.4         # two relation clauses joined into one sentence

# Drawing
SCALE = 4            # draw at 4x, downsample with LANCZOS
BACKGROUND = (20, 20, 28)
FOG_GREY = 128.0
COLOUR_RGB = {"red": (225, 35, 35), "blue": (45, 95, 245), "green": (40, 195, 60),
              "yellow": (245, 225, 40), "purple": (165, 60, 225), "orange": (250, 135, 15)}
SQUARE_HALF_SIDE = 0.85   # of the radius
STAR_INNER = 0.45         # inner / outer radius of the 5-point star
RING_WIDTH = 0.4          # band width of the ring, of the radius


# ---------------------------------------------------------------------------------------------- scenes

def _object_count(rng, world_params, long):
    lo, hi = ((world_params.long_min_objects, world_params.long_max_objects) if long
              else (world_params.min_objects, world_params.max_objects))
    key = "long_max_objects" if long else "max_objects"
    if not 1 <= lo <= hi <= len(SHAPES):
        raise ValueError(f"world params: object counts {lo}..{hi} ('{key}') must satisfy "
                         f"1 <= min <= max <= {len(SHAPES)}")
    if long:
        return rng.randint(lo, hi)
    # the fewest count once, every larger count twice: {1, 2, 2, 3, 3, 4, 4} for 1..4
    return rng.choice([lo] + [k for k in range(lo + 1, hi + 1) for _ in range(2)])


def _pick_shapes(rng, count, partner_p):
    shapes = [rng.choice(SHAPES)]
    while len(shapes) < count:
        partners = [PARTNER[s] for s in shapes if PARTNER[s] not in shapes]
        if partners and rng.random() < partner_p:
            shapes.append(rng.choice(partners))
        else:
            shapes.append(rng.choice([s for s in SHAPES if s not in shapes]))
    return shapes


def _pick_colour(rng, shape, typical_colour_p):
    typical = TYPICAL_COLOUR[shape]
    if rng.random() < typical_colour_p:
        return typical
    return rng.choice([c for c in COLOURS if c != typical])


def _apart(x, y, r, placed):
    """A box of radius r at (x, y) is at least BOX_GAP from every placed (cx, cy, radius) box on some axis."""
    return all(abs(x - ox) >= r + o_r + BOX_GAP or abs(y - oy) >= r + o_r + BOX_GAP for ox, oy, o_r in placed)


def _place(rng, r, width, height, placed):
    """A centre on the quarter-pixel grid, uniform among the grid points that keep the box inside the canvas
    and apart from the placed boxes; None if there is no such point. A few rejection draws (uniform over the
    grid, so an accepted one is uniform over the free points) settle most cases; a crowded canvas
    enumerates the free points."""
    x_lo, x_hi = math.ceil(r * SCALE), math.floor((width - r) * SCALE)
    y_lo, y_hi = math.ceil(r * SCALE), math.floor((height - r) * SCALE)
    if x_lo > x_hi or y_lo > y_hi:
        raise ValueError(f"world params: radius {r} does not fit a {width}x{height} canvas")
    for _ in range(REJECTION_TRIES):
        x, y = rng.randint(x_lo, x_hi) / SCALE, rng.randint(y_lo, y_hi) / SCALE
        if _apart(x, y, r, placed):
            return x, y
    xs = np.arange(x_lo, x_hi + 1) / SCALE
    ys = np.arange(y_lo, y_hi + 1) / SCALE
    free = np.ones((len(ys), len(xs)), dtype=bool)
    for ox, oy, o_r in placed:
        reach = r + o_r + BOX_GAP
        free &= (np.abs(xs - ox) >= reach)[None, :] | (np.abs(ys - oy) >= reach)[:, None]
    options = np.flatnonzero(free)
    if len(options) == 0:
        return None
    row, col = divmod(int(options[rng.randrange(len(options))]), len(xs))
    return float(xs[col]), float(ys[row])


def _layout(rng, radii, width, height):
    """Centres for objects of these radii, placed one by one with `_place`; None when LAYOUT_TRIES such
    sequential layouts all dead-end."""
    for _ in range(LAYOUT_TRIES):
        placed = []
        for r in radii:
            centre = _place(rng, r, width, height, placed)
            if centre is None:
                break
            placed.append((*centre, r))
        if len(placed) == len(radii):
            return [(x, y) for x, y, _ in placed]
    return None


def scene_relations(objects):
    """Every ordered pair (a, b) whose relation language.stated_relation states, in object order."""
    relations = []
    for a in objects:
        for b in objects:
            if a is not b:
                relation = stated_relation(a, b)
                if relation is not None:
                    relations.append({"subject": a["shape"], "relation": relation, "object": b["shape"]})
    return relations


def sample_scene(rng, world_params, long=False, image_id=0, split="sft"):
    """One random scene dict (captions empty; fog False). `rng` is a random.Random."""
    count = _object_count(rng, world_params, long)
    shapes = _pick_shapes(rng, count, world_params.partner_p)
    colours = [_pick_colour(rng, s, world_params.typical_colour_p) for s in shapes]
    sizes = [rng.choice(SIZES) for _ in shapes]
    radius = {"small": world_params.radius_small, "large": world_params.radius_large}
    side = world_params.image_size
    while True:
        # big objects first: a crowded canvas fits them more often that way
        order = sorted(range(len(shapes)), key=lambda i: -radius[sizes[i]])
        centres = _layout(rng, [radius[sizes[i]] for i in order], side, side)
        if centres is not None or len(shapes) == 1:
            break
        shapes, colours, sizes = shapes[:-1], colours[:-1], sizes[:-1]
    if centres is None:
        raise ValueError(f"world params: one object of radius {radius[sizes[0]]} cannot be placed on {side}x{side}")
    centre_of = dict(zip(order, centres))
    objects = []
    for i, (shape, colour, size) in enumerate(zip(shapes, colours, sizes)):
        cx, cy = centre_of[i]
        r = radius[size]
        objects.append({"id": image_id * 10 + i, "shape": shape, "colour": colour, "size": size,
                        "cx": cx, "cy": cy, "radius": r, "bbox": [cx - r, cy - r, 2 * r, 2 * r]})
    return {"image_id": image_id, "file_name": f"images/{split}/{image_id:012d}.png", "split": split,
            "width": side, "height": side, "objects": objects, "relations": scene_relations(objects),
            "captions": [], "fog": False}


# ---------------------------------------------------------------------------------------------- drawing

def _polygon(cx, cy, radii, start_angle=-math.pi / 2):
    """Points at equal angular steps around (cx, cy), cycling through `radii` (image y grows downwards)."""
    n = len(radii)
    return [(cx + radii[k] * math.cos(start_angle + 2 * math.pi * k / n),
             cy + radii[k] * math.sin(start_angle + 2 * math.pi * k / n)) for k in range(n)]


def _heart_points(cx, cy, r, n=72):
    """The classic parametric heart, scaled so its bounding box is centred on (cx, cy) and fits radius r."""
    ts = np.linspace(0, 2 * np.pi, n, endpoint=False)
    xs = 16 * np.sin(ts) ** 3
    ys = 13 * np.cos(ts) - 5 * np.cos(2 * ts) - 2 * np.cos(3 * ts) - np.cos(4 * ts)
    scale = 2 * r / max(np.ptp(xs), np.ptp(ys))
    x_mid, y_mid = (xs.max() + xs.min()) / 2, (ys.max() + ys.min()) / 2
    return [(cx + (x - x_mid) * scale, cy - (y - y_mid) * scale) for x, y in zip(xs, ys)]


def _draw_object(draw, obj, scale):
    cx, cy, r = obj["cx"] * scale, obj["cy"] * scale, obj["radius"] * scale
    rgb = COLOUR_RGB[obj["colour"]]
    shape = obj["shape"]
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=rgb)
    elif shape == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=rgb, width=round(RING_WIDTH * r))
    elif shape == "square":
        h = SQUARE_HALF_SIDE * r
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=rgb)
    elif shape == "triangle":
        draw.polygon(_polygon(cx, cy, [r, r, r]), fill=rgb)
    elif shape == "star":
        draw.polygon(_polygon(cx, cy, [r, STAR_INNER * r] * 5), fill=rgb)
    elif shape == "heart":
        draw.polygon(_heart_points(cx, cy, r), fill=rgb)
    else:
        raise ValueError(f"scene {obj.get('id')}: unknown shape {shape!r}")


def render(scene, world_params, fog=None):
    """The scene's image as uint8 (H, W, 3). Fog (blend with grey plus gaussian pixel noise, seeded by the
    image id, so a scene always draws the same) when `fog`, or when `fog` is None and scene["fog"]."""
    width, height = scene["width"], scene["height"]
    canvas = Image.new("RGB", (width * SCALE, height * SCALE), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for obj in scene["objects"]:
        _draw_object(draw, obj, SCALE)
    # reducing_gap: a 2x box reduction before the LANCZOS step, 2.5x faster and visually the same
    image = np.asarray(canvas.resize((width, height), Image.LANCZOS, reducing_gap=2.0))
    if not (scene["fog"] if fog is None else fog):
        return image
    noise_rng = np.random.default_rng(scene["image_id"])
    strength = world_params.fog_strength
    pixels = (1 - strength) * image + strength * FOG_GREY
    pixels = pixels + noise_rng.normal(0.0, world_params.fog_noise_std, pixels.shape)
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


def png_bytes(image):
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", compress_level=3)
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------- text

def _word(forms, rng):
    """The canonical surface form with probability CANONICAL_P, else one of its synonyms."""
    if len(forms) > 1 and rng.random() >= CANONICAL_P:
        return rng.choice(forms[1:])
    return forms[0]


def writing_style(world_params, split):
    """The keyword arguments describe() and noisy_describe() take from WorldParams for a split's descriptions:
    long ones (up to twice max_relations relations) in the splits drawn like eval_long."""
    return {"long": split in world_params.long_splits, "max_relations": world_params.max_relations,
            "size_word_p": world_params.size_word_p, "colour_word_p": world_params.colour_word_p}


def _states(p, rng):
    """Whether a noun phrase states an attribute written with probability p; p = 1 draws nothing, so the
    always-stated default writes the same texts from the same seed as before these knobs existed."""
    return p >= 1.0 or rng.random() < p


def _noun_phrase(obj, rng, size_word_p=1.0, colour_word_p=1.0):
    words = ["a"]
    if _states(size_word_p, rng):
        words.append(_word(SIZE_WORDS[obj["size"]], rng))
    if _states(colour_word_p, rng):
        words.append(obj["colour"])
    words.append(_word(SHAPE_WORDS[obj["shape"]], rng))
    return " ".join(words)


def _existence_sentences(objects, rng, size_word_p=1.0, colour_word_p=1.0):
    """Every object once, in random order, in sentences of 1-3 noun phrases."""
    order = list(objects)
    rng.shuffle(order)
    sentences = []
    while order:
        k = rng.randint(1, min(3, len(order)))
        phrases = [_noun_phrase(obj, rng, size_word_p, colour_word_p) for obj in order[:k]]
        order = order[k:]
        body = phrases[0] if k == 1 else " , ".join(phrases[:-1]) + " and " + phrases[-1]
        sentences.append(f"{rng.choice(EXISTENCE_LEADS)} {body} .")
    return sentences


def _pick_relations(relations, rng, max_relations):
    """1..max_relations stated relations (copies), at most one per unordered pair; [] if none is stated."""
    by_pair = {}
    for relation in relations:
        by_pair.setdefault(tuple(sorted((relation["subject"], relation["object"]))), []).append(relation)
    if not by_pair or max_relations < 1:
        return []
    pairs = sorted(by_pair)
    chosen = rng.sample(pairs, min(len(pairs), rng.randint(1, max_relations)))
    return [dict(rng.choice(by_pair[pair])) for pair in chosen]


def _relation_sentences(clauses, rng):
    texts = [f"the {_word(SHAPE_WORDS[c['subject']], rng)} is {_word(RELATION_PHRASES[c['relation']], rng)} "
             f"the {_word(SHAPE_WORDS[c['object']], rng)}" for c in clauses]
    sentences, i = [], 0
    while i < len(texts):
        if i + 1 < len(texts) and rng.random() < JOIN_P:
            sentences.append(f"{texts[i]} , and {texts[i + 1]} .")
            i += 2
        else:
            sentences.append(f"{texts[i]} .")
            i += 1
    return sentences


def _compose(objects, clauses, rng, size_word_p=1.0, colour_word_p=1.0):
    sentences = _existence_sentences(objects, rng, size_word_p, colour_word_p)
    if rng.random() < OPENER_P:
        sentences[0] = f"{rng.choice(OPENERS)} {sentences[0]}"
    return " ".join(sentences + _relation_sentences(clauses, rng))


def describe(scene, rng, long=False, max_relations=2, size_word_p=1.0, colour_word_p=1.0):
    """A clean reference description: existence sentences for every object, then up to `max_relations`
    (twice that when `long`) stated relations. Each noun phrase states the object's size with probability
    `size_word_p` and its colour with `colour_word_p`. `rng` is a random.Random."""
    clauses = _pick_relations(scene["relations"], rng, max_relations * (2 if long else 1))
    return _compose(scene["objects"], clauses, rng, size_word_p, colour_word_p)


def noisy_describe(scene, rng, noise, long=False, max_relations=2, size_word_p=1.0, colour_word_p=1.0):
    """A description of a *claimed* scene that differs from the true one by independent injections
    (rates from NoiseParams). Returns (text, injections). Draw order is fixed: object, systematic colour
    (one draw per small atypical-colour object), colour, relation; then the targets. An injected colour can
    go unwritten when the phrase omits the colour (`colour_word_p` < 1); it stays in `injections`."""
    claimed = [{"shape": o["shape"], "colour": o["colour"], "size": o["size"]} for o in scene["objects"]]
    object_hit = rng.random() < noise.p_object
    sys_hits = [rng.random() < noise.sys_colour if o["size"] == "small" and o["colour"] != TYPICAL_COLOUR[o["shape"]]
                else False for o in claimed]
    colour_hit = rng.random() < noise.p_colour
    relation_hit = rng.random() < noise.p_relation
    injections = []

    for obj, hit in zip(claimed, sys_hits):
        if hit:
            injections.append({"type": "sys_colour", "shape": obj["shape"], "size": obj["size"],
                               "true_colour": obj["colour"], "claimed_colour": TYPICAL_COLOUR[obj["shape"]]})
            obj["colour"] = TYPICAL_COLOUR[obj["shape"]]

    untouched = [obj for obj, hit in zip(claimed, sys_hits) if not hit]
    if colour_hit and untouched:
        obj = rng.choice(untouched)
        typical = TYPICAL_COLOUR[obj["shape"]]
        wrong = typical if obj["colour"] != typical else rng.choice([c for c in COLOURS if c != typical])
        injections.append({"type": "colour", "shape": obj["shape"], "true_colour": obj["colour"],
                           "claimed_colour": wrong})
        obj["colour"] = wrong

    present = {o["shape"] for o in claimed}
    absent_partners = [s for s in SHAPES if s not in present and PARTNER[s] in present]
    if object_hit and absent_partners:
        shape = rng.choice(absent_partners)
        inserted = {"shape": shape, "colour": TYPICAL_COLOUR[shape], "size": rng.choice(SIZES)}
        injections.append({"type": "object", "partner_of": PARTNER[shape], **inserted})
        claimed.append(inserted)

    clauses = _pick_relations(scene["relations"], rng, max_relations * (2 if long else 1))
    if relation_hit and clauses:
        clause = rng.choice(clauses)
        injections.append({"type": "relation", "subject": clause["subject"], "object": clause["object"],
                           "true_relation": clause["relation"], "claimed_relation": OPPOSITE[clause["relation"]]})
        clause["relation"] = OPPOSITE[clause["relation"]]

    return _compose(claimed, clauses, rng, size_word_p, colour_word_p), injections


def noise_applicable(scene, injections):
    """Which injection types could have happened in this noisy description (the denominators of their rates):
    object needs an absent partner, colour an object not already hit by sys_colour, relation a stated
    relation (every description of such a scene states one), sys_colour a small atypical-colour object."""
    shapes = {o["shape"] for o in scene["objects"]}
    n_sys = sum(inj["type"] == "sys_colour" for inj in injections)
    return {"object": any(PARTNER[s] not in shapes for s in shapes),
            "colour": len(scene["objects"]) > n_sys,
            "relation": bool(scene["relations"]),
            "sys_colour": any(_sys_candidate(o) for o in scene["objects"])}


def _sys_candidate(obj):
    return obj["size"] == "small" and obj["colour"] != TYPICAL_COLOUR[obj["shape"]]


# ---------------------------------------------------------------------------------------------- files

def write_atomic(path, data):
    """Write bytes (or text) to `path` through a temp file and a rename: no half-written file survives."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)


def write_jsonl(path, records):
    write_atomic(path, "".join(json.dumps(record) + "\n" for record in records))


def coco_instances(scenes):
    """COCO-2014 instances dict for synthetic scenes (category ids 1..6 in SHAPES order)."""
    images = [{"id": s["image_id"], "file_name": s["file_name"], "width": s["width"], "height": s["height"]}
              for s in scenes]
    annotations = []
    for scene in scenes:
        for obj in scene["objects"]:
            x, y, w, h = obj["bbox"]
            annotations.append({"id": obj["id"], "image_id": scene["image_id"],
                                "category_id": SHAPES.index(obj["shape"]) + 1, "bbox": [x, y, w, h],
                                "area": w * h, "iscrowd": 0,
                                "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]]})
    categories = [{"id": i + 1, "name": shape, "supercategory": "shape"} for i, shape in enumerate(SHAPES)]
    return {"info": {"description": "fgaif synthetic shapes world"}, "licenses": [], "images": images,
            "annotations": annotations, "categories": categories}


def coco_captions(scenes):
    images = [{"id": s["image_id"], "file_name": s["file_name"], "width": s["width"], "height": s["height"]}
              for s in scenes]
    annotations = [{"id": s["image_id"] * 10 + k, "image_id": s["image_id"], "caption": caption}
                   for s in scenes for k, caption in enumerate(s["captions"])]
    return {"info": {"description": "fgaif synthetic shapes world"}, "licenses": [], "images": images,
            "annotations": annotations}


def _split_rng(seed, split, purpose):
    return random.Random(f"fgaif-world:{seed}:{split}:{purpose}")


def make_split(data_params, seed, split, n):
    """The split's scenes with their clean captions (nothing drawn or written)."""
    world_params = data_params.world_params
    long = split in world_params.long_splits
    scene_rng, caption_rng = _split_rng(seed, split, "scenes"), _split_rng(seed, split, "captions")
    offset = (SPLITS.index(split) + 1) * IMAGE_ID_STRIDE
    if n >= IMAGE_ID_STRIDE:
        raise ValueError(f"split {split}: {n} images exceed the {IMAGE_ID_STRIDE} image ids a split has")
    scenes = []
    for index in range(n):
        scene = sample_scene(scene_rng, world_params, long=long, image_id=offset + index, split=split)
        scene["fog"] = split == "eval_ood"
        scene["captions"] = [describe(scene, caption_rng, **writing_style(world_params, split))
                             for _ in range(data_params.captions_per_image)]
        scenes.append(scene)
    return scenes


def make_noisy_captions(data_params, seed, scenes):
    """DataParams.noisy_captions_per_image noisy records per scene: {"image_id", "caption", "injections"}."""
    rng = _split_rng(seed, "sft", "noisy")
    records = []
    for scene in scenes:
        for _ in range(data_params.noisy_captions_per_image):
            text, injections = noisy_describe(scene, rng, data_params.noise,
                                              **writing_style(data_params.world_params, "sft"))
            records.append({"image_id": scene["image_id"], "caption": text, "injections": injections})
    return records


def noise_rates(scenes, records, noise):
    """Measured injection rates per type: over the noisy captions where the type applies, and over all;
    sys_colour also per small atypical-colour object."""
    by_id = {s["image_id"]: s for s in scenes}
    requested = {"object": noise.p_object, "colour": noise.p_colour, "relation": noise.p_relation,
                 "sys_colour": noise.sys_colour}
    hits, applicable = Counter(), Counter()
    sys_objects = sys_hits = 0
    for record in records:
        scene = by_id[record["image_id"]]
        kinds = {inj["type"] for inj in record["injections"]}
        for kind, ok in noise_applicable(scene, record["injections"]).items():
            applicable[kind] += ok
            hits[kind] += kind in kinds
        sys_objects += sum(_sys_candidate(o) for o in scene["objects"])
        sys_hits += sum(inj["type"] == "sys_colour" for inj in record["injections"])
    n = max(len(records), 1)
    rates = {kind: {"requested": requested[kind], "n_applicable": applicable[kind],
                    "applicable": hits[kind] / max(applicable[kind], 1), "all": hits[kind] / n}
             for kind in requested}
    rates["sys_colour"]["per_object"] = sys_hits / max(sys_objects, 1)
    rates["sys_colour"]["n_objects"] = sys_objects
    rates["clean"] = sum(not r["injections"] for r in records) / n
    return rates


def _write_split(out_dir, split, scenes, world_params, progress):
    # images go to a side folder renamed into place at the end: no half-written image folder survives,
    # and nothing stale from an earlier, larger build stays
    final = out_dir / "images" / split
    partial = final.with_name(f"{split}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    for scene in tqdm(scenes, desc=f"draw {split}", disable=not progress, leave=False):
        (partial / Path(scene["file_name"]).name).write_bytes(png_bytes(render(scene, world_params)))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(partial, final)
    write_atomic(out_dir / "annotations" / f"instances_{split}.json", json.dumps(coco_instances(scenes)))
    write_atomic(out_dir / "annotations" / f"captions_{split}.json", json.dumps(coco_captions(scenes)))
    write_jsonl(out_dir / f"scenes_{split}.jsonl", scenes)


def world_counts(scenes_by_split):
    """Images, objects per image, and category / colour / size / relation counts over all splits."""
    every = [s for scenes in scenes_by_split.values() for s in scenes]
    objects = [o for s in every for o in s["objects"]]
    return {
        "images": {split: len(scenes) for split, scenes in scenes_by_split.items()},
        "objects_per_image": {split: dict(sorted(Counter(len(s["objects"]) for s in scenes).items()))
                              for split, scenes in scenes_by_split.items()},
        "objects": len(objects),
        "categories": {shape: sum(o["shape"] == shape for o in objects) for shape in SHAPES},
        "colours": {colour: sum(o["colour"] == colour for o in objects) for colour in COLOURS},
        "sizes": {size: sum(o["size"] == size for o in objects) for size in SIZES},
        "relations": {rel: sum(r["relation"] == rel for s in every for r in s["relations"]) for rel in RELATIONS},
        "typical_colour_share": sum(o["colour"] == TYPICAL_COLOUR[o["shape"]] for o in objects) / max(len(objects), 1),
        "partner_pair_share": sum(any(PARTNER[o["shape"]] == p["shape"] for p in s["objects"])
                                  for s in every for o in s["objects"]) / max(len(objects), 1),
    }


def build_synthetic_world(data_params, seed, out_dir, splits=None, progress=True):
    """Write every split (images, COCO json, scenes jsonl; sft also noisy captions) under out_dir.
    Returns stats (counts, measured noise rates, seconds per split) for plots and the manifest."""
    out_dir = Path(out_dir)
    splits = SPLITS if splits is None else list(splits)
    unknown = [s for s in splits if s not in SPLITS]
    if unknown:
        raise ValueError(f"unknown split(s) {unknown}; the synthetic world has {SPLITS}")
    scenes_by_split, seconds, stats = {}, {}, {}
    for split in splits:
        start = time.perf_counter()
        scenes = make_split(data_params, seed, split, getattr(data_params, SPLIT_SIZE_KEYS[split]))
        _write_split(out_dir, split, scenes, data_params.world_params, progress)
        if split == "sft":
            records = make_noisy_captions(data_params, seed, scenes)
            write_jsonl(out_dir / "noisy_captions_sft.jsonl", records)
            stats["noise"] = noise_rates(scenes, records, data_params.noise)
            stats["noisy_captions"] = len(records)
        scenes_by_split[split] = scenes
        seconds[split] = round(time.perf_counter() - start, 3)
        if progress:
            print(f"{split}: {len(scenes)} images in {seconds[split]:.1f} s")
    stats.update(world_counts(scenes_by_split))
    stats["seconds"] = seconds
    return stats


# ---------------------------------------------------------------------------------------------- reading

def load_scenes(data_dir, split):
    """The scene dicts of one split, from <data_dir>/scenes_<split>.jsonl."""
    path = Path(data_dir) / f"scenes_{split}.jsonl"
    if not path.is_file():
        found = sorted(p.name for p in Path(data_dir).glob("scenes_*.jsonl")) if Path(data_dir).is_dir() else []
        raise FileNotFoundError(f"scenes file {path} not found (scenes files in {data_dir}: {found or 'none'})")
    return read_jsonl(path)


def load_image(data_dir, scene):
    """The scene's image as uint8 (H, W, 3) RGB; file_name is relative to data_dir unless absolute (COCO)."""
    path = Path(scene["file_name"])
    if not path.is_absolute():
        path = Path(data_dir) / path
    if not path.is_file():
        raise FileNotFoundError(f"image file {path} of image_id {scene.get('image_id')} "
                                f"(split {scene.get('split')}) not found")
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def load_images(data_dir, scenes):
    """A list of uint8 (H, W, 3) arrays, one per scene (np.stack them for the fixed-size synthetic world)."""
    return [load_image(data_dir, scene) for scene in scenes]
