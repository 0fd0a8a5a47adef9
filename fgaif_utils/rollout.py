"""The rollout engine: sample responses from the LLaVA policy fast enough for PPO.

Generation is where an RLHF loop spends its time, and transformers' `generate` spends most of a decode step
launching kernels from Python, not waiting for memory (see shared/notes/gpu-anchor.md: 71-86 ms per step for a
7B LLaVA where reading the weights and the KV cache takes 7-12 ms). The engine here removes that overhead:

1. **prefill once**: one forward over prompt + image (the LLaVA model splices the image features into the
   <image> placeholders as usual) fills a transformers `StaticCache`, a KV cache of fixed shape;
2. **decode on static buffers**: every step reads its input token, positions and attention mask from tensors
   that never change address, so one decode step can be captured in a CUDA graph and replayed;
3. **sample in the loop**: suppression of <image>/<pad>/<s>, temperature, top-p, EOS bookkeeping and the
   log-prob of each chosen token are a handful of tensor ops after the step, with no host sync except an
   "all finished?" check every few steps.

Engines (`engine=`):
    "generate"  transformers `generate` (the reference; every device).
    "static"    the static-cache loop, eager (any device; this is what the CPU tests exercise).
    "graph"     the static-cache loop with the decode step captured in a torch.cuda.CUDAGraph (CUDA only).
    "compile"   the static-cache loop with the decode step under torch.compile(mode="reduce-overhead"),
                an alternative to "graph"; not the default and not measured yet.
    "auto"      "graph" where it can work (CUDA, sdpa/eager attention, no 4-bit weights), else "generate".

All engines return the same thing as `models.generate` plus log-probs: see `sample`.
"""
import inspect
import warnings
from typing import NamedTuple

import torch

from . import models

ENGINES = ("auto", "generate", "static", "graph", "compile")
EOS_CHECK_EVERY = 8   # decode steps between host syncs that ask "has every row finished?"
GRAPH_WARMUP_STEPS = 2


class Rollout(NamedTuple):
    """What `sample` returns. Unpacks as `token_ids, texts, logprobs = sample(...)`.

    token_ids: per sequence, the new token ids without padding and without the EOS (as `models.generate`).
    texts:     decoded from exactly those ids (skip_special_tokens), so character spans index into them.
    logprobs:  per sequence, one float per token id: log pi(token | prefix) under the model's plain softmax
               (temperature 1, no suppression, no top-p), i.e. what a forward pass over prompt + response gives.
               When sampling with temperature != 1 or top_p < 1, it is NOT the log-prob under the distribution
               the token was drawn from (PPO's ratio and KL use ppo.response_logprobs, at the sampling temperature).
    """
    token_ids: list
    texts: list
    logprobs: list


@torch.no_grad()
def sample(model, processor, images, prompts, max_new_tokens=64, do_sample=False, temperature=1.0, top_p=1.0,
           seed=None, engine="auto", stop_at_eos=True, with_logprobs=True):
    """Generate responses for a batch of (image, prompt) pairs; returns a `Rollout`.

    Same arguments and results as `models.generate`, plus `engine` (see the module docstring), `stop_at_eos`
    (False suppresses EOS, so that every row gets exactly max_new_tokens tokens, as benchmarks need) and
    `with_logprobs` (False: the generate engine keeps no per-step logits and the log-probs returned are zeros). Greedy
    decoding gives the same tokens on every engine (up to floating-point near-ties); sampling draws from the same
    distribution, but the static engines do not consume the random stream as `generate` does.
    The model (a LlavaForConditionalGeneration, or a peft model around one, adapters applied as they are active
    now) is used in whatever train/eval mode it is in.
    """
    engine = pick_engine(model, engine)
    tokenizer = processor.tokenizer
    batch = prepare_batch(model, processor, images, prompts)
    suppress_ids = models.suppressed_token_ids(processor) + ([] if stop_at_eos else [tokenizer.eos_token_id])
    options = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_p=top_p,
                   seed=seed, eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id, suppress_ids=suppress_ids)
    if engine == "generate":
        tokens, logprobs = generate_with_logprobs(model, batch, with_logprobs=with_logprobs, **options)
    else:
        tokens, logprobs = decode_static(model, batch, mode=engine, **options)
    return to_rollout(tokens, logprobs, tokenizer)


# ---------------------------------------------------------------------------------------------- choosing

def pick_engine(model, engine="auto"):
    """Resolve "auto": the CUDA-graph loop where capture can work, `generate` everywhere else.

    Capture needs CUDA, an attention implementation that takes our ready-made 4D mask (sdpa or eager; flash
    attention wants a 2D mask), and kernels without host syncs (bitsandbytes 4-bit is not known to be safe).
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    if engine != "auto":
        return engine
    base = _base_model(model)
    on_cuda = next(base.parameters()).device.type == "cuda"
    quantised = getattr(base, "is_loaded_in_4bit", False) or getattr(base, "is_loaded_in_8bit", False)
    return "graph" if on_cuda and _attention_kind(base) is not None and not quantised else "generate"


def _base_model(model):
    """The LlavaForConditionalGeneration under a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _attention_kind(base):
    """"sdpa" or "eager" when the language model takes a 4D mask we build ourselves; None otherwise."""
    impl = getattr(base.config.get_text_config(), "_attn_implementation", None) or "eager"
    return impl if impl in ("sdpa", "eager") else None


def _cache_kwarg(base):
    """The name of the KV-cache argument: "cache" in transformers 5.24, "past_key_values" in 5.17."""
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


# ---------------------------------------------------------------------------------------------- inputs

def prepare_batch(model, processor, images, prompts):
    """Tokenise (left padding, so every row's last prompt token sits in the last column), pad non-square images to
    squares as LLaVA-1.5 saw them (`models.square_images`), and move to the model."""
    processor.tokenizer.padding_side = "left"
    batch = processor(images=models.square_images(images, processor), text=list(prompts), return_tensors="pt",
                      padding=True)
    device, dtype = _device_and_dtype(model)
    batch = {key: value.to(device) for key, value in batch.items()}
    if "pixel_values" in batch:
        batch["pixel_values"] = batch["pixel_values"].to(dtype)
    return batch


def _device_and_dtype(model):
    weight = _base_model(model).get_input_embeddings().weight
    return weight.device, weight.dtype


# ---------------------------------------------------------------------------------------------- reference

def generate_with_logprobs(model, batch, max_new_tokens, do_sample, temperature, top_p, seed, eos_id, pad_id,
                           suppress_ids, with_logprobs=True):
    """transformers `generate` (as `models.generate` calls it) plus the plain log-probs of the chosen tokens.

    `output_logits` are the raw logits (unlike `output_scores`, which suppression, temperature and top-p have
    changed), so their log-softmax is exactly the forward-pass log-prob. Returns (tokens, logprobs), (B, T).
    """
    if seed is not None:
        torch.manual_seed(seed)
    sampling = models.sampling_args(do_sample, temperature, top_p)
    out = model.generate(**batch, max_new_tokens=max_new_tokens, pad_token_id=pad_id, eos_token_id=eos_id,
                         suppress_tokens=suppress_ids, output_logits=with_logprobs, return_dict_in_generate=True,
                         **sampling)
    tokens = out.sequences[:, batch["input_ids"].shape[1]:]
    if not with_logprobs:   # (B, T, V) logits of every step cost GBs at LLaVA scale; PPO recomputes log-probs anyway
        return tokens, torch.zeros(tokens.shape)
    logits = torch.stack(out.logits, dim=1)
    return tokens, token_logprobs(logits, tokens)


def token_logprobs(logits, tokens):
    """log softmax(logits)[token], in float32: (B, T, V), (B, T) -> (B, T)."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


# ---------------------------------------------------------------------------------------------- the loop

def decode_static(model, batch, max_new_tokens, do_sample, temperature, top_p, seed, eos_id, pad_id, suppress_ids,
                  mode="static"):
    """Prefill into a StaticCache, then decode step by step on static buffers. Returns (tokens, logprobs), (B, T).

    After a row has emitted EOS it is fed padding (its later tokens are cut by `to_rollout`); the loop stops once
    every row has finished, checked every EOS_CHECK_EVERY steps so that the GPU is not drained every step.
    """
    input_ids, prompt_mask = batch["input_ids"], batch["attention_mask"]
    rows, prompt_len = input_ids.shape
    device = input_ids.device
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    cache_len = -(-(prompt_len + max_new_tokens) // 16) * 16   # a multiple of 16 keeps fused attention kernels
    step = DecodeStep(model, rows, cache_len, device, mode)     # on aligned masks; the extra slots stay masked

    logits = step.prefill(batch)
    step.start(prompt_mask)
    tokens = torch.full((rows, max_new_tokens), pad_id, dtype=torch.long, device=device)
    logprobs = torch.zeros((rows, max_new_tokens), dtype=torch.float32, device=device)
    finished = torch.zeros(rows, dtype=torch.bool, device=device)
    suppress = torch.tensor(suppress_ids, dtype=torch.long, device=device)
    for t in range(max_new_tokens):
        if t > 0:
            logits = step(prompt_len + t - 1)
        chosen = choose_tokens(logits, suppress, do_sample, temperature, top_p, generator)
        logprobs[:, t] = token_logprobs(logits, chosen)
        chosen = chosen.masked_fill(finished, pad_id)
        tokens[:, t] = chosen
        finished |= chosen == eos_id
        if (t + 1) % EOS_CHECK_EVERY == 0 and bool(finished.all()):
            break
        step.feed(chosen)
    return tokens, logprobs


def choose_tokens(logits, suppress, do_sample, temperature, top_p, generator=None):
    """The next token per row, as `generate` picks it: suppressed ids out, then argmax, or temperature + top-p
    + multinomial. `logits` are the raw (B, V) logits of the last position."""
    scores = logits.float().index_fill(-1, suppress, float("-inf"))
    if not do_sample:
        return scores.argmax(-1)
    scores = scores / temperature
    if top_p < 1.0:
        scores = top_p_filter(scores, top_p)
    return torch.multinomial(torch.softmax(scores, -1), 1, generator=generator).squeeze(-1)


def top_p_filter(scores, top_p):
    """Nucleus filtering: keep the smallest set of most likely tokens whose probability reaches top_p (at least
    one), set the rest to -inf. Same rule as transformers' TopPLogitsWarper: drop a token when the probability
    mass of the tokens less likely than or as likely as it is <= 1 - top_p."""
    ascending, order = torch.sort(scores, dim=-1)
    mass_below = torch.softmax(ascending, -1).cumsum(-1)
    drop = mass_below <= 1 - top_p
    drop[:, -1] = False
    return scores.masked_fill(drop.scatter(-1, order, drop), float("-inf"))


# ---------------------------------------------------------------------------------------------- one step

class DecodeStep:
    """One decode forward of the language model on buffers that never move, so that it can be replayed.

    Static inputs: `ids` (B, 1) the token fed, `positions` (B, 1) its rotary position (left padding makes them
    differ per row), `allowed` (B, 1, 1, M) which cache slots each row may attend to. Where the new key/value is
    written needs no input: transformers' static cache layers keep their fill level in a device tensor
    (`cumulative_length`, in 5.17 and 5.24 alike) and advance it in place, which a CUDA graph replays too.
    """

    def __init__(self, model, rows, max_len, device, mode):
        self.model, self.mode, self.max_len = model, mode, max_len
        base = _base_model(model)
        self.attention = _attention_kind(base)
        if self.attention is None:
            raise ValueError("the static-cache engine needs sdpa or eager attention; use engine='generate'")
        check_device(mode, device)
        from transformers import StaticCache
        self.cache = StaticCache(config=base.config, max_cache_len=max_len)
        self.cache_kwarg = _cache_kwarg(base)
        self.dtype = _device_and_dtype(model)[1]
        self.ids = torch.zeros((rows, 1), dtype=torch.long, device=device)
        self.positions = torch.zeros((rows, 1), dtype=torch.long, device=device)
        self.allowed = torch.zeros((rows, 1, 1, max_len), dtype=torch.bool, device=device)
        self.graph, self.graph_logits, self.compiled = None, None, None

    def prefill(self, batch):
        """The prompt forward (image features spliced in), filling cache slots [0, L). Returns (B, V) logits."""
        mask = batch["attention_mask"]
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)   # as generate: padding does not count
        out = self.model(**batch, position_ids=positions, use_cache=True, logits_to_keep=1,
                         **{self.cache_kwarg: self.cache})
        return out.logits[:, -1]

    def start(self, prompt_mask):
        """Set the buffers for the first decode step: attend to the real prompt tokens, position = their count."""
        prompt_len = prompt_mask.shape[1]
        self.allowed[:, 0, 0, :prompt_len] = prompt_mask.bool()
        self.positions.copy_(prompt_mask.long().sum(-1, keepdim=True))

    def feed(self, chosen):
        """Write the chosen tokens as the next input (the position buffer moves on in `__call__`)."""
        self.ids.copy_(chosen.unsqueeze(-1))

    def __call__(self, slot):
        """Run the step for cache slot `slot` (= prompt length + tokens fed so far). Returns (B, V) logits."""
        self.allowed[:, 0, 0, slot] = True
        if self.mode == "graph":
            logits = self._replay()
        elif self.mode == "compile":
            if self.compiled is None:
                for buffer in (self.ids, self.positions, self.allowed):   # inputs at fixed addresses: no copies
                    torch._dynamo.mark_static_address(buffer)
                self.compiled = torch.compile(self._forward, mode="reduce-overhead", fullgraph=False)
            logits = self.compiled().clone()   # cudagraph-tree outputs are overwritten by the next replay
        else:
            logits = self._forward()
        self.positions.add_(1)
        return logits

    def _forward(self):
        mask = self.allowed
        if self.attention == "eager":   # eager attention adds its mask to the scores
            mask = torch.zeros(mask.shape, dtype=self.dtype, device=mask.device).masked_fill(
                ~mask, torch.finfo(self.dtype).min)
        out = self.model(input_ids=self.ids, position_ids=self.positions, attention_mask=mask, use_cache=True,
                         logits_to_keep=1, **{self.cache_kwarg: self.cache})
        return out.logits[:, -1]

    def _replay(self):
        """Replay the captured step, capturing it on first use (after warm-up runs whose cache writes are undone)."""
        if self.graph is None:
            try:
                self._capture()
            except Exception as err:   # capture is an optimisation: never lose the rollout over it
                warnings.warn(f"CUDA graph capture failed ({err!r}); decoding without a graph")
                self.graph, self.mode = None, "static"
                return self._forward()
        self.graph.replay()
        return self.graph_logits

    def _capture(self):
        """Warm up on a side stream (lazy cuBLAS/attention setup must not happen inside capture), restore the
        cache fill level the warm-up advanced, then record one step into a CUDA graph.

        The warm-up writes junk keys/values into the slots after the current one; they are masked (`allowed` is
        False there) and overwritten by the real steps before they are ever attended to.
        """
        fill_levels = [layer.cumulative_length.clone() for layer in self.cache.layers]
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(GRAPH_WARMUP_STEPS):
                    self._forward()
            torch.cuda.current_stream().wait_stream(side)
            self._restore(fill_levels)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                logits = self._forward()
        finally:                        # capture runs no kernel; a failed warm-up may have advanced the cache
            self._restore(fill_levels)
        self.graph, self.graph_logits = graph, logits

    def _restore(self, fill_levels):
        for layer, level in zip(self.cache.layers, fill_levels):
            layer.cumulative_length.copy_(level)


def check_device(mode, device):
    """CUDA graphs (and torch.compile's reduce-overhead graphs) exist only on CUDA devices."""
    if mode in ("graph", "compile") and device.type != "cuda":
        raise ValueError(f"engine={mode!r} needs a CUDA device; use 'static' or 'generate'")


# ---------------------------------------------------------------------------------------------- outputs

def to_rollout(tokens, logprobs, tokenizer):
    """(B, T) tensors -> `Rollout`: ids up to (not including) the first EOS, padding dropped, texts decoded from
    exactly those ids, log-probs aligned with the ids."""
    token_ids, token_logprobs_, texts = [], [], []
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    for row_ids, row_lp in zip(tokens.tolist(), logprobs.tolist()):
        ids, lps = [], []
        for token, lp in zip(row_ids, row_lp):
            if token == eos:
                break
            if token != pad:
                ids.append(token)
                lps.append(lp)
        token_ids.append(ids)
        token_logprobs_.append(lps)
        texts.append(tokenizer.decode(ids, skip_special_tokens=True))
    return Rollout(token_ids, texts, token_logprobs_)
