"""The rollout engine on the CPU: the static-cache loop against transformers `generate` (greedy token-for-token,
EOS mid-batch, left padding, LoRA), sampled log-probs against a forward pass, <image> never emitted, and the
`auto` fallback. The CUDA-graph path runs only on a GPU (benchmarks/rollout.py --check)."""

import copy
import types

import numpy as np
import pytest
import torch

from fgaif_utils import models, params, rollout

torch.set_num_threads(1)

DESCRIBE = "Describe this image in detail."


@pytest.fixture(scope="module")
def tiny():
    arch = params.TinyArchParams(vision_hidden=32, text_hidden=32, text_layers=1, vision_layers=1, heads=2)
    tokenizer = models.build_tiny_tokenizer()
    processor = models.build_tiny_processor(tokenizer, 32, 8)
    model = models.build_tiny_llava(arch, 32, tokenizer, seed=0).eval()
    return model, processor


def _images(n, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def _prompts(processor, texts):
    return [models.chat_prompt(processor, text) for text in texts]


def _forward_logprobs(model, processor, images, prompts, token_ids):
    """log pi(token | prefix) by one plain forward pass over prompt + response, one row at a time (no padding)."""
    result = []
    for image, prompt, ids in zip(images, prompts, token_ids):
        batch = processor(images=[image], text=[prompt], return_tensors="pt")
        prompt_len = batch["input_ids"].shape[1]
        response = torch.tensor([ids], dtype=torch.long)
        sequence = torch.cat([batch["input_ids"], response], dim=1)
        with torch.no_grad():
            logits = model(input_ids=sequence, pixel_values=batch["pixel_values"]).logits
        logprobs = torch.log_softmax(logits[0, prompt_len - 1:-1].float(), -1)
        result.append(logprobs.gather(-1, response[0, :, None]).squeeze(-1))
    return result


def test_static_greedy_matches_generate_with_eos_mid_batch(tiny):
    model, processor = tiny
    images, prompts = _images(4), _prompts(processor, [DESCRIBE] * 4)
    expected, expected_texts = models.generate(model, processor, images, prompts, max_new_tokens=12)
    lengths = [len(ids) for ids in expected]
    assert min(lengths) < 12 and max(lengths) == 12, "the fixture should stop one row at EOS and not another"
    got = rollout.sample(model, processor, images, prompts, max_new_tokens=12, engine="static")
    assert got.token_ids == expected and got.texts == expected_texts
    assert [len(lp) for lp in got.logprobs] == lengths


def test_static_greedy_matches_generate_with_left_padding(tiny):
    model, processor = tiny
    images = _images(3, seed=1)
    prompts = _prompts(processor, [DESCRIBE, "is there a red heart in the image ?", "is the star above the ring ?"])
    batch = rollout.prepare_batch(model, processor, images, prompts)
    assert (batch["attention_mask"] == 0).any(), "prompts of different lengths should be left-padded"
    expected, _ = models.generate(model, processor, images, prompts, max_new_tokens=10)
    got = rollout.sample(model, processor, images, prompts, max_new_tokens=10, engine="static")
    assert got.token_ids == expected


@pytest.mark.parametrize("engine", ["static", "generate"])
def test_sampled_logprobs_match_a_forward_pass(tiny, engine):
    model, processor = tiny
    images, prompts = _images(4, seed=2), _prompts(processor, [DESCRIBE] * 4)
    got = rollout.sample(model, processor, images, prompts, max_new_tokens=10, do_sample=True, temperature=0.7,
                         top_p=0.9, seed=3, engine=engine)
    vocab = len(processor.tokenizer)
    assert all(0 <= t < vocab for ids in got.token_ids for t in ids) and any(got.token_ids)
    assert got.texts == [processor.tokenizer.decode(ids, skip_special_tokens=True) for ids in got.token_ids]
    for returned, forward in zip(got.logprobs, _forward_logprobs(model, processor, images, prompts, got.token_ids)):
        assert torch.allclose(torch.tensor(returned), forward, atol=1e-4)


@pytest.mark.parametrize("engine", ["static", "generate"])
def test_sampling_draws_from_the_temperature_scaled_distribution(engine):
    """A peaked model (output head x40: its top first token has p 0.42 at temperature 1, 0.81 at 0.5): 1,000
    samples at temperature 0.5 hit the top token about as often as softmax(logits / 0.5) says, not as logits say."""
    arch = params.TinyArchParams(vision_hidden=32, text_hidden=32, text_layers=1, vision_layers=1, heads=2)
    tokenizer = models.build_tiny_tokenizer()
    processor = models.build_tiny_processor(tokenizer, 32, 8)
    model = models.build_tiny_llava(arch, 32, tokenizer, seed=0).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(40)
    image, prompt = _images(1, seed=5), _prompts(processor, [DESCRIBE])
    with torch.no_grad():
        logits = model(**processor(images=[image[0]], text=prompt, return_tensors="pt")).logits[0, -1].float()
    top = int(logits.argmax())
    p_cold, p_plain = (float(torch.softmax(logits / t, -1)[top]) for t in (0.5, 1.0))
    assert p_cold - p_plain > 0.3
    n = 1000
    got = rollout.sample(model, processor, np.repeat(image, n, 0), prompt * n, max_new_tokens=1, do_sample=True,
                         temperature=0.5, seed=1, engine=engine)
    hits = np.mean([bool(ids) and ids[0] == top for ids in got.token_ids])
    assert abs(hits - p_cold) < 0.05, (hits, p_cold, p_plain)      # binomial sd 0.013


def test_sampling_is_seeded_and_stop_at_eos_false_gives_full_length(tiny):
    model, processor = tiny
    images, prompts = _images(3, seed=4), _prompts(processor, [DESCRIBE] * 3)
    run = lambda seed: rollout.sample(model, processor, images, prompts, max_new_tokens=9, do_sample=True, seed=seed,
                                      engine="static", stop_at_eos=False)
    first, again, other = run(5), run(5), run(6)
    assert first == again and first.token_ids != other.token_ids
    assert [len(ids) for ids in first.token_ids] == [9, 9, 9]


def test_prepare_batch_pads_images_to_squares_so_a_dot_near_the_left_edge_stays_in_view(tiny):
    """The processor alone keeps the middle square of a wide image: a dot in the left quarter of a 32x64 image is
    cropped away. Padded to 64x64 first (models.square_images), the image is only scaled and the dot stays."""
    model, processor = tiny
    wide = np.zeros((32, 64, 3), np.uint8)
    wide[14:18, 4:8] = 255                                  # white dot (pixel value 1) on black (-1)
    tall = np.zeros((48, 32, 3), np.uint8)                  # another shape in the same batch
    square = _images(1)[0]
    batch = rollout.prepare_batch(model, processor, [wide, tall, square], _prompts(processor, [DESCRIBE] * 3))
    pixels = batch["pixel_values"]
    assert pixels.shape == (3, 3, 32, 32)
    assert pixels[0, :, :, :8].max() > 0.5                  # the dot, in the left quarter of the squared image
    unpadded = processor(images=[square], text=_prompts(processor, [DESCRIBE]), return_tensors="pt")["pixel_values"]
    assert torch.equal(pixels[2], unpadded[0])              # a square image goes in as it did before


def _rig_towards(model, processor, token_id, scale=50.0):
    """A copy of the model whose lm_head makes `token_id` by far the most likely next token everywhere."""
    rigged = copy.deepcopy(model)
    batch = processor(images=list(_images(4)), text=_prompts(processor, [DESCRIBE] * 4), return_tensors="pt")
    with torch.no_grad():
        hidden = rigged(**batch, output_hidden_states=True).hidden_states[-1]
        direction = rigged.model.language_model.norm(hidden).mean((0, 1))
        rigged.lm_head.weight[token_id] = scale * direction / direction.norm()
    return rigged


@pytest.mark.parametrize("do_sample", [False, True])
def test_the_image_token_is_never_emitted(tiny, do_sample):
    model, processor = tiny
    image_id = processor.tokenizer.image_token_id
    rigged = _rig_towards(model, processor, image_id)
    images, prompts = _images(4), _prompts(processor, [DESCRIBE] * 4)
    batch = rollout.prepare_batch(rigged, processor, images, prompts)
    with torch.no_grad():
        assert (rigged(**batch).logits[:, -1].argmax(-1) == image_id).all(), "the rig should favour <image>"
    got = rollout.sample(rigged, processor, images, prompts, max_new_tokens=8, do_sample=do_sample, seed=0,
                         engine="static", stop_at_eos=False)
    assert all(len(ids) == 8 for ids in got.token_ids)
    banned = set(models.suppressed_token_ids(processor))
    assert image_id in banned and not banned & {t for ids in got.token_ids for t in ids}


@pytest.mark.parametrize("engine", ["generate", "static"])
def test_sampling_draws_from_the_whole_vocabulary(tiny, engine):
    """top_p 1 is the whole distribution: generate() would keep only the 50 likeliest tokens unless told top_k=0."""
    model, processor = tiny
    flat = _rig_towards(model, processor, 0)             # a copy; then near-uniform logits, all distinct
    prompt = _prompts(processor, [DESCRIBE])
    with torch.no_grad():
        hidden = flat(**rollout.prepare_batch(flat, processor, _images(1), prompt), output_hidden_states=True)
        last = flat.model.language_model.norm(hidden.hidden_states[-1])[0, -1]
        ranks = torch.arange(len(flat.lm_head.weight), dtype=torch.float32)[:, None]
        flat.lm_head.weight.copy_(ranks / len(ranks) * last / last.norm() ** 2)     # logit of token i: i / V
        logits = flat(**rollout.prepare_batch(flat, processor, _images(1), prompt)).logits[0, -1]
    logits[models.suppressed_token_ids(processor)] = -float("inf")
    probs = torch.softmax(logits, -1)
    assert float(probs.sort(descending=True).values[50:].sum()) > 0.2    # the tail a top 50 would cut
    n = 600
    got = rollout.sample(flat, processor, _images(1).repeat(n, 0), _prompts(processor, [DESCRIBE] * n),
                         max_new_tokens=1, do_sample=True, seed=0, engine=engine, stop_at_eos=False,
                         with_logprobs=False)
    assert len({ids[0] for ids in got.token_ids}) > 55    # 600 uniform draws from > 60 tokens miss hardly any
    _, texts = models.generate(flat, processor, _images(1).repeat(200, 0), _prompts(processor, [DESCRIBE] * 200),
                               max_new_tokens=1, do_sample=True, seed=0)
    assert len(set(texts)) > 50


def test_the_image_token_is_suppressed_when_the_tokenizer_does_not_name_it():
    """llava-hf tokenizers may carry no `image_token` attribute; LlavaProcessor always knows the id."""
    tokenizer = types.SimpleNamespace(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    assert models.suppressed_token_ids(types.SimpleNamespace(tokenizer=tokenizer, image_token_id=32000)) == \
        [0, 1, 32000]
    tokenizer.pad_token_id = 2                          # padding with EOS: EOS still ends responses
    assert models.suppressed_token_ids(types.SimpleNamespace(tokenizer=tokenizer, image_token_id=32000)) == [1, 32000]


def test_lora_adapter_is_applied_and_matches_generate(tiny):
    model, processor = tiny
    peft_model = models.add_lora(copy.deepcopy(model), r=4, alpha=8)
    with torch.no_grad():   # a fresh adapter is the identity (lora_B = 0); make it change the policy
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    images, prompts = _images(4, seed=6), _prompts(processor, [DESCRIBE] * 4)
    expected, _ = models.generate(peft_model, processor, images, prompts, max_new_tokens=10)
    base, _ = models.generate(model, processor, images, prompts, max_new_tokens=10)
    assert expected != base, "the adapter should change the greedy output"
    got = rollout.sample(peft_model, processor, images, prompts, max_new_tokens=10, engine="static")
    assert got.token_ids == expected
    with peft_model.disable_adapter():
        without = rollout.sample(peft_model, processor, images, prompts, max_new_tokens=10, engine="static")
    assert without.token_ids == base


def test_auto_falls_back_to_generate_on_the_cpu_with_the_same_results(tiny):
    model, processor = tiny
    assert rollout.pick_engine(model, "auto") == "generate"
    images, prompts = _images(3, seed=7), _prompts(processor, [DESCRIBE] * 3)
    for do_sample in (False, True):
        expected = models.generate(model, processor, images, prompts, max_new_tokens=8, do_sample=do_sample, seed=8)
        got = rollout.sample(model, processor, images, prompts, max_new_tokens=8, do_sample=do_sample, seed=8)
        assert (got.token_ids, got.texts) == expected


def test_graph_engines_need_cuda_and_unknown_engines_are_refused(tiny):
    model, processor = tiny
    images, prompts = _images(1), _prompts(processor, [DESCRIBE])
    if not torch.cuda.is_available():
        for engine in ("graph", "compile"):
            with pytest.raises(ValueError, match="CUDA"):
                rollout.sample(model, processor, images, prompts, max_new_tokens=2, engine=engine)
    with pytest.raises(ValueError, match="engine must be one of"):
        rollout.sample(model, processor, images, prompts, engine="vllm")


def test_top_p_filter_matches_transformers(tiny):
    from transformers.generation.logits_process import TopPLogitsWarper
    scores = torch.randn(5, 40, generator=torch.Generator().manual_seed(0)) * 3
    for top_p in (0.1, 0.5, 0.9, 0.99):
        expected = TopPLogitsWarper(top_p)(torch.zeros(5, 1, dtype=torch.long), scores.clone())
        assert torch.equal(rollout.top_p_filter(scores, top_p), expected)


def test_static_loop_also_runs_with_eager_attention(tiny):
    """Eager attention adds its mask to the scores, so the engine hands it an additive mask instead of a boolean."""
    model, processor = tiny
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    assert rollout._attention_kind(eager) == "eager"
    images, prompts = _images(3, seed=9), _prompts(processor, [DESCRIBE, "is the heart red ?", DESCRIBE])
    expected, _ = models.generate(eager, processor, images, prompts, max_new_tokens=8)
    assert rollout.sample(eager, processor, images, prompts, max_new_tokens=8, engine="static").token_ids == expected


def test_the_benchmark_runs_tiny_on_the_cpu(monkeypatch, capsys, tmp_path):
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "rollout.py"
    spec = importlib.util.spec_from_file_location("rollout_benchmark", path)
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    monkeypatch.setenv("OUT", str(tmp_path))
    monkeypatch.setattr("sys.argv", ["rollout.py", "--tiny", "--device", "cpu", "--batches", "2", "--short", "2",
                                     "--long", "5"])
    benchmark.main()
    printed = capsys.readouterr().out
    assert "| 2 | generate |" in printed and "| 2 | static |" in printed
    import json
    results = json.loads((tmp_path / "rollout_bench.json").read_text())
    assert all(r["identical_rows"] == r["rows"] and r["max_logprob_error"] < 1e-4
               for r in results["check"].values())
    assert {(r["batch"], r["engine"]) for r in results["rows"]} == {(2, "generate"), (2, "static")}

    monkeypatch.setattr("sys.argv", ["rollout.py", "--tiny", "--device", "cpu", "--batches", "2", "--check-only"])
    benchmark.main()   # the exact-agreement check alone (device_check.sh runs it at the 7B shape in float32)
    results = json.loads((tmp_path / "rollout_bench.json").read_text())
    assert results["rows"] == [] and set(results["check"]) == {"generate", "static"}


def test_graph_bookkeeping_with_a_simulated_cuda_graph(tiny, monkeypatch):
    """The CUDA-graph path on the CPU, with torch.cuda's graph API replaced by a stand-in that re-runs the
    recorded step and copies into the captured output tensor (what a replay does). It checks the engine's side:
    warm-up steps before capture advance the static cache and must be undone, and the output tensor is reused
    between replays. It cannot check that the step reads only the static buffers: the stand-in re-runs the Python
    step, which would read a fresh input as well (a real graph would not); that needs a GPU."""
    import contextlib
    import types
    model, processor = tiny
    recorded = {"capturing": False, "captures": 0, "replays": 0}

    class FakeGraph:
        def replay(self):
            recorded["replays"] += 1
            recorded["output"].copy_(recorded["step"]())

    @contextlib.contextmanager
    def fake_capture(graph):
        recorded["capturing"] = True
        yield
        recorded["capturing"] = False

    original = rollout.DecodeStep._forward

    def forward(self):
        output = original(self)
        if recorded["capturing"]:
            recorded.update(step=lambda: original(self), output=output, captures=recorded["captures"] + 1)
        return output

    stream = types.SimpleNamespace(wait_stream=lambda other: None)
    monkeypatch.setattr(rollout.DecodeStep, "_forward", forward)
    monkeypatch.setattr(rollout, "check_device", lambda mode, device: None)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", fake_capture)
    monkeypatch.setattr(torch.cuda, "Stream", lambda: stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())

    images, prompts = _images(4, seed=10), _prompts(processor, [DESCRIBE, "is the heart red ?", DESCRIBE, DESCRIBE])
    for do_sample in (False, True):
        expected = rollout.sample(model, processor, images, prompts, max_new_tokens=10, do_sample=do_sample, seed=1,
                                  engine="static", stop_at_eos=False)
        got = rollout.sample(model, processor, images, prompts, max_new_tokens=10, do_sample=do_sample, seed=1,
                             engine="graph", stop_at_eos=False)
        assert got.token_ids == expected.token_ids
        assert np.allclose(np.array(got.logprobs), np.array(expected.logprobs), atol=1e-6)
    assert recorded["captures"] == 2 and recorded["replays"] == 2 * 9
