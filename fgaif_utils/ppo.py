"""FGAIF step 3: PPO with fine-grained rewards (Algorithm 1 of the paper), top-down like cleanrl's ppo.py.

For each iteration:
  1. rollout   sample responses from the policy (base LVLM + trainable LoRA adapter), temperature / top-p
               from params, the image token never emitted; keep the sampled token ids.
  2. score     sub-sentence last tokens from the sampled ids (never re-tokenised text); the three reward
               models (one shared base, three adapters) give each sub-sentence a class per type.
  3. forward   log pi (policy), log pi_ref (the same base with the adapter disabled) and V (value model)
               at every response token, from forward passes over the sampled sequence.
  4. rewards   r_t = sum_types w_type * R_type(sub-sentence closed at t)  -  beta * (log pi(a_t) - log pi_ref(a_t))
               with R = +1 correct, -1 hallucinated, 0 n/a. (The FGAIF authors' code adds the KL term; it
               must be subtracted.) `sparse` puts the same fine-grained total on the last token instead;
               `oracle_rewards` (a control, synthetic world) takes R from the ground-truth scorer instead.
  5. GAE       delta_t = r_t + gamma V_{t+1} - V_t,  A_t = delta_t + gamma lambda A_{t+1},  returns = A + V.
  6. update    for `epochs` passes over shuffled minibatches:
               ratio = exp(log pi_new - log pi_old)
               L_pi  = mean(max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps)))
               L_V   = 0.5 mean(max((V_new - R)^2, (V_old + clip(V_new - V_old, -c, c) - R)^2))
               Adam steps on the policy adapter and the value model, gradient-norm clip.

A response's actions are its sampled tokens plus the EOS that ended it (when it ended before
max_new_tokens): stopping is an action too, and "saying less" is the cheapest way to hallucinate less.

The value model is the reward backbone with a trainable adapter started from the object reward model's
LoRA weights (the paper) and a scalar head, as a fourth adapter ("value") of the reward models' peft model,
so the backbone is held once. Sequences are right-padded with no attention mask (causal attention never lets
a real token see a pad on its right; on CPU the masked backward is much slower).

Several processes (torchrun / accelerate launch): every rank samples its share of the batch, then gradients
are averaged across ranks by all-reduce after each backward, with losses normalised by the global number of
tokens, so N ranks compute exactly the update one process would on the same global batch when a minibatch is
the whole batch (smaller minibatches are drawn per rank from its own rows: other minibatches, the same ranks).
With `ppo.deepspeed` (a DeepSpeed config, ZeRO stage 3 for 13B-size bases) two DeepSpeed engines, the policy and
the value model, hold 1/N of every parameter, gradient and Adam state on each rank and do the reduction,
clipping and Adam step; every equation above stays where it is.
"""
import contextlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm   # text bars: they stream into papermill's live notebook and logs

from . import models, reward, rollout, scorer, segment, stage, tiny_train, world
from .params import deepspeed_config

VALUE_ADAPTER = "value"
POLICY_ADAPTER = "policy"
PROMPT_STREAM = 1    # names the random stream of the prompt images' order (prompt_order) among those of a seed
# Token means of the returns and of the value residuals (returns - values) and their squares: explained variance
# over every rank's tokens is computed from their means over ranks (_mean_over_ranks), then they leave the row.
EV_MOMENTS = ("ev_return", "ev_return_sq", "ev_residual", "ev_residual_sq")
# A log row's per-token means: averaged over ranks by their response tokens (_mean_over_ranks).
PER_TOKEN_KEYS = ("kl_per_token", "kl_k3_per_token", "entropy", "value_mean") + EV_MOMENTS
RANK_WEIGHTS = "rank_weights"   # a log row's key for what each entry is a mean over on this rank (not logged)


# ---------------------------------------------------------------------------------------------- equations

def subsentence_slices(end_positions):
    """Each sub-sentence's token slice: from after the previous sub-sentence's last token up to its own."""
    starts = [0] + [end + 1 for end in end_positions[:-1]]
    return [slice(start, end + 1) for start, end in zip(starts, end_positions)]


def repeated_subsentences(token_ids, end_positions):
    """For each sub-sentence, whether its tokens repeat an earlier sub-sentence of the same response exactly."""
    seen, repeated = set(), []
    for span in subsentence_slices(end_positions):
        tokens = tuple(token_ids[span])
        repeated.append(tokens in seen)
        seen.add(tokens)
    return repeated


def ground_truth_labels(token_ids, decode, scene):
    """(K, 3) [object, attribute, relation] labels of one response's sub-sentences from the ground-truth scorer,
    the sub-sentences aligned to tokens as subsentence_end_positions aligns them (a merged pair gets the labels
    of both members' facts): the oracle control's rewards (`ppo.oracle_rewards`)."""
    if not token_ids:
        return np.zeros((0, len(reward.FACT_TYPES)), dtype=np.int64)
    aligned = segment.align_subsentences(token_ids, decode)
    scored = scorer.score_subsentences(decode(token_ids), [entry["span"] for entry in aligned], scene)
    return np.array([sub["labels"] for sub in scored], dtype=np.int64).reshape(-1, len(reward.FACT_TYPES))


def fine_grained_rewards(labels, end_positions, n_actions, weights, sparse=False, claim_bonus=0.0, skip=None):
    """(n_actions,) rewards of one response: at each sub-sentence's last token, sum over types of
    weight * (+1 correct / -1 hallucinated / 0 n/a). `labels` (K, T) in {-1, 0, 1} (reward-model classes
    shifted), `end_positions` K token indices. `sparse`: the same total on the last action instead.
    `claim_bonus`: added at a sub-sentence judged correct for some type and hallucinated for none, among the types
    whose weight is not 0 (a switched-off reward model must not decide the bonus either: the ablations).
    `skip`: K booleans, True for sub-sentences that earn nothing (repeats, when repeats are not rewarded)."""
    rewards = torch.zeros(n_actions)
    labels = np.asarray(labels).reshape(len(end_positions), len(weights))
    counted = np.asarray(weights, dtype=float) != 0
    for k, position in enumerate(end_positions):
        if skip is not None and skip[k]:
            continue
        per_type = np.where(labels[k] == 0, 1.0, np.where(labels[k] == 1, -1.0, 0.0))
        value = float(np.dot(per_type, weights))
        judged = labels[k][counted]
        if claim_bonus and (judged == 0).any() and not (judged == 1).any():
            value += claim_bonus
        rewards[position] += value
    if sparse and n_actions:
        total = rewards.sum()
        rewards.zero_()
        rewards[n_actions - 1] = total
    return rewards


def kl_penalised_rewards(fine_grained, logprobs, ref_logprobs, mask, beta):
    """r_t = fine-grained reward - beta * (log pi - log pi_ref) on every response token; (B, T) each."""
    kl = (logprobs - ref_logprobs) * mask
    return fine_grained * mask - beta * kl, kl


def k3_kl(logprobs, ref_logprobs, mask):
    """Per-token KL(pi || pi_ref) estimate k3 = (r - 1) - log r, r = pi_ref / pi at the sampled token: unbiased
    like the penalty's log pi - log pi_ref (k1), but never negative and of lower variance, so a budget compares a
    steadier number. Diagnostic and budget only; the reward keeps the paper's k1."""
    log_ratio = (ref_logprobs - logprobs) * mask     # 0 on padding, where k3 is then 0 too
    return torch.expm1(log_ratio) - log_ratio


def gae(rewards, values, mask, gamma, lam):
    """Generalised advantage estimation over right-padded responses: (advantages, returns), (B, T) each.
    V after a response's last action is 0 (the episode ends there)."""
    n_steps = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    next_advantage = torch.zeros(rewards.shape[0])
    next_value = torch.zeros(rewards.shape[0])
    for t in reversed(range(n_steps)):
        alive = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        advantages[:, t] = advantage * alive
        next_value = values[:, t] * alive            # padding beyond the end passes 0 back
        next_advantage = advantages[:, t]
    return advantages, (advantages + values) * mask


def masked_mean(x, mask):
    """Mean over the masked entries, across all ranks when several processes train together."""
    return _global_sum((x * mask).sum()) / _global_sum(mask.sum()).clamp(min=1)


def whiten(x, mask, shift_mean=True):
    """(x - mean) / std over the masked entries of the global batch; x / std when shift_mean is False (a zero
    stays zero)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return ((x - mean) if shift_mean else x) * torch.rsqrt(var + 1e-8) * mask


def scale_to_unit_response_std(rewards, mask):
    """rewards / the standard deviation of the responses' total rewards over the global batch. Scaled, not shifted
    (a shifted mean would put a reward on every token, and the sparse reward would be sparse no more), and by the
    totals, not the tokens: dense and sparse rewards of the same labels have the same totals, so they keep them."""
    totals = (rewards * mask).sum(dim=1)
    every_response = torch.ones_like(totals)
    mean = masked_mean(totals, every_response)
    variance = masked_mean((totals - mean) ** 2, every_response)
    if variance < 1e-8:   # every response earned the same total: no spread to scale to (1/sqrt(1e-8) would be 1e4)
        return rewards
    return rewards * torch.rsqrt(variance)


def ppo_losses(logprobs, old_logprobs, advantages, values, old_values, returns, mask, clip, value_clip, n_tokens):
    """Sums over the minibatch's tokens divided by `n_tokens` (the global token count, so that ranks can add
    up): clipped policy loss, clipped value loss, and the diagnostics approx KL (k3) and clip fraction."""
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    policy_loss = torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - clip, 1 + clip))
    values_clipped = old_values + (values - old_values).clamp(-value_clip, value_clip)
    value_loss = 0.5 * torch.max((values - returns) ** 2, (values_clipped - returns) ** 2)
    with torch.no_grad():
        approx_kl = (ratio - 1) - log_ratio
        clipped = ((ratio - 1).abs() > clip).float()
    total = lambda x: (x * mask).sum() / n_tokens  # noqa: E731
    return total(policy_loss), total(value_loss), total(approx_kl), total(clipped)


def advantage_contrast(advantages, end_positions, labels, n_types):
    """Credit assignment, measured: within each response that has both, the mean advantage of the tokens of
    sub-sentences judged hallucinated (for some type) minus that of the tokens of sub-sentences judged correct (for
    some type, hallucinated for none), averaged over those responses; None when no response has both. Dense
    rewards make it negative from the first iteration; a sparse reward only as far as the value model learns where
    the errors are."""
    contrasts = []
    for row, ends, lab in zip(advantages, end_positions, labels):
        lab = np.asarray(lab).reshape(len(ends), n_types)
        hallucinated, correct = [], []
        for span, sub_labels in zip(subsentence_slices(ends), lab):
            if (sub_labels == 1).any():
                hallucinated += row[span].tolist()
            elif (sub_labels == 0).any():
                correct += row[span].tolist()
        if hallucinated and correct:
            contrasts.append(np.mean(hallucinated) - np.mean(correct))
    return float(np.mean(contrasts)) if contrasts else None


def explained_variance(values, returns, mask):
    """1 - Var(returns - values) / Var(returns) over the masked tokens."""
    v, r = values[mask.bool()], returns[mask.bool()]
    var = r.var(unbiased=False)
    return float("nan") if var == 0 else float(1 - (r - v).var(unbiased=False) / var)


# ---------------------------------------------------------------------------------------------- sequences

def action_ids(token_ids, max_new_tokens, eos_id):
    """The actions of one response: its sampled tokens plus the EOS that ended it early."""
    return list(token_ids) + ([eos_id] if len(token_ids) < max_new_tokens else [])


def sequence_batch(prompt, actions, pad_id):
    """input_ids (B, P + T) = prompt + actions, right-padded; mask (B, T) of real actions."""
    width = max(len(a) for a in actions)
    input_ids = torch.full((len(actions), len(prompt) + width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(actions), width)
    input_ids[:, :len(prompt)] = torch.tensor(prompt)
    for row, a in enumerate(actions):
        input_ids[row, len(prompt):len(prompt) + len(a)] = torch.tensor(a, dtype=torch.long)
        mask[row, :len(a)] = 1.0
    return input_ids, mask


def response_logprobs(lvlm, input_ids, pixel_values, prompt_len, temperature=1.0, with_entropy=False):
    """log pi(a_t | s_t) of every action (B, T): logits at position prompt_len - 1 + t predict action t.
    Logits are divided by the sampling temperature, the distribution the actions were drawn from."""
    logits = lvlm(input_ids=input_ids, pixel_values=pixel_values, use_cache=False).logits
    logits = logits[:, prompt_len - 1:-1].float() / temperature
    logp_all = torch.log_softmax(logits, -1)
    logprobs = logp_all.gather(-1, input_ids[:, prompt_len:, None]).squeeze(-1)
    if not with_entropy:
        return logprobs
    return logprobs, -(logp_all.exp() * logp_all).sum(-1)


class ValueHead(torch.nn.Module):
    """A scalar head on the value adapter's last hidden states: V(s_t) read at the token before action t."""

    def __init__(self, hidden_size):
        super().__init__()
        self.linear = torch.nn.Linear(hidden_size, 1)
        torch.nn.init.zeros_(self.linear.weight)
        torch.nn.init.zeros_(self.linear.bias)

    def forward(self, hidden):
        return self.linear(hidden.float()).squeeze(-1)


def response_values(rm, head, input_ids, pixel_values, prompt_len):
    """V(s_t) for every action (B, T) from the value adapter of the reward models' peft model."""
    rm.model.set_adapter(VALUE_ADAPTER)
    lvlm = rm.model.base_model.model.lvlm
    hidden = lvlm.model(input_ids=input_ids, pixel_values=pixel_values.to(lvlm.dtype), use_cache=False).last_hidden_state
    return head(hidden[:, prompt_len - 1:-1])


# ---------------------------------------------------------------------------------------------- models

def policy_model(base_path, lora_r, lora_alpha, dtype="float32", device="auto", load_in_4bit=False,
                 local_files_only=True, gradient_checkpointing=False, seed=0):
    """The base LVLM with a trainable LoRA adapter on the language model; the vision tower and projector stay
    frozen (unused parameters would break DDP). The reference policy is this model with the adapter disabled."""
    lvlm, processor = models.load_lvlm(base_path, dtype=dtype, device=device, load_in_4bit=load_in_4bit,
                                       local_files_only=local_files_only)
    torch.manual_seed(seed)
    policy = models.add_lora(lvlm, r=lora_r, alpha=lora_alpha, adapter_name=POLICY_ADAPTER)
    if gradient_checkpointing:
        reward.enable_gradient_checkpointing(lvlm)
    return policy, processor


def add_value_adapter(rm, init="object_reward", seed=0):
    """A "value" adapter on the reward models' base, its LoRA weights copied from the object reward model
    (paper; the holistic ablation's single model) or freshly initialised (init "fresh"), and a zero scalar head.
    The value LoRA has no dropout whatever the reward models trained with, as the policy's has none."""
    r, alpha = _lora_shape(rm)
    config = reward.lora_config(r, alpha, dropout=0.0)   # no dropout: old and new values come from one function
    torch.manual_seed(seed)
    rm.model.add_adapter(VALUE_ADAPTER, config)
    source = "object" if "object" in rm.types else rm.types[0]     # the holistic ablation has one model
    if init == "object_reward":
        with torch.no_grad():
            for module in rm.model.modules():
                if hasattr(module, "lora_A") and VALUE_ADAPTER in module.lora_A:
                    module.lora_A[VALUE_ADAPTER].weight.copy_(module.lora_A[source].weight)
                    module.lora_B[VALUE_ADAPTER].weight.copy_(module.lora_B[source].weight)
    lvlm = rm.model.base_model.model.lvlm
    head = ValueHead(lvlm.config.text_config.hidden_size).to(lvlm.device)
    return head


def _lora_shape(rm):
    config = rm.model.peft_config[rm.types[0]]
    return config.r, config.lora_alpha


def trainable(module, adapter):
    """The LoRA parameters of one adapter, made trainable; every other parameter of the module frozen."""
    chosen = {}
    for name, p in module.named_parameters():
        keep = f".{adapter}." in name and "lora_" in name
        p.requires_grad_(keep)
        if keep:
            chosen[name] = p
    if not chosen:
        raise ValueError(f"no LoRA parameters of adapter {adapter!r}")
    return chosen


# ---------------------------------------------------------------------------------------------- one iteration

@dataclass
class Batch:
    """One rollout batch on this rank (tensors (B, T) over actions)."""
    image_ids: list
    token_ids: list
    end_positions: list
    labels: list
    input_ids: torch.Tensor
    pixel_values: torch.Tensor
    mask: torch.Tensor
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    entropy: torch.Tensor
    values: torch.Tensor
    fine_grained: torch.Tensor
    rewards: torch.Tensor
    kl: torch.Tensor
    advantages: torch.Tensor = None
    returns: torch.Tensor = None


class Trainer:
    """Everything PPO holds: the policy (with its frozen reference), the reward models, the value adapter and
    head, two Adam optimisers, and the settings. `step(images, image_ids)` is one iteration of Algorithm 1."""

    def __init__(self, policy, processor, rm, value_head, settings, reward_types, prompt_text):
        self.policy, self.processor, self.rm, self.value_head, self.s = policy, processor, rm, value_head, settings
        self.reward_types = list(reward_types)
        self.weights = np.array([getattr(settings.weights, t, 1.0) for t in self.reward_types])   # holistic: 1
        self.tokenizer = processor.tokenizer
        self.eos = self.tokenizer.eos_token_id
        self.pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos
        self.prompt_text = models.chat_prompt(processor, prompt_text)
        self.prompt = reward.prompt_ids(processor, prompt_text)
        self.policy_params = trainable(policy, POLICY_ADAPTER)
        self.value_params = trainable(rm.model, VALUE_ADAPTER)
        self.value_params.update({f"head.{n}": p for n, p in value_head.named_parameters()})
        self.policy_opt = torch.optim.Adam(list(self.policy_params.values()), lr=settings.lr)
        self.value_opt = torch.optim.Adam(list(self.value_params.values()), lr=settings.value_lr or settings.lr)
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.engines = None         # (policy, value) DeepSpeed engines once `use_deepspeed` wrapped the models
        self.oracle_scenes = None   # {image_id: scene}: the oracle control scores with the truth instead

    @property
    def device(self):
        return self.policy.base_model.model.device

    def decode(self, ids):
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def forward_chunk(self, n_rows):
        """Rows a rank scores and runs forward at once: rollout_chunk (0 = all n_rows); under DeepSpeed all n_rows, so
        that every rank runs the same number of forwards whatever share of its responses closed a sub-sentence."""
        return max(1, n_rows if self.engines else (self.s.rollout_chunk or n_rows))

    # ---- 1-5: rollout, score, forward passes, rewards, GAE
    @torch.no_grad()
    def rollout(self, images, image_ids, seed):
        s = self.s
        self.policy.eval()
        chunk = s.rollout_chunk or len(images)
        token_ids = []
        for start in range(0, len(images), chunk):
            chunk_seed = seed if start == 0 else int(np.random.SeedSequence([seed, start]).generate_state(1)[0])
            token_ids += rollout.sample(self.policy, self.processor, images[start:start + chunk],
                                        [self.prompt_text] * len(images[start:start + chunk]),
                                        max_new_tokens=s.max_new_tokens, do_sample=True, temperature=s.temperature,
                                        top_p=s.top_p, seed=chunk_seed,
                                        engine="generate" if self.engines else s.rollout_engine,
                                        with_logprobs=False).token_ids   # log pi comes from a forward pass below
        end_positions = [segment.subsentence_end_positions(ids, self.decode) if ids else [] for ids in token_ids]
        return token_ids, end_positions

    @torch.no_grad()
    def score(self, images, token_ids, end_positions, image_ids=None):
        if self.oracle_scenes is not None:
            if image_ids is None:
                raise ValueError("oracle rewards: score() needs the image ids to find each response's scene")
            labels = [ground_truth_labels(ids, self.decode, self.oracle_scenes[image_id])
                      for ids, image_id in zip(token_ids, image_ids)]
            if [len(response) for response in labels] != [len(ends) for ends in end_positions]:
                raise RuntimeError("oracle rewards: the scorer's sub-sentences do not match the end positions")
            return labels
        # Under DeepSpeed one forward per type: peft's mixed-adapter batch gave other logits under ZeRO-3's hooks
        # (measured on CPU; per-type forwards match the unwrapped model exactly).
        mixed = not self.engines
        if self.engines and not any(len(ends) for ends in end_positions):
            # ZeRO-3 gathers each layer's weights from all ranks, so every rank runs every forward: score a
            # one-token stand-in when this rank's responses closed no sub-sentence
            self.rm.score(images[:1], [[self.eos]], [[0]], batch_size=1, mixed=mixed)
        # a mixed-adapter batch is three forwards' worth of rows: the validation's 200 responses at once would not fit
        chunk = self.forward_chunk(len(images))
        scores = self.rm.score(images, token_ids, end_positions, batch_size=chunk, mixed=mixed)
        return [s["labels"] for s in scores]

    @torch.no_grad()
    def make_batch(self, images, image_ids, token_ids, end_positions, labels):
        s = self.s
        actions = [action_ids(ids, s.max_new_tokens, self.eos) or [self.eos] for ids in token_ids]
        input_ids, mask = sequence_batch(self.prompt, actions, self.pad)
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        pixel_values = reward.pixel_values(self.processor, images).to(self.device)
        P = len(self.prompt)
        # log pi, log pi_ref and V in chunks: 64 LLaVA rows of ~1,100 tokens hold ~17 GB of float logits at once
        chunk = self.forward_chunk(len(actions))
        parts = []
        for rows in (slice(start, start + chunk) for start in range(0, len(actions), chunk)):
            ids, pixels = input_ids[rows], pixel_values[rows]
            logprobs, entropy = response_logprobs(self.policy, ids, pixels, P, s.temperature, True)
            with self.policy.disable_adapter():
                ref_logprobs = response_logprobs(self.policy, ids, pixels, P, s.temperature)
            parts.append((logprobs, entropy, ref_logprobs, response_values(self.rm, self.value_head, ids, pixels, P)))
        logprobs, entropy, ref_logprobs, values = (torch.cat(part) for part in zip(*parts))
        values = values * mask
        skips = [None if s.reward_repeats else repeated_subsentences(ids, ends)
                 for ids, ends in zip(token_ids, end_positions)]
        fine_grained = torch.stack([
            _padded(fine_grained_rewards(lab, ends, len(a), self.weights, s.sparse, s.claim_bonus, skip), mask.shape[1])
            for lab, ends, a, skip in zip(labels, end_positions, actions, skips)]).to(self.device)
        if s.whiten_rewards:
            fine_grained = scale_to_unit_response_std(fine_grained, mask)
        fine_grained = fine_grained * s.reward_scale
        rewards, kl = kl_penalised_rewards(fine_grained, logprobs, ref_logprobs, mask, s.beta)
        batch = Batch(image_ids, token_ids, end_positions, labels, input_ids, pixel_values, mask, logprobs * mask,
                      ref_logprobs * mask, entropy * mask, values, fine_grained, rewards, kl)
        batch.advantages, batch.returns = gae(rewards.cpu(), values.cpu(), mask.cpu(), s.gamma, s.lam)
        batch.advantages = whiten(batch.advantages, mask.cpu()).to(self.device)
        batch.returns = batch.returns.to(self.device)
        return batch

    # ---- 6: the clipped PPO update
    def update(self, batch, seed):
        """`epochs` passes over shuffled minibatches; returns the mean diagnostics."""
        s = self.s
        n = len(batch.token_ids)
        per_rank = max(1, s.minibatch_size // self.world)
        stats = {"policy_loss": [], "value_loss": [], "approx_kl": [], "clip_fraction": [], "grad_norm": []}
        P = len(self.prompt)
        self.policy.train()
        self.rm.model.train()     # the value adapter trains (and gradient checkpointing, when on, only acts in train mode)
        for epoch in range(s.epochs):
            order = torch.from_numpy(np.random.default_rng([seed, epoch]).permutation(n))
            for start in range(0, n, per_rank):
                rows = order[start:start + per_rank].to(self.device)
                mask = batch.mask[rows]
                n_tokens = _global_sum(mask.sum())
                logprobs = response_logprobs(self.policy, batch.input_ids[rows], batch.pixel_values[rows], P,
                                             s.temperature)
                values = response_values(self.rm, self.value_head, batch.input_ids[rows], batch.pixel_values[rows], P)
                policy_loss, value_loss, approx_kl, clip_fraction = ppo_losses(
                    logprobs, batch.logprobs[rows], batch.advantages[rows], values, batch.values[rows],
                    batch.returns[rows], mask, s.clip, s.value_clip, n_tokens)
                if self.engines:   # DeepSpeed averages the ranks' gradients; the losses are per global token: sum
                    policy_engine, value_engine = self.engines
                    policy_engine.backward(policy_loss * self.world)
                    value_engine.backward(s.vf_coef * value_loss * self.world)
                    policy_engine.step()    # clip at gradient_clipping (= grad_clip), Adam, zero the gradients
                    value_engine.step()
                    grad_norm = policy_engine.get_global_grad_norm()
                else:
                    self.policy_opt.zero_grad(set_to_none=True)
                    self.value_opt.zero_grad(set_to_none=True)
                    (policy_loss + s.vf_coef * value_loss).backward()
                    _all_reduce_grads(self.policy_params.values(), self.world)
                    _all_reduce_grads(self.value_params.values(), self.world)
                    grad_norm = torch.nn.utils.clip_grad_norm_(list(self.policy_params.values()), s.grad_clip)
                    torch.nn.utils.clip_grad_norm_(list(self.value_params.values()), s.grad_clip)
                    self.policy_opt.step()
                    self.value_opt.step()
                for key, value in (("policy_loss", policy_loss), ("value_loss", value_loss),
                                   ("approx_kl", approx_kl), ("clip_fraction", clip_fraction)):
                    stats[key].append(float(_global_sum(value.detach())))
                stats["grad_norm"].append(float(grad_norm))
        self.policy.eval()
        self.rm.model.eval()
        return {k: float(np.mean(v)) for k, v in stats.items()}

    def step(self, images, image_ids, iteration, seed):
        """One iteration: rollout, score, forward passes and rewards, GAE, update. Returns (log row, batch)."""
        times = {}
        torch.manual_seed(seed)     # all this iteration draws from torch's stream follows (seed, iteration): resumable
        t0 = time.monotonic()
        token_ids, end_positions = self.rollout(images, image_ids, seed)
        times["rollout_s"] = time.monotonic() - t0
        t0 = time.monotonic()
        labels = self.score(images, token_ids, end_positions, image_ids)
        times["scoring_s"] = time.monotonic() - t0
        t0 = time.monotonic()
        batch = self.make_batch(images, image_ids, token_ids, end_positions, labels)
        times["reference_s"] = time.monotonic() - t0
        t0 = time.monotonic()
        update_stats = self.update(batch, seed)
        times["update_s"] = time.monotonic() - t0
        row = {"iteration": iteration, **rollout_stats(batch, self.reward_types, self.weights), **update_stats,
               **{k: round(v, 3) for k, v in times.items()}}
        return row, batch


def _padded(x, width):
    out = torch.zeros(width)
    out[:len(x)] = x
    return out


def _global_sum(x):
    """x summed over the ranks (a new tensor on x's device; x itself when one process trains)."""
    if not dist.is_initialized():
        return x
    total = x.to(_collective_device(x.device), copy=True)
    dist.all_reduce(total)
    return total.to(x.device)


def _collective_device(device):
    """Where a reduction of a tensor on `device` runs: NCCL reduces CUDA tensors only, so under a plain NCCL
    group a CPU tensor (GAE and the log row are computed on the CPU) goes to this rank's GPU and back."""
    if device.type == "cpu" and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _all_reduce_grads(params, world):
    """Average gradients over ranks (what DDP does, made explicit). Losses are already divided by the global
    token count, so the ranks' gradients are summed."""
    if world == 1:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)


@torch.no_grad()
def rollout_stats(batch, reward_types, weights):
    """Per-iteration diagnostics of a rollout batch (this rank's; means over responses unless said)."""
    mask = batch.mask
    n = mask.shape[0]
    per_type = {t: [] for t in reward_types}
    for lab in batch.labels:
        lab = np.asarray(lab).reshape(-1, len(reward_types))
        for j, t in enumerate(reward_types):
            per_type[t].append(float(np.sum(np.where(lab[:, j] == 0, 1.0, np.where(lab[:, j] == 1, -1.0, 0.0)))))
    row = {f"reward_{t}": float(np.mean(v)) for t, v in per_type.items()}
    row.update({
        "reward_fine_grained": float(batch.fine_grained.sum() / n),
        "reward_total": float(batch.rewards.sum() / n),
        "kl": float(batch.kl.sum() / n),                      # sum over tokens: KL of the response, per response
        "kl_per_token": float(batch.kl.sum() / mask.sum()),
        "kl_k3_per_token": float(k3_kl(batch.logprobs, batch.ref_logprobs, mask).sum() / mask.sum()),
        "entropy": float(batch.entropy.sum() / mask.sum()),
        "response_length": float(np.mean([len(ids) for ids in batch.token_ids])),   # sampled tokens, as val_length
        "subsentences": float(np.mean([len(e) for e in batch.end_positions])),
        "explained_variance": explained_variance(batch.values, batch.returns, mask),
        "advantage_contrast": advantage_contrast(batch.advantages.cpu(), batch.end_positions, batch.labels,
                                                 len(reward_types)),
        "value_mean": float(batch.values.sum() / mask.sum()),
    })
    returns, residuals = batch.returns[mask.bool()], (batch.returns - batch.values)[mask.bool()]
    row.update(zip(EV_MOMENTS, (float(returns.mean()), float((returns ** 2).mean()), float(residuals.mean()),
                                float((residuals ** 2).mean()))))
    tokens = float(mask.sum())
    weights = {key: tokens for key in PER_TOKEN_KEYS}
    for j, t in enumerate(reward_types):
        labels = np.concatenate([np.asarray(l).reshape(-1, len(reward_types))[:, j] for l in batch.labels] or [[]])
        judged = labels[labels != -1]
        row[f"halluc_share_{t}"] = float((judged == 1).mean()) if len(judged) else None
        weights[f"halluc_share_{t}"] = float(len(judged))
    row[RANK_WEIGHTS] = weights
    return row


# ---------------------------------------------------------------------------------------------- checkpoints

def save_checkpoint(trainer, folder, state, rank=0):
    """Adapter, value adapter + head, both optimisers and the loop state, as one set that a kill never tears
    (`stage.write_checkpoint`). Every rank calls it; rank 0 writes (under DeepSpeed every rank also writes its
    partition of the Adam states)."""
    from safetensors.torch import save_file
    if rank != 0 and not trainer.engines:
        return
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with full_weights(trainer):
        tensors = {f"policy/{n}": p.detach().cpu().clone() for n, p in trainer.policy_params.items()}
        tensors.update({f"value/{n}": p.detach().cpu().clone() for n, p in trainer.value_params.items()})
    if trainer.engines:     # tagged by iteration: a save cut short never damages the set state.json names
        for tag, engine in zip(_deepspeed_tags(state), trainer.engines):
            engine.save_checkpoint(str(folder / "deepspeed"), tag=tag, exclude_frozen_parameters=True)
    if rank != 0:
        return
    writers = {"weights.safetensors": lambda path: save_file(tensors, path)}
    if not trainer.engines:
        writers["optimizers.pt"] = lambda path: torch.save(
            {"policy": trainer.policy_opt.state_dict(), "value": trainer.value_opt.state_dict()}, path)
    stage.write_checkpoint(folder, writers, state)
    if trainer.engines:
        for old in (folder / "deepspeed").iterdir():
            if old.is_dir() and old.name not in _deepspeed_tags(state):
                shutil.rmtree(old)


def _deepspeed_tags(state):
    return [f"{model}-{state['iteration']}" for model in ("policy", "value")]


def load_checkpoint(trainer, folder):
    """The loop state saved by save_checkpoint (weights and optimisers restored into `trainer`), or None."""
    from safetensors.torch import load_file
    checkpoint = stage.read_checkpoint(folder, ("weights.safetensors", "optimizers.pt"))
    if checkpoint is None:
        return None
    state, files = checkpoint
    if trainer.engines:     # each rank reads its partition of weights and Adam states
        for tag, engine in zip(_deepspeed_tags(state), trainer.engines):
            engine.load_checkpoint(str(Path(folder) / "deepspeed"), tag=tag, load_module_strict=False)
        return state
    tensors = load_file(files["weights.safetensors"])
    with torch.no_grad():
        for n, p in trainer.policy_params.items():
            p.copy_(tensors[f"policy/{n}"])
        for n, p in trainer.value_params.items():
            p.copy_(tensors[f"value/{n}"])
    optimizers = torch.load(files["optimizers.pt"], weights_only=True)
    trainer.policy_opt.load_state_dict(optimizers["policy"])
    trainer.value_opt.load_state_dict(optimizers["value"])
    return state


def save_policy_adapter(trainer, folder):
    """The policy's LoRA adapter as a peft folder (load: PeftModel.from_pretrained(base, folder)); the base it was
    trained on is recorded repository-relative, as every path in the outputs."""
    config = trainer.policy.peft_config[POLICY_ADAPTER]
    if config.base_model_name_or_path:
        config.base_model_name_or_path = stage.shown_path(config.base_model_name_or_path)
    trainer.policy.save_pretrained(str(folder), selected_adapters=[POLICY_ADAPTER])
    nested = Path(folder) / POLICY_ADAPTER     # peft writes non-default adapters into a sub-folder
    if nested.is_dir():
        for item in nested.iterdir():
            os.replace(item, Path(folder) / item.name)
        nested.rmdir()


# ---------------------------------------------------------------------------------------------- DeepSpeed ZeRO

class ValueModel(torch.nn.Module):
    """The value model as one module for its DeepSpeed engine: the reward models' peft model (whose "value"
    adapter trains; the three reward adapters score from the same partitioned base) and the scalar head."""

    def __init__(self, peft_model, head):
        super().__init__()
        self.peft_model, self.head = peft_model, head


@contextlib.contextmanager
def partitioned_loading(config, dtype):
    """Inside, with a ZeRO stage 3 DeepSpeed `config`, from_pretrained builds every model straight into its ZeRO-3
    partitions (transformers' zero.Init): a rank never holds a whole base, so a 13B policy and a 13B reward base
    load on GPUs that cannot hold both. zero.Init casts to the config's half precision, so the loading config's
    bf16 / fp16 follow `dtype` (models.dtype; without it bf16 bases load in fp32); the engines keep the config as
    written. Without a stage 3 config it does nothing."""
    if not config or config.get("zero_optimization", {}).get("stage") != 3:
        yield
        return
    from transformers.integrations import deepspeed as hf_deepspeed
    earlier = hf_deepspeed._hf_deepspeed_config_weak_ref
    loading = hf_deepspeed.HfDeepSpeedConfig({**config, "train_micro_batch_size_per_gpu": 1,
                                              "bf16": {"enabled": dtype == "bfloat16"},
                                              "fp16": {"enabled": dtype == "float16"}})
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = earlier      # a trainer's engine config, if one lives
        del loading


def use_deepspeed(trainer, config):
    """Wrap the policy and the value model in DeepSpeed engines built from `config` (a DeepSpeed config dict; ZeRO
    stage 3 partitions every parameter, gradient and Adam state over the ranks). These params decide the batch
    size, the gradient clipping and the optimiser (the trainer's Adams). Every rank calls it."""
    import deepspeed
    from transformers.integrations.deepspeed import HfDeepSpeedConfig
    s = trainer.s
    config = {**config, "train_micro_batch_size_per_gpu": max(1, s.minibatch_size // trainer.world),
              "gradient_accumulation_steps": 1, "gradient_clipping": s.grad_clip, "zero_allow_untested_optimizer": True}
    config.pop("train_batch_size", None)
    # While it lives, generate() keeps ZeRO-3 ranks in step (the models were loaded under partitioned_loading).
    trainer.hf_deepspeed = HfDeepSpeedConfig(config)
    policy, trainer.policy_opt, _, _ = deepspeed.initialize(model=trainer.policy, optimizer=trainer.policy_opt,
                                                           config=config)
    value, trainer.value_opt, _, _ = deepspeed.initialize(model=ValueModel(trainer.rm.model, trainer.value_head),
                                                         optimizer=trainer.value_opt, config=config)
    trainer.engines = (policy, value)


@contextlib.contextmanager
def full_weights(trainer):
    """Inside, every rank holds the whole trainable weights (ZeRO-3 keeps 1/N of each; gathering them is a
    collective, so every rank enters). Without DeepSpeed it does nothing."""
    if not trainer.engines:
        yield
        return
    import deepspeed
    with deepspeed.zero.GatheredParameters(list(trainer.policy_params.values()) + list(trainer.value_params.values())):
        yield


# ---------------------------------------------------------------------------------------------- the loop

def tensorboard_writer(log_dir):
    """A TensorBoard SummaryWriter when the tensorboard package is installed, else None (JSONL is always written)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(log_dir))


def train(trainer, prompt_scenes, load_images, settings, seed, checkpoint_dir, log_path, validate=None,
          stop_after=None, rank=0, writer=None):
    """Algorithm 1: `settings.steps` iterations over batches of prompt images, this rank's share of each
    batch. Checkpoints every `checkpoint_every` iterations resume the same trajectory (each iteration's image
    batch and sampling seed come from (seed, iteration)). `validate(trainer, iteration)` returns a dict logged
    to the same JSONL (and to `writer`, a TensorBoard SummaryWriter, when given). Stops early when the per-token
    KL (its k3 estimate) exceeds `kl_budget`. Returns the loop state (its "log" holds the rows)."""
    s = settings
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    images_per_batch = max(1, s.rollout_batch // s.samples_per_image)
    log_path, checkpoint_dir = Path(log_path), Path(checkpoint_dir)
    state = load_checkpoint(trainer, checkpoint_dir) or {"iteration": 0, "log": [], "stopped": None}
    if state["iteration"] == 0 and validate is not None and not state["log"]:
        state["log"].append({"iteration": 0, **validate(trainer, 0)})
    bar = tqdm(total=s.steps, initial=state["iteration"], desc="PPO", mininterval=2.0, disable=rank != 0)
    t_start = time.monotonic()
    while state["iteration"] < s.steps and state["stopped"] is None:
        iteration = state["iteration"] + 1
        order = prompt_order(len(prompt_scenes), images_per_batch, iteration, seed)
        chosen = [prompt_scenes[i] for i in order for _ in range(s.samples_per_image)]
        mine = chosen[rank::world_size]
        images = load_images(mine)
        row, _ = trainer.step(images, [sc["image_id"] for sc in mine], iteration,
                              seed=seed * 1_000_003 + iteration * world_size + rank)
        row = _mean_over_ranks(row)
        row["wall_s"] = round(time.monotonic() - t_start, 2)
        if validate is not None and (iteration % s.validate_every == 0 or iteration == s.steps):
            row.update(validate(trainer, iteration))
        state["log"].append(row)
        state["iteration"] = iteration
        if s.kl_budget and row["kl_k3_per_token"] > s.kl_budget:
            state["stopped"] = (f"KL budget: {row['kl_k3_per_token']:.3f} nats/token (k3) > {s.kl_budget} "
                                f"at iteration {iteration}")
        if rank == 0:
            bar.update(1)
            bar.set_postfix(fg=f"{row['reward_fine_grained']:.2f}", kl=f"{row['kl_per_token']:.3f}",
                            len=f"{row['response_length']:.1f}")
            world.write_jsonl(log_path, state["log"])
            if writer is not None:
                for key, value in row.items():
                    if isinstance(value, (int, float)) and key != "iteration":
                        writer.add_scalar(key, value, iteration)
        if iteration % s.checkpoint_every == 0 or iteration == s.steps or state["stopped"]:
            save_checkpoint(trainer, checkpoint_dir, state, rank)
        if stop_after is not None and iteration >= stop_after:
            break
    bar.close()
    if rank == 0:
        world.write_jsonl(log_path, state["log"])
    return state


def prompt_order(n_images, per_iteration, iteration, seed):
    """Indices of iteration `iteration`'s (1-based) prompt images: the next `per_iteration` of a seeded permutation
    of the n images, a new permutation each pass, so every image prompts once per pass (the paper's one pass over
    its PPO images)."""
    passes, indices = {}, []
    for position in range((iteration - 1) * per_iteration, iteration * per_iteration):
        n_pass, offset = divmod(position, n_images)
        if n_pass not in passes:
            passes[n_pass] = np.random.default_rng([seed, PROMPT_STREAM, n_pass]).permutation(n_images)
        indices.append(int(passes[n_pass][offset]))
    return indices


def _mean_over_ranks(row):
    """Each numeric entry averaged over the ranks that have it, weighted by what the rank's value is a mean over
    where the row's RANK_WEIGHTS says (response tokens for per-token means, judged sub-sentences for the
    hallucination shares: the global batch's value, as one process would log it), else equally (the ranks' shares
    hold equally many responses); explained variance, not a mean, from the global moments (EV_MOMENTS). A value can
    be None on one rank only (e.g. no judged relation in its share of the batch), so every rank sends the same
    keys: (weighted sum, weight) per key."""
    row = dict(row)
    weights = row.pop(RANK_WEIGHTS, {})
    if not dist.is_initialized():
        return _global_explained_variance(row)
    keys = sorted(k for k, v in row.items() if k != "iteration" and (v is None or isinstance(v, (int, float))))
    sent = [[(row[k] or 0.0) * weights.get(k, 1.0), weights.get(k, 1.0) if row[k] is not None else 0.0]
            for k in keys]
    sums = _global_sum(torch.tensor(sent, dtype=torch.float64).reshape(-1, 2))
    return _global_explained_variance({**row, **{k: (float(total / weight) if weight else None)
                                                 for k, (total, weight) in zip(keys, sums.tolist())}})


def _global_explained_variance(row):
    """The row with explained_variance = 1 - Var(returns - values) / Var(returns) from its EV_MOMENTS (the global
    batch's tokens once averaged over ranks; a rank's own EV centres on its own mean), the moments removed."""
    if not all(key in row for key in EV_MOMENTS):
        return row
    mean_r, mean_r2, mean_d, mean_d2 = (row.pop(key) for key in EV_MOMENTS)
    variance = mean_r2 - mean_r ** 2
    row["explained_variance"] = float("nan") if variance <= 0 else 1 - (mean_d2 - mean_d ** 2) / variance
    return row


# ---------------------------------------------------------------------------------------------- validation

def validator(scenes, images, prompt_text, max_new_tokens, batch_size, synthetic):
    """validate(trainer, iteration) for `train`: greedy descriptions of the validation images scored by the
    reward models (mean reward per type per response) and, in the synthetic world, by the ground-truth scorer
    (hallucination rate per type, coverage). Never the eval split."""
    def validate(trainer, iteration):
        # After iteration 0 this runs inside the PPO bar, where a second text bar writes cursor-up codes.
        token_ids, texts = tiny_train.describe_images(trainer.policy, trainer.processor, images, False, 0, batch_size,
                                                      max_new_tokens, prompt=prompt_text, desc="validate",
                                                      progress=iteration == 0)
        ends = [segment.subsentence_end_positions(ids, trainer.decode) if ids else [] for ids in token_ids]
        labels = trainer.score(images, token_ids, ends, [scene["image_id"] for scene in scenes])
        row = {"val_length": float(np.mean([len(t) for t in token_ids])),
               "val_subsentences": float(np.mean([len(e) for e in ends]))}
        for j, t in enumerate(trainer.reward_types):
            values = [float(np.sum(np.where(l[:, j] == 0, 1.0, np.where(l[:, j] == 1, -1.0, 0.0)))) if len(l) else 0.0
                      for l in (np.asarray(l).reshape(-1, len(trainer.reward_types)) for l in labels)]
            row[f"val_reward_{t}"] = float(np.mean(values))
        row["val_reward_fine_grained"] = float(sum(row[f"val_reward_{t}"] * w
                                                   for t, w in zip(trainer.reward_types, trainer.weights)))
        if synthetic:
            summary = scorer.aggregate([scorer.score_description(text, scene) for text, scene in zip(texts, scenes)])
            row.update({f"val_gt_{k}": summary[k] for k in ("object_error_rate", "attribute_error_rate",
                                                             "relation_error_rate", "coverage", "mean_sentences",
                                                             "duplicate_sentence_rate")})
        return row

    return validate


# ---------------------------------------------------------------------------------------------- the stage job

def run_job(params, data_dir, models_dir, reward_dir, out_dir, checkpoint_dir, stop_after=None, progress=True):
    """Everything stage 05 computes, in one function that runs the same in a notebook kernel or on each rank
    of a torchrun / accelerate job: build the models, train, and (rank 0) write log.jsonl, policy_adapter/,
    value/ and summary.json into `out_dir`. Returns the loop state."""
    P, s = params, params.ppo
    if s.oracle_rewards and (P.data.world != "synthetic" or P.reward.holistic):
        raise ValueError("params ppo.oracle_rewards: the oracle control needs the synthetic world's ground truth "
                         "and the three fact types (data.world: synthetic, reward.holistic: false)")
    rank = dist.get_rank() if dist.is_initialized() else 0
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() and world_size > 1 \
        else P.models.device
    policy_path = str(Path(models_dir) / "policy") if P.models.policy == "tiny" else \
        models.resolve_checkpoint(P.models.policy, P.models.local_files_only)
    load = dict(dtype=P.models.dtype, device=device, local_files_only=P.models.local_files_only)
    ds_config = deepspeed_config(s.deepspeed) if s.deepspeed else None
    backbone = reward.backbone_path(P.reward.backbone, models_dir, P.models.local_files_only)
    with partitioned_loading(ds_config, P.models.dtype):
        policy, processor = policy_model(policy_path, s.lora_r, s.lora_alpha, load_in_4bit=P.models.load_in_4bit,
                                         gradient_checkpointing=s.gradient_checkpointing, seed=P.seed, **load)
        rm_lvlm, rm_processor = models.load_lvlm(backbone, load_in_4bit=P.models.load_in_4bit, **load)
    if s.gradient_checkpointing:    # the value adapter trains through this backbone
        reward.enable_gradient_checkpointing(rm_lvlm)
    types = ["holistic"] if P.reward.holistic else reward.FACT_TYPES
    rm = reward.RewardModels.load(rm_lvlm, rm_processor, P.sampling.prompt, Path(reward_dir) / "reward_models", types)
    value_head = add_value_adapter(rm, s.value_init, seed=P.seed)
    trainer = Trainer(policy, processor, rm, value_head, s, types, P.sampling.prompt)
    if ds_config:
        use_deepspeed(trainer, ds_config)

    prompt_scenes = world.load_scenes(data_dir, "ppo")
    validation_scenes = world.load_scenes(data_dir, "validation")[:s.validation_images]
    validation_images = world.load_images(data_dir, validation_scenes)
    if s.oracle_rewards:
        trainer.oracle_scenes = {scene["image_id"]: scene for scene in prompt_scenes + validation_scenes}
    # under ZeRO-3 every rank joins every forward, so every rank validates (the same images; rank 0 logs)
    validate = validator(validation_scenes, validation_images, P.sampling.prompt, s.max_new_tokens,
                         P.evaluate.batch_size, P.data.world == "synthetic") \
        if rank == 0 or world_size == 1 or trainer.engines else None
    if world_size > 1 and not trainer.engines:
        validate = _rank0_only(validate)
    writer = tensorboard_writer(Path(out_dir) / "tensorboard") if rank == 0 else None
    state = train(trainer, prompt_scenes, lambda chunk: world.load_images(data_dir, chunk), s, P.seed,
                  checkpoint_dir, Path(out_dir) / "log.jsonl", validate, stop_after, rank, writer)
    if writer is not None:
        writer.close()
    with full_weights(trainer):
        if rank == 0:
            save_policy_adapter(trainer, Path(out_dir) / "policy_adapter")
            from safetensors.torch import save_file
            value_dir = Path(out_dir) / "value"
            value_dir.mkdir(parents=True, exist_ok=True)
            save_file({n: p.detach().cpu().contiguous() for n, p in trainer.value_params.items()},
                      value_dir / "value.safetensors")
    if rank == 0:
        (Path(out_dir) / "summary.json").write_text(json.dumps(
            {"iterations": state["iteration"], "stopped": state["stopped"], "world_size": world_size,
             "policy_base": stage.shown_path(policy_path), "reward_backbone": stage.shown_path(backbone),
             "reward_types": types}, indent=2))
    return state


def _rank0_only(validate):
    """Validation runs on rank 0; the other ranks wait for it (a barrier) and log nothing."""
    def wrapped(trainer, iteration):
        row = validate(trainer, iteration) if validate is not None else {}
        dist.barrier()
        return row
    return wrapped
