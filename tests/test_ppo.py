"""PPO with fine-grained rewards: GAE by hand, the KL sign, reward positions from sampled ids, the sparse
ablation, the value model's start, stop-and-resume, and 2-process gloo runs (plain and DeepSpeed ZeRO-3) against
one process."""
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import numpy as np
import pytest
import torch

from fgaif_utils import launch, models, params, ppo, reward, segment
from tests.test_rollout import _rig_towards

torch.set_num_threads(1)
PROMPT = "Describe this image in detail."
REPO = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------- equations

def test_gae_on_three_tokens_by_hand():
    rewards = torch.tensor([[1.0, 0.0, 2.0], [0.5, -1.0, 0.0]])
    values = torch.tensor([[0.5, 1.0, 0.2], [0.3, 0.4, 9.0]])   # row 2 is 2 tokens long: its 9.0 is padding
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    advantages, returns = ppo.gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # row 1: delta2 = 2 - 0.2 = 1.8; delta1 = 0 + 0.9*0.2 - 1 = -0.82, A1 = -0.82 + 0.72*1.8 = 0.476;
    #        delta0 = 1 + 0.9*1.0 - 0.5 = 1.4, A0 = 1.4 + 0.72*0.476 = 1.74272
    # row 2: delta1 = -1 - 0.4 = -1.4 (no value after the end); delta0 = 0.5 + 0.9*0.4 - 0.3 = 0.56,
    #        A0 = 0.56 + 0.72*(-1.4) = -0.448
    assert advantages.tolist()[0] == pytest.approx([1.74272, 0.476, 1.8])
    assert advantages.tolist()[1] == pytest.approx([-0.448, -1.4, 0.0])
    assert returns.tolist()[0] == pytest.approx([2.24272, 1.476, 2.0])
    assert returns.tolist()[1] == pytest.approx([-0.148, -1.0, 0.0])


def test_advantage_contrast_by_hand_dense_against_sparse():
    """Two sub-sentences (tokens 0-2 judged correct, tokens 3-4 hallucinated), values 0, gamma = lambda = 1: the
    advantage of a token is its reward-to-go. Dense: +1 at token 2, -1 at token 4, so tokens 0-2 get 0 and tokens
    3-4 get -1: contrast -1. Sparse: the total 0 on token 4, every advantage 0: contrast 0."""
    labels = [[[0, -1, -1], [1, -1, -1]]]
    ends = [[2, 4]]
    mask, values = torch.ones(1, 5), torch.zeros(1, 5)
    for sparse, expected in ((False, -1.0), (True, 0.0)):
        rewards = ppo.fine_grained_rewards(labels[0], ends[0], 5, np.ones(3), sparse=sparse)[None]
        advantages, _ = ppo.gae(rewards, values, mask, gamma=1.0, lam=1.0)
        assert ppo.advantage_contrast(advantages, ends, labels, 3) == pytest.approx(expected)
    # by hand, and a response without both kinds (all n/a, or all correct) does not count
    advantages = torch.tensor([[1.0, 1.0, 1.0, -1.0, -3.0], [5.0, 5.0, 5.0, 5.0, 5.0], [2.0, 2.0, 2.0, 2.0, 2.0]])
    labels = [[[0, 0, -1], [-1, 1, -1]], [[-1, -1, -1], [-1, -1, -1]], [[0, -1, -1], [0, -1, -1]]]
    assert ppo.advantage_contrast(advantages, [[2, 4]] * 3, labels, 3) == pytest.approx(-2.0 - 1.0)
    assert ppo.advantage_contrast(advantages[1:], [[2, 4]] * 2, labels[1:], 3) is None


def test_kl_term_is_subtracted():
    fine = torch.tensor([[0.0, 1.0]])
    logp, ref = torch.tensor([[-1.0, -0.5]]), torch.tensor([[-2.0, -0.5]])
    rewards, kl = ppo.kl_penalised_rewards(fine, logp, ref, torch.ones(1, 2), beta=0.1)
    # token 0: the policy puts more mass on its action than the reference: reward 0 - 0.1 * 1
    assert rewards.tolist()[0] == pytest.approx([-0.1, 1.0])
    assert kl.tolist()[0] == pytest.approx([1.0, 0.0])


def test_fine_grained_rewards_by_hand():
    labels = [[0, -1, 1], [1, 0, -1]]           # sub-sentence 0: object ok, relation wrong; 1: object wrong, attr ok
    weights = np.array([1.0, 0.5, 2.0])
    rewards = ppo.fine_grained_rewards(labels, [2, 5], 7, weights)
    assert rewards.tolist() == pytest.approx([0, 0, 1 - 2, 0, 0, -1 + 0.5, 0])
    sparse = ppo.fine_grained_rewards(labels, [2, 5], 7, weights, sparse=True)
    assert sparse.tolist() == pytest.approx([0] * 6 + [-1.5]) and float(sparse.sum()) == pytest.approx(float(rewards.sum()))
    bonus = ppo.fine_grained_rewards([[0, 0, -1], [1, 0, -1]], [2, 5], 7, weights, claim_bonus=0.25)
    assert bonus.tolist() == pytest.approx([0, 0, 1.5 + 0.25, 0, 0, -0.5, 0])   # no bonus where anything is wrong
    off = ppo.fine_grained_rewards(labels, [2, 5], 7, np.array([0.0, 0.5, 0.0]))   # object and relation switched off
    assert off.tolist() == pytest.approx([0, 0, 0, 0, 0, 0.5, 0])
    # a switched-off model decides no bonus either: sub-sentence 1's wrong object no longer withholds it, and
    # sub-sentence 0, judged only by switched-off models, earns none
    off_bonus = ppo.fine_grained_rewards(labels, [2, 5], 7, np.array([0.0, 0.5, 0.0]), claim_bonus=0.25)
    assert off_bonus.tolist() == pytest.approx([0, 0, 0, 0, 0, 0.5 + 0.25, 0])


def test_reward_positions_follow_tokens_that_straddle_sub_sentence_boundaries():
    # a byte-pair-like vocabulary where one token carries the end of one sub-sentence and the start of the next
    pieces = {0: "There", 1: " is", 2: " a", 3: " red", 4: " heart", 5: ", a", 6: " blue", 7: " star", 8: " on",
              9: " its", 10: " left", 11: " and", 12: " more", 13: "."}
    decode = lambda ids: "".join(pieces[i] for i in ids)  # noqa: E731
    ids = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]
    text = decode(ids)
    spans = [(0, text.index(",") + 1), (text.index("a blue"), len(text))]
    ends = segment.subsentence_end_positions(ids, decode, spans)
    assert ends == [5, 13]     # ", a" closes "There is a red heart,"; the final "." closes the second
    assert segment.subsentence_end_positions(ids, decode, [(0, text.index(",")), spans[1]]) == [4, 13]
    rewards = ppo.fine_grained_rewards([[0, -1, -1], [1, -1, -1]], ends, len(ids) + 1, np.ones(3))
    assert rewards.nonzero().flatten().tolist() == [5, 13] and rewards[5] == 1 and rewards[13] == -1


def test_ppo_losses_by_hand():
    old = torch.tensor([[0.0, 0.0]])
    new = torch.log(torch.tensor([[1.5, 0.9]]))       # ratios 1.5 (clipped to 1.2) and 0.9
    adv = torch.tensor([[1.0, -2.0]])
    values, old_values, returns = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.5, 0.0]]), torch.tensor([[2.0, 1.0]])
    pg, vf, approx_kl, clipfrac = ppo.ppo_losses(new, old, adv, values, old_values, returns, torch.ones(1, 2),
                                                 clip=0.2, value_clip=0.2, n_tokens=2)
    # token 0: max(-1.5, -1.2) = -1.2; token 1: max(1.8, 2*0.9=1.8) = 1.8 -> mean 0.3
    assert float(pg) == pytest.approx(0.3)
    # token 0: unclipped (1-2)^2 = 1, clipped value 0.7 -> (0.7-2)^2 = 1.69 -> 1.69; token 1: 1 -> 0.5*(1.69+1)/2
    assert float(vf) == pytest.approx(0.5 * (1.69 + 1.0) / 2)
    assert float(clipfrac) == pytest.approx(0.5)
    assert float(approx_kl) == pytest.approx(((0.5 - np.log(1.5)) + (-0.1 - np.log(0.9))) / 2)
    # masked: token 3 (ratio 7, advantage 100, value 10 against return -10) is padding; n_tokens 6 (the global
    # count) is not the 3 tokens here; token 2's ratio 0.5 falls below 1 - 0.2 with a negative advantage
    new = torch.log(torch.tensor([[1.5, 0.9, 0.5, 7.0]]))
    adv = torch.tensor([[1.0, -2.0, -1.0, 100.0]])
    values, old_values = torch.tensor([[1.0, 0.0, 0.0, 10.0]]), torch.tensor([[0.5, 0.0, 0.0, 0.0]])
    returns, mask = torch.tensor([[2.0, 1.0, 0.0, -10.0]]), torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    pg, vf, approx_kl, clipfrac = ppo.ppo_losses(new, torch.zeros(1, 4), adv, values, old_values, returns, mask,
                                                 clip=0.2, value_clip=0.2, n_tokens=6)
    # token 2: max(-(-1)*0.5, -(-1)*clip(0.5) = 0.8) = 0.8 -> (-1.2 + 1.8 + 0.8) / 6 = 1.4 / 6 = 0.233333
    assert float(pg) == pytest.approx(1.4 / 6)
    # token 2: value 0 = old value = return -> 0; 0.5 * (1.69 + 1 + 0) / 6 = 0.224167
    assert float(vf) == pytest.approx(0.5 * 2.69 / 6)
    # |ratio - 1| > 0.2: tokens 0 (0.5) and 2 (0.5), not 1 (0.1) -> 2 / 6
    assert float(clipfrac) == pytest.approx(2 / 6)
    # (r - 1) - log r: 0.5 - 0.405465 = 0.094535, -0.1 + 0.105361 = 0.005361, -0.5 + 0.693147 = 0.193147
    assert float(approx_kl) == pytest.approx((0.094535 + 0.005361 + 0.193147) / 6, abs=1e-6)   # 0.048840


def test_explained_variance():
    returns = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    mask = torch.ones(1, 4)
    assert ppo.explained_variance(returns, returns, mask) == pytest.approx(1.0)
    assert ppo.explained_variance(torch.full((1, 4), 2.5), returns, mask) == pytest.approx(0.0)
    # masked (the 99 / -7 pair is padding), population variances: r - v = [0, 0, 0, -1], mean -0.25,
    # Var = (3 * 0.25^2 + 0.75^2) / 4 = 0.75 / 4 = 0.1875; r = [1, 2, 3, 4]: Var = (2.25 + 0.25 + 0.25 + 2.25) / 4
    # = 1.25; EV = 1 - 0.1875 / 1.25 = 0.85
    values, returns = torch.tensor([[1.0, 2.0, 3.0, 5.0, 99.0]]), torch.tensor([[1.0, 2.0, 3.0, 4.0, -7.0]])
    assert ppo.explained_variance(values, returns, torch.tensor([[1.0, 1, 1, 1, 0]])) == pytest.approx(0.85)


# ---------------------------------------------------------------------------------------------- with models

def _settings(**overrides):
    s = params.PpoParams(steps=3, rollout_batch=4, samples_per_image=1, minibatch_size=2, epochs=2, lr=1e-2,
                         lora_r=2, lora_alpha=4, max_new_tokens=10, beta=0.1, validate_every=100,
                         checkpoint_every=1)
    for key, value in overrides.items():
        setattr(s, key, value)
    return s


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random policy checkpoint and three random reward adapters saved on a tiny backbone."""
    arch = params.TinyArchParams(vision_hidden=32, text_hidden=32, text_layers=1, vision_layers=1, heads=2)
    tokenizer = models.build_tiny_tokenizer()
    processor = models.build_tiny_processor(tokenizer, 32, 8)
    root = tmp_path_factory.mktemp("ppo")
    models.save_lvlm(models.build_tiny_llava(arch, 32, tokenizer, seed=0), processor, root / "policy")
    models.save_lvlm(models.build_tiny_llava(arch, 32, tokenizer, seed=1), processor, root / "backbone")
    lvlm, proc = models.load_lvlm(str(root / "backbone"), device="cpu")
    rm = reward.RewardModels.create(lvlm, proc, PROMPT, r=2, alpha=4, seed=0)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in rm.model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    rm.save(root / "reward_models")
    return root


def _images(n, seed=0):
    return list(np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8))


def _trainer(root, settings, dtype="float32"):
    policy, processor = ppo.policy_model(str(root / "policy"), settings.lora_r, settings.lora_alpha, dtype=dtype,
                                         device="cpu")
    lvlm, proc = models.load_lvlm(str(root / "backbone"), dtype=dtype, device="cpu")
    rm = reward.RewardModels.load(lvlm, proc, PROMPT, root / "reward_models")
    head = ppo.add_value_adapter(rm, "object_reward", seed=0)
    return ppo.Trainer(policy, processor, rm, head, settings, reward.FACT_TYPES, PROMPT)


def test_value_adapter_starts_from_the_object_reward_model(tiny):
    trainer = _trainer(tiny, _settings())
    pairs = [(module.lora_A, module.lora_B) for module in trainer.rm.model.modules()
             if hasattr(module, "lora_A") and "value" in module.lora_A]
    assert pairs                                # a value adapter exists (else the loop below checks nothing)
    for lora_a, lora_b in pairs:
        assert torch.equal(lora_a["value"].weight, lora_a["object"].weight)
        assert torch.equal(lora_b["value"].weight, lora_b["object"].weight)
    assert any(torch.count_nonzero(lora_b["object"].weight) for _, lora_b in pairs)   # not two untrained zeros
    assert set(trainer.value_params) and all("value" in n or n.startswith("head.") for n in trainer.value_params)


def test_value_adapter_has_no_dropout_when_the_reward_models_had_some(tiny):
    lvlm, proc = models.load_lvlm(str(tiny / "backbone"), device="cpu")
    rm = reward.RewardModels.create(lvlm, proc, PROMPT, r=2, alpha=4, dropout=0.05, seed=0)
    ppo.add_value_adapter(rm, "object_reward", seed=0)
    assert rm.model.peft_config["object"].lora_dropout == 0.05
    assert rm.model.peft_config["value"].lora_dropout == 0.0    # old and new values: one deterministic function


def test_whitened_rewards_are_scaled_not_shifted(tiny):
    images = _images(6)
    plain = _trainer(tiny, _settings(max_new_tokens=16, sparse=True))
    token_ids, ends = plain.rollout(images, list(range(6)), seed=2)
    labels = plain.score(images, token_ids, ends)
    raw_batch = plain.make_batch(images, list(range(6)), token_ids, ends, labels)
    raw, response_tokens = raw_batch.fine_grained, raw_batch.mask.bool()

    def fine_grained(**settings):
        return _trainer(tiny, _settings(max_new_tokens=16, **settings)).make_batch(
            images, list(range(6)), token_ids, ends, labels).fine_grained
    whitened = fine_grained(sparse=True, whiten_rewards=True)
    assert raw.abs().sum() > 0 and torch.equal(whitened == 0, raw == 0)   # still only on the last tokens
    # divided by the standard deviation of the six responses' totals
    std = torch.sqrt((raw * response_tokens).sum(1).var(unbiased=False))
    assert torch.allclose(whitened, raw / std, atol=1e-6)
    assert not torch.allclose(std, torch.ones(())) and not torch.allclose(whitened, raw)
    # the dense reward of the same labels gets the same factor, so sparse still carries the same sum per response
    dense = fine_grained(sparse=False, whiten_rewards=True)
    assert torch.allclose((dense * response_tokens).sum(1), (whitened * response_tokens).sum(1), atol=1e-5)
    # reward_scale applies after whitening (before, whitening would cancel it)
    assert torch.allclose(fine_grained(sparse=True, whiten_rewards=True, reward_scale=3.0), 3 * whitened, atol=1e-6)


def test_the_batch_log_probs_are_those_of_the_sampling_temperature(tiny):
    """PPO's old log-probs (and so its ratio) must be the distribution the actions were drawn from: at temperature
    0.7 the forward pass divides the logits by 0.7, and the temperature-1 values differ."""
    images = _images(4)
    cold = _trainer(tiny, _settings(max_new_tokens=12, temperature=0.7))
    token_ids, ends = cold.rollout(images, list(range(4)), seed=5)
    labels = cold.score(images, token_ids, ends)
    batch = cold.make_batch(images, list(range(4)), token_ids, ends, labels)
    with torch.no_grad():
        expected = ppo.response_logprobs(cold.policy, batch.input_ids, batch.pixel_values, len(cold.prompt), 0.7)
        plain = ppo.response_logprobs(cold.policy, batch.input_ids, batch.pixel_values, len(cold.prompt), 1.0)
    assert torch.allclose(batch.logprobs, expected * batch.mask, atol=1e-5)
    assert not torch.allclose(batch.logprobs, plain * batch.mask, atol=1e-3)
    warm = _trainer(tiny, _settings(max_new_tokens=12)).make_batch(images, list(range(4)), token_ids, ends, labels)
    assert torch.allclose(warm.logprobs, plain * batch.mask, atol=1e-5)


def test_whitening_leaves_rewards_alone_when_every_response_earned_the_same_total():
    # totals 2 and 2: no spread to divide by (dividing by sqrt(0 + 1e-8) multiplied them by 10,000)
    rewards = torch.tensor([[1.0, 0, 1, 0], [0, 0, 2, 0]])
    mask = torch.tensor([[1.0, 1, 1, 0], [1, 1, 1, 1]])
    assert torch.equal(ppo.scale_to_unit_response_std(rewards, mask), rewards)
    spread = torch.tensor([[1.0, 0, 1, 0], [0, 0, -2, 0]])   # totals 2 and -2: std 2
    assert torch.allclose(ppo.scale_to_unit_response_std(spread, mask), spread / 2)


def test_prompt_images_pass_through_every_image_once_per_pass():
    orders = [ppo.prompt_order(10, 4, iteration, seed=3) for iteration in range(1, 6)]   # 20 positions: 2 passes
    flat = [i for order in orders for i in order]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:]) == list(range(10))
    assert flat[:10] != flat[10:]                                  # each pass its own order
    assert ppo.prompt_order(10, 4, 2, seed=3) == orders[1]         # a resumed run asks for the same images
    assert ppo.prompt_order(10, 4, 2, seed=4) != orders[1]


def test_rollout_decodes_in_chunks_of_rollout_chunk(tiny, monkeypatch):
    images = _images(6)
    whole = _trainer(tiny, _settings(max_new_tokens=8)).rollout(images, list(range(6)), seed=0)
    calls = []
    sample = ppo.rollout.sample
    monkeypatch.setattr(ppo.rollout, "sample", lambda model, processor, chunk, *a, **k: (
        calls.append(len(chunk)), sample(model, processor, chunk, *a, **k))[1])
    same = _trainer(tiny, _settings(max_new_tokens=8, rollout_chunk=6)).rollout(images, list(range(6)), seed=0)
    assert calls == [6] and same == whole                          # one chunk: the batch as before
    chunked = _trainer(tiny, _settings(max_new_tokens=8, rollout_chunk=4))
    token_ids, ends = chunked.rollout(images, list(range(6)), seed=0)
    assert calls[1:] == [4, 2] and len(token_ids) == len(ends) == 6
    assert chunked.rollout(images, list(range(6)), seed=0) == (token_ids, ends)   # seeded per chunk


def test_reward_models_score_in_chunks_of_rollout_chunk(tiny, monkeypatch):
    images = _images(6)
    trainer = _trainer(tiny, _settings(max_new_tokens=8))
    token_ids, ends = trainer.rollout(images, list(range(6)), seed=0)
    assert sum(len(e) for e in ends) > 0
    whole = [np.asarray(labels).tolist() for labels in trainer.score(images, token_ids, ends)]
    sizes = []
    score = trainer.rm.score
    monkeypatch.setattr(trainer.rm, "score", lambda *a, batch_size, **k: (sizes.append(batch_size),
                                                                          score(*a, batch_size=batch_size, **k))[1])
    assert [np.asarray(labels).tolist() for labels in trainer.score(images, token_ids, ends)] == whole
    assert sizes == [6]                                                    # rollout_chunk 0: the whole share
    trainer.s.rollout_chunk = 4
    assert [np.asarray(labels).tolist() for labels in trainer.score(images, token_ids, ends)] == whole
    assert sizes[1:] == [4]


def test_the_batch_s_forward_passes_in_chunks_give_the_whole_batch_s_numbers(tiny):
    images = _images(6)
    trainer = _trainer(tiny, _settings(max_new_tokens=8))
    token_ids, ends = trainer.rollout(images, list(range(6)), seed=0)
    labels = trainer.score(images, token_ids, ends)
    with mock.patch.object(ppo, "response_values", wraps=ppo.response_values) as values:
        whole = trainer.make_batch(images, list(range(6)), token_ids, ends, labels)
        trainer.s.rollout_chunk = 4
        chunked = trainer.make_batch(images, list(range(6)), token_ids, ends, labels)
    assert [call.args[2].shape[0] for call in values.call_args_list] == [6, 4, 2]
    for name in ("logprobs", "ref_logprobs", "entropy", "values", "rewards", "advantages", "returns"):
        assert torch.allclose(getattr(chunked, name), getattr(whole, name), atol=1e-5), name


def test_kl_lowers_the_reward_when_the_policy_moves_away(tiny):
    trainer = _trainer(tiny, _settings(max_new_tokens=16))
    n = 64
    images = _images(n)
    with torch.no_grad():   # move the policy away from the reference (LoRA B starts at zero: policy == reference)
        for name, p in trainer.policy_params.items():
            if "lora_B" in name:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
    token_ids, ends = trainer.rollout(images, list(range(n)), seed=0)     # sampled from the moved policy
    labels = trainer.score(images, token_ids, ends)
    moved = trainer.make_batch(images, list(range(n)), token_ids, ends, labels)
    response_kl = moved.kl.sum(1)
    # log pi - log pi_ref on pi's own samples estimates KL(pi || ref) >= 0: positive beyond twice its standard error
    assert float(response_kl.mean()) > 2 * float(response_kl.std() / n ** 0.5)
    assert torch.allclose(moved.rewards.sum(1), moved.fine_grained.sum(1) - 0.1 * response_kl, atol=1e-5)
    assert float(moved.rewards.sum()) < float(moved.fine_grained.sum())
    saved = {n: p.detach().clone() for n, p in trainer.policy_params.items()}
    with torch.no_grad():
        for name, p in trainer.policy_params.items():
            if "lora_B" in name:
                p.zero_()
    at_reference = trainer.make_batch(images, list(range(n)), token_ids, ends, labels)
    assert float(at_reference.kl.abs().max()) < 1e-5
    assert torch.equal(at_reference.rewards, at_reference.fine_grained)
    assert torch.equal(moved.fine_grained, at_reference.fine_grained)
    with torch.no_grad():
        for n, p in trainer.policy_params.items():
            p.copy_(saved[n])


def test_rollout_never_emits_the_image_token_and_positions_index_sampled_ids(tiny):
    trainer = _trainer(tiny, _settings(max_new_tokens=12))
    image_token = trainer.tokenizer.image_token_id
    base = trainer.policy.get_base_model()
    with torch.no_grad():    # <image> made by far the likeliest next token (test_rollout's rig), in place
        base.lm_head.weight.copy_(_rig_towards(base, trainer.processor, image_token).lm_head.weight)
    images = _images(6)
    token_ids, ends = trainer.rollout(images, list(range(6)), seed=1)
    assert all(image_token not in ids for ids in token_ids)
    actions = [ppo.action_ids(ids, 12, trainer.eos) for ids in token_ids]
    input_ids, mask = ppo.sequence_batch(trainer.prompt, actions, trainer.pad)
    with torch.no_grad():
        logits = trainer.policy(input_ids=input_ids, pixel_values=reward.pixel_values(trainer.processor, images)).logits
    favoured = logits[:, len(trainer.prompt) - 1:-1].argmax(-1) == image_token
    assert favoured[:, 0].all(), "the rig should favour <image> as every response's first token"
    # each end position is the first token whose prefix decodes as far as a sub-sentence's end (split of the text)
    assert any(ends)
    for ids, e in zip(token_ids, ends):
        span_ends = [end for _, end in segment.split_subsentences(trainer.decode(ids))]
        reached = [len(trainer.decode(ids[:k + 1])) for k in range(len(ids))]
        assert e == sorted({next(k for k, n in enumerate(reached) if n >= end) for end in span_ends})
        assert all(0 <= k < len(ids) for k in e)


def _flat(trainer):
    return torch.cat([p.detach().flatten() for p in list(trainer.policy_params.values()) +
                      list(trainer.value_params.values())])


def _with_policy_dropout(trainer, p=0.5):
    """The trainer with dropout on the policy's LoRA input: its update then draws from torch's random stream."""
    for module in trainer.policy.modules():
        if hasattr(module, "lora_dropout") and ppo.POLICY_ADAPTER in module.lora_dropout:
            module.lora_dropout[ppo.POLICY_ADAPTER] = torch.nn.Dropout(p)
    return trainer


@pytest.mark.parametrize("engine", ["generate", "static"])
def test_stop_and_resume_reproduce_an_uninterrupted_run(tiny, tmp_path, engine):
    """With the static engine (own sampling generator) and dropout in the update, only the per-iteration reseed
    of torch's stream makes the resumed run repeat the uninterrupted one."""
    scenes = [{"image_id": i} for i in range(12)]
    images = {i: im for i, im in enumerate(_images(12, seed=5))}
    load = lambda chunk: [images[s["image_id"]] for s in chunk]  # noqa: E731
    make = lambda: _with_policy_dropout(_trainer(tiny, _settings(rollout_engine=engine)))  # noqa: E731
    straight = make()
    state = ppo.train(straight, scenes, load, straight.s, seed=0, checkpoint_dir=tmp_path / "a",
                      log_path=tmp_path / "a.jsonl")
    assert state["iteration"] == 3
    first = make()
    ppo.train(first, scenes, load, first.s, seed=0, checkpoint_dir=tmp_path / "b", log_path=tmp_path / "b.jsonl",
              stop_after=2)
    torch.manual_seed(1234)                                    # a fresh process starts its random stream anew
    resumed = make()                                           # a fresh process: everything from the checkpoint
    scalars = []
    writer = type("Writer", (), {"add_scalar": lambda self, *a: scalars.append(a)})()
    state_b = ppo.train(resumed, scenes, load, resumed.s, seed=0, checkpoint_dir=tmp_path / "b",
                        log_path=tmp_path / "b.jsonl", writer=writer)
    assert ("kl", state_b["log"][-1]["kl"], 3) in scalars     # the resumed iteration, to TensorBoard too
    assert state_b["iteration"] == 3
    assert torch.equal(_flat(straight), _flat(resumed))
    log_a = [json.loads(l) for l in (tmp_path / "a.jsonl").read_text().splitlines()]
    log_b = [json.loads(l) for l in (tmp_path / "b.jsonl").read_text().splitlines()]
    strip = lambda row: {k: v for k, v in row.items() if not k.endswith("_s")}  # noqa: E731
    assert [strip(r) for r in log_a] == [strip(r) for r in log_b]
    for key in ("approx_kl", "clip_fraction", "explained_variance", "reward_object", "kl", "entropy",
                "response_length", "subsentences", "value_loss", "rollout_s", "scoring_s", "reference_s", "update_s"):
        assert key in log_a[-1]
    # training moved the adapter away from the reference
    assert log_a[-1]["kl_per_token"] != 0


WORKER = r'''
import json, sys, numpy as np, torch, torch.distributed as dist
sys.path.insert(0, sys.argv[1])
from tests.test_ppo import _trainer, _settings, _images, _flat, _recording_grad_norms
from fgaif_utils import launch
from pathlib import Path
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.set_num_threads(1)
trainer = _trainer(Path(sys.argv[2]), _settings(minibatch_size=8, epochs=2))
images, token_ids, ends, labels = torch.load(sys.argv[3], weights_only=False)
mine = slice(rank, None, world)
batch = trainer.make_batch(images[mine], list(range(8))[mine], token_ids[mine], ends[mine], labels[mine])
norms = []
torch.nn.utils.clip_grad_norm_ = _recording_grad_norms(norms)
stats = trainer.update(batch, seed=0)
norms = list(norms)   # the first update's (the one below records into the old list)
flat = _flat(trainer)
gathered = [torch.zeros_like(flat) for _ in range(world)]
dist.all_gather(gathered, flat)
# two minibatches per epoch (a rank's permutation, the token count reduced per minibatch, four Adam steps)
several = _trainer(Path(sys.argv[2]), _settings(minibatch_size=4, epochs=2))
several.update(several.make_batch(images[mine], list(range(8))[mine], token_ids[mine], ends[mine], labels[mine]),
               seed=0)
flat_several = _flat(several)
gathered_several = [torch.zeros_like(flat_several) for _ in range(world)]
dist.all_gather(gathered_several, flat_several)
if rank == 0:
    torch.save({"flat": flat, "same": all(torch.equal(g, flat) for g in gathered), "stats": stats, "norms": norms,
                "same_with_minibatches": all(torch.equal(g, flat_several) for g in gathered_several),
                "moved_with_minibatches": not torch.equal(flat_several, flat)}, sys.argv[4])
launch.all_ranks_finished(Path(sys.argv[4]).with_name(launch.FINISHED))   # as fgaif_utils.launch ends a rank
dist.destroy_process_group()
'''


def _recording_grad_norms(norms):
    """torch's clip_grad_norm_, appending each total norm it measures (before it clips) to `norms`."""
    clip = torch.nn.utils.clip_grad_norm_

    def recording(*args, **kwargs):
        norm = clip(*args, **kwargs)
        norms.append(float(norm))
        return norm
    return recording


def _one_process_update_and_two_ranks(tiny, tmp_path, worker, port):
    """One process updates on a rollout batch of 8; then `worker` runs under torchrun with 2 gloo ranks on the same
    batch (half each). Returns (the single trainer, its update stats with "norms": the policy's and the value
    model's gradient norm at each Adam step, what the worker's rank 0 saved)."""
    single = _trainer(tiny, _settings(minibatch_size=8, epochs=2))
    images = _images(8, seed=9)
    token_ids, ends = single.rollout(images, list(range(8)), seed=3)
    labels = single.score(images, token_ids, ends)
    torch.save((images, token_ids, ends, labels), tmp_path / "batch.pt")
    batch = single.make_batch(images, list(range(8)), token_ids, ends, labels)
    norms = []
    with mock.patch.object(torch.nn.utils, "clip_grad_norm_", _recording_grad_norms(norms)):
        stats = {**single.update(batch, seed=0), "norms": norms}     # policy, value, policy, value (2 epochs)
    _torchrun(tmp_path, worker, port, str(tiny), str(tmp_path / "batch.pt"), str(tmp_path / "out.pt"))
    return single, stats, torch.load(tmp_path / "out.pt")


WORKER_ENV = {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def _torchrun_argv(tmp_path, worker, port, *args):
    """Write the `worker` script into tmp_path; the argv that runs it as 2 gloo ranks (argv[1] is the repository)."""
    (tmp_path / "worker.py").write_text(worker)
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
            str(tmp_path / "worker.py"), str(REPO), *args]


def _torchrun(tmp_path, worker, port, *args):
    """Run `worker` as 2 gloo ranks and judge the exit as stage 05 does (`launch.settle`): a failure raises
    LaunchError with the log, a crash after every rank finished (the marker beside the output) only warns."""
    argv = _torchrun_argv(tmp_path, worker, port, *args)
    with open(tmp_path / "ranks.log", "w") as log:
        ranks = subprocess.Popen(argv, env={**os.environ, **WORKER_ENV}, stdout=log, stderr=subprocess.STDOUT)
        try:
            ranks.wait(timeout=300)
        except subprocess.TimeoutExpired:      # a hung collective: SIGTERM lets torchrun take its ranks down too
            ranks.terminate()
            ranks.wait(timeout=60)
            raise
    launch.settle(ranks.returncode, tmp_path / launch.FINISHED, tmp_path / "ranks.log", "torchrun worker.py")


def test_two_process_gloo_update_matches_one_process(tiny, tmp_path):
    single, stats, out = _one_process_update_and_two_ranks(tiny, tmp_path, WORKER, 29517)
    assert out["same"]                                     # both ranks hold identical parameters
    assert out["same_with_minibatches"] and out["moved_with_minibatches"]   # also after 2 minibatches an epoch
    assert torch.allclose(out["flat"], _flat(single), atol=1e-5, rtol=1e-4)
    _assert_same_update_stats(out, stats)


def _assert_same_update_stats(out, stats):
    """The ranks' gradients add up to one process's (Adam and clipping would hide a factor: the norms do not)."""
    assert out["stats"]["policy_loss"] == pytest.approx(stats["policy_loss"], abs=1e-5)
    for key in ("grad_norm", "value_loss", "approx_kl", "clip_fraction"):
        assert out["stats"][key] == pytest.approx(stats[key], rel=1e-4), key
    assert len(stats["norms"]) == 4 and min(stats["norms"]) > 0
    assert out["norms"] == pytest.approx(stats["norms"], rel=1e-4)


ZERO3_WORKER = r'''
import sys, torch, torch.distributed as dist
sys.path.insert(0, sys.argv[1])
from pathlib import Path
from tests.test_ppo import _trainer, _settings, _flat
from fgaif_utils import launch, ppo
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.set_num_threads(1)
images, token_ids, ends, labels = torch.load(sys.argv[3], weights_only=False)
mine = slice(rank, None, world)
checkpoint = Path(sys.argv[4]).parent / "checkpoint"


ZERO3 = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}   # every parameter partitioned


def base_elements(trainer):
    """(elements this rank holds, elements in all) of the policy's and the reward / value base's frozen weights."""
    lvlms = (trainer.policy.get_base_model(), trainer.rm.model.base_model.model.lvlm)
    bases = [p for lvlm in lvlms for n, p in lvlm.named_parameters() if "lora_" not in n]
    partitioned = lambda p: hasattr(p, "ds_tensor")  # noqa: E731
    return (sum(p.ds_tensor.numel() if partitioned(p) else p.numel() for p in bases),
            sum(p.ds_numel if partitioned(p) else p.numel() for p in bases))


def zero3_trainer(dtype="float32"):   # as run_job does: the bases load straight into partitions, then the engines
    with ppo.partitioned_loading(ZERO3, dtype):
        trainer = _trainer(Path(sys.argv[2]), _settings(minibatch_size=8, epochs=2), dtype)
    trainer.at_load = base_elements(trainer)
    ppo.use_deepspeed(trainer, ZERO3)
    return trainer


def update(trainer, seed):
    labels_here = trainer.score(images[mine], token_ids[mine], ends[mine])    # scored under ZeRO-3 on this rank
    assert [l.tolist() for l in labels_here] == [l.tolist() for l in labels[mine]]
    batch = trainer.make_batch(images[mine], list(range(8))[mine], token_ids[mine], ends[mine], labels_here)
    return trainer.update(batch, seed=seed)


def whole(trainer):
    with ppo.full_weights(trainer):
        return _flat(trainer)


def recording_grad_norms(trainer, norms):
    """Each engine's step appends the global gradient norm it measured (before it clipped) to `norms`."""
    for engine in trainer.engines:
        def step(step=engine.step, engine=engine):
            step()
            norms.append(float(engine.get_global_grad_norm()))
        engine.step = step


trainer = zero3_trainer()
norms = []
recording_grad_norms(trainer, norms)
# a rank whose responses closed no sub-sentence still joins the other rank's reward-model forwards (else: a hang)
nothing = [[] for _ in token_ids[mine]]
trainer.score(images[mine], nothing, nothing) if rank == 1 else trainer.score(images[mine], token_ids[mine], ends[mine])
held = sum(p.ds_tensor.numel() for module in (trainer.policy, trainer.rm.model) for p in module.parameters())
total = sum(p.ds_numel for module in (trainer.policy, trainer.rm.model) for p in module.parameters())
at_start = whole(trainer)
stats = update(trainer, seed=0)
norms = list(norms)                    # the first update's: policy, value, policy, value
ppo.save_checkpoint(trainer, checkpoint, {"iteration": 1, "log": [], "stopped": None}, rank)
after_one = whole(trainer)
resumed = zero3_trainer()              # a fresh start: weights and Adam states from the checkpoint
ppo.load_checkpoint(resumed, checkpoint)
restored = whole(resumed)
update(trainer, seed=1)
update(resumed, seed=1)
bf16 = zero3_trainer("bfloat16")       # the paper profile's bases: partitions keep their dtype, adapters fp32
dtypes = {kind: sorted({str(p.ds_tensor.dtype) for n, p in bf16.policy.named_parameters() if ("lora_" in n) == lora})
          for kind, lora in (("base", False), ("adapter", True))}
bf16_batch = bf16.make_batch(images[mine], list(range(8))[mine], token_ids[mine], ends[mine], labels[mine])
bf16_start, bf16_norms = whole(bf16), []
recording_grad_norms(bf16, bf16_norms)
bf16.update(bf16_batch, seed=0)
bf16_step = whole(bf16) - bf16_start
two, two_resumed = whole(trainer), whole(resumed)   # gathering is a collective: every rank takes part
if rank == 0:
    torch.save({"held": held, "total": total, "at_load": trainer.at_load, "after_one": after_one,
                "restored": restored, "stats": stats, "norms": norms, "two": two, "two_resumed": two_resumed,
                "bf16_dtypes": dtypes, "start": at_start, "bf16_start": bf16_start, "bf16_step": bf16_step,
                "bf16_norms": bf16_norms},
               sys.argv[4])
launch.all_ranks_finished(Path(sys.argv[4]).with_name(launch.FINISHED))
dist.destroy_process_group()
'''


def test_zero3_ranks_hold_half_of_every_model_and_update_as_one_process(tiny, tmp_path):
    # DeepSpeed ZeRO stage 3 (ppo.deepspeed): each of 2 ranks loads and keeps half of the policy and of the reward /
    # value base, scores the labels the unwrapped reward models give, updates as one process does on the same batch,
    # and a checkpoint (the partitioned Adam states included) continues the same trajectory in a fresh trainer
    single, stats, out = _one_process_update_and_two_ranks(tiny, tmp_path, ZERO3_WORKER, 29518)
    assert out["held"] == pytest.approx(out["total"] / 2, rel=0.01)
    held_at_load, bases = out["at_load"]          # loaded straight into partitions: never a whole base on a rank
    assert held_at_load == pytest.approx(bases / 2, rel=0.01)
    assert torch.allclose(out["after_one"], _flat(single), atol=1e-5, rtol=1e-4)
    _assert_same_update_stats(out, stats)
    assert torch.equal(out["restored"], out["after_one"])
    assert torch.equal(out["two"], out["two_resumed"]) and not torch.equal(out["two"], out["after_one"])
    assert out["bf16_dtypes"] == {"base": ["torch.bfloat16"], "adapter": ["torch.float32"]}
    # bf16 bases: the same start but for bf16's rounding of the initial adapters (relative 2^-8), gradients within 5%
    # of fp32's (measured: within 2.7%) and an update close to fp32's, not equal. Adam's first steps are about
    # lr * sign(gradient), so elements whose gradient is near 0 flip with bf16's rounding: measured 0.21, bound 0.3
    assert torch.allclose(out["bf16_start"], out["start"], rtol=2 ** -8, atol=0)
    assert out["bf16_norms"] == pytest.approx(out["norms"], rel=0.05)
    step = out["after_one"] - out["start"]
    assert step.norm() > 0 and not torch.equal(out["bf16_step"], step)
    assert (out["bf16_step"] - step).norm() < 0.3 * step.norm()


MEAN_WORKER = r'''
import json, sys, torch.distributed as dist
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from fgaif_utils import launch, ppo
dist.init_process_group("gloo")
rank = dist.get_rank()
row = {"iteration": 3, "kl": [1.0, 3.0][rank], "halluc_share_relation": [None, 0.5][rank],
       "halluc_share_attribute": None, "note": "text", "kl_per_token": [0.1, 0.0][rank], "halluc_share_object": 0.5 * rank,
       ppo.RANK_WEIGHTS: {"kl_per_token": [100.0, 10.0][rank], "halluc_share_relation": [0.0, 3.0][rank],
                          "halluc_share_object": [1.0, 3.0][rank], **{key: 2.0 for key in ppo.EV_MOMENTS}}}
# returns {0, 2} against values {1, 1} on rank 0, {10, 12} against {11, 11} on rank 1: each rank's own EV is 0
row.update(zip(ppo.EV_MOMENTS, [[1.0, 2.0, 0.0, 1.0], [11.0, 122.0, 0.0, 1.0]][rank]), explained_variance=0.0)
mean = ppo._mean_over_ranks(row)
if rank == 0:
    open(sys.argv[2], "w").write(json.dumps(mean))
launch.all_ranks_finished(Path(sys.argv[2]).with_name(launch.FINISHED))
dist.destroy_process_group()
'''


def test_cpu_tensors_are_reduced_on_the_gpu_under_a_plain_nccl_group(monkeypatch):
    """NCCL all-reduces CUDA tensors only; GAE's whitening and the log row reduce CPU tensors."""
    monkeypatch.setattr(ppo.dist, "get_backend", lambda: "nccl")
    monkeypatch.setattr(ppo.torch.cuda, "current_device", lambda: 1)
    assert ppo._collective_device(torch.device("cpu")) == torch.device("cuda", 1)
    assert ppo._collective_device(torch.device("cuda", 1)) == torch.device("cuda", 1)
    for backend in ("gloo", "cpu:gloo,cuda:nccl"):
        monkeypatch.setattr(ppo.dist, "get_backend", lambda backend=backend: backend)
        assert ppo._collective_device(torch.device("cpu")) == torch.device("cpu")


def test_log_rows_average_over_ranks_when_a_value_is_missing_on_one_rank(tmp_path):
    # a rank without judged relations logs None; the ranks must still send matching tensors (a gloo size
    # mismatch aborted the 2-process smoke job once the existence gate made such rows common)
    _torchrun(tmp_path, MEAN_WORKER, 29519, str(tmp_path / "out.json"))
    mean = json.loads((tmp_path / "out.json").read_text())
    # per-token means weighted by the ranks' tokens (100 tokens at 0.1, 10 at 0.0: the global 10 / 110, not 0.05),
    # shares by judged sub-sentences (1 judged at 0.0, 3 at 0.5: 1.5 / 4); per-response means equally
    # explained variance over both ranks' tokens: Var(returns) = 62 - 6^2 = 26, Var(residuals) = 1: 1 - 1/26
    assert mean == {"iteration": 3, "kl": 2.0, "halluc_share_relation": 0.5, "halluc_share_attribute": None,
                    "note": "text", "kl_per_token": pytest.approx(10 / 110), "halluc_share_object": pytest.approx(1.5 / 4),
                    "explained_variance": pytest.approx(1 - 1 / 26)}


def test_one_process_log_row_drops_the_rank_weights():
    row = {"iteration": 1, "kl_per_token": 0.2, ppo.RANK_WEIGHTS: {"kl_per_token": 7.0}}
    assert ppo._mean_over_ranks(row) == {"iteration": 1, "kl_per_token": 0.2}
    # returns {1, 3} against values {1, 2}: residuals {0, 1}; 1 - Var(residuals) / Var(returns) = 1 - 0.25 / 1
    moments = dict(zip(ppo.EV_MOMENTS, (2.0, 5.0, 0.5, 0.5)), explained_variance=0.75)
    assert ppo._mean_over_ranks(moments) == {"explained_variance": pytest.approx(0.75)}   # the moments leave the row
    assert ppo.RANK_WEIGHTS in row   # the caller's row is left as it was


def test_repeated_sub_sentences_earn_nothing_when_repeats_are_not_rewarded():
    # "a red heart ." twice, then "a star ." : sub-sentences end at the periods (token 3, 7, 10)
    ids = [5, 6, 7, 9, 5, 6, 7, 9, 5, 8, 9]
    assert ppo.repeated_subsentences(ids, [3, 7, 10]) == [False, True, False]
    labels = [[0, 0, -1], [0, 0, -1], [1, -1, -1]]
    rewards = ppo.fine_grained_rewards(labels, [3, 7, 10], 12, np.ones(3), skip=[False, True, False])
    assert rewards.tolist() == pytest.approx([0, 0, 0, 2, 0, 0, 0, 0, 0, 0, -1, 0])


CRASH_WORKER = r'''
import os, sys, torch.distributed as dist
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from fgaif_utils import launch
dist.init_process_group("gloo")
if sys.argv[2] == "after":
    launch.all_ranks_finished(Path(sys.argv[3]))
if dist.get_rank() == 1:
    os.abort()                         # SIGABRT, as gloo's teardown once did
launch.all_ranks_finished(Path(sys.argv[3]))
dist.destroy_process_group()
'''


@pytest.mark.parametrize("when", ["before", "after"])
def test_a_rank_crashing_fails_the_job_unless_every_rank_had_finished(tmp_path, capsys, when):
    # launch.run's verdict: a crash after the ranks' final barrier (rank 0 wrote the marker) loses nothing and
    # warns; one before it fails, even when a marker from an earlier run is lying there
    marker = tmp_path / launch.FINISHED
    marker.write_text("from an earlier run\n")
    argv = _torchrun_argv(tmp_path, CRASH_WORKER, 29520, when, str(marker))
    if when == "before":
        with pytest.raises(launch.LaunchError, match=r"exited with status 1; log .*crash.log"):
            launch.run(argv, tmp_path / "crash.log", env=WORKER_ENV, finished=marker)
        assert not marker.exists()
    else:
        assert launch.run(argv, tmp_path / "crash.log", env=WORKER_ENV, finished=marker) == 1
        assert marker.read_text() == "every rank finished its work\n"
        assert "after every rank had finished its work" in capsys.readouterr().out
        assert (tmp_path / "crash.log").read_text().splitlines()[-1].startswith("WARNING: ")


def test_launch_picks_a_free_port_unless_told_one():
    with socket.socket() as held:            # another job holds the port the launcher once always used
        try:
            held.bind(("127.0.0.1", 29531))
        except OSError:
            pytest.skip("port 29531 is taken on this machine already")
        held.listen()
        argv = launch.command("torchrun", 1, "p.yaml", "r", "d", "m", "w", "o", "c")
        with socket.socket() as ranks:       # the chosen one is free: the ranks can meet there
            ranks.bind(("127.0.0.1", int(argv[argv.index("--master_port") + 1])))


def test_launch_commands():
    argv = launch.command("torchrun", 4, "p.yaml", "r", "d", "m", "w", "o", "c", master_port=1234)
    assert argv[1:7] == ["-m", "torch.distributed.run", "--nproc_per_node", "4", "--master_port", "1234"]
    assert argv[argv.index("-m", 2):][:2] == ["-m", "fgaif_utils.launch"] and "--run-name" in argv
    accel = launch.command("accelerate", 2, "p.yaml", "r", "d", "m", "w", "o", "c", master_port=4321)
    assert accel[1:4] == ["launch", "--num_processes", "2"] and "--multi_gpu" in accel
    assert accel[accel.index("--main_process_port") + 1] == "4321"
    with pytest.raises(ValueError, match="launcher"):
        launch.command("mpirun", 2, "p.yaml", "r", "d", "m", "w", "o", "c")


def test_launch_refuses_more_ranks_than_gpus(monkeypatch):
    # on a GPU box rank k takes cuda:k; a rank without a device would fail deep in model loading
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert launch.command("torchrun", 2, "p.yaml", "r", "d", "m", "w", "o", "c")[4] == "2"
    with pytest.raises(ValueError, match=r"p\.yaml: key 'ppo\.nproc' is 4, but this machine has 2 CUDA device"):
        launch.command("torchrun", 4, "p.yaml", "r", "d", "m", "w", "o", "c")


def test_oracle_labels_by_hand_and_the_trainer_scores_with_them(tiny):
    trainer = _trainer(tiny, _settings(max_new_tokens=12))
    scene = {"image_id": 5, "objects": [
        {"shape": "heart", "colour": "blue", "size": "small", "cx": 30, "cy": 30},
        {"shape": "star", "colour": "yellow", "size": "large", "cx": 8, "cy": 10},
        {"shape": "ring", "colour": "orange", "size": "large", "cx": 56, "cy": 10}]}
    text = "there is a small red heart . the star is left of the ring . i can see a large green square ."
    ids = trainer.tokenizer(text, add_special_tokens=False)["input_ids"]
    # red is wrong (attribute); the relation holds; no square (object; its colour and size are not judged)
    labels = ppo.ground_truth_labels(ids, trainer.decode, scene)
    assert labels.tolist() == [[0, 1, -1], [0, -1, 0], [1, -1, -1]]
    assert len(labels) == len(segment.subsentence_end_positions(ids, trainer.decode))
    assert ppo.ground_truth_labels([], trainer.decode, scene).shape == (0, 3)

    images, image_ids = _images(4, seed=4), [5, 6, 7, 8]
    token_ids, ends = trainer.rollout(images, image_ids, seed=2)
    token_ids[0], ends[0] = ids, segment.subsentence_end_positions(ids, trainer.decode)
    token_ids[1], ends[1] = ids, ends[0]          # the same text about image 6, whose scene is empty
    trainer.oracle_scenes = {5: scene, **{i: {"image_id": i, "objects": []} for i in image_ids[1:]}}
    trainer.rm.score = None    # the oracle never asks the reward models
    try:
        scored = trainer.score(images, token_ids, ends, image_ids)
    finally:
        del trainer.rm.score
        trainer.oracle_scenes = None
    assert scored[0].tolist() == labels.tolist()
    # in an empty scene heart, star, ring and square are all absent: each sub-sentence hallucinates an object, and
    # the colour, size and relation of an absent object are not judged
    assert scored[1].tolist() == [[1, -1, -1]] * 3
    for got, e in zip(scored[2:], ends[2:]):
        assert got.shape == (len(e), 3) and (got[:, 1:] == -1).all()   # an empty scene: attributes never judged
        assert set(got[:, 0].tolist()) <= {-1, 1}                      # and no object is ever correct


def test_oracle_rewards_need_the_synthetic_world_and_three_types():
    p = params.load(params.REPO_ROOT / "params" / "smoke.yaml")
    p.ppo.oracle_rewards, p.reward.holistic = True, True
    with pytest.raises(ValueError, match="ppo.oracle_rewards"):
        ppo.run_job(p, "data", "models", "rewards", "out", "checkpoints")


# ---------------------------------------------------------------------------------------------- what no test reached

def test_logprobs_and_entropy_are_of_the_tempered_distribution_by_hand():
    class FixedLogits(torch.nn.Module):   # logits [2, 0] over a two-token vocabulary at every position
        def forward(self, input_ids, pixel_values=None, use_cache=False):
            return SimpleNamespace(logits=torch.tensor([2.0, 0.0]).expand(*input_ids.shape, 2))
    ids = torch.tensor([[1, 0, 1]])       # one prompt token, then the actions 0 and 1
    logprobs, entropy = ppo.response_logprobs(FixedLogits(), ids, None, prompt_len=1, temperature=2.0,
                                              with_entropy=True)
    # logits / 2 = [1, 0]: log p(0) = 1 - log(e + 1), log p(1) = -log(e + 1)
    z = math.log(math.e + 1)
    assert logprobs[0].tolist() == pytest.approx([1 - z, -z])
    p0 = math.e / (math.e + 1)
    assert entropy[0].tolist() == pytest.approx([-(p0 * math.log(p0) + (1 - p0) * math.log(1 - p0))] * 2)
    assert ppo.response_logprobs(FixedLogits(), ids, None, 1)[0].tolist() == pytest.approx(
        [2 - math.log(math.e ** 2 + 1), -math.log(math.e ** 2 + 1)])   # temperature 1: the logits as they are


def test_rollout_stats_by_hand():
    mask = torch.tensor([[1.0, 1, 1, 0], [1, 1, 0, 0]])                      # 5 response tokens in 2 responses
    batch = SimpleNamespace(
        mask=mask, end_positions=[[0, 2], [1]], token_ids=[[7, 8], [7, 9]],   # the first ended early: EOS action
        labels=[np.array([[0, -1, -1], [1, 0, -1]]), np.array([[1, 1, -1]])],
        fine_grained=torch.tensor([[1.0, 0, -1, 0], [0, -2, 0, 0]]),
        rewards=torch.tensor([[0.9, -0.1, -1.1, 0], [-0.1, -2.1, 0, 0]]),
        kl=torch.tensor([[0.1, 0.1, 0.1, 0], [0.1, 0.1, 0, 0]]),
        logprobs=torch.tensor([[-1.0, -2.0, -1.0, 0], [-1.0, -1.0, 0, 0]]),
        ref_logprobs=torch.tensor([[-1.5, -1.0, -1.0, 0], [-1.0, -1.0, 0, 0]]),
        entropy=torch.tensor([[1.0, 2, 3, 0], [4, 5, 0, 0]]),
        values=torch.tensor([[1.0, 2, 3, 0], [4, 5, 0, 0]]), returns=torch.tensor([[1.0, 2, 3, 0], [4, 5, 0, 0]]),
        advantages=torch.zeros(2, 4))
    row = ppo.rollout_stats(batch, reward.FACT_TYPES, [1.0, 1.0, 1.0])
    # object +1 - 1 and -1; attribute +1 and -1; relation nothing: means over the 2 responses
    assert (row["reward_object"], row["reward_attribute"], row["reward_relation"]) == (-0.5, 0.0, 0.0)
    assert row["reward_fine_grained"] == pytest.approx(-2 / 2) and row["reward_total"] == pytest.approx(-2.5 / 2)
    assert row["kl"] == pytest.approx(0.5 / 2) and row["kl_per_token"] == pytest.approx(0.5 / 5)
    # k3 = r - 1 - log r with log r = ref - logprob: -0.5 -> e^-0.5 - 0.5 = 0.10653, +1.0 -> e - 2 = 0.71828
    assert row["kl_k3_per_token"] == pytest.approx((math.exp(-0.5) - 1 + 0.5 + math.e - 1 - 1) / 5)
    assert row["entropy"] == pytest.approx(15 / 5) and row["response_length"] == 2 and row["subsentences"] == 1.5
    assert row["explained_variance"] == pytest.approx(1.0) and row["value_mean"] == pytest.approx(15 / 5)
    # judged labels: object [0, 1, 1], attribute [0, 1], relation none
    assert row["halluc_share_object"] == pytest.approx(2 / 3) and row["halluc_share_attribute"] == 0.5
    assert row["halluc_share_relation"] is None
    # what each is a mean over on this rank, for the mean over ranks: 5 response tokens; 3, 2 and 0 judged
    assert row[ppo.RANK_WEIGHTS] == {**{key: 5.0 for key in ppo.PER_TOKEN_KEYS}, "halluc_share_object": 3.0,
                                     "halluc_share_attribute": 2.0, "halluc_share_relation": 0.0}


def test_a_repeated_sub_sentence_earns_nothing_unless_reward_repeats(tiny):
    images = _images(1)
    paid = {}
    for repeats in (True, False):
        trainer = _trainer(tiny, _settings(max_new_tokens=16, reward_repeats=repeats))
        ids = trainer.processor.tokenizer("a red circle . a red circle . a blue star .",
                                          add_special_tokens=False)["input_ids"]
        ends = segment.subsentence_end_positions(ids, trainer.decode)
        assert len(ends) == 3
        labels = [np.array([[0, -1, -1], [0, -1, -1], [0, 0, -1]])]
        fine_grained = trainer.make_batch(images, [0], [ids], [ends], labels).fine_grained[0]
        paid[repeats] = fine_grained[ends].tolist()
    assert paid == {True: [1.0, 1.0, 2.0], False: [1.0, 0.0, 2.0]}


def test_a_fresh_value_adapter_is_not_the_object_reward_model(tiny):
    lvlm, proc = models.load_lvlm(str(tiny / "backbone"), device="cpu")
    rm = reward.RewardModels.load(lvlm, proc, PROMPT, tiny / "reward_models")
    head = ppo.add_value_adapter(rm, "fresh", seed=0)
    pairs = [(m.lora_A["value"].weight, m.lora_A["object"].weight, m.lora_B["value"].weight)
             for m in rm.model.modules() if hasattr(m, "lora_A") and "value" in m.lora_A]
    assert pairs and all(not torch.equal(a, obj) for a, obj, _ in pairs)
    assert all(torch.equal(b, torch.zeros_like(b)) for _, _, b in pairs)     # peft's start: B = 0, the base's values
    assert torch.equal(head.linear.weight, torch.zeros_like(head.linear.weight))


def test_k3_is_never_negative_and_its_expectation_under_the_policy_is_the_exact_kl():
    torch.manual_seed(0)
    # near the reference, as PPO's policy stays (tiny: ~0.02 nats per token); far from it k3's tail is the heavier
    logits = torch.randn(50)
    policy, reference = logits.log_softmax(0), (logits + 0.3 * torch.randn(50)).log_softmax(0)
    exact = float((policy.exp() * (policy - reference)).sum())
    per_token = ppo.k3_kl(policy, reference, torch.ones(50))
    assert float((policy.exp() * per_token).sum()) == pytest.approx(exact, rel=1e-5)
    k1 = policy - reference
    assert (k1 < 0).any() and (per_token >= 0).all()         # k1 goes below 0 on tokens pi_ref prefers; k3 never
    # and on samples it is the steadier estimate of the same number (Schulman's note on KL estimators)
    draws = torch.multinomial(policy.exp(), 200 * 64, replacement=True).reshape(200, 64)
    k1_means, k3_means = k1[draws].mean(1), per_token[draws].mean(1)
    assert float(k3_means.mean()) == pytest.approx(exact, rel=0.05) and k3_means.std() < k1_means.std()


def test_the_kl_budget_stops_the_run_and_a_resume_keeps_it_stopped(tiny, tmp_path):
    scenes = [{"image_id": i} for i in range(12)]
    images = {i: im for i, im in enumerate(_images(12, seed=5))}
    load = lambda chunk: [images[s["image_id"]] for s in chunk]  # noqa: E731
    trainer = _trainer(tiny, _settings(kl_budget=0.003, steps=5))
    state = ppo.train(trainer, scenes, load, trainer.s, seed=0, checkpoint_dir=tmp_path / "c",
                      log_path=tmp_path / "log.jsonl")
    # iteration 1 samples from the untrained adapter (KL 0); the budget reads the k3 estimate, never negative
    kls = [row["kl_k3_per_token"] for row in state["log"]]
    assert kls[0] == 0.0 and all(0 <= kl <= 0.003 for kl in kls[:-1]) and kls[-1] > 0.003
    assert state["iteration"] == len(kls) < 5 and state["stopped"].startswith("KL budget")
    again = _trainer(tiny, _settings(kl_budget=0.003, steps=5))
    resumed = ppo.train(again, scenes, load, again.s, seed=0, checkpoint_dir=tmp_path / "c",
                        log_path=tmp_path / "log.jsonl")
    assert resumed["iteration"] == state["iteration"] and resumed["stopped"] == state["stopped"]
    assert torch.equal(_flat(again), _flat(trainer))


def test_ranks_join_the_group_with_an_hour_for_rank_0_s_lone_validation(monkeypatch):
    joined = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: bool(joined))
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda backend, **kw: joined.update(backend=backend, **kw))
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert launch.init_distributed() == (1, 2)
    assert joined == {"backend": "gloo", "timeout": launch.COLLECTIVE_TIMEOUT}
    assert launch.COLLECTIVE_TIMEOUT.total_seconds() == 3600   # NCCL's default watchdog is 10 minutes
