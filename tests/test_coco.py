"""The COCO-2014 reader on a tiny fake COCO folder: seeded, disjoint splits of the requested sizes, scene records
that match the annotations, and errors that name what is missing."""
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from fgaif_utils import coco, world
from fgaif_utils.params import DataParams

CATEGORIES = [{"id": 1, "name": "person", "supercategory": "person"},
              {"id": 3, "name": "car", "supercategory": "vehicle"},
              {"id": 18, "name": "dog", "supercategory": "animal"}]
SIZES = dict(n_feedback=8, n_ppo=12, n_validation=5, n_eval=10)


def _write_source(root, source, ids, annotated):
    """Images `ids` (PNG files + json); those in `annotated` get 1-3 instances; every image gets 2 captions."""
    (root / source).mkdir(parents=True)
    images, instances, captions = [], [], []
    for image_id in ids:
        name = f"COCO_{source}_{image_id:012d}.jpg"
        Image.fromarray(np.full((6, 8, 3), image_id % 255, dtype=np.uint8)).save(root / source / name, format="PNG")
        images.append({"id": image_id, "file_name": name, "width": 8, "height": 6})
        if image_id in annotated:
            for k in range(1 + image_id % 3):
                instances.append({"id": image_id * 100 + k, "image_id": image_id,
                                  "category_id": CATEGORIES[k]["id"], "bbox": [k, 1.5, 2.0, 3.0 + k],
                                  "area": 6.0, "iscrowd": 0, "segmentation": [[k, 1.5, k + 2, 1.5, k + 2, 4.5]]})
        for k in range(2):
            captions.append({"id": image_id * 10 + k, "image_id": image_id,
                             "caption": f"a photo {image_id} number {k} . "})
    (root / "annotations").mkdir(exist_ok=True)
    (root / "annotations" / f"instances_{source}.json").write_text(
        json.dumps({"images": images, "annotations": instances, "categories": CATEGORIES}))
    (root / "annotations" / f"captions_{source}.json").write_text(
        json.dumps({"images": images, "annotations": captions}))


@pytest.fixture
def coco_root(tmp_path):
    root = tmp_path / "coco"
    train_ids, val_ids = list(range(1, 41)), list(range(101, 126))
    _write_source(root, "train2014", train_ids, annotated=set(train_ids[:30]))  # 10 images without instances
    _write_source(root, "val2014", val_ids, annotated=set(val_ids[:20]))
    return root


def _ids(splits):
    return {name: [s["image_id"] for s in scenes] for name, scenes in splits.items()}


def test_splits_are_seeded_disjoint_and_of_the_requested_sizes(coco_root, tmp_path):
    params = DataParams(world="coco", **SIZES)
    splits = coco.sample_coco_splits(coco_root, params, seed=0, out_dir=tmp_path / "data")
    ids = _ids(splits)
    assert {k: len(v) for k, v in ids.items()} == {"feedback": 8, "ppo": 12, "validation": 5, "eval": 10}
    assert set(ids["feedback"]) <= set(range(1, 31)) and set(ids["ppo"]) <= set(range(1, 31))
    assert set(ids["validation"]) <= set(range(101, 121)) and set(ids["eval"]) <= set(range(101, 121))
    assert not set(ids["feedback"]) & set(ids["ppo"]) and not set(ids["validation"]) & set(ids["eval"])
    for name in ids:
        assert len(set(ids[name])) == len(ids[name])
    assert _ids(coco.sample_coco_splits(coco_root, params, seed=0)) == ids
    assert _ids(coco.sample_coco_splits(coco_root, params, seed=1)) != ids
    for name, scenes in splits.items():
        assert world.load_scenes(tmp_path / "data", name) == scenes


def test_scene_records_match_the_annotations(coco_root):
    splits = coco.sample_coco_splits(coco_root, DataParams(world="coco", **SIZES), seed=3)
    for name, scenes in splits.items():
        source = "train2014" if name in ("feedback", "ppo") else "val2014"
        for scene in scenes:
            image_id = scene["image_id"]
            assert scene["split"] == name and scene["relations"] == [] and scene["fog"] is False
            assert scene["file_name"] == str((coco_root / source / f"COCO_{source}_{image_id:012d}.jpg").resolve())
            assert (scene["width"], scene["height"]) == (8, 6)
            assert scene["captions"] == [f"a photo {image_id} number 0 .", f"a photo {image_id} number 1 ."]
            n = 1 + image_id % 3
            assert [o["shape"] for o in scene["objects"]] == ["person", "car", "dog"][:n]
            for k, o in enumerate(scene["objects"]):
                assert o["id"] == image_id * 100 + k and o["bbox"] == [k, 1.5, 2.0, 3.0 + k]
                assert (o["cx"], o["cy"]) == (k + 1.0, 1.5 + (3.0 + k) / 2)
                assert o["colour"] is None and o["size"] is None
            image = world.load_image("/nonexistent", scene)  # absolute file_name: data_dir is not used
            assert image.shape == (6, 8, 3) and image[0, 0, 0] == image_id % 255


def test_too_many_images_requested(coco_root):
    with pytest.raises(ValueError, match=r"instances_train2014.json.*12 n_ppo.*only 30 images of train2014"):
        coco.sample_coco_splits(coco_root, DataParams(world="coco", **dict(SIZES, n_feedback=19)), seed=0)
    with pytest.raises(ValueError, match=r"instances_val2014.json.*only 20 images of val2014"):
        coco.sample_coco_splits(coco_root, DataParams(world="coco", **dict(SIZES, n_eval=16)), seed=0)
    # exactly all eligible images is fine
    splits = coco.sample_coco_splits(coco_root, DataParams(world="coco", **dict(SIZES, n_eval=15)), seed=0)
    assert sorted(_ids(splits)["validation"] + _ids(splits)["eval"]) == list(range(101, 121))


def test_missing_pieces_are_named(coco_root, tmp_path):
    assert coco.check_coco_root(coco_root) == coco_root.resolve()
    with pytest.raises(FileNotFoundError, match="not a folder"):
        coco.check_coco_root(tmp_path / "nowhere")
    shutil.rmtree(coco_root / "val2014")
    with pytest.raises(FileNotFoundError) as err:
        coco.check_coco_root(coco_root)
    assert f"is missing {coco_root / 'val2014'}. Expected: train2014/, val2014/" in str(err.value)
    assert "['annotations/', 'train2014/']" in str(err.value)  # what was found
    (coco_root / "val2014").mkdir()
    (coco_root / "annotations" / "captions_train2014.json").unlink()
    with pytest.raises(FileNotFoundError) as err:
        coco.sample_coco_splits(coco_root, DataParams(world="coco", **SIZES), seed=0)
    message = str(err.value)
    assert str(coco_root / "annotations" / "captions_train2014.json") in message
    assert "instances_val2014.json" in message and "found in" in message.lower()


def test_missing_image_file_is_named(coco_root):
    for path in (coco_root / "train2014").iterdir():
        path.unlink()
    with pytest.raises(FileNotFoundError, match=r"20 sampled COCO image file\(s\) are missing.*COCO_train2014_"):
        coco.sample_coco_splits(coco_root, DataParams(world="coco", **SIZES), seed=0)


def test_bad_json_is_named(coco_root):
    (coco_root / "annotations" / "instances_val2014.json").write_text("{not json")
    with pytest.raises(ValueError, match="instances_val2014.json: not valid JSON"):
        coco.sample_coco_splits(coco_root, DataParams(world="coco", **SIZES), seed=0)
    (coco_root / "annotations" / "instances_val2014.json").write_text(json.dumps({"images": []}))
    with pytest.raises(ValueError, match="instances_val2014.json: missing top-level key 'annotations'"):
        coco.sample_coco_splits(coco_root, DataParams(world="coco", **SIZES), seed=0)
