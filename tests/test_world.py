"""The synthetic world: reproducible files, geometry that matches the scene graphs, pixels that show them,
COCO files pycocotools reads, descriptions that follow the grammar, and noise at the requested rates."""
import colorsys
import io
import json
import math
import random
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from pycocotools.coco import COCO

from fgaif_utils import world
from fgaif_utils.language import (COLOURS, EXISTENCE_LEADS, OPENERS, OPPOSITE, PARTNER, RELATION_PHRASES, SHAPES,
                                  SHAPE_WORDS, SIZE_WORDS, STATE_MARGIN, TYPICAL_COLOUR, relation_holds, vocabulary)
from fgaif_utils.params import DataParams, NoiseParams, WorldParams

SMALL = dict(n_sft=60, n_feedback=8, n_ppo=8, n_validation=8, n_eval=30, n_eval_long=30, n_eval_ood=8)
SHAPE_OF = {form: shape for shape, forms in SHAPE_WORDS.items() for form in forms}
SIZE_OF = {form: size for size, forms in SIZE_WORDS.items() for form in forms}
RELATION_OF = {phrase: rel for rel, phrases in RELATION_PHRASES.items() for phrase in phrases}
NP = r"a (\w+) (\w+) (\w+)"
CLAUSE = re.compile(r"the (\w+) is (" + "|".join(sorted(RELATION_OF, key=len, reverse=True)) + r") the (\w+)")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    params = DataParams(**SMALL)
    stats = world.build_synthetic_world(params, 7, out, progress=False)
    return out, params, stats


def parse(text):
    """The grammar, written independently of the generator: (existence noun phrases as (shape, colour, size),
    relation clauses as (subject, relation, object), sentence kinds). Fails on anything else."""
    assert text == text.strip().lower() and "  " not in text and text.endswith(" ."), text
    nps, clauses, kinds = [], [], []
    for k, sentence in enumerate(text[:-2].split(" . ")):
        if sentence.startswith("the ") and not sentence.startswith("the image shows") \
                and not sentence.startswith("the picture contains"):
            parts = sentence.split(" , and ")
            assert len(parts) <= 2, sentence
            for part in parts:
                match = CLAUSE.fullmatch(part)
                assert match, f"not a relation clause: {part!r} in {text!r}"
                clauses.append((SHAPE_OF[match[1]], RELATION_OF[match[2]], SHAPE_OF[match[3]]))
            kinds.append("joined" if len(parts) == 2 else "relation")
            continue
        assert not clauses, f"existence sentence after a relation sentence: {text!r}"
        opener = next((o for o in OPENERS if sentence.startswith(o + " ")), None)
        if opener:
            assert k == 0, f"opener not on the first sentence: {text!r}"
            sentence = sentence[len(opener) + 1:]
        lead = next((lead for lead in EXISTENCE_LEADS if sentence.startswith(lead + " ")), None)
        assert lead, f"no existence lead: {sentence!r} in {text!r}"
        body = sentence[len(lead) + 1:]
        match = re.fullmatch(f"{NP}|{NP} and {NP}|{NP} , {NP} and {NP}", body)
        assert match, f"not 1-3 noun phrases: {body!r}"
        words = [w for w in match.groups() if w is not None]
        for size, colour, shape in zip(words[0::3], words[1::3], words[2::3]):
            assert colour in COLOURS, body
            nps.append((SHAPE_OF[shape], colour, SIZE_OF[size]))
        kinds.append(("opener+" if opener else "") + lead)
    return nps, clauses, kinds


def all_scenes(out):
    return {split: world.load_scenes(out, split) for split in world.SPLITS}


def test_same_seed_gives_byte_identical_files(tmp_path):
    params = DataParams(n_sft=12, n_feedback=3, n_ppo=3, n_validation=3, n_eval=3, n_eval_long=3, n_eval_ood=3)
    for name in ("a", "b"):
        world.build_synthetic_world(params, 3, tmp_path / name, progress=False)
    world.build_synthetic_world(params, 4, tmp_path / "c", progress=False)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) == 7 * 3 + 1 + 30  # per split 3 files; the noisy captions; the images
    assert files == sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    for rel in files:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    assert not list(tmp_path.rglob("*.tmp")) and not list(tmp_path.rglob("*.partial"))
    # a different seed gives a different world (so the comparison above can fail)
    assert (tmp_path / "a" / "scenes_sft.jsonl").read_bytes() != (tmp_path / "c" / "scenes_sft.jsonl").read_bytes()


def test_splits_are_independent_of_each_other(tmp_path):
    """A split's content depends on (seed, split) only: building eval alone gives the same eval."""
    world.build_synthetic_world(DataParams(**SMALL), 7, tmp_path, splits=["eval"], progress=False)
    assert not (tmp_path / "scenes_sft.jsonl").exists()
    full = world.make_split(DataParams(**SMALL), 7, "eval", SMALL["n_eval"])
    assert world.load_scenes(tmp_path, "eval") == full


def test_relations_by_hand():
    objects = [{"shape": "heart", "cx": 10.0, "cy": 30.0}, {"shape": "star", "cx": 40.0, "cy": 32.0},
               {"shape": "ring", "cx": 12.0, "cy": 50.0}, {"shape": "circle", "cx": 19.0, "cy": 30.0}]
    got = {(r["subject"], r["relation"], r["object"]) for r in world.scene_relations(objects)}
    # heart/circle are 9 px apart (under the 10 px margin), circle/ring differ by dx 7, dy 20
    assert got == {("heart", "left", "star"), ("star", "right", "heart"), ("heart", "above", "ring"),
                   ("ring", "below", "heart"), ("star", "right", "ring"), ("ring", "left", "star"),
                   ("circle", "left", "star"), ("star", "right", "circle"), ("circle", "above", "ring"),
                   ("ring", "below", "circle")}


def test_scene_geometry_and_relations(built):
    out, params, _ = built
    wp = params.world_params
    radius = {"small": wp.radius_small, "large": wp.radius_large}
    for split, scenes in all_scenes(out).items():
        assert len(scenes) == SMALL[world.SPLIT_SIZE_KEYS[split]]
        for scene in scenes:
            objects = scene["objects"]
            assert scene["file_name"] == f"images/{split}/{scene['image_id']:012d}.png"
            assert scene["fog"] == (split == "eval_ood")
            shapes = [o["shape"] for o in objects]
            assert len(set(shapes)) == len(shapes) and 1 <= len(shapes) <= 5
            for o in objects:
                x, y, w, h = o["bbox"]
                assert o["radius"] == radius[o["size"]]
                assert (x, y, w, h) == (o["cx"] - o["radius"], o["cy"] - o["radius"], 2 * o["radius"], 2 * o["radius"])
                assert 0 <= x and x + w <= wp.image_size and 0 <= y and y + h <= wp.image_size
            for a in range(len(objects)):
                for b in range(a + 1, len(objects)):
                    (ax, ay, aw, ah), (bx, by, bw, bh) = objects[a]["bbox"], objects[b]["bbox"]
                    gap_x = max(bx - (ax + aw), ax - (bx + bw))
                    gap_y = max(by - (ay + ah), ay - (by + bh))
                    assert max(gap_x, gap_y) >= 2.0, (scene["image_id"], objects[a], objects[b])
            by_shape = {o["shape"]: o for o in objects}
            stated = {(r["subject"], r["object"]): r["relation"] for r in scene["relations"]}
            for r in scene["relations"]:
                assert relation_holds(by_shape[r["subject"]], r["relation"], by_shape[r["object"]], margin=STATE_MARGIN)
            for a in objects:  # completeness: every pair with a clear dominant-axis offset is stated
                for b in objects:
                    dx, dy = b["cx"] - a["cx"], b["cy"] - a["cy"]
                    if a is not b and max(abs(dx), abs(dy)) > STATE_MARGIN and abs(dx) != abs(dy):
                        assert (a["shape"], b["shape"]) in stated, (scene["image_id"], a, b)


def test_object_counts_and_priors():
    wp = WorldParams()
    rng = random.Random(0)
    scenes = [world.sample_scene(rng, wp) for _ in range(3000)]
    counts = Counter(len(s["objects"]) for s in scenes)
    # requested {1,2,2,3,3,4,4}; crowded 4-object layouts may drop an object
    assert abs(counts[1] / 3000 - 1 / 7) < 0.03 and abs(counts[2] / 3000 - 2 / 7) < 0.03
    assert counts[4] / 3000 > 0.2 and set(counts) == {1, 2, 3, 4}
    objects = [o for s in scenes for o in s["objects"]]
    typical = sum(o["colour"] == TYPICAL_COLOUR[o["shape"]] for o in objects) / len(objects)
    assert abs(typical - wp.typical_colour_p) < 0.03
    # second shape: the partner of the first with p = partner_p, else uniform over the other 5
    second = [s["objects"][1]["shape"] == PARTNER[s["objects"][0]["shape"]] for s in scenes if len(s["objects"]) >= 2]
    expected = wp.partner_p + (1 - wp.partner_p) / 5
    assert abs(sum(second) / len(second) - expected) < 4 * math.sqrt(expected * (1 - expected) / len(second))
    assert abs(sum(o["size"] == "small" for o in objects) / len(objects) - 0.5) < 0.03


def test_eval_long_has_more_objects(built):
    out, params, stats = built
    scenes = all_scenes(out)
    long_counts = [len(s["objects"]) for s in scenes["eval_long"]]
    eval_counts = [len(s["objects"]) for s in scenes["eval"]]
    assert np.mean(long_counts) > np.mean(eval_counts) + 0.8 and min(long_counts) >= 3 and 5 in long_counts
    assert stats["objects_per_image"]["eval_long"] == dict(sorted(Counter(long_counts).items()))
    relation_counts = [len(parse(c)[1]) for s in scenes["eval_long"] for c in s["captions"]]
    assert max(relation_counts) > params.world_params.max_relations  # long descriptions state more


def test_long_splits_make_ppo_scenes_crowded():
    """data.world_params.long_splits: a split listed there is drawn like eval_long (4-5 objects, up to twice the
    relations in its reference descriptions); by default only eval_long is, and the ppo split keeps 1-4 objects."""
    default = world.make_split(DataParams(**SMALL), 7, "ppo", 40)
    crowded_params = DataParams(**SMALL, world_params=WorldParams(long_splits=["ppo", "eval_long"]))
    crowded = world.make_split(crowded_params, 7, "ppo", 40)
    default_counts = [len(s["objects"]) for s in default]
    crowded_counts = [len(s["objects"]) for s in crowded]
    assert min(default_counts) == 1 and max(default_counts) <= 4
    assert min(crowded_counts) >= 3 and max(crowded_counts) == 5   # 3: a fifth object may not fit the canvas
    assert max(len(parse(c)[1]) for s in crowded for c in s["captions"]) > crowded_params.world_params.max_relations
    # the splits not listed are untouched
    assert world.make_split(crowded_params, 7, "eval", 10) == world.make_split(DataParams(**SMALL), 7, "eval", 10)
    # a long sft split's noisy captions state the long descriptions' relations too
    long_sft = DataParams(**SMALL, world_params=WorldParams(long_splits=["sft", "eval_long"]))
    noisy = world.make_noisy_captions(long_sft, 7, world.make_split(long_sft, 7, "sft", 40))
    assert max(len(parse(r["caption"])[1]) for r in noisy) > long_sft.world_params.max_relations


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools' mask decoding under numpy 2
def test_pycocotools_reads_what_the_scenes_say(built):
    out, _, _ = built
    for split, scenes in all_scenes(out).items():
        instances = COCO(str(out / "annotations" / f"instances_{split}.json"))
        captions = COCO(str(out / "annotations" / f"captions_{split}.json"))
        assert [c["name"] for c in instances.loadCats(sorted(instances.getCatIds()))] == SHAPES
        assert sorted(instances.getCatIds()) == [1, 2, 3, 4, 5, 6]
        assert sorted(instances.getImgIds()) == sorted(s["image_id"] for s in scenes)
        for scene in scenes:
            anns = instances.loadAnns(instances.getAnnIds(imgIds=scene["image_id"]))
            got = sorted((instances.loadCats(a["category_id"])[0]["name"], a["bbox"], a["id"]) for a in anns)
            assert got == sorted((o["shape"], o["bbox"], o["id"]) for o in scene["objects"])
            for a in anns:
                assert a["iscrowd"] == 0 and a["area"] == a["bbox"][2] * a["bbox"][3]
                assert instances.annToMask(a).sum() > 0
            caps = captions.loadAnns(captions.getAnnIds(imgIds=scene["image_id"]))
            assert [c["caption"] for c in caps] == scene["captions"]
            assert len(scene["captions"]) == 2
            assert instances.imgs[scene["image_id"]]["file_name"] == scene["file_name"]


def test_image_ids_unique_across_splits(built):
    ids = [s["image_id"] for scenes in all_scenes(built[0]).values() for s in scenes]
    assert len(ids) == len(set(ids))


def test_reference_descriptions_follow_the_grammar_and_mention_every_object_once(built):
    out, params, _ = built
    max_rel = params.world_params.max_relations
    for split, scenes in all_scenes(out).items():
        limit = 2 * max_rel if split == "eval_long" else max_rel
        for scene in scenes:
            truth = Counter((o["shape"], o["colour"], o["size"]) for o in scene["objects"])
            stated = {(r["subject"], r["relation"], r["object"]) for r in scene["relations"]}
            for caption in scene["captions"]:
                nps, clauses, _ = parse(caption)
                assert Counter(nps) == truth, (caption, scene["objects"])
                assert set(clauses) <= stated, caption
                assert len(clauses) <= limit
                assert len({frozenset((a, b)) for a, _, b in clauses}) == len(clauses)
                if scene["relations"]:
                    assert clauses, caption
                assert set(caption.split()) <= set(vocabulary()), caption


def test_descriptions_use_every_construction():
    wp = WorldParams()
    rng = random.Random(1)
    scenes = [world.sample_scene(rng, wp) for _ in range(400)]
    texts = [world.describe(s, rng) for s in scenes for _ in range(3)]
    kinds = Counter(k for t in texts for k in parse(t)[2])
    for lead in EXISTENCE_LEADS:
        assert kinds[lead] > 0
    assert sum(v for k, v in kinds.items() if k.startswith("opener+")) > 0 and kinds["joined"] > 0
    words = Counter(w for t in texts for w in t.split())
    for synonym in ("disc", "box", "donut", "little", "big", "under"):
        assert words[synonym] > 0, synonym
    for canonical, synonym in (("square", "box"), ("small", "little"), ("large", "big")):
        share = words[canonical] / (words[canonical] + words[synonym])
        assert abs(share - world.CANONICAL_P) < 0.05, (canonical, share)
    openers = sum(any(t.startswith(o) for o in OPENERS) for t in texts) / len(texts)
    assert abs(openers - world.OPENER_P) < 0.05
    assert world.describe(scenes[0], random.Random(5)) == world.describe(scenes[0], random.Random(5))


def _noisy_sample(noise, n=3000, seed=11):
    wp = WorldParams()
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        scene = world.sample_scene(rng, wp)
        out.append((scene, *world.noisy_describe(scene, rng, noise)))
    return out


def _claimed(scene, injections):
    """What the text should say: the true scene with the injections applied (by hand)."""
    objects = {o["shape"]: (o["shape"], o["colour"], o["size"]) for o in scene["objects"]}
    relations = set()
    for inj in injections:
        if inj["type"] in ("colour", "sys_colour"):
            shape, colour, size = objects[inj["shape"]]
            assert colour == inj["true_colour"]
            objects[inj["shape"]] = (shape, inj["claimed_colour"], size)
        elif inj["type"] == "object":
            objects[inj["shape"]] = (inj["shape"], inj["colour"], inj["size"])
        else:
            relations.add((inj["subject"], inj["claimed_relation"], inj["object"]))
    return Counter(objects.values()), relations


def test_noise_rates_match_params():
    noise = NoiseParams(p_object=0.3, p_colour=0.25, p_relation=0.35, sys_colour=0.6)
    sample = _noisy_sample(noise)
    hits, applicable = Counter(), Counter()
    sys_objects = sys_hits = 0
    for scene, text, injections in sample:
        shapes = {o["shape"] for o in scene["objects"]}
        kinds = Counter(inj["type"] for inj in injections)
        assert all(v == 1 for k, v in kinds.items() if k != "sys_colour")
        ok = {"object": any(PARTNER[s] not in shapes for s in shapes),
              "colour": len(scene["objects"]) > kinds["sys_colour"],
              "relation": bool(scene["relations"])}
        for kind, applies in ok.items():
            applicable[kind] += applies
            hits[kind] += kinds[kind] > 0
            assert applies or not kinds[kind]
        candidates = [o for o in scene["objects"] if o["size"] == "small" and o["colour"] != TYPICAL_COLOUR[o["shape"]]]
        sys_objects += len(candidates)
        sys_hits += kinds["sys_colour"]
        # the text says exactly the claimed scene
        nps, clauses, _ = parse(text)
        claimed_objects, flipped = _claimed(scene, injections)
        assert Counter(nps) == claimed_objects, (text, injections)
        stated = {(r["subject"], r["relation"], r["object"]) for r in scene["relations"]}
        assert flipped <= set(clauses) and set(clauses) - flipped <= stated, (text, injections)
    requested = {"object": noise.p_object, "colour": noise.p_colour, "relation": noise.p_relation}
    for kind, p in requested.items():
        n = applicable[kind]
        assert n > 1000
        assert abs(hits[kind] / n - p) < 4 * math.sqrt(p * (1 - p) / n), (kind, hits[kind] / n)
    p = noise.sys_colour
    assert abs(sys_hits / sys_objects - p) < 4 * math.sqrt(p * (1 - p) / sys_objects)
    # the builder's bookkeeping (world.noise_rates) agrees with this count
    scenes = [dict(scene, image_id=i) for i, (scene, _, _) in enumerate(sample)]
    records = [{"image_id": i, "caption": text, "injections": inj} for i, (_, text, inj) in enumerate(sample)]
    rates = world.noise_rates(scenes, records, noise)
    for kind in requested:
        assert rates[kind]["n_applicable"] == applicable[kind]
        assert rates[kind]["applicable"] == hits[kind] / applicable[kind]
        assert rates[kind]["all"] == hits[kind] / len(sample)
    assert rates["sys_colour"]["per_object"] == sys_hits / sys_objects
    assert rates["clean"] == sum(not inj for _, _, inj in sample) / len(sample)


def test_injections_are_the_prior_driven_kind():
    sample = _noisy_sample(NoiseParams(p_object=0.5, p_colour=0.5, p_relation=0.5, sys_colour=0.5), n=800)
    for scene, _, injections in sample:
        by_shape = {o["shape"]: o for o in scene["objects"]}
        for inj in injections:
            if inj["type"] == "object":
                assert inj["shape"] not in by_shape and PARTNER[inj["shape"]] in by_shape
                assert inj["colour"] == TYPICAL_COLOUR[inj["shape"]]
            elif inj["type"] == "colour":
                true, claimed, typical = inj["true_colour"], inj["claimed_colour"], TYPICAL_COLOUR[inj["shape"]]
                assert true == by_shape[inj["shape"]]["colour"] and claimed != true
                assert claimed == typical or true == typical
            elif inj["type"] == "sys_colour":
                obj = by_shape[inj["shape"]]
                assert obj["size"] == "small" and obj["colour"] != TYPICAL_COLOUR[obj["shape"]]
                assert inj["claimed_colour"] == TYPICAL_COLOUR[obj["shape"]]
            else:
                assert inj["claimed_relation"] == OPPOSITE[inj["true_relation"]]


def test_systematic_substitution_hits_only_small_atypical_objects():
    only_sys = NoiseParams(p_object=0.0, p_colour=0.0, p_relation=0.0, sys_colour=1.0)
    for scene, text, injections in _noisy_sample(only_sys, n=500):
        written = {shape: (colour, size) for shape, colour, size in parse(text)[0]}
        for o in scene["objects"]:
            atypical_small = o["size"] == "small" and o["colour"] != TYPICAL_COLOUR[o["shape"]]
            expected = TYPICAL_COLOUR[o["shape"]] if atypical_small else o["colour"]
            assert written[o["shape"]] == (expected, o["size"]), (text, o)
        assert all(inj["type"] == "sys_colour" for inj in injections)
    none = NoiseParams(p_object=0.0, p_colour=0.0, p_relation=0.0, sys_colour=0.0)
    assert all(not inj for _, _, inj in _noisy_sample(none, n=300))


def test_builder_noise_records_and_stats(built):
    out, params, stats = built
    sft = world.load_scenes(out, "sft")
    records = [json.loads(line) for line in (out / "noisy_captions_sft.jsonl").read_text().splitlines()]
    assert len(records) == params.noisy_captions_per_image * len(sft)
    assert Counter(r["image_id"] for r in records) == Counter({s["image_id"]: 2 for s in sft})
    by_id = {s["image_id"]: s for s in sft}
    for r in records:
        assert Counter(parse(r["caption"])[0]) == _claimed(by_id[r["image_id"]], r["injections"])[0]
    assert stats["noise"] == world.noise_rates(sft, records, params.noise)
    assert stats["noisy_captions"] == len(records)
    every = [s for scenes in all_scenes(out).values() for s in scenes]
    objects = [o for s in every for o in s["objects"]]
    assert stats["objects"] == len(objects) == sum(stats["categories"].values()) == sum(stats["colours"].values())
    assert stats["categories"] == {shape: sum(o["shape"] == shape for o in objects) for shape in SHAPES}
    assert stats["relations"]["left"] == stats["relations"]["right"] == sum(
        r["relation"] == "left" for s in every for r in s["relations"])
    assert stats["images"] == {split: SMALL[world.SPLIT_SIZE_KEYS[split]] for split in world.SPLITS}


def test_pixels_show_the_scene(built):
    out, params, _ = built
    for scene in world.load_scenes(out, "sft")[:30]:
        image = world.load_image(out, scene).astype(int)
        assert image.shape == (64, 64, 3)
        assert np.array_equal(image, world.render(scene, params.world_params))  # PNG is lossless
        for o in scene["objects"]:
            rgb = np.array(world.COLOUR_RGB[o["colour"]])
            if o["shape"] == "ring":
                band = o["radius"] * (1 - world.RING_WIDTH / 2)
                for dx, dy in ((band, 0), (-band, 0), (0, band), (0, -band)):
                    pixel = image[int(o["cy"] + dy), int(o["cx"] + dx)]
                    assert np.abs(pixel - rgb).max() < 25, (o, dx, dy, pixel)
                hole = image[int(o["cy"]), int(o["cx"])]
                assert np.abs(hole - np.array(world.BACKGROUND)).max() < 40, (o, hole)
            else:
                pixel = image[int(o["cy"]), int(o["cx"])]
                assert np.abs(pixel - rgb).max() < 25, (o, pixel)
        background = np.ones((64, 64), dtype=bool)
        for o in scene["objects"]:
            x, y, w, h = o["bbox"]
            background[max(int(y) - 2, 0):int(y + h) + 3, max(int(x) - 2, 0):int(x + w) + 3] = False
        # outside the boxes (and the 2 px LANCZOS ringing around them) there is only background
        assert np.abs(image[background] - np.array(world.BACKGROUND)).max() <= 3


def test_colour_rgb_values_have_their_names_hue():
    expected_hue = {"red": 0, "orange": 30, "yellow": 55, "green": 125, "blue": 225, "purple": 275}
    for name, rgb in world.COLOUR_RGB.items():
        hue, lightness, saturation = colorsys.rgb_to_hls(*(c / 255 for c in rgb))
        distance = abs((hue * 360 - expected_hue[name] + 180) % 360 - 180)
        assert distance < 20 and saturation > 0.6 and 0.35 < lightness < 0.65, (name, hue * 360)


def test_eval_ood_is_fogged(built):
    out, params, _ = built
    for scene in world.load_scenes(out, "eval_ood"):
        fogged = world.load_image(out, scene).astype(float)
        clean = world.render(scene, params.world_params, fog=False).astype(float)
        assert np.abs(fogged - clean).mean() > 20
        # fog pulls toward grey: the dark background gets brighter on average
        assert fogged.mean() > clean.mean() + 20


def test_load_errors_name_the_file(built, tmp_path):
    out, _, _ = built
    with pytest.raises(FileNotFoundError, match="scenes_nope.jsonl"):
        world.load_scenes(out, "nope")
    scene = dict(world.load_scenes(out, "eval")[0], file_name="images/eval/missing.png")
    with pytest.raises(FileNotFoundError, match=re.escape(str(Path(out) / "images/eval/missing.png"))):
        world.load_image(out, scene)
    (tmp_path / "scenes_bad.jsonl").write_text('{"image_id": 1}\n{oops\n')
    with pytest.raises(ValueError, match=r"scenes_bad.jsonl: line 2"):
        world.load_scenes(tmp_path, "bad")
    with pytest.raises(ValueError, match="unknown split"):
        world.build_synthetic_world(DataParams(**SMALL), 0, tmp_path, splits=["test"], progress=False)
    images = world.load_images(out, world.load_scenes(out, "eval")[:3])
    assert len(images) == 3 and all(i.dtype == np.uint8 and i.shape == (64, 64, 3) for i in images)


def test_rebuild_removes_stale_images(tmp_path):
    world.build_synthetic_world(DataParams(**dict(SMALL, n_eval=6)), 0, tmp_path, splits=["eval"], progress=False)
    world.build_synthetic_world(DataParams(**dict(SMALL, n_eval=4)), 0, tmp_path, splits=["eval"], progress=False)
    assert len(list((tmp_path / "images" / "eval").glob("*.png"))) == 4


def test_data_figures_draw(built):
    from fgaif_utils import viz
    out, _, stats = built
    scenes = world.load_scenes(out, "sft")[:3] + world.load_scenes(out, "eval_ood")[:2]
    stats = json.loads(json.dumps(stats))  # as a notebook would read it back from a manifest
    for fig in (viz.scene_grid(out, scenes, n=4), viz.world_stats_figure(stats)):
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=40)
        assert buffer.getvalue().startswith(b"\x89PNG")
    assert len(viz.scene_grid(out, scenes, n=4).axes) == 4
    # a caption is drawn as text, never as mathtext: "$\\foo$" raised ValueError when the figure was drawn
    priced = [dict(scenes[0], captions=["a sign says $\\foo$ here"])]
    buffer = io.BytesIO()
    viz.scene_grid(out, priced, n=1).savefig(buffer, format="png", dpi=40)
    assert buffer.getvalue().startswith(b"\x89PNG")


def test_optional_size_and_colour_words():
    """size_word_p / colour_word_p: each noun phrase states the attribute at that rate, the true value when it
    does, and the parser then finds exactly the stated attributes; p = 1 draws no random number (tiny's texts
    stay what they were)."""
    from fgaif_utils import facts
    wp = WorldParams()
    rng = random.Random(4)
    scenes = [world.sample_scene(rng, wp) for _ in range(600)]
    stated = Counter()
    for scene in scenes:
        text = world.describe(scene, rng, size_word_p=0.7, colour_word_p=0.4)
        truth = {o["shape"]: o for o in scene["objects"]}
        found = facts.parse_facts(text)
        phrases = len(scene["objects"])
        sizes = [f for f in found if f["type"] == "attribute" and f["kind"] == "size"]
        colours = [f for f in found if f["type"] == "attribute" and f["kind"] == "colour"]
        assert all(truth[f["subject"]]["size"] == f["value"] for f in sizes), text
        assert all(truth[f["subject"]]["colour"] == f["value"] for f in colours), text
        stated.update(phrases=phrases, sizes=len(sizes), colours=len(colours))
    assert abs(stated["sizes"] / stated["phrases"] - 0.7) < 0.04, stated
    assert abs(stated["colours"] / stated["phrases"] - 0.4) < 0.04, stated
    never = world.describe(scenes[0], random.Random(2), size_word_p=0.0, colour_word_p=0.0)
    assert not set(never.split()) & ({w for forms in SIZE_WORDS.values() for w in forms} | set(COLOURS)), never
    text, _ = world.noisy_describe(scenes[1], random.Random(3), NoiseParams(), size_word_p=0.0)
    assert not set(text.split()) & {w for forms in SIZE_WORDS.values() for w in forms}, text
    before = random.Random(9)
    after = random.Random(9)
    assert world._states(1.0, after) and before.getstate() == after.getstate()
    assert world.writing_style(WorldParams(size_word_p=0.5), "sft") == {"long": False, "max_relations": 2,
                                                                        "size_word_p": 0.5, "colour_word_p": 1.0}
    # sft drawn like eval_long: stage 01's clean pre-training captions are long too, as the noisy ones were
    # (they were written short while the noisy ones were long)
    crowded = WorldParams(long_splits=["eval_long", "sft"])
    assert world.writing_style(crowded, "sft")["long"] and world.writing_style(crowded, "eval")["long"] is False
