"""Real COCO 2014: check a local COCO folder and sample the feedback / ppo / validation / eval splits from it.

The splits are written as the same `scenes_<split>.jsonl` records the synthetic world writes, so later stages
read both worlds alike: file_name is the absolute image path, objects are the instance annotations (shape =
COCO category name, colour and size None, centre = bbox centre), relations are empty, captions come from the
COCO captions file. feedback and ppo come from train2014, validation and eval from val2014; only images with at
least one instance annotation are eligible.
"""
import json
import random
from collections import defaultdict
from pathlib import Path

from fgaif_utils.world import write_jsonl

EXPECTED_DIRS = ["train2014", "val2014"]
EXPECTED_FILES = ["annotations/instances_train2014.json", "annotations/instances_val2014.json",
                  "annotations/captions_train2014.json", "annotations/captions_val2014.json"]
SOURCE_SPLITS = {"train2014": ["feedback", "ppo"], "val2014": ["validation", "eval"]}
SPLIT_SIZE_KEYS = {"feedback": "n_feedback", "ppo": "n_ppo", "validation": "n_validation", "eval": "n_eval"}


def _listing(folder):
    return sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir()) if folder.is_dir() else []


def check_coco_root(root):
    """The resolved COCO root; a FileNotFoundError listing what is expected and what was found if a piece is missing."""
    root = Path(root).expanduser()
    expected = [d + "/" for d in EXPECTED_DIRS] + EXPECTED_FILES
    if not root.is_dir():
        raise FileNotFoundError(f"COCO 2014 root {root} is not a folder; it must hold: {', '.join(expected)}")
    missing = [d + "/" for d in EXPECTED_DIRS if not (root / d).is_dir()]
    missing += [f for f in EXPECTED_FILES if not (root / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"COCO 2014 root {root} is missing {', '.join(str(root / m) for m in missing)}. "
            f"Expected: {', '.join(expected)}. Found in {root}: {_listing(root) or 'nothing'}; "
            f"in {root / 'annotations'}: {_listing(root / 'annotations') or 'nothing'}")
    return root.resolve()


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None


def _require(record, keys, path, what):
    missing = [k for k in keys if k not in record]
    if missing:
        raise ValueError(f"{path}: {what} {record.get('id', record)!r} lacks key(s) {missing}")


def _source_scenes(root, source):
    """Scene dicts (split unset) for every image of train2014 or val2014 that has an instance annotation."""
    instances_path = root / "annotations" / f"instances_{source}.json"
    captions_path = root / "annotations" / f"captions_{source}.json"
    instances, captions = _read_json(instances_path), _read_json(captions_path)
    for key in ("images", "annotations", "categories"):
        if key not in instances:
            raise ValueError(f"{instances_path}: missing top-level key '{key}'")
    if "annotations" not in captions:
        raise ValueError(f"{captions_path}: missing top-level key 'annotations'")
    category_name = {c["id"]: c["name"] for c in instances["categories"]}
    objects_of = defaultdict(list)
    for ann in instances["annotations"]:
        _require(ann, ("id", "image_id", "category_id", "bbox"), instances_path, "annotation")
        if ann["category_id"] not in category_name:
            raise ValueError(f"{instances_path}: annotation {ann['id']} has unknown category_id {ann['category_id']}")
        x, y, w, h = ann["bbox"]
        objects_of[ann["image_id"]].append({"id": ann["id"], "shape": category_name[ann["category_id"]],
                                            "colour": None, "size": None, "cx": x + w / 2, "cy": y + h / 2,
                                            "radius": None, "bbox": [x, y, w, h]})
    captions_of = defaultdict(list)
    for ann in sorted(captions["annotations"], key=lambda a: a.get("id", 0)):
        _require(ann, ("image_id", "caption"), captions_path, "caption")
        captions_of[ann["image_id"]].append(ann["caption"].strip())
    scenes = {}
    for image in instances["images"]:
        _require(image, ("id", "file_name", "width", "height"), instances_path, "image")
        if objects_of.get(image["id"]):
            scenes[image["id"]] = {"image_id": image["id"], "file_name": str(root / source / image["file_name"]),
                                   "split": None, "width": image["width"], "height": image["height"],
                                   "objects": objects_of[image["id"]], "relations": [],
                                   "captions": captions_of.get(image["id"], []), "fog": False}
    return scenes, instances_path


def sample_coco_splits(root, data_params, seed, out_dir=None):
    """Seeded, disjoint splits: feedback + ppo from train2014, validation + eval from val2014 (sizes from
    data_params). Returns {split: [scene]}; with out_dir also writes <out_dir>/scenes_<split>.jsonl."""
    root = check_coco_root(root)
    splits = {}
    for source, names in SOURCE_SPLITS.items():
        scenes, instances_path = _source_scenes(root, source)
        sizes = [getattr(data_params, SPLIT_SIZE_KEYS[name]) for name in names]
        if sum(sizes) > len(scenes):
            wanted = " + ".join(f"{n} {SPLIT_SIZE_KEYS[name]}" for n, name in zip(sizes, names))
            raise ValueError(f"{instances_path}: {wanted} = {sum(sizes)} images requested, but only "
                             f"{len(scenes)} images of {source} have an instance annotation")
        rng = random.Random(f"fgaif-coco:{seed}:{source}")
        chosen = rng.sample(sorted(scenes), sum(sizes))
        start = 0
        for name, size in zip(names, sizes):
            splits[name] = [dict(scenes[i], split=name) for i in chosen[start:start + size]]
            start += size
    missing = [s["file_name"] for scenes in splits.values() for s in scenes if not Path(s["file_name"]).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} sampled COCO image file(s) are missing, e.g. {missing[:3]}")
    if out_dir is not None:
        for name, scenes in splits.items():
            write_jsonl(Path(out_dir) / f"scenes_{name}.jsonl", scenes)
    return splits
