"""The model layer: the one loader on a llava-hf checkpoint written here, prompts, LoRA targets, generation
that never emits <image>, the tiny training loop's resume, the detector verifier and the question sets."""

import types

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from fgaif_utils import detector, language, models, params, tiny_train

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    arch = params.TinyArchParams(vision_hidden=32, text_hidden=32, text_layers=1, vision_layers=1, heads=2)
    tokenizer = models.build_tiny_tokenizer()
    processor = models.build_tiny_processor(tokenizer, 32, 8)
    model = models.build_tiny_llava(arch, 32, tokenizer, seed=0).eval()
    folder = tmp_path_factory.mktemp("ckpt") / "tiny-llava"
    models.save_lvlm(model, processor, folder)
    return model, processor, folder


def _images(n, size=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_sincos_position_code_by_hand():
    code = models.sincos_position_code(4, 8)   # 4 x 4 patches, 8 dims: 2 frequencies, sin + cos, row then column
    assert code.shape == (16, 8) and abs(float(code.std()) - 1) < 1e-5
    raw = code * 0   # rebuild by hand: frequencies 2*pi/4 * (4/2)**(0, 1) = pi/2 and pi radians per patch
    for patch in range(16):
        row, col = divmod(patch, 4)
        raw[patch] = torch.tensor([f(np.pi * k * x) for x in (row, col) for f in (np.sin, np.cos) for k in (0.5, 1)])
    torch.testing.assert_close(code, raw / raw.std(), atol=1e-5, rtol=0)
    assert len({tuple(np.round(c, 4)) for c in code.tolist()}) == 16   # every patch has its own code
    with pytest.raises(ValueError, match="divisible by 4"):
        models.sincos_position_code(4, 6)


def _benchmark(name):
    """benchmarks/<name>.py as a module (the probe and curriculum figures of benchmarks/MEASUREMENTS.md come from these scripts)."""
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parent.parent / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _position_probe():
    return _benchmark("position_probe")


def test_ridge_probe_by_hand():
    probe = _position_probe()
    features = np.array([[0.0], [1.0], [2.0], [3.0]])
    train = np.array([True, True, False, False])
    # fit on x = 0, 1 with y = 2x and lambda 1: slope 0.5 * 2 / (0.5 + 1) = 2/3 about the means (0.5, 1);
    # predictions at x = 2, 3 are 2 and 2.667 against 4 and 6, whose mean is 5: R^2 = 1 - (4 + 11.11) / 2
    assert probe.ridge_r2(features, 2 * features[:, 0], train) == pytest.approx(1 - (4 + (6 - 8 / 3) ** 2) / 2)


def test_ridge_classifier_by_hand():
    probe = _position_probe()
    features = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1], [0.1, 1.0], [0.9, 0.0], [0.0, 0.8]])
    classes = np.array([0, 1, 0, 1, 0, 1])
    train = np.array([True, True, True, True, False, False])
    assert probe.ridge_class_accuracy(features, classes, train) == 1.0            # separable: both held out right
    assert probe.ridge_class_accuracy(features, 1 - classes, train) == 1.0        # labels swapped: still right
    assert probe.ridge_class_accuracy(features, np.array([0, 1, 0, 1, 1, 0]), train) == 0.0   # held-out labels flipped


def test_sincos_start_puts_patch_positions_into_the_image_tokens(tmp_path):
    arch = params.TinyArchParams(vision_position_init="sincos", vision_position_scale=0.3)
    tokenizer = models.build_tiny_tokenizer()
    default = models.build_tiny_llava(params.TinyArchParams(), 64, tokenizer, seed=0).eval()
    coded = models.build_tiny_llava(arch, 64, tokenizer, seed=0).eval()
    table, default_table = models.vision_position_table(coded), models.vision_position_table(default)
    torch.testing.assert_close(table[1:], models.sincos_position_code(8, 64) * 0.3)
    torch.testing.assert_close(table[0], default_table[0])   # the class token keeps CLIP's start
    images = _images(100, size=64, seed=3)   # noise: high-contrast content in every patch (measured 0.69 / 0.01)
    probe = _position_probe()
    coded_r2, default_r2 = probe.patch_position_r2(coded, images)["all"], probe.patch_position_r2(default, images)["all"]
    assert min(coded_r2) > 0.5 and max(default_r2) < 0.1
    processor = models.build_tiny_processor(tokenizer, 64, 8)
    models.save_lvlm(coded, processor, tmp_path / "coded")   # plain llava-hf format: the one loader reads it back
    loaded, _ = models.load_lvlm(str(tmp_path / "coded"), device="cpu")
    torch.testing.assert_close(models.vision_position_table(loaded), table)


def _scene(*objects):
    from fgaif_utils import world
    objects = [{"shape": shape, "colour": "red", "size": "large", "cx": cx, "cy": cy} for shape, cx, cy in objects]
    return {"objects": objects, "relations": world.scene_relations(objects)}


def test_curriculum_questions_answer_from_the_scene_geometry():
    curriculum = _benchmark("question_curriculum")
    rng = np.random.default_rng(0)
    two = _scene(("circle", 10.0, 30.0), ("square", 50.0, 34.0))   # circle left of square (40 px), y differs by 4
    where = {q: a for q, a, _ in curriculum.questions_of("where", two, rng, n=40)}
    assert where == {"what is the circle on ?": "left", "what is the square on ?": "right"}
    half = set((q, a) for q, a, _ in curriculum.questions_of("half", two, rng, n=60))
    assert half == {("is the circle on the left ?", "yes"), ("is the circle on the right ?", "no"),
                    ("is the square on the right ?", "yes"), ("is the square on the left ?", "no")}
    rel = set((q, a) for q, a, _ in curriculum.questions_of("rel", two, rng, n=20))
    assert rel == {("what is the circle to the square ?", "left"), ("what is the square to the circle ?", "right")}
    # the single-object kinds skip scenes with more objects; objects near the midline get no side question
    assert curriculum.questions_of("where1", two, rng) == [] and curriculum.questions_of("half1", two, rng) == []
    near_midline = _scene(("star", 30.0, 10.0))
    assert curriculum.questions_of("where1", near_midline, rng, n=10) == []
    assert curriculum.questions_of("rel", near_midline, rng) == []   # one object: no relation stated
    assert [a for _, a, _ in curriculum.questions_of("where1", _scene(("star", 50.0, 10.0)), rng, n=3)] == ["right"] * 3
    with pytest.raises(ValueError, match="unknown question kind"):
        curriculum.questions_of("size1", two, rng)


def test_chat_prompt_is_llava15_format(tiny):
    _, processor, _ = tiny
    assert models.chat_prompt(processor, "Describe this image in detail.") == \
        "USER: <image>\nDescribe this image in detail. ASSISTANT:"


def test_loader_round_trip_gives_identical_logits(tiny):
    model, processor, folder = tiny
    loaded, loaded_processor = models.load_lvlm(str(folder), device="cpu")
    assert type(loaded).__name__ == "LlavaForConditionalGeneration"
    prompt = models.chat_prompt(loaded_processor, "Describe this image in detail.")
    batch = loaded_processor(images=list(_images(2)), text=[prompt] * 2, return_tensors="pt")
    assert (batch["input_ids"] == processor.tokenizer.image_token_id).sum(1).tolist() == [16, 16]
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, loaded(**batch).logits)


def test_a_half_precision_load_gives_float32_logits_from_its_own_weights(tiny):
    """In bfloat16 the lm_head used to round every logit to bfloat16 (steps of 0.125 at 20): PPO's log-probs, ratio
    and KL moved in those steps. Now the head multiplies the upcast hidden states by the upcast weights."""
    _, processor, folder = tiny
    half, _ = models.load_lvlm(str(folder), dtype="bfloat16", device="cpu")
    assert half.lm_head.weight.dtype == torch.bfloat16            # the weights stay as loaded
    prompt = models.chat_prompt(processor, "Describe this image in detail.")
    batch = processor(images=list(_images(2)), text=[prompt] * 2, return_tensors="pt")
    batch["pixel_values"] = batch["pixel_values"].to(torch.bfloat16)
    with torch.no_grad():
        logits = half(**batch).logits
        hidden = half.model(**batch).last_hidden_state
    assert logits.dtype == torch.float32
    by_hand = hidden.float() @ half.lm_head.weight.float().T
    torch.testing.assert_close(logits, by_hand, rtol=1e-6, atol=1e-6)
    rounded = torch.nn.functional.linear(hidden, half.lm_head.weight).float()       # what the plain head returns
    assert not torch.equal(rounded, logits)
    full, _ = models.load_lvlm(str(folder), device="cpu")
    assert "forward" not in vars(full.lm_head)                   # float32 loads keep the module's own forward


def test_a_checkpoint_in_pickle_format_is_refused(tiny, tmp_path):
    """Weights load from safetensors only: a folder holding pytorch_model.bin (a pickle) is not loaded."""
    import shutil
    _, _, folder = tiny
    pickled = tmp_path / "pickled"
    shutil.copytree(folder, pickled)
    for weights in pickled.glob("*.safetensors"):
        torch.save(load_file(weights), pickled / "pytorch_model.bin")
        weights.unlink()
    with pytest.raises(models.ModelLoadError, match="safetensors"):
        models.load_lvlm(str(pickled), device="cpu")


def _legacy_key(key):
    """A weight name in the llava-hf/llava-1.5-7b-hf on-disk layout, whatever layout save_pretrained wrote."""
    for new, old in (("model.language_model.", "language_model.model."), ("model.multi_modal_projector.", "multi_modal_projector."),
                     ("model.vision_tower.", "vision_tower.")):
        if key.startswith(new):
            key = old + key[len(new):]
    if key.startswith("lm_head."):
        key = "language_model." + key
    if key.startswith("vision_tower.") and not key.startswith("vision_tower.vision_model."):
        key = "vision_tower.vision_model." + key[len("vision_tower."):]
    return key


def test_loader_reads_the_legacy_llava_hf_layout(tiny, tmp_path):
    """llava-hf/llava-1.5-7b-hf on disk uses language_model.model.* / vision_tower.vision_model.* keys."""
    model, processor, folder = tiny
    legacy = tmp_path / "legacy"
    models.save_lvlm(model, processor, legacy)
    weights = load_file(legacy / "model.safetensors")
    renamed = {_legacy_key(key): value for key, value in weights.items()}
    assert all(k.startswith(("language_model.model.", "language_model.lm_head.", "vision_tower.vision_model.",
                             "multi_modal_projector.")) for k in renamed)
    save_file(renamed, legacy / "model.safetensors", metadata={"format": "pt"})
    loaded, _ = models.load_lvlm(str(legacy), device="cpu")
    batch = processor(images=list(_images(1)), text=[models.chat_prompt(processor, "is there a star in the image ?")],
                      return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, loaded(**batch).logits)


def test_a_repository_relative_model_path_loads_from_any_working_folder(tiny, tmp_path, monkeypatch):
    # artifacts record model paths relative to the repository (stage 05's summary.json: policy_base); JupyterLab runs
    # a notebook from notebooks/ or from a stage folder, where that relative path names nothing
    _, _, folder = tiny
    repository = tmp_path / "repo"
    (repository / "outputs" / "run").mkdir(parents=True)
    (repository / "outputs" / "run" / "policy").symlink_to(folder, target_is_directory=True)
    (repository / "notebooks").mkdir()
    monkeypatch.setattr(models, "REPO_ROOT", repository)
    monkeypatch.chdir(repository / "notebooks")
    loaded, _ = models.load_lvlm("outputs/run/policy", device="cpu")
    assert type(loaded).__name__ == "LlavaForConditionalGeneration"
    assert models.resolve_checkpoint("outputs/run/policy") == str(folder.resolve())
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-cache"))
    with pytest.raises(models.ModelLoadError, match="--local-dir"):   # a name that is no folder here stays a hub id
        models.resolve_checkpoint("outputs/run/nothing")


def test_missing_folder_and_offline_hub_id_give_clear_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-cache"))
    with pytest.raises(models.ModelLoadError, match="does not exist"):
        models.load_lvlm(str(tmp_path / "nowhere"))
    with pytest.raises(models.ModelLoadError, match="local path|local folder|--local-dir"):
        models.load_lvlm("llava-hf/llava-1.5-7b-hf")
    with pytest.raises(models.ModelLoadError, match="--local-dir"):
        models.resolve_checkpoint("llava-hf/llava-1.5-7b-hf")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_four_bit_without_cuda_fails_clearly_instead_of_loading_full_precision(tiny):
    _, _, folder = tiny
    with pytest.raises(models.ModelLoadError, match="CUDA"):
        models.load_lvlm(str(folder), load_in_4bit=True)


def test_four_bit_config_quantises_the_language_model_only(tiny):
    """Loading with load_lvlm's NF4 config also works on the CPU (bitsandbytes quantises there): the vision tower and
    projector stay in full precision, as the config means."""
    import bitsandbytes as bnb                  # pinned in requirements.txt: a broken install fails, never skips
    from transformers import LlavaForConditionalGeneration
    _, _, folder = tiny
    config = models._four_bit_config(torch.device("cuda"), torch.float32)   # only builds the config
    quantised = LlavaForConditionalGeneration.from_pretrained(folder, quantization_config=config,
                                                              device_map={"": "cpu"})
    linear = {name: isinstance(module, bnb.nn.Linear4bit) for name, module in quantised.named_modules()
              if isinstance(module, torch.nn.Linear)}
    assert [name for name, four_bit in linear.items() if four_bit] == \
        [name for name in linear if name.startswith("model.language_model.")]


def test_lora_targets_exactly_the_language_model_projections(tiny):
    model, _, _ = tiny
    import copy
    peft_model = models.add_lora(copy.deepcopy(model), r=4, alpha=8)
    targets = models.lora_target_names(peft_model)
    expected = sorted(name for name, module in peft_model.named_modules()
                      if "language_model" in name and name.rsplit(".", 1)[-1] in
                      ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
    assert targets == expected and len(targets) == 7 * model.config.text_config.num_hidden_layers
    assert not any("vision_tower" in name or "projector" in name for name in targets)


def test_generation_never_emits_the_image_token(tiny):
    model, processor, _ = tiny
    import copy
    rigged = copy.deepcopy(model)
    image_id = processor.tokenizer.image_token_id
    prompt = models.chat_prompt(processor, "Describe this image in detail.")
    batch = processor(images=list(_images(4)), text=[prompt] * 4, return_tensors="pt")
    with torch.no_grad():   # make <image> by far the most likely next token everywhere
        hidden = rigged(**batch, output_hidden_states=True).hidden_states[-1]
        direction = rigged.model.language_model.norm(hidden).mean((0, 1))
        rigged.lm_head.weight[image_id] = 50 * direction / direction.norm()
        raw = rigged.generate(**batch, max_new_tokens=5, do_sample=False, pad_token_id=processor.tokenizer.pad_token_id)
    assert (raw[:, batch["input_ids"].shape[1]:] == image_id).any(), "the rig should make raw generate emit <image>"
    for do_sample in (False, True):
        ids, _ = models.generate(rigged, processor, _images(4), [prompt] * 4, max_new_tokens=8, do_sample=do_sample, seed=0)
        assert all(image_id not in seq for seq in ids)


def test_sequence_builder_matches_the_processor(tiny):
    _, processor, _ = tiny
    builder = tiny_train.SequenceBuilder(processor, 16)
    prompt = models.chat_prompt(processor, language.DESCRIBE_PROMPT)
    images = _images(1)
    batch = processor(images=list(images), text=[prompt], return_tensors="pt")
    assert batch["input_ids"][0].tolist() == builder.prompt(language.DESCRIBE_PROMPT)
    assert torch.allclose(batch["pixel_values"], models.pixel_values_from_uint8(images), atol=1e-6)
    ids, labels = builder.caption("there is a red heart .")
    answer = [i for i, l in zip(ids, labels) if l != tiny_train.IGNORE]
    assert processor.tokenizer.decode(answer) == "there is a red heart . </s>"
    ids, labels = builder.packed_qa([("is the heart red ?", "yes", "colour"), ("is there a star in the image ?", "no", "object")])
    assert processor.tokenizer.decode([i for i, l in zip(ids, labels) if l != tiny_train.IGNORE]) == "yes </s> no </s>"


CLIP_MEAN = types.SimpleNamespace(image_mean=[0.48145466, 0.4578275, 0.40821073])   # CLIP's image processor


def test_square_images_pad_by_hand_with_the_mean_colour_and_keep_squares():
    wide = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)    # H=2, W=3 -> 3x3, margin of 1 below
    tall = np.full((4, 1, 3), 200, np.uint8)                         # H=4, W=1 -> 4x4, 1 column left, 2 right
    square = _images(1)[0]
    padded_wide, padded_tall, same = models.square_images([wide, tall, square], CLIP_MEAN)
    fill = [122, 116, 104]                                           # LLaVA-1.5's int(mean * 255)
    assert padded_wide.shape == (3, 3, 3) and np.array_equal(padded_wide[:2], wide)
    assert (padded_wide[2] == fill).all()
    assert padded_tall.shape == (4, 4, 3) and (padded_tall[:, 1] == 200).all()
    assert (padded_tall[:, [0, 2, 3]] == fill).all()
    assert same is square
    stacked = np.stack([wide, wide + 1])                             # (B, H, W, 3) rows, padded one by one
    assert [p.tolist() for p in models.square_images(stacked, CLIP_MEAN)] == \
        [p.tolist() for p in models.square_images([wide, wide + 1], CLIP_MEAN)]


def _spy_on_generate(model):
    """A copy of the model whose generate() records the pixel values it is given."""
    import copy
    spied, seen = copy.deepcopy(model), []
    real = spied.generate

    def generate(**batch):
        seen.append(batch["pixel_values"])
        return real(**batch)

    spied.generate = generate
    return spied, seen


def test_generate_pads_a_non_square_image_and_leaves_a_square_one_as_it_was(tiny):
    model, processor, _ = tiny
    spied, seen = _spy_on_generate(model)
    wide = np.random.default_rng(1).integers(0, 256, (20, 40, 3), dtype=np.uint8)
    padded = np.full((40, 40, 3), 127, np.uint8)                     # the tiny processor's mean 0.5 -> 127
    padded[10:30] = wide
    square = _images(1)[0]
    prompt = models.chat_prompt(processor, language.DESCRIBE_PROMPT)
    models.generate(spied, processor, [wide, square], [prompt] * 2, max_new_tokens=1)
    by_hand = processor.image_processor(images=[padded, square], return_tensors="pt")["pixel_values"]
    assert torch.equal(seen[0], by_hand)
    assert torch.equal(seen[0][1], processor(images=[square], text=[prompt], return_tensors="pt")["pixel_values"][0])


def test_train_phase_resume_continues_the_same_trajectory(tiny, tmp_path):
    model, processor, _ = tiny
    import copy
    builder = tiny_train.SequenceBuilder(processor, 16)
    images = _images(8)
    scenes = [{"objects": [{"shape": "heart", "colour": "red", "size": "small", "cx": 8, "cy": 8}], "relations": []}] * 8
    make_batch = tiny_train.qa_batches(builder, images, scenes, batch_size=4, per_type=1)
    straight = copy.deepcopy(model)
    log_straight = tiny_train.train_phase(straight, make_batch, 6, 1e-3, 0, tmp_path / "a", "a", checkpoint_every=3)
    interrupted = copy.deepcopy(model)
    tiny_train.train_phase(interrupted, make_batch, 6, 1e-3, 0, tmp_path / "b", "b", checkpoint_every=3,
                           stop_after=3)
    resumed = copy.deepcopy(model)
    log_resumed = tiny_train.train_phase(resumed, make_batch, 6, 1e-3, 0, tmp_path / "b", "b", checkpoint_every=3)
    assert [x[2] for x in log_resumed] == pytest.approx([x[2] for x in log_straight], rel=1e-5)
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.allclose(a, b, atol=1e-6), name


SCENE = {"objects": [{"shape": "heart", "colour": "red", "size": "small", "cx": 12.0, "cy": 40.0},
                     {"shape": "star", "colour": "blue", "size": "large", "cx": 45.0, "cy": 20.0}],
         "relations": [{"subject": "heart", "relation": "left", "object": "star"},
                       {"subject": "star", "relation": "right", "object": "heart"}]}


def test_qa_pairs_answers_agree_with_the_scene():
    rng = np.random.default_rng(0)
    counts = {"yes": 0, "no": 0}
    for _ in range(200):
        for question, answer, qtype in tiny_train.qa_pairs(SCENE, rng):
            fact = detector.parse_question(question)
            assert fact is not None and fact["type"] == {"colour": "attribute", "size": "attribute"}.get(qtype, qtype)
            assert detector.answer_fact(fact, SCENE) == answer, question
            counts[answer] += 1
    assert 0.4 < counts["yes"] / (counts["yes"] + counts["no"]) < 0.6


@pytest.mark.parametrize("fact", [
    {"type": "object", "subject": "ring", "negated": False},
    {"type": "attribute", "subject": "heart", "kind": "colour", "value": "purple"},
    {"type": "attribute", "subject": "square", "kind": "size", "value": "large"},
    {"type": "relation", "subject": "star", "relation": "below", "object": "triangle"},
])
def test_parse_question_inverts_question_for_fact(fact):
    assert detector.parse_question(language.question_for_fact(fact)) == fact


def test_detector_answers_from_its_predicted_scene():
    assert detector.answer_fact({"type": "object", "subject": "ring", "negated": False}, SCENE) == "no"
    assert detector.answer_fact({"type": "attribute", "subject": "heart", "kind": "colour", "value": "red"}, SCENE) == "yes"
    assert detector.answer_fact({"type": "relation", "subject": "heart", "relation": "above", "object": "star"}, SCENE) == "no"
    assert detector.answer_fact({"type": "relation", "subject": "star", "relation": "above", "object": "heart"}, SCENE) == "yes"
    assert detector.answer_fact({"type": "relation", "subject": "ring", "relation": "above", "object": "heart"}, SCENE) == "no"


def test_detector_save_load_round_trip(tmp_path):
    model = detector.ShapeDetector(image_size=32, width=8)
    detector.save_detector(model, tmp_path / "det")
    loaded = detector.load_detector(tmp_path / "det")
    pixels = models.pixel_values_from_uint8(_images(2))
    for a, b in zip(model(pixels), loaded(pixels)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("text,expected", [("yes", "yes"), ("No.", "no"), ("yes , it is", "yes"), ("", "unknown"),
                                           ("the heart", "unknown"), ("it is not", "no")])
def test_parse_yes_no(text, expected):
    assert tiny_train.parse_yes_no(text) == expected
