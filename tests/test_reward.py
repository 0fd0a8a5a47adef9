"""The reward models: where the end markers and labels land, what the loss reads, three adapters on one base
against three separate models, save / load / resume, the scoring API, split and metrics."""
import types

import numpy as np
import pytest
import torch

from fgaif_utils import feedback, models, params, reward, reward_viz, stage

torch.set_num_threads(1)
PROMPT = "Describe this image in detail."


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    arch = params.TinyArchParams(vision_hidden=32, text_hidden=32, text_layers=1, vision_layers=1, heads=2)
    tokenizer = models.build_tiny_tokenizer()
    processor = models.build_tiny_processor(tokenizer, 32, 8)
    model = models.build_tiny_llava(arch, 32, tokenizer, seed=0)
    folder = tmp_path_factory.mktemp("ckpt") / "tiny-llava"
    models.save_lvlm(model, processor, folder)
    return processor, folder


def _backbone(folder):
    return models.load_lvlm(str(folder), device="cpu")


def _images(n, size=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _records(processor, n, seed=0):
    """fg_labels-like records: random responses of real words, sub-sentences closed by '.', random labels."""
    rng = np.random.default_rng(seed)
    words = processor.tokenizer("there is a red heart . the star is left of the ring . a small blue square",
                                add_special_tokens=False).input_ids
    period = words[5]
    records = []
    for i in range(n):
        ids = [int(w) for w in rng.choice(words, size=int(rng.integers(6, 14)))]
        ids[-1] = period
        ends = [k for k, t in enumerate(ids) if t == period]
        subs = [{"last_token": k, "labels": [int(v) for v in rng.integers(-1, 2, 3)],
                 "gt_labels": [int(v) for v in rng.integers(-1, 2, 3)]} for k in ends]
        records.append({"response_id": f"r{i}", "image_id": i % 4, "token_ids": ids, "subsentences": subs})
    return records


def _randomise(rm, seed):
    """LoRA B starts at zero (an adapter is a no-op): give every adapter weight a distinct random value."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in rm.model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)


def test_end_markers_and_labels_land_after_the_spliced_image_tokens(tiny):
    processor, folder = tiny
    tok = processor.tokenizer
    prompt = reward.prompt_ids(processor, PROMPT)
    # <s> USER : <image> x16 describe this image in detail . ASSISTANT :  = 1 + 2 + 16 + 6 + 2 tokens
    assert len(prompt) == 27 and prompt[3:19] == [tok.image_token_id] * 16
    response = tok("there is a red heart . there is a star .", add_special_tokens=False).input_ids
    assert len(response) == 11
    record = {"response_id": "x", "image_id": 0, "token_ids": response,
              "subsentences": [{"last_token": 5, "labels": [0, -1, -1], "gt_labels": None},
                               {"last_token": 10, "labels": [1, 0, -1], "gt_labels": None}]}
    [example] = reward.examples_from_records([record], prompt, tok.eos_token_id)
    # by hand: '.' #1 is response token 5 -> 27 + 5 = 32, marker at 33; '.' #2 is token 10 -> 27 + 10 + 1 = 38,
    # marker at 39
    assert example["positions"] == [33, 39]
    assert len(example["ids"]) == 40
    assert [i for k, i in enumerate(example["ids"]) if k not in (33, 39)] == prompt + response
    assert example["ids"][33] == example["ids"][39] == tok.eos_token_id
    # the processor, given the same text with written-out markers, yields the same ids
    text = models.chat_prompt(processor, PROMPT) + " there is a red heart . </s> there is a star . </s>"
    assert processor(images=list(_images(1)), text=[text], return_tensors="pt")["input_ids"][0].tolist() == example["ids"]
    for type_index, expected in enumerate([(1, 2), (0, 1), (0, 0)]):
        labels = reward.collate([example], tok.pad_token_id, type_index)["labels"][0]
        assert torch.nonzero(labels != reward.IGNORE).flatten().tolist() == [33, 39]
        assert (labels[33].item(), labels[39].item()) == expected
    # the model's per-token outputs line up with input_ids (image features replace the 16 tokens in place)
    lvlm, _ = _backbone(folder)
    rm = reward.RewardModels.create(lvlm, processor, PROMPT, r=2, alpha=4, types=["object"])
    batch = reward.collate([example], tok.pad_token_id)
    logits = rm.logits("object", batch["input_ids"], reward.pixel_values(processor, _images(1)))
    assert logits.shape == (1, 40, 3)
    probs = rm.class_probs(batch, reward.pixel_values(processor, _images(1)))
    assert torch.allclose(probs[0, :, 0], logits[0, [33, 39]].softmax(-1), atol=1e-6)


def test_pixel_values_of_a_non_square_image_are_those_of_it_padded_by_hand(tiny):
    processor, _ = tiny
    wide = np.random.default_rng(5).integers(0, 256, (20, 40, 3), dtype=np.uint8)
    padded = np.full((40, 40, 3), 127, np.uint8)            # the tiny processor's mean 0.5 -> 127, as LLaVA-1.5 pads
    padded[10:30] = wide
    by_hand = processor.image_processor(images=[padded, padded], return_tensors="pt")["pixel_values"]
    assert torch.equal(reward.pixel_values(processor, [wide, wide]), by_hand)
    assert torch.equal(reward.pixel_values(processor, np.stack([wide, wide])), by_hand)   # a stacked batch too
    squares = _images(2)                                    # square images go in as they did before
    assert torch.equal(reward.pixel_values(processor, squares),
                       processor.image_processor(images=list(squares), return_tensors="pt")["pixel_values"])
    dot = np.zeros((32, 64, 3), np.uint8)
    dot[14:18, 4:8] = 255                                   # in the left quarter: a centre crop would cut it away
    assert reward.pixel_values(processor, [dot])[0, :, :, :8].max() > 0.5


def test_marker_positions_are_checked():
    with pytest.raises(ValueError, match="record 'bad'"):
        reward.examples_from_records([{"response_id": "bad", "image_id": 0, "token_ids": [7, 8, 9],
                                       "subsentences": [{"last_token": 3, "labels": [0, 0, 0]}]}], [1, 2], 3)
    with pytest.raises(ValueError, match="increasing"):
        reward.marked_sequence([1], [7, 8, 9], [2, 1], 3)
    with pytest.raises(ValueError, match=r"record 'empty': 1 sub-sentence\(s\) but no token ids"):  # was max()'s
        reward.examples_from_records([{"response_id": "empty", "image_id": 0, "token_ids": [],
                                       "subsentences": [{"last_token": 0, "labels": [0, 0, 0]}]}], [1, 2], 3, 50)


def test_ignored_positions_never_contribute_to_the_loss():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 7, 3, generator=gen)
    labels = torch.full((2, 7), reward.IGNORE)
    labels[0, 2], labels[1, 5], labels[1, 6] = 1, 2, 0
    loss = reward.token_loss(logits, labels)
    by_hand = -(logits[0, 2].log_softmax(-1)[1] + logits[1, 5].log_softmax(-1)[2] + logits[1, 6].log_softmax(-1)[0]) / 3
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-6)
    changed = logits.clone()
    changed[labels == reward.IGNORE] = 100 * torch.randn(int((labels == reward.IGNORE).sum()), 3, generator=gen)
    assert reward.token_loss(changed, labels).item() == pytest.approx(loss.item(), rel=1e-6)
    changed[1, 5] += torch.tensor([5.0, 0.0, -5.0])
    assert reward.token_loss(changed, labels).item() != pytest.approx(loss.item(), rel=1e-3)
    # a batch with no labelled position (every sub-sentence unlabelled for this type): 0 with zero gradients, not NaN
    unlabelled = logits.clone().requires_grad_()
    for weights in (None, torch.tensor([0.5, 1.0, 4.0])):
        empty = reward.token_loss(unlabelled, torch.full((2, 7), reward.IGNORE), weights)
        empty.backward()
        assert empty.item() == 0.0 and torch.equal(unlabelled.grad, torch.zeros_like(logits))


def test_class_weighted_loss_and_balanced_weights_by_hand():
    logits = torch.tensor([[[2.0, 0.0, -1.0], [0.5, 0.5, 0.0], [0.0, 1.0, 3.0], [9.0, 9.0, 9.0]]])
    labels = torch.tensor([[0, 1, 2, reward.IGNORE]])
    weights = torch.tensor([0.5, 1.0, 4.0])
    nll = [-logits[0, i].log_softmax(-1)[c] for i, c in enumerate([0, 1, 2])]
    by_hand = (0.5 * nll[0] + 1.0 * nll[1] + 4.0 * nll[2]) / (0.5 + 1.0 + 4.0)
    assert reward.token_loss(logits, labels, weights).item() == pytest.approx(by_hand.item(), rel=1e-6)
    # classes (n/a, correct, hallucinated) of the attribute type (column 1): 3 n/a, 2 correct, 1 hallucinated
    examples = [{"classes": [[1, 0, 0], [2, 0, 0], [1, 1, 0]]}, {"classes": [[2, 0, 0], [1, 1, 0], [1, 2, 0]]}]
    assert reward.balanced_class_weights(examples, "attribute").tolist() == \
        pytest.approx([6 / (3 * 3), 6 / (3 * 2), 6 / (3 * 1)])
    # relation (column 2): only n/a present; the absent classes get the cap
    assert reward.balanced_class_weights(examples, "relation", cap=10.0).tolist() == pytest.approx([6 / 18, 10.0, 10.0])


def test_loss_gradient_reaches_only_the_marked_tokens(tiny):
    processor, folder = tiny
    lvlm, _ = _backbone(folder)
    rm = reward.RewardModels.create(lvlm, processor, PROMPT, r=2, alpha=4, types=["object"])
    examples = rm.examples(_records(processor, 3))
    batch = reward.collate(examples, rm.pad, 0)
    hidden = []
    handle = rm.model.base_model.model.score.register_forward_hook(lambda m, i, o: hidden.append(i[0]))
    logits = rm.logits("object", batch["input_ids"], reward.pixel_values(processor, _images(3)))
    handle.remove()
    hidden[0].retain_grad()
    reward.token_loss(logits, batch["labels"]).backward()
    touched = hidden[0].grad.abs().sum(-1) > 0
    assert torch.equal(touched, batch["labels"] != reward.IGNORE)


def test_three_adapters_on_one_base_match_three_separately_loaded_models(tiny, tmp_path):
    processor, folder = tiny
    rm = reward.RewardModels.create(_backbone(folder)[0], processor, PROMPT, r=4, alpha=8)
    _randomise(rm, seed=1)
    rm.save(tmp_path / "rm")
    assert sorted(p.name for p in (tmp_path / "rm").iterdir() if p.is_dir()) == sorted(reward.FACT_TYPES)
    combined = reward.RewardModels.load(_backbone(folder)[0], processor, PROMPT, tmp_path / "rm")
    examples = combined.examples(_records(processor, 5))
    batch = reward.collate(examples, combined.pad)
    pixels = reward.pixel_values(processor, _images(5))
    outputs = {}
    for fact_type in reward.FACT_TYPES:
        alone = reward.RewardModels.load(_backbone(folder)[0], processor, PROMPT, tmp_path / "rm", types=[fact_type])
        with torch.no_grad():
            expected = alone.logits(fact_type, batch["input_ids"], pixels)
            outputs[fact_type] = combined.logits(fact_type, batch["input_ids"], pixels)
            before_save = rm.logits(fact_type, batch["input_ids"], pixels)
        assert torch.allclose(outputs[fact_type], expected, atol=1e-5), fact_type
        assert torch.allclose(before_save, expected, atol=1e-5), fact_type
    assert not torch.allclose(outputs["object"], outputs["attribute"], atol=1e-3)
    tower_batches = []   # how many images the frozen vision tower sees per class_probs call
    tower = combined.model.base_model.model.lvlm.model.vision_tower
    handle = tower.register_forward_hook(lambda module, args, kwargs, out: tower_batches.append(
        len(kwargs.get("pixel_values", args[0] if args else None))), with_kwargs=True)
    mixed = combined.class_probs(batch, pixels, mixed=True)
    switched = combined.class_probs(batch, pixels, mixed=False)
    handle.remove()
    assert tower_batches == [5, 5]   # once per image, not once per image and type
    assert torch.allclose(mixed, switched, atol=1e-5)
    # against the separately loaded models' pixel-path logits, read at the markers
    markers = batch["positions"].clamp(min=0)
    for t, fact_type in enumerate(reward.FACT_TYPES):
        at_markers = outputs[fact_type].gather(1, markers[..., None].expand(-1, -1, 3)).softmax(-1)
        filled = batch["positions"] >= 0
        assert torch.allclose(mixed[:, :, t][filled], at_markers[filled], atol=1e-5), fact_type
    # one backbone's parameters, plus the three adapters' own
    base_bytes = reward.param_bytes(_backbone(folder)[0])
    adapter_bytes = sum(p.numel() * p.element_size() for n, p in combined.model.named_parameters()
                        if "lora_" in n or "modules_to_save" in n or "original_module" in n)
    assert reward.param_bytes(combined.model) == base_bytes + adapter_bytes


def test_cached_vision_features_give_the_logits_and_gradients_of_the_pixel_path(tiny):
    processor, folder = tiny
    rm = reward.RewardModels.create(_backbone(folder)[0], processor, PROMPT, r=4, alpha=8)
    _randomise(rm, seed=2)
    examples = rm.examples(_records(processor, 6))
    batch = reward.collate(examples, rm.pad, type_index=0)
    images = _images(4, seed=3)
    image_ids = [e["image_id"] for e in examples]                       # 0 1 2 3 0 1: repeats hit the cache
    loads = []
    features = reward.FeatureCache(rm, processor, lambda i: loads.append(i) or images[i], batch_size=3)
    cached = features(image_ids)
    assert cached.shape == (6, 16, 32) and loads == [0, 1, 2, 3]
    assert torch.equal(features(image_ids[::-1]), cached.flip(0)) and loads == [0, 1, 2, 3]
    pixels = reward.pixel_values(processor, [images[i] for i in image_ids])
    # the features are what the LVLM itself splices in: its image-token embeddings, read back through a hook
    spliced = []
    backbone = rm.model.base_model.model.lvlm
    handle = backbone.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: spliced.append(kwargs["inputs_embeds"].detach()), with_kwargs=True)
    with torch.no_grad():
        rm.logits("object", batch["input_ids"], pixels)
    handle.remove()
    image_slots = batch["input_ids"] == backbone.config.image_token_id
    assert torch.allclose(spliced[0][image_slots].view(6, 16, 32), cached, atol=1e-6)
    with torch.no_grad():
        for fact_type in reward.FACT_TYPES:
            assert torch.allclose(rm.logits(fact_type, batch["input_ids"], cached),
                                  rm.logits(fact_type, batch["input_ids"], pixels), atol=1e-5), fact_type
    assert torch.allclose(rm.class_probs(batch, cached), rm.class_probs(batch, pixels), atol=1e-6)
    rm.model.set_adapter("object")
    grads = []
    for images_in in (pixels, cached):
        rm.model.zero_grad()
        logits = rm.model(input_ids=batch["input_ids"], **reward.image_inputs(images_in))
        reward.token_loss(logits, batch["labels"]).backward()
        grads.append({n: p.grad.clone() for n, p in rm.model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and any("lora_B.object" in n for n in grads[0])
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-5), name
    with pytest.raises(ValueError, match="image tokens"):
        rm.logits("object", batch["input_ids"], cached[:5])


def _train(processor, folder, checkpoints, stop_after=None, lr_schedule="constant", **train_kwargs):
    rm = reward.RewardModels.create(_backbone(folder)[0], processor, PROMPT, r=2, alpha=4, types=["object", "relation"])
    records = _records(processor, 8)
    train, dev = rm.examples(records[:6]), rm.examples(records[6:])
    images = _images(4)
    pixels = lambda ids: reward.pixel_values(processor, [images[i] for i in ids])
    history = reward.train_type(rm, "relation", train, dev, pixels, lr=1e-2, batch_size=2, epochs=3, patience=5,
                                seed=0, checkpoint_dir=checkpoints, checkpoint_every=2, stop_after=stop_after,
                                lr_schedule=lr_schedule, **train_kwargs)
    return rm, history


def test_the_dev_history_holds_what_the_kept_weights_score_and_the_plot_draws_it(tiny, tmp_path):
    processor, folder = tiny
    rm = reward.RewardModels.create(_backbone(folder)[0], processor, PROMPT, r=2, alpha=4, types=["object"])
    records = _records(processor, 8, seed=3)
    records[6]["subsentences"][0]["labels"][0], records[7]["subsentences"][0]["labels"][0] = 1, 0   # a dev reference with both classes
    for record in (records[0], records[7]):          # stage 03 could not judge these: no target, no reference
        record["subsentences"][-1]["labels"] = [None, None, None]
    train, dev = rm.examples(records[:6]), rm.examples(records[6:])
    images = _images(4)
    pixels = lambda ids: reward.pixel_values(processor, [images[i] for i in ids])
    history = reward.train_type(rm, "object", train, dev, pixels, lr=3e-2, batch_size=2, epochs=1, patience=5,
                                seed=0, checkpoint_dir=tmp_path / "ck")
    predicted, _ = rm.predict(dev, pixels, types=["object"])   # one epoch: the kept weights are that epoch's
    reference = np.array([c[0] for e in dev for c in e["classes"]])
    labelled = reference != reward.IGNORE
    assert (~labelled).sum() == 1
    expected = reward.label_metrics(predicted[labelled, 0], reference[labelled] - 1)
    assert expected["f1"] is not None
    (entry,) = history["dev"]
    assert entry["halluc_f1"] == pytest.approx(expected["f1"]) and entry["macro_f1"] == pytest.approx(expected["macro_f1"])
    right = reward_viz.learning_curves({"object": history}).axes[1]
    curves = [line for line in right.get_lines() if not line.get_label().startswith("_")]   # not the best-epoch marker
    assert [line.get_label() for line in curves] == ["dev macro-F1", "dev hallucination F1"]
    assert list(curves[1].get_ydata()) == pytest.approx([expected["f1"]])


def test_early_stopping_ends_after_patience_epochs_and_keeps_the_best_epoch_s_weights(tiny, tmp_path, monkeypatch):
    """Dev macro-F1 0.5, 0.7, 0.6, 0.6 with patience 2: training stops after epoch 4 of 6 and ends with epoch 2's
    weights, not the last ones (every other test ran out of epochs before its patience)."""
    processor, folder = tiny
    rm = reward.RewardModels.create(_backbone(folder)[0], processor, PROMPT, r=2, alpha=4, types=["relation"])
    records = _records(processor, 8)
    train, dev = rm.examples(records[:6]), rm.examples(records[6:])
    images = _images(4)
    pixels = lambda ids: reward.pixel_values(processor, [images[i] for i in ids])
    scripted = iter([0.5, 0.7, 0.6, 0.6, 0.9, 0.9])
    monkeypatch.setattr(reward, "label_metrics", lambda *_: {"macro_f1": next(scripted), "accuracy": 0.0, "f1": 0.0})
    snapshots = []
    keep = lambda entry: snapshots.append({n: p.detach().clone()   # noqa: E731
                                           for n, p in reward._adapter_params(rm.model, "relation").items()})
    history = reward.train_type(rm, "relation", train, dev, pixels, lr=1e-2, batch_size=2, epochs=6, patience=2,
                                seed=0, checkpoint_dir=tmp_path / "ck", after_epoch=keep, show_bar=False)
    assert [e["epoch"] for e in history["dev"]] == [1, 2, 3, 4] and len(snapshots) == 4
    assert history["best_epoch"] == 2 and history["stopped_early"] and history["done"]
    final = reward._adapter_params(rm.model, "relation")
    assert all(torch.equal(final[n], snapshots[1][n]) for n in final)
    assert not all(torch.equal(final[n], snapshots[3][n]) for n in final)


def test_a_resumed_training_run_continues_the_same_trajectory(tiny, tmp_path):
    processor, folder = tiny
    straight, log_straight = _train(processor, folder, tmp_path / "a")
    _, partial = _train(processor, folder, tmp_path / "b", stop_after=4)
    assert partial["step"] == 4 and not partial["done"]
    resumed, log_resumed = _train(processor, folder, tmp_path / "b")
    assert log_straight["done"] and log_straight["step"] == 9
    assert [x[1] for x in log_resumed["loss"]] == pytest.approx([x[1] for x in log_straight["loss"]], rel=1e-5)
    assert log_resumed["dev"] == log_straight["dev"] and log_resumed["best_epoch"] == log_straight["best_epoch"]
    for (name, a), (_, b) in zip(straight.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.allclose(a, b, atol=1e-6), name
    # training moved the relation adapter only, and a finished run is loaded, not retrained
    untouched = reward.RewardModels.create(_backbone(folder)[0], processor, PROMPT, r=2, alpha=4, types=["object", "relation"])
    changed = {n for (n, a), (_, b) in zip(straight.model.named_parameters(), untouched.model.named_parameters())
               if not torch.equal(a, b)}
    assert changed and all(".relation." in n for n in changed)
    again, log_again = _train(processor, folder, tmp_path / "a")
    assert log_again["loss"] == log_straight["loss"]
    for (name, a), (_, b) in zip(straight.model.named_parameters(), again.model.named_parameters()):
        assert torch.equal(a, b), name


def _recipe(folder, types=("object", "relation")):
    return reward.ScorerRecipe(backbone=str(folder), load={"device": "cpu"}, prompt=PROMPT, lora_r=2, lora_alpha=4,
                               types=list(types))


def _train_all(recipe, checkpoints, processes, records, images, num_threads=2, **settings):
    """train_all as stage 04 calls it, on a fresh scorer from `recipe` and a feature cache."""
    rm, _ = recipe.build()
    examples = {"train": rm.examples(records[:6]), "dev": rm.examples(records[6:])}
    features = reward.FeatureCache(rm, rm.processor, lambda i: images[i], batch_size=3)
    settings = params.RewardParams(lr=1e-2, batch_size=2, epochs=2, patience=5, class_weights="balanced",
                                   ema_decay=0.5, train_processes=processes, **settings)
    histories, seconds = reward.train_all(rm, examples, features, settings, 0, checkpoints, recipe, num_threads)
    return rm, histories, seconds


def test_types_trained_in_processes_equal_types_trained_in_turn_and_resume_across_the_two(tiny, tmp_path,
                                                                                           monkeypatch):
    processor, folder = tiny
    recipe, records, images = _recipe(folder), _records(processor, 8, seed=5), _images(4, seed=6)
    in_turn, turn_histories, _ = _train_all(recipe, tmp_path / "turn", 1, records, images)
    side_by_side, histories, seconds = _train_all(recipe, tmp_path / "processes", 2, records, images)
    assert set(seconds) == {"object", "relation"} and all(s > 0 for s in seconds.values())
    for fact_type in ("object", "relation"):
        assert histories[fact_type]["step"] == 6 and histories[fact_type]["done"]
        assert histories[fact_type]["loss"] == turn_histories[fact_type]["loss"], fact_type
        assert histories[fact_type]["dev"] == turn_histories[fact_type]["dev"], fact_type
    trained = [n for n, p in in_turn.model.named_parameters() if "lora_B" in n and p.abs().sum() > 0]
    assert any(".object." in n for n in trained) and any(".relation." in n for n in trained)
    for (name, a), (_, b) in zip(in_turn.model.named_parameters(), side_by_side.model.named_parameters()):
        assert torch.equal(a, b), name
    # a rerun starts no process: the stage loads the finished checkpoints
    monkeypatch.setattr(reward.multiprocessing, "get_context", lambda method: pytest.fail("a process was started"))
    again, again_histories, _ = _train_all(recipe, tmp_path / "processes", 2, records, images)
    assert again_histories == histories
    monkeypatch.undo()
    # a process stopped part-way leaves checkpoints that the stage's own process finishes on the same trajectory
    rm, _ = recipe.build()
    examples = {"train": rm.examples(records[:6]), "dev": rm.examples(records[6:])}
    features = reward.FeatureCache(rm, processor, lambda i: images[i], batch_size=3)
    features(sorted({e["image_id"] for e in examples["train"] + examples["dev"]}))
    weights = reward.balanced_class_weights(examples["train"], "relation")
    job = dict(fact_type="relation", train_examples=examples["train"], dev_examples=examples["dev"], lr=1e-2,
               batch_size=2, epochs=2, patience=5, seed=1, checkpoint_dir=tmp_path / "broken" / "relation",
               eval_batch_size=32, class_weights=weights, ema_decay=0.5, stop_after=4)
    reward.train_in_processes(recipe, [job], features, 2, 1)
    _, resumed, _ = _train_all(recipe, tmp_path / "broken", 1, records, images)
    assert resumed["relation"]["loss"] == turn_histories["relation"]["loss"]


def test_a_failed_training_process_names_its_type_and_says_why(tiny, tmp_path, monkeypatch, capsys):
    processor, folder = tiny
    recipe, images = _recipe(folder, ["relation"]), _images(4)
    rm, _ = recipe.build()
    examples = rm.examples(_records(processor, 4))
    features = reward.FeatureCache(rm, processor, lambda i: images[i])
    features([0, 1, 2])                              # the training examples also show image 3
    job = dict(fact_type="relation", train_examples=examples, dev_examples=examples, lr=1e-2, batch_size=2, epochs=1,
               patience=1, seed=0, checkpoint_dir=tmp_path / "relation")
    with pytest.raises(RuntimeError, match=r"(?s)'relation'.*rerun resumes.*no features of image 3"):
        reward.train_in_processes(recipe, [job], features, 2, 1)
    pixels = reward.PixelCache(processor, lambda i: images[i])
    with pytest.raises(ValueError, match="feature cache"):
        reward.train_in_processes(recipe, [job], pixels, 2, 1)
    # stage 04 with pixels per step (COCO) trains in its own process, one type after another, and says so
    monkeypatch.setattr(reward.multiprocessing, "get_context", lambda method: pytest.fail("a process was started"))
    recipe = _recipe(folder)
    rm, _ = recipe.build()
    settings = params.RewardParams(lr=1e-2, batch_size=2, epochs=1, patience=1, train_processes=2)
    histories, _ = reward.train_all(rm, {"train": examples, "dev": examples}, pixels, settings, 0, tmp_path / "in",
                                    recipe, 2)
    assert histories["object"]["done"] and histories["relation"]["done"]
    assert "one type after another" in capsys.readouterr().out


def test_a_checkpoint_keeps_the_cuda_generators_where_there_is_cuda(tmp_path, monkeypatch):
    set_to = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all",
                        lambda: [torch.tensor([1, 2], dtype=torch.uint8), torch.tensor([3, 4], dtype=torch.uint8)])
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: set_to.append([s.tolist() for s in states]))
    weights = {"w": torch.nn.Parameter(torch.zeros(2))}
    optimizer = torch.optim.Adam(list(weights.values()))
    reward._save_state(tmp_path, weights, None, optimizer, {"step": 3})
    state, _ = reward._load_state(tmp_path, weights, optimizer)
    assert set_to == [[[1, 2], [3, 4]]] and state == {"step": 3}


def test_linear_learning_rate_by_hand_and_a_resumed_run_keeps_the_schedule(tiny, tmp_path):
    assert [reward.learning_rate(0.2, "linear", step, 4) for step in range(4)] == pytest.approx([0.2, 0.15, 0.1, 0.05])
    assert reward.learning_rate(0.2, "constant", 3, 4) == 0.2
    with pytest.raises(ValueError, match="cosine"):
        reward.learning_rate(0.2, "cosine", 0, 4)
    processor, folder = tiny
    _, log_constant = _train(processor, folder, tmp_path / "c")
    straight, log_straight = _train(processor, folder, tmp_path / "a", lr_schedule="linear")
    _train(processor, folder, tmp_path / "b", stop_after=5, lr_schedule="linear")
    resumed, log_resumed = _train(processor, folder, tmp_path / "b", lr_schedule="linear")
    assert log_constant["loss"][0] == log_straight["loss"][0]        # step 0: the same lr, so the same first loss
    assert log_constant["loss"][1:] != log_straight["loss"][1:]
    assert [x[1] for x in log_resumed["loss"]] == pytest.approx([x[1] for x in log_straight["loss"]], rel=1e-5)
    for (name, a), (_, b) in zip(straight.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.allclose(a, b, atol=1e-6), name


def test_weight_averaging_by_hand_and_the_kept_weights_are_the_average(tiny, tmp_path):
    from safetensors.torch import load_file
    processor, folder = tiny
    decay = 0.3
    fresh = reward.RewardModels.create(_backbone(folder)[0], processor, PROMPT, r=2, alpha=4, types=["object", "relation"])
    initial = {n: p.detach().clone() for n, p in reward._adapter_params(fresh.model, "relation").items()}
    # one step at a time (each call resumes the checkpoint and stops after one more step): the step's weights and average
    weights, averages = [], []
    for step in range(1, 10):
        _, history = _train(processor, folder, tmp_path / "steps", stop_after=step, ema_decay=decay)
        _, files = stage.read_checkpoint(tmp_path / "steps", reward.CHECKPOINT_FILES)   # the set state.json names
        weights.append(load_file(files["adapter.safetensors"]))
        averages.append(load_file(files["average.safetensors"]))
    assert history["done"] and history["step"] == 9
    expected = initial
    for step, (w, a) in enumerate(zip(weights, averages), start=1):
        rate = 1 - min(decay, step / (9 + step))            # 0.9, 0.82, 0.75, then 0.7 from step 4
        expected = {n: expected[n] + rate * (w[n] - expected[n]) for n in expected}
        for n in expected:
            assert torch.allclose(a[n], expected[n], atol=1e-6), (step, n)
    # a straight run scores and keeps the averages, goes on training from the raw weights, and matches the resumed run
    rm = reward.RewardModels.create(_backbone(folder)[0], processor, PROMPT, r=2, alpha=4, types=["object", "relation"])
    params = reward._adapter_params(rm.model, "relation")
    scored = []
    records = _records(processor, 8)
    images = _images(4)
    pixels = lambda ids: reward.pixel_values(processor, [images[i] for i in ids])
    straight = reward.train_type(rm, "relation", rm.examples(records[:6]), rm.examples(records[6:]), pixels, lr=1e-2,
                                 batch_size=2, epochs=3, patience=5, seed=0, checkpoint_dir=tmp_path / "straight",
                                 checkpoint_every=2, ema_decay=decay,
                                 after_epoch=lambda entry: scored.append({n: p.detach().clone() for n, p in params.items()}))
    assert [d["macro_f1"] for d in straight["dev"]] == pytest.approx([d["macro_f1"] for d in history["dev"]])
    for epoch, seen in enumerate(scored, start=1):
        for n in seen:
            assert torch.allclose(seen[n], averages[3 * epoch - 1][n], atol=1e-6), (epoch, n)
    assert any(not torch.allclose(averages[8][n], weights[8][n], atol=1e-4) for n in initial)   # averaging did something
    kept = averages[3 * straight["best_epoch"] - 1]
    for n, p in params.items():
        assert torch.allclose(p, kept[n], atol=1e-6), n
    _train(processor, folder, tmp_path / "a-plain", stop_after=2)
    with pytest.raises(ValueError, match="without weight averages"):
        _train(processor, folder, tmp_path / "a-plain", ema_decay=decay)


def test_save_and_load_round_trip_after_training(tiny, tmp_path):
    processor, folder = tiny
    trained, _ = _train(processor, folder, tmp_path / "ck")
    trained.save(tmp_path / "rm")
    loaded = reward.RewardModels.load(_backbone(folder)[0], processor, PROMPT, tmp_path / "rm", types=["object", "relation"])
    records = _records(processor, 4, seed=3)
    images = _images(4, seed=3)
    ids = [r["token_ids"] for r in records]
    ends = [[s["last_token"] for s in r["subsentences"]] for r in records]
    for a, b in zip(trained.score(images, ids, ends), loaded.score(images, ids, ends)):
        assert np.allclose(a["probs"], b["probs"], atol=1e-6)


def test_an_adapter_saved_as_a_pickle_is_refused(tiny, tmp_path):
    """peft falls back to adapter_model.bin (a pickle) when the safetensors file is missing: never loaded here."""
    from safetensors.torch import load_file
    processor, folder = tiny
    rm = reward.RewardModels.create(_backbone(folder)[0], processor, PROMPT, r=4, alpha=8, types=["object"])
    rm.save(tmp_path / "rm")
    adapter = tmp_path / "rm" / "object"
    torch.save(load_file(adapter / "adapter_model.safetensors"), adapter / "adapter_model.bin")
    (adapter / "adapter_model.safetensors").unlink()
    with pytest.raises(models.ModelLoadError, match="adapter_model.safetensors"):
        reward.RewardModels.load(_backbone(folder)[0], processor, PROMPT, tmp_path / "rm", types=["object"])


def test_scoring_api_is_batched_and_consistent(tiny, tmp_path):
    processor, folder = tiny
    rm = reward.RewardModels.create(_backbone(folder)[0], processor, PROMPT, r=4, alpha=8)
    _randomise(rm, seed=2)
    records = _records(processor, 5, seed=1)
    images = _images(5, seed=1)
    ids = [r["token_ids"] for r in records] + [[5, 6, 7]]
    ends = [[s["last_token"] for s in r["subsentences"]] for r in records] + [[]]
    images = np.concatenate([images, _images(1, seed=9)])
    one_by_one = rm.score(images, ids, ends, batch_size=1)
    batched = rm.score(images, ids, ends, batch_size=4)           # padding to the right changes nothing
    switched = rm.score(images, ids, ends, batch_size=4, mixed=False)
    for a, b, c, e in zip(one_by_one, batched, switched, ends):
        assert a["probs"].shape == (len(e), 3, 3) and a["labels"].shape == (len(e), 3)
        assert np.allclose(a["probs"], b["probs"], atol=1e-5) and np.allclose(b["probs"], c["probs"], atol=1e-5)
        assert np.allclose(a["probs"].sum(-1), 1, atol=1e-5)
        assert np.array_equal(a["labels"], a["probs"].argmax(-1) - 1)
        assert set(np.unique(a["labels"])) <= {-1, 0, 1}
    with pytest.raises(ValueError, match="as many"):
        rm.score(images[:2], ids, ends)
    # predict (the dev and probe scoring) batches by length too: its rows come back in the examples' order
    examples = [dict(e, image_id=k) for k, e in enumerate(rm.examples(records))]   # record k was scored on image k
    assert len({len(e["ids"]) for e in examples}) > 2
    _, probs = rm.predict(examples, reward.PixelCache(processor, lambda image_id: images[image_id]), batch_size=2)
    assert np.allclose(probs, np.concatenate([s["probs"] for s in one_by_one[:5]]), atol=1e-5)


def test_word_swaps_pair_each_form_with_the_next_value(tiny):
    processor, _ = tiny
    tok = processor.tokenizer
    one = lambda word: tok(word, add_special_tokens=False)["input_ids"][0]
    sizes = feedback.word_swaps(tok, {"small": ["small", "little"], "large": ["large", "big", "zzgiant"]})
    assert sizes == {one("small"): ("small", one("large")), one("little"): ("small", one("big")),
                     one("large"): ("large", one("small")), one("big"): ("large", one("little"))}
    colours = feedback.word_swaps(tok, {"red": ["red"], "blue": ["blue"], "green": ["green"]})
    assert colours == {one("red"): ("red", one("blue")), one("blue"): ("blue", one("green")),
                       one("green"): ("green", one("red"))}


def test_word_swap_probe_picks_truth_correct_sub_sentences_and_scores_them_alone(tiny):
    processor, folder = tiny
    tok = processor.tokenizer
    rm = reward.RewardModels.create(_backbone(folder)[0], processor, PROMPT, r=4, alpha=8)
    _randomise(rm, seed=5)
    ids = lambda text: tok(text, add_special_tokens=False)["input_ids"]

    def record(image_id, sentences, truths):
        tokens, subs = [], []
        for sentence, truth in zip(sentences, truths):
            tokens += ids(sentence)
            subs.append({"last_token": len(tokens) - 1, "labels": [0, 0, -1], "gt_labels": truth})
        return {"response_id": str(image_id), "image_id": image_id, "token_ids": tokens, "subsentences": subs}

    records = [record(0, ["the star is left of the ring .", "there is a small red heart ."], [[0, -1, 0], [0, 0, -1]]),
               record(1, ["a small blue square and a large red star ."], [[0, 0, -1]]),   # two size words: out
               record(2, ["there is a big green ring ."], [[1, -1, -1]]),                 # object not there: out
               record(3, ["i can see a large yellow circle ."], [[0, 0, -1]]),
               record(4, ["there is a little red heart ."], [[0, 1, -1]])]                # attribute wrong: out
    images = _images(5, seed=3)
    swaps = feedback.word_swaps(tok, {"small": ["small", "little"], "large": ["large", "big"]})
    features = reward.FeatureCache(rm, processor, lambda image_id: images[image_id])
    rows = reward.word_swap_probe(rm, records, features, swaps, batch_size=2)
    assert [(row["said"], row["n"]) for row in rows] == [("small", 1), ("large", 1)]
    # by hand: each kept sub-sentence alone, as written and with its size word swapped
    written = [ids("there is a small red heart ."), ids("i can see a large yellow circle .")]
    swapped = [ids("there is a large red heart ."), ids("i can see a small yellow circle .")]
    direct = rm.score([images[0], images[3]] * 2, written + swapped, [[len(t) - 1] for t in written + swapped])
    for k, row in enumerate(rows):
        for t, name in enumerate(rm.types):
            p_written, p_swapped = direct[k]["probs"][0, t, 2], direct[2 + k]["probs"][0, t, 2]
            assert row[name]["p_written"] == pytest.approx(p_written, abs=1e-6)
            assert row[name]["p_swapped"] == pytest.approx(p_swapped, abs=1e-6)
            assert row[name]["rises"] == float(p_swapped > p_written)
    assert reward.word_swap_probe(rm, records[1:3], features, swaps) == []
    table = reward_viz.word_swap_markdown({"size": rows}).splitlines()
    assert len(table) == 4 and table[2].startswith("| size | small | 1 | ")
    assert table[2].endswith(f"{rows[0]['attribute']['p_swapped']:.3f} | {rows[0]['attribute']['rises']:.2f} |")


def test_word_swap_probe_scores_a_claim_word_head_as_scoring_does(tiny):
    processor, folder = tiny
    tok = processor.tokenizer
    rm = reward.RewardModels.create(_backbone(folder)[0], processor, PROMPT, r=2, alpha=4,
                                    claim_words={"relation": [["left"], ["right"], ["above"], ["below", "under"]]})
    _randomise(rm, seed=6)
    tokens = tok("the small heart is left of the star .", add_special_tokens=False)["input_ids"]
    records = [{"response_id": "0", "image_id": 0, "token_ids": tokens,
                "subsentences": [{"last_token": len(tokens) - 1, "labels": [0, 0, 0], "gt_labels": [0, 0, 0]}]}]
    images = _images(1, seed=4)
    swaps = feedback.word_swaps(tok, {"small": ["small"], "large": ["large"]})
    [row] = reward.word_swap_probe(rm, records, reward.FeatureCache(rm, processor, lambda i: images[i]), swaps)
    swapped = [swaps[t][1] if t in swaps else t for t in tokens]
    direct = rm.score([images[0]] * 2, [tokens, swapped], [[len(tokens) - 1]] * 2)
    assert row["relation"]["p_written"] == pytest.approx(direct[0]["probs"][0, 2, 2], abs=1e-6)
    assert row["relation"]["p_swapped"] == pytest.approx(direct[1]["probs"][0, 2, 2], abs=1e-6)


def _four_bit_backbone(processor, folder):
    """A tiny LLaVA saved in `folder` and loaded with load_lvlm's NF4 config on the CPU, where bitsandbytes quantises
    and runs it when the language model's layers span whole 64-wide quantisation blocks (hidden size 64)."""
    import bitsandbytes as bnb
    from transformers import LlavaForConditionalGeneration
    arch = params.TinyArchParams(vision_hidden=32, text_hidden=64, text_layers=1, vision_layers=1, heads=2)
    models.save_lvlm(models.build_tiny_llava(arch, 32, processor.tokenizer, seed=0), processor, folder)
    lvlm = LlavaForConditionalGeneration.from_pretrained(
        folder, quantization_config=models._four_bit_config(torch.device("cuda"), torch.float32),   # config only
        device_map={"": "cpu"})
    for module in lvlm.modules():   # on AVX512-BF16 CPUs an eval forward repacks the 4-bit weights for its kernels:
        if isinstance(module, bnb.nn.Linear4bit):   # keep one layout so that "unchanged" is checked byte for byte
            module.support_avx512bf16_for_cpu = False
    return lvlm


def test_training_on_a_four_bit_backbone_moves_only_the_adapter_and_round_trips(tiny, tmp_path):
    """Stage 04 trains the reward adapters on the NF4 base stage 05 applies them to (models.load_in_4bit)."""
    import bitsandbytes as bnb                  # pinned in requirements.txt: a broken install fails, never skips
    processor, _ = tiny
    lvlm = _four_bit_backbone(processor, tmp_path / "base")
    quantised = {n: (m.weight.data.clone(), m.weight.quant_state.absmax.clone())
                 for n, m in lvlm.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert len(quantised) == 7
    rm = reward.RewardModels.create(lvlm, processor, PROMPT, r=2, alpha=4, types=["object"])
    reward.enable_gradient_checkpointing(lvlm)
    before = {n: p.detach().clone() for n, p in rm.model.named_parameters() if p.is_floating_point()}
    images = _images(4, seed=8)
    history = reward.train_type(rm, "object", rm.examples(_records(processor, 8)), rm.examples(_records(processor, 4)),
                                reward.PixelCache(processor, lambda i: images[i]), lr=1e-2, batch_size=4, epochs=1,
                                patience=1, seed=0, checkpoint_dir=tmp_path / "ckpt")
    assert history["done"] and all(np.isfinite(loss) for _, loss in history["loss"])
    moved = {n for n, p in rm.model.named_parameters() if n in before and not torch.equal(p, before[n])}
    assert moved and all(".object." in n and ("lora_" in n or "modules_to_save" in n) for n in moved)
    for n, m in lvlm.named_modules():
        if n in quantised:
            assert torch.equal(m.weight.data, quantised[n][0]) and torch.equal(m.weight.quant_state.absmax,
                                                                              quantised[n][1]), n
    rm.save(tmp_path / "rm")
    loaded = reward.RewardModels.load(_four_bit_backbone(processor, tmp_path / "base2"), processor, PROMPT,
                                      tmp_path / "rm", types=["object"])
    batch = reward.collate(rm.examples(_records(processor, 4, seed=3)), rm.pad)
    pixels = reward.pixel_values(processor, images)
    assert torch.equal(rm.class_probs(batch, pixels), loaded.class_probs(batch, pixels))


def test_stage_04_loads_the_backbone_as_stage_05_applies_the_adapters():
    """Every backbone load of notebooks/04_reward_models.ipynb (a models.load_lvlm call, or the `load` keywords of the
    ScorerRecipe that its training processes load with too) passes models.load_in_4bit, as ppo.run_job does for the
    same backbone: adapters trained on a full-precision base are not applied to an NF4 one."""
    import ast
    import json
    from pathlib import Path
    notebook = json.loads((Path(__file__).resolve().parent.parent / "notebooks" / "04_reward_models.ipynb").read_text())
    code = "\n".join("".join(cell["source"]) for cell in notebook["cells"] if cell["cell_type"] == "code")
    calls = [node for node in ast.walk(ast.parse(code)) if isinstance(node, ast.Call)
             and isinstance(node.func, ast.Attribute) and node.func.attr in ("load_lvlm", "ScorerRecipe")]
    keywords = lambda call: {k.arg: k.value for k in call.keywords}
    loads = [keywords(call) if call.func.attr == "load_lvlm" else keywords(keywords(call)["load"]) for call in calls]
    assert loads and all(ast.unparse(load.get("load_in_4bit", ast.Constant(None))) == "P.models.load_in_4bit"
                         for load in loads)


def test_split_by_image_is_disjoint_complete_and_seeded():
    records = [{"image_id": i // 3, "response_id": f"{i}"} for i in range(60)]
    splits = reward.split_by_image(records, 0.1, 0.2, seed=0)
    images = {name: {r["image_id"] for r in rs} for name, rs in splits.items()}
    assert (len(images["train"]), len(images["dev"]), len(images["test"])) == (14, 2, 4)
    assert not (images["train"] & images["dev"] or images["train"] & images["test"] or images["dev"] & images["test"])
    assert sorted(r["response_id"] for rs in splits.values() for r in rs) == sorted(r["response_id"] for r in records)
    assert splits == reward.split_by_image(records, 0.1, 0.2, seed=0)
    assert splits != reward.split_by_image(records, 0.1, 0.2, seed=1)


def test_label_metrics_by_hand():
    reference = [-1, -1, 0, 0, 0, 1, 1, 1]
    predicted = [-1, 1, 0, 1, 0, 1, 0, 1]
    m = reward.label_metrics(predicted, reference)
    assert m["confusion"] == [[1, 0, 1], [0, 2, 1], [0, 1, 2]]
    assert m["accuracy"] == pytest.approx(5 / 8) and m["n"] == 8 and m["n_applicable"] == 6
    # per-class F1 over all: n/a 2*1/(2+0+1) = 2/3, correct 2*2/(4+1+1) = 2/3, hallucinated 2*2/(4+2+1) = 4/7
    assert m["macro_f1"] == pytest.approx((2 / 3 + 2 / 3 + 4 / 7) / 3)
    # hallucination class where the reference judges: the halluc. guess on a reference-n/a row is left out
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3) and m["applicable_accuracy"] == pytest.approx(4 / 6)
    assert reward.label_metrics([-1, 0], [-1, 0])["f1"] is None
    # a predicted n/a where the reference says hallucinated is a miss
    assert reward.label_metrics([-1, 1], [1, 1])["recall"] == pytest.approx(1 / 2)
    # what the hallucination precision leaves out: reference-n/a rows called hallucinated (1 of the 2 above)
    assert m["na_called_hallucinated"] == pytest.approx(1 / 2)
    assert reward.label_metrics([1, 1, 0, 1], [-1, -1, 0, 1])["na_called_hallucinated"] == 1.0
    assert reward.label_metrics([0, 1], [0, 1])["na_called_hallucinated"] is None


def test_macro_f1_leaves_out_classes_rarer_than_one_percent():
    # 200 object-type labels with a single reference n/a (as the object type has): whether the model happens to
    # predict n/a on that row must not move macro-F1 by a third. Correct 100 (90 right), hallucinated 99 (80 right).
    reference = [-1] + [0] * 100 + [1] * 99
    predicted = [0] + [0] * 90 + [1] * 10 + [1] * 80 + [0] * 19
    # correct: tp 90, fp 19 + 1 (the n/a row), fn 10 -> 180/210; hallucinated: tp 80, fp 10, fn 19 -> 160/189
    expected = (180 / 210 + 160 / 189) / 2
    assert reward.label_metrics(predicted, reference)["macro_f1"] == pytest.approx(expected)
    predicted_na_right = [-1] + predicted[1:]      # the n/a row now right: only the correct class's fp changes
    assert reward.label_metrics(predicted_na_right, reference)["macro_f1"] == pytest.approx((180 / 209 + 160 / 189) / 2)
    # a predicted class the reference never holds is left out too (it still costs the other classes recall)
    assert reward.label_metrics([-1, 0, 1], [0, 0, 1])["macro_f1"] == pytest.approx((2 / 3 + 1) / 2)


def test_constant_baselines_by_hand():
    # judged: 0, 1, 1 (n/a left out): majority hallucinated 2/3; always-halluc precision 2/3, recall 1 -> F1 4/5
    b = reward.constant_baselines([-1, 0, 1, 1, -1])
    assert b["majority_class"] == 1 and b["majority_accuracy"] == pytest.approx(2 / 3)
    assert b["always_hallucinated_f1"] == pytest.approx(4 / 5)
    assert b["always_hallucinated_f1"] == pytest.approx(reward.label_metrics([-1, 1, 1, 1, -1], [-1, 0, 1, 1, -1])["f1"])
    # nothing judged hallucinated: always guessing it is all false positives, F1 0 (as label_metrics scores it)
    assert reward.constant_baselines([-1, 0])["always_hallucinated_f1"] == 0.0 == \
        reward.label_metrics([1, 1], [-1, 0])["f1"]
    assert reward.constant_baselines([-1, -1])["always_hallucinated_f1"] is None   # nothing judged at all


def test_holistic_labels_by_hand():
    assert [reward.holistic_label(l) for l in ([-1, -1, -1], [0, -1, -1], [0, 1, -1], [-1, -1, 1], [0, 0, 0])] == \
        [-1, 0, 1, 1, 0]
    record = {"response_id": "r", "image_id": 0, "token_ids": [1, 2],
              "subsentences": [{"last_token": 1, "labels": [0, 1, -1], "gt_labels": [0, 0, -1]}]}
    [converted] = reward.holistic_records([record])
    assert converted["subsentences"][0]["labels"] == [1] and converted["subsentences"][0]["gt_labels"] == [0]
    assert record["subsentences"][0]["labels"] == [0, 1, -1]          # the input is not modified


def test_evaluate_reads_each_type_from_its_own_label_column():
    examples = [{"classes": [[1, 1, 2]], "gt": [[0, 0, 1]]}]          # AI labels 0, 0, 1 (classes are shifted by one)
    predicted = np.array([[1]])                                         # a relation-only model says hallucinated
    result = reward.evaluate(predicted, examples, ["relation"])
    assert result["relation"]["ai"]["f1"] == 1.0 and result["relation"]["gt"]["f1"] == 1.0


def test_a_sub_sentence_without_a_label_is_no_target_and_no_reference():
    # stage 03 gives null labels to a sub-sentence whose fact extraction or verifier call failed
    record = {"response_id": "r", "image_id": 0, "token_ids": [5, 6, 7],
              "subsentences": [{"last_token": 0, "labels": [1, 0, -1], "gt_labels": [1, 0, -1]},
                               {"last_token": 2, "labels": [None, None, None], "gt_labels": [0, -1, -1]}]}
    [example] = reward.examples_from_records([record], [1, 2], 3)
    assert example["classes"] == [[2, 1, 0], [reward.IGNORE] * 3]
    labels = reward.collate([example], 0, type_index=0)["labels"][0]
    assert labels[example["positions"]].tolist() == [2, reward.IGNORE]
    assert reward.balanced_class_weights([example], "object", cap=5.0).tolist() == pytest.approx([5.0, 5.0, 1 / 3])
    result = reward.evaluate(np.array([[1], [1]]), [example], ["object"])
    assert result["object"]["ai"]["n"] == 1 and result["object"]["ai"]["accuracy"] == 1.0   # the null one left out
    assert result["object"]["baseline_ai"]["n_applicable"] == 1
    assert result["object"]["gt"]["n"] == 2                             # the truth of its facts is still known
    assert reward.holistic_records([record])[0]["subsentences"][1]["labels"] == [None]
    [holistic] = reward.examples_from_records(reward.holistic_records([record]), [1, 2], 3, n_types=1)
    assert holistic["classes"] == [[2], [reward.IGNORE]]
    with pytest.raises(ValueError, match=r"record 'r', sub-sentence 1: labels must be 3 values in \(-1, 0, 1\) or null"):
        reward.examples_from_records([{**record, "subsentences": [record["subsentences"][0],
                                                                   {"last_token": 2, "labels": [2, 0, 0]}]}], [1, 2], 3)


def _with_all_twins(examples, twin_class):
    """A twin for every example: the same sequence, every marker's classes set to `twin_class`."""
    for e in examples:
        e["twin"] = {**e, "response_id": f"{e['response_id']}~sizes", "twin_of": e["response_id"],
                     "classes": [[twin_class] * 3 for _ in e["classes"]]}
    return examples


def test_balanced_weights_count_twins_at_their_share_by_hand():
    # object type (column 0): the first response has a twin, the second none
    examples = [{"classes": [[1, 0, 0], [2, 0, 0]], "twin": {"classes": [[1, 0, 0], [1, 0, 0]]}},
                {"classes": [[0, 0, 0]]}]
    # share 0.25: n/a 1, correct 0.75 * 1 + 0.25 * 2 = 1.25, hallucinated 0.75 * 1 = 0.75; N = 3
    assert reward.balanced_class_weights(examples, "object", twin_share=0.25).tolist() == \
        pytest.approx([3 / (3 * 1), 3 / (3 * 1.25), 3 / (3 * 0.75)])
    assert reward.balanced_class_weights(examples, "object").tolist() == pytest.approx([1.0, 1.0, 1.0])


def test_attach_twins_pairs_by_response_and_checks_the_markers():
    examples = [{"response_id": "a", "positions": [3, 7]}, {"response_id": "b", "positions": [4]}]
    twin = {"response_id": "a~sizes", "twin_of": "a", "positions": [3, 7]}
    assert reward.attach_twins(examples, [twin]) == 1
    assert examples[0]["twin"] is twin and "twin" not in examples[1]
    with pytest.raises(ValueError, match="end markers"):
        reward.attach_twins([{"response_id": "a", "positions": [3, 8]}], [twin])


def test_with_twins_replaces_only_examples_that_have_one_at_about_the_share():
    chunk = [{"id": i, "twin": {"id": -i}} if i % 2 else {"id": i} for i in range(4000)]
    mixed = reward.with_twins(chunk, 0.3, [0, 1, 0])
    twins_used = [m["id"] < 0 for m in mixed]
    assert not any(used for used, e in zip(twins_used, chunk) if "twin" not in e)
    assert sum(twins_used) / 2000 == pytest.approx(0.3, abs=0.03)
    assert reward.with_twins(chunk, 0.3, [0, 1, 0]) == mixed            # the same key draws the same batch
    assert reward.with_twins(chunk, 0.3, [0, 1, 8]) != mixed
    assert reward.with_twins(chunk, 0.0, [0, 1, 0]) is chunk


def _train_with_twins(processor, folder, checkpoints, twin_share, stop_after=None):
    rm = reward.RewardModels.create(_backbone(folder)[0], processor, PROMPT, r=2, alpha=4, types=["relation"])
    records = _records(processor, 8)
    for record in records:                        # originals all "correct", twins all "hallucinated"
        for sub in record["subsentences"]:
            sub["labels"] = [0, 0, 0]
    train, dev = _with_all_twins(rm.examples(records[:6]), twin_class=2), rm.examples(records[6:])
    images = _images(4)
    pixels = lambda ids: reward.pixel_values(processor, [images[i] for i in ids])
    history = reward.train_type(rm, "relation", train, dev, pixels, lr=3e-2, batch_size=2, epochs=3, patience=5,
                                seed=0, checkpoint_dir=checkpoints, checkpoint_every=2, stop_after=stop_after,
                                twin_share=twin_share)
    predicted, probs = rm.predict(dev, pixels, types=["relation"])
    return history, probs


def test_training_with_twins_learns_their_labels_and_resumes(tiny, tmp_path):
    processor, folder = tiny
    _, probs_off = _train_with_twins(processor, folder, tmp_path / "off", twin_share=0.0)
    straight, probs_on = _train_with_twins(processor, folder, tmp_path / "on", twin_share=0.9)
    # the twins' "hallucinated" labels reach the model only when they are drawn
    assert probs_off[..., 2].mean() < 0.2 < 0.8 < probs_on[..., 2].mean()
    _train_with_twins(processor, folder, tmp_path / "cut", twin_share=0.9, stop_after=4)
    resumed, _ = _train_with_twins(processor, folder, tmp_path / "cut", twin_share=0.9)
    assert [x[1] for x in resumed["loss"]] == pytest.approx([x[1] for x in straight["loss"]], rel=1e-5)


RELATION_WORDS = {"relation": [["left"], ["right"], ["above"], ["below", "under"]]}


def test_claim_word_logits_by_hand():
    head = torch.tensor([[0.0, 5.0, -5.0, 1.0, 2.0, 0.0, -1.0]] * 2)   # n/a, correct, hallucinated, 4 words
    logits = reward.three_class_logits(head, torch.tensor([1, -1]))
    z = np.exp([0.0, 1.0, 2.0, 0.0, -1.0]).sum()
    # stated word 1: p(n/a) = e^0 / Z, p(correct) = e^2 / Z, p(hallucinated) = (e^1 + e^0 + e^-1) / Z
    assert np.allclose(logits[0].softmax(-1).numpy(), [1 / z, np.exp(2.0) / z, (np.e + 1 + np.exp(-1.0)) / z])
    assert torch.equal(logits[1], head[1, :3])   # no stated word: the plain three outputs
    assert torch.equal(reward.three_class_logits(head[:, :3], torch.tensor([1, -1])), head[:, :3])


def test_scoring_one_type_after_another_leaves_the_active_adapter_and_what_trains(tiny):
    """peft's set_adapter makes the adapter it switches to the trainable one: per-type scoring (mixed=False: under
    DeepSpeed, or one type) left the last type active and trainable and the training adapter frozen."""
    processor, folder = tiny
    rm = reward.RewardModels.create(_backbone(folder)[0], processor, PROMPT, r=2, alpha=4)
    rm.model.set_adapter("object")                 # as train_type leaves it: object's adapter and head train
    trains = reward._adapter_params(rm.model, "object")
    for name, param in rm.model.named_parameters():
        param.requires_grad_(name in trains)
    batch = reward.collate(rm.examples(_records(processor, 2)), rm.pad)
    pixels = reward.pixel_values(processor, _images(2))
    probs = rm.class_probs(batch, pixels, mixed=False, types=["relation", "attribute"])
    assert probs.shape[:3] == (2, batch["positions"].shape[1], 2)
    assert rm.model.active_adapter == "object"
    assert {n for n, p in rm.model.named_parameters() if p.requires_grad} == set(trains)


def test_claim_word_logits_leave_out_the_slots_of_another_type_s_words():
    """Two words for attribute, four for relation: the heads are 3 + 4 wide, and an attribute claim's
    "hallucinated" is the other attribute word only (before: the logsumexp of three slots, two of them no word)."""
    head = torch.tensor([[0.0, 5.0, -5.0, 1.0, 2.0, 3.0, 4.0]])
    scorer = types.SimpleNamespace(types=list(reward.FACT_TYPES), claim_words={
        "attribute": [["small"], ["large"]], "relation": [["left"], ["right"], ["above"], ["below"]]})
    batch = {"claims": torch.tensor([[-1, 1, 1]])}
    attribute = reward.RewardModels.type_logits(scorer, head, "attribute", batch)
    assert torch.equal(attribute, torch.tensor([[0.0, 2.0, 1.0]]))          # n/a, "large", "small"
    relation = reward.RewardModels.type_logits(scorer, head, "relation", batch)
    assert torch.allclose(relation, torch.tensor([[0.0, 2.0, float(np.log(np.exp([1.0, 3.0, 4.0]).sum()))]]))
    assert torch.equal(reward.RewardModels.type_logits(scorer, head, "object", batch), head[:, :3])


def test_a_dev_split_without_labels_of_a_type_is_an_error_before_training():
    """It gave a macro-F1 of None (read as 0) at every epoch: epoch 1 kept, training stopped, no word said."""
    assert reward.ai_labels([]).shape == (0, 3)
    labelled = {"classes": [[1, 2, reward.IGNORE]], "image_id": 1}          # no AI relation label
    rm = types.SimpleNamespace(types=list(reward.FACT_TYPES))
    with pytest.raises(ValueError, match=r"no sub-sentence of the dev split \(1 responses\) has an AI relation label"):
        reward.train_all(rm, {"train": [labelled], "dev": [labelled]}, None, None, 0, "unused")
    with pytest.raises(ValueError, match=r"dev split \(0 responses\) has an AI object label"):
        reward.train_all(rm, {"train": [labelled], "dev": []}, None, None, 0, "unused")


def test_claim_indices_name_the_stated_word_of_each_sub_sentence(tiny):
    processor, _ = tiny
    tok = processor.tokenizer
    ids = tok("the star is left of the ring . there is a heart under the box . a red heart .",
              add_special_tokens=False).input_ids
    ends = [k for k, t in enumerate(ids) if t == tok.convert_tokens_to_ids(".")]
    tables = reward.claim_token_ids(tok, RELATION_WORDS, ["object", "relation"])
    assert tables[0] == {} and sorted(tables[1].values()) == [0, 1, 2, 3, 3]
    assert reward.claim_indices(ids, ends, tables) == [[-1, 0], [-1, 3], [-1, -1]]
    with pytest.raises(ValueError, match="claim_words.relation: 'sideways'"):
        reward.claim_token_ids(tok, {"relation": [["sideways"]]}, ["relation"])


def _brightness_records(processor, n):
    """'the star is left of the ring .' / '... right of ...': correct iff the image's brightness matches the word
    (bright: left, dark: right). Neither the word nor the image alone says the label: an XOR."""
    tok = processor.tokenizer
    records = []
    for i in range(n):
        word = ["left", "right"][(i // 2) % 2]
        ids = tok(f"the star is {word} of the ring .", add_special_tokens=False).input_ids
        truth = 0 if (word == "left") == (i % 2 == 0) else 1
        records.append({"response_id": f"b{i}", "image_id": i % 2, "token_ids": ids,
                        "subsentences": [{"last_token": len(ids) - 1, "labels": [-1, -1, truth],
                                          "gt_labels": [-1, -1, truth]}]})
    return records


def test_a_claim_word_head_learns_the_xor_and_round_trips(tiny, tmp_path):
    processor, folder = tiny
    images = np.stack([np.full((32, 32, 3), 230, np.uint8), np.full((32, 32, 3), 20, np.uint8)])
    pixels = reward.pixel_values(processor, images)
    rm = reward.RewardModels.create(_backbone(folder)[0], processor, PROMPT, r=2, alpha=4, types=["object", "relation"],
                                    seed=0, claim_words=RELATION_WORDS)
    examples = rm.examples(_brightness_records(processor, 8))
    assert [e["claims"] for e in examples[:4]] == [[[-1, 0]], [[-1, 0]], [[-1, 1]], [[-1, 1]]]
    reward.train_type(rm, "relation", examples, examples, lambda ids: pixels[list(ids)], lr=0.05, batch_size=4,
                      epochs=15, patience=20, seed=0, checkpoint_dir=tmp_path / "ckpt")
    predicted, probs = rm.predict(examples, lambda ids: pixels[list(ids)], types=["relation"])
    assert predicted[:, 0].tolist() == [e["classes"][0][2] - 1 for e in examples]
    rm.save(tmp_path / "rm")
    loaded = reward.RewardModels.load(_backbone(folder)[0], processor, PROMPT, tmp_path / "rm", types=["object", "relation"])
    assert loaded.claim_words == RELATION_WORDS
    scored = loaded.score(images[[0, 1, 0, 1]], [r["token_ids"] for r in _brightness_records(processor, 4)],
                          [[len(r["token_ids"]) - 1] for r in _brightness_records(processor, 4)])
    assert np.allclose(np.stack([s["probs"][0, 1] for s in scored]), probs[:4, 0], atol=1e-5)


def test_a_backbone_under_outputs_is_found_from_the_repo_root_wherever_the_notebook_runs(tiny, tmp_path,
                                                                                          monkeypatch):
    processor, folder = tiny
    monkeypatch.setattr(params, "REPO_ROOT", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"outputs/curriculum/grounded.*params file's header"):
        reward.backbone_path("outputs/curriculum/grounded", tmp_path / "models")
    (tmp_path / "outputs" / "curriculum").mkdir(parents=True)
    (tmp_path / "outputs" / "curriculum" / "grounded").symlink_to(folder)
    monkeypatch.chdir(tmp_path / "outputs")        # JupyterLab runs a notebook in its own folder
    assert reward.backbone_path("outputs/curriculum/grounded", tmp_path / "models") == \
        str(tmp_path / "outputs" / "curriculum" / "grounded")


def test_check_trainable_warns_per_empty_type_and_refuses_when_every_type_is_empty():
    record = lambda *labels: {"subsentences": [{"labels": list(sub)} for sub in labels]}  # noqa: E731
    assert reward.check_trainable([record((0, -1, -1)), record((-1, 1, -1))], reward.FACT_TYPES, "x.jsonl") == [
        "relation: no training sub-sentence is labelled correct or hallucinated; this reward model will learn n/a "
        "only and give 0 reward"]
    with pytest.raises(ValueError, match=r"fg_labels\.jsonl: no training sub-sentence .* for any type"):
        reward.check_trainable([record((-1, -1, -1))] * 3, reward.FACT_TYPES, "run/03/fg_labels.jsonl")
    holistic = reward.holistic_records([record((-1, 1, -1))])
    assert reward.check_trainable(holistic, ["holistic"], "x.jsonl") == []


def test_scorer_memory_by_hand():
    # one 100-byte base with three 10-byte adapters, against three bases with one adapter each
    assert reward.scorer_memory(100, 130, 3) == {"backbone_bytes": 100, "scorer_bytes": 130, "adapter_bytes_each": 10,
                                                 "scorer_vs_one_backbone": 1.3,
                                                 "separate_models_vs_one_backbone": 3.3}
