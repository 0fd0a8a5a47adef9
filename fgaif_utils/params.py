"""One typed, documented schema for every params file, and its loader.

A params file is YAML. `extends: other.yaml` (relative to the file) starts from another profile and overrides
it key by key. Every key is checked against the dataclasses below before any work starts: an unknown key,
a wrong type, a number outside its bounds, a value outside its choices or a missing file is a `ParamsError`
naming the key and the file.
The string under each field is its documentation (`describe()` prints them all).
"""
import ast
import dataclasses
import difflib
import inspect
import json
import os
import re
import typing
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal, Optional

import yaml

from fgaif_utils import language

REPO_ROOT = Path(__file__).resolve().parent.parent


# The synthetic world's splits, in image-id order (world.SPLITS); named here so that params can check split names.
WORLD_SPLITS = ("sft", "feedback", "ppo", "validation", "eval", "eval_long", "eval_ood")


# A run name becomes a folder under outputs/ that the runner wipes parts of: a plain name (stage.check_run_name).
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
ENV_VARIABLE = re.compile(r"[A-Z_][A-Z0-9_]{0,63}")   # POSIX's portable names: a mixed-case key does not pass


class ParamsError(ValueError):
    """A params file is malformed: the message names the file and the key."""


@dataclass(frozen=True)
class Bounds:
    """The range a number must lie in (each limit optional), attached to a field's type with `Annotated`."""
    ge: Optional[float] = None
    gt: Optional[float] = None
    le: Optional[float] = None
    lt: Optional[float] = None

    def admits(self, value):
        return ((self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
                and (self.le is None or value <= self.le) and (self.lt is None or value < self.lt))

    def __str__(self):
        limits = ((">=", self.ge), (">", self.gt), ("<=", self.le), ("<", self.lt))
        return " and ".join(f"{op} {limit:g}" for op, limit in limits if limit is not None)


PositiveInt = Annotated[int, Bounds(ge=1)]
NonNegativeInt = Annotated[int, Bounds(ge=0)]
PositiveFloat = Annotated[float, Bounds(gt=0)]
NonNegativeFloat = Annotated[float, Bounds(ge=0)]
Probability = Annotated[float, Bounds(ge=0, le=1)]
OpenFraction = Annotated[float, Bounds(gt=0, lt=1)]     # a share that must leave something on both sides
NucleusP = Annotated[float, Bounds(gt=0, le=1)]         # top-p: 1.0 = off, 0 would keep no token
ObjectCount = Annotated[int, Bounds(ge=1, le=len(language.SHAPES))]   # each shape appears at most once in a scene


@dataclass
class NoiseParams:
    p_object: Probability = 0.2
    """Per noisy description: probability of inserting an absent object (a present object's co-occurrence partner, in its typical colour)."""
    p_colour: Probability = 0.2
    """Per noisy description: probability of describing one present object with a wrong colour (its shape's typical colour when that differs)."""
    p_relation: Probability = 0.2
    """Per noisy description with a stated relation: probability of flipping one relation (left <-> right, above <-> below)."""
    sys_colour: Probability = 0.6
    """Systematic prior substitution: a small object of atypical colour is written in its shape's typical colour with this probability."""


@dataclass
class WorldParams:
    image_size: PositiveInt = 64
    """Side of the square synthetic images in pixels."""
    min_objects: ObjectCount = 1
    """Fewest objects drawn for a scene (all splits but eval_long); a scene whose objects do not fit on the canvas loses its last ones, so a few scenes hold fewer."""
    max_objects: ObjectCount = 4
    """Most objects in a scene (all splits but eval_long); each shape appears at most once."""
    long_min_objects: ObjectCount = 4
    """Fewest objects drawn for an eval_long scene (as `min_objects`, a crowded canvas may hold fewer: 4% of tiny's eval_long scenes have 3)."""
    long_max_objects: ObjectCount = 5
    """Most objects in an eval_long scene."""
    long_splits: list[Literal[WORLD_SPLITS]] = field(default_factory=lambda: ["eval_long"])
    """Splits drawn like eval_long: long_min_objects..long_max_objects objects, descriptions (clean and, for sft, noisy) with up to twice max_relations relations. eval_long always; adding ppo and validation trains PPO on crowded scenes and long descriptions (params/long/)."""
    radius_small: PositiveFloat = 9.0
    """Radius in pixels of a small object."""
    radius_large: PositiveFloat = 14.0
    """Radius in pixels of a large object."""
    typical_colour_p: Probability = 0.6
    """Probability that an object has its shape's typical colour (otherwise one of the others, uniformly)."""
    partner_p: Probability = 0.6
    """Probability that a new object is the co-occurrence partner of one already placed (when that partner is absent)."""
    max_relations: NonNegativeInt = 2
    """Most relation sentences in a reference description (eval_long states up to twice as many)."""
    size_word_p: Probability = 1.0
    """Probability that a noun phrase of the world's descriptions (clean and noisy) states the object's size; 1 = always (tiny), lower lets a policy leave out what it cannot see (params/words/, 0.7)."""
    colour_word_p: Probability = 1.0
    """Probability that a noun phrase states the object's colour; 1 = always (tiny)."""
    fog_strength: Probability = 0.55
    """eval_ood: blend weight of the grey fog overlay (0 = none, 1 = only fog)."""
    fog_noise_std: NonNegativeFloat = 18.0
    """eval_ood: standard deviation of the added pixel noise (0-255 scale)."""


@dataclass
class DataParams:
    world: Literal["synthetic", "coco"] = "synthetic"
    """Which world: the embedded synthetic scene world, or real COCO 2014 read from `coco_root`."""
    coco_root: str = ""
    """COCO 2014 folder with train2014/, val2014/ and annotations/ (world: coco only)."""
    n_sft: NonNegativeInt = 20000
    """Images for supervised training of the tiny models (synthetic only; 0 for COCO)."""
    n_feedback: NonNegativeInt = 1000
    """Images whose sampled responses get AI feedback, i.e. reward-model training data (paper: 3,500)."""
    n_ppo: NonNegativeInt = 2000
    """Images used as PPO prompts, disjoint from the feedback images (paper: 14,000)."""
    n_validation: NonNegativeInt = 300
    """Images for choosing checkpoints and PPO stopping points, never for reporting."""
    n_eval: NonNegativeInt = 500
    """Held-out evaluation images (COCO: from val2014)."""
    n_eval_long: NonNegativeInt = 500
    """Evaluation images with more objects and longer descriptions (synthetic only)."""
    n_eval_ood: NonNegativeInt = 500
    """Evaluation images under fog and noise: the out-of-distribution test (synthetic only)."""
    captions_per_image: Annotated[int, Bounds(ge=1, le=10)] = 2
    """Clean reference descriptions written per image (COCO-style captions file; caption ids are image id x 10 + k, so at most 10)."""
    noisy_captions_per_image: NonNegativeInt = 2
    """Noisy descriptions written per sft image for training the base policy."""
    noise: NoiseParams = field(default_factory=NoiseParams)
    """Noisy-caption generator rates."""
    world_params: WorldParams = field(default_factory=WorldParams)
    """Synthetic scene world geometry and priors."""


@dataclass
class TinyArchParams:
    patch_size: PositiveInt = 8
    """Vision patch size; (image_size / patch_size)^2 image tokens."""
    vision_hidden: PositiveInt = 64
    """CLIP-style vision tower hidden size."""
    vision_layers: PositiveInt = 2
    """CLIP-style vision tower layers."""
    text_hidden: PositiveInt = 128
    """Llama-style language model hidden size."""
    text_layers: PositiveInt = 2
    """Llama-style language model layers."""
    heads: PositiveInt = 4
    """Attention heads in both towers."""
    vision_position_init: Literal["default", "sincos"] = "default"
    """Start of the vision tower's patch position embeddings: "default" (CLIP's, std 0.02: training never grows them, so
    the image tokens carry no patch position and relations cannot be learned) or "sincos" (a fixed-frequency 2D sine /
    cosine code of row and column, still trained, scaled to `vision_position_scale`). Same llava-hf format either way."""
    vision_position_scale: PositiveFloat = 0.3
    """Standard deviation of the "sincos" position code (the patch embeddings start near 0.23, so 0.3 leaves both
    visible after the tower's first layer norm)."""


@dataclass
class TinyTrainParams:
    batch_size: PositiveInt = 32
    """Sequences per optimiser step."""
    lr: PositiveFloat = 1e-3
    """Peak learning rate of the shared clean-caption pre-training (AdamW, warm-up then cosine)."""
    branch_lr: PositiveFloat = 5e-4
    """Peak learning rate of the policy and verifier branches."""
    pretrain_steps: NonNegativeInt = 2400
    """Steps of clean-caption pre-training shared by policy and verifier."""
    policy_steps: NonNegativeInt = 1200
    """Steps of the policy branch: noisy captions mixed with packed yes/no questions."""
    policy_qa_share: Probability = 0.25
    """Share of policy-branch steps that are packed yes/no question batches."""
    verifier_steps: NonNegativeInt = 2600
    """Steps of the LVLM verifier branch: clean captions mixed 50/50 with packed yes/no questions."""
    detector_steps: NonNegativeInt = 450
    """Steps of the detector verifier (a small CNN predicting each shape's presence, colour, size and position). About 450 steps gives an imperfect judge (~90% yes/no accuracy, like LLaVA-1.5 on POPE); 1500 gives ~99.8%."""
    eval_images: PositiveInt = 500
    """Held-out eval images used for the stage-01 report."""


@dataclass
class ModelParams:
    policy: str = "tiny"
    """Base policy: "tiny" (trained in stage 01), a hub id such as llava-hf/llava-1.5-7b-hf, or a local llava-hf folder."""
    verifier: str = "tiny"
    """Verifier LVLM for yes/no questions: "tiny", a hub id (llava-hf/llava-1.5-13b-hf) or a local llava-hf folder."""
    train_lvlm_verifier: bool = False
    """Tiny world only: also train the tiny LVLM verifier (about 13 minutes on 2 cores), which `feedback.verifier: hf` with `models.verifier: tiny` and `reward.backbone: verifier_lvlm` need; the detector is the default judge."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Weights dtype when loading real models."""
    device: str = "auto"
    """"auto" (cuda when available, else cpu), "cpu", "cuda" or "cuda:N"."""
    load_in_4bit: bool = False
    """Load real models in 4-bit NF4 with double quantisation (bitsandbytes, CUDA only)."""
    local_files_only: bool = True
    """Never reach the hub: a hub id must already be in the local cache (set HF_HOME) or be a local folder."""
    tiny: TinyArchParams = field(default_factory=TinyArchParams)
    """Architecture of the tiny LLaVA models."""
    tiny_train: TinyTrainParams = field(default_factory=TinyTrainParams)
    """Training schedule of the tiny models."""


@dataclass
class SamplingParams:
    samples_per_image: PositiveInt = 4
    """K: responses sampled per feedback image."""
    n_images: NonNegativeInt = 0
    """Feedback images to sample for (0 = every image of the feedback split)."""
    prompt: str = "Describe this image in detail."
    """The instruction (LLaVA-1.5's detailed-description prompt), wrapped in the model's chat template."""
    temperature: PositiveFloat = 1.0
    """Sampling temperature."""
    top_p: NucleusP = 1.0
    """Nucleus sampling threshold (1.0 = off)."""
    max_new_tokens: PositiveInt = 64
    """Longest response in tokens."""
    batch_size: PositiveInt = 64
    """Prompts per generate call."""
    engine: Literal["auto", "generate", "static", "graph", "compile"] = "auto"
    """How responses are decoded (fgaif_utils.rollout): "auto" = a CUDA-graph static-cache decode on GPUs, transformers generate elsewhere."""


@dataclass
class FeedbackParams:
    extractor: Literal["rules", "openai"] = "rules"
    """Atomic-fact extraction: "rules" (offline, the synthetic world's grammar) or "openai" (an OpenAI-compatible LLM)."""
    llm_model: str = "gpt-3.5-turbo-0125"
    """LLM for fact extraction (paper: gpt-3.5-turbo-0125; alternative gpt-4o-2024-08-06)."""
    llm_base_url: str = ""
    """OpenAI-compatible endpoint (vLLM, Ollama, LM Studio); "" = the OpenAI API."""
    llm_api_key_env: str = ""
    """The environment variable that holds the LLM endpoint's key (a name, never the key); "" = OPENAI_API_KEY for the OpenAI API and no key for a llm_base_url, so the OpenAI key never goes to another server unless this names it."""
    llm_max_tokens: NonNegativeInt = 1024
    """Most tokens of one fact-extraction answer (a runaway answer is cut there, and repaired or counted as failed); 0 = no limit, and no max_tokens in the request (for servers that refuse it, like OpenAI's reasoning models)."""
    concurrency: PositiveInt = 8
    """Parallel LLM / vision requests."""
    max_retries: NonNegativeInt = 5
    """Retries (exponential backoff) on 429, 5xx, timeouts and connection errors."""
    timeout_s: PositiveFloat = 60.0
    """Seconds before one request counts as timed out."""
    max_failed_fraction: Probability = 0.01
    """Most sub-sentences (a share) that may stay unlabelled because their fact extraction or a verifier call failed for good: they get null labels, which the reward models skip. Above it stage 03 stops with an error naming them once every answer is cached, so a rerun retries only the failures. Not 0: one answer a model never makes usable would block the stage for good."""
    verifier: Literal["detector", "hf", "openai-vision"] = "detector"
    """Who answers the yes/no questions: the tiny detector verifier, an HF LVLM (models.verifier; "tiny" = stage 01's LVLM verifier), or an OpenAI-compatible vision endpoint."""
    vision_model: str = "gpt-4o-2024-08-06"
    """Model name for the openai-vision verifier."""
    vision_base_url: str = ""
    """Endpoint for the openai-vision verifier (e.g. vLLM serving LLaVA-1.5); "" = the OpenAI API."""
    vision_api_key_env: str = ""
    """The environment variable that holds the vision endpoint's key; "" = OPENAI_API_KEY for the OpenAI API and no key for a vision_base_url."""
    question_suffix: str = ""
    """Appended to every verifier question (LLaVA-1.5 short answers: " Answer the question using a single word or phrase.")."""
    verifier_batch_size: PositiveInt = 128
    """Questions per verifier forward pass (hf backend)."""
    existence_gate: bool = False
    """Attribute and relation facts about a shape the verifier judged absent are not judged for their own type (n/a), as in the ground-truth scorer: the object label carries that error. false = the paper's literal rule (every answer counts, so a red ring that is not there is an object and an attribute hallucination)."""
    size_twins: bool = False
    """Synthetic world: also label a counterfactual twin of every response that says a size word, with each size word flipped (small <-> large) and nothing else changed, by the same extractor and verifier (fg_labels_twins.jsonl); reward.twin_share trains on them. Not in the paper."""
    report_records: NonNegativeInt = 150
    """Responses shown in labels_report.html (metrics always use all)."""


@dataclass
class TypeEpochs:
    object: NonNegativeInt = 0
    """Most epochs of the object reward model; 0 = reward.epochs."""
    attribute: NonNegativeInt = 0
    """Most epochs of the attribute reward model; 0 = reward.epochs."""
    relation: NonNegativeInt = 0
    """Most epochs of the relation reward model; 0 = reward.epochs."""


@dataclass
class ClaimWords:
    object: list[list[str]] = field(default_factory=list)
    """Claim words of the object reward model's head ([] = the plain 3-way head); see `relation`."""
    attribute: list[list[str]] = field(default_factory=list)
    """Claim words of the attribute reward model's head ([] = the plain 3-way head); see `relation`."""
    relation: list[list[str]] = field(default_factory=list)
    """Claim words of the relation reward model's head, one list of surface forms per value (tiny: [[left], [right], [above], [below, under]]), at least two values, each form one token of the tokenizer; [] = the plain 3-way head (paper). The head then names the value at each end marker and p(correct) is the stated word's probability (reward.three_class_logits)."""


@dataclass
class RewardParams:
    backbone: str = "pretrained"
    """Reward-model backbone: "pretrained", "policy" or "verifier_lvlm" (a stage-01 model of the tiny world), a hub id (paper: llava-hf/llava-1.5-13b-hf, larger than the policy) or a local llava-hf folder ("outputs/..." is under the repo root and checked when stage 04 runs: a model a benchmark wrote). It must share the policy's tokenizer."""
    lora_r: PositiveInt = 64
    """LoRA rank of each reward model's adapter on the language model (paper: 64)."""
    lora_alpha: PositiveInt = 16
    """LoRA alpha (paper: 16)."""
    lora_dropout: Annotated[float, Bounds(ge=0, lt=1)] = 0.0
    """Dropout on the LoRA inputs."""
    lr: PositiveFloat = 2e-5
    """Adam learning rate (paper: 2e-5)."""
    lr_schedule: Literal["constant", "linear"] = "constant"
    """The learning rate over training: "constant" (paper) or "linear" (from lr down to 0 at the last step of `epochs`)."""
    ema_decay: Annotated[float, Bounds(ge=0, lt=1)] = 0.0
    """Keep an exponential moving average of each adapter's weights (decay per step, warmed up as min(decay, (1 + step) / (10 + step))) and score, keep and save the average instead of the last step's weights; 0 = off (paper)."""
    batch_size: PositiveInt = 4
    """Responses per optimiser step (paper: 4)."""
    class_weights: Literal["none", "balanced"] = "none"
    """Cross-entropy class weights: "none" (paper) or "balanced" (N / (3 * N_class) from each type's training labels, at most 10). With existence_gate the hallucinated class is rare for attribute and relation, and unweighted models rarely predict it (benchmarks/MEASUREMENTS.md)."""
    epochs: PositiveInt = 100
    """Most epochs per reward model (paper: up to 100, with early stopping)."""
    type_epochs: TypeEpochs = field(default_factory=TypeEpochs)
    """Most epochs of one type's reward model where it should differ from `epochs` (0 = `epochs`)."""
    patience: PositiveInt = 3
    """Early stopping: epochs without a better dev macro-F1 (against the AI labels) before training stops."""
    dev_fraction: OpenFraction = 0.1
    """Share of the feedback images whose responses form the dev split (early stopping)."""
    test_fraction: OpenFraction = 0.2
    """Share of the feedback images whose responses are held out for the reported metrics."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (less GPU memory, slower)."""
    train_processes: PositiveInt = 1
    """Processes that train the types' adapters side by side, each with its own copy of the backbone and num_threads // train_processes torch threads (CPU and the synthetic world's feature cache only). 1 = one type after another in the stage's process. Small models leave a second thread half idle: on 2 cores tiny's three types train in 264 s in two one-thread processes and in 330 s one after another with two threads, to the same bits (benchmarks/MEASUREMENTS.md)."""
    eval_batch_size: PositiveInt = 32
    """Responses per forward pass when scoring (times 3 in the mixed-adapter pass)."""
    checkpoint_every: PositiveInt = 500
    """Steps between training checkpoints in the stage cache (there is also one at every epoch end)."""
    report_records: NonNegativeInt = 40
    """Scored held-out responses shown in scored_examples.html."""
    twin_share: Annotated[float, Bounds(ge=0, lt=1)] = 0.0
    """Chance that a training response with a size-flipped twin (feedback.size_twins) is replaced by the twin in a batch; dev and test stay as sampled. 0 = off (paper). Breaks the correlation between the word "small" and the errors it co-occurs with in the policy's samples (benchmarks/MEASUREMENTS.md)."""
    claim_words: ClaimWords = field(default_factory=ClaimWords)
    """Per type, the words whose value its head names instead of judging the sub-sentence directly (off in the paper profile; benchmarks/MEASUREMENTS.md "Relations: naming instead of judging")."""
    holistic: bool = False
    """Ablation: train ONE reward model on "any hallucination" labels (1 if any type is hallucinated) instead of the three; PPO then uses it alone."""

    def epochs_of(self, fact_type):
        """Most epochs of one reward model: its `type_epochs` entry, else `epochs` (also for the holistic model)."""
        return getattr(self.type_epochs, fact_type, 0) or self.epochs


@dataclass
class RewardWeights:
    object: NonNegativeFloat = 1.0
    """Weight of the object-existence reward model (0 switches it off: the no-object ablation)."""
    attribute: NonNegativeFloat = 1.0
    """Weight of the attribute reward model."""
    relation: NonNegativeFloat = 1.0
    """Weight of the relation reward model."""


@dataclass
class PpoParams:
    steps: PositiveInt = 100
    """PPO iterations (each: one rollout batch, scoring, then `epochs` passes of minibatch updates)."""
    rollout_batch: PositiveInt = 256
    """Responses sampled per iteration (paper: 256)."""
    samples_per_image: PositiveInt = 1
    """Responses per prompt image within a rollout batch."""
    rollout_chunk: NonNegativeInt = 0
    """Responses a rank decodes at once in PPO's rollout, and scores and runs the policy, reference and value forwards
    on at once (0 = its whole share of the batch; under DeepSpeed scoring and forwards always take the whole share). The static KV cache holds rows x (prompt + max_new_tokens) for every layer: 35 GiB for 64 LLaVA-7B rows of 1,120 tokens, on top of two bases, adapters and Adam states."""
    minibatch_size: PositiveInt = 64
    """Responses per gradient step."""
    epochs: PositiveInt = 2
    """PPO epochs over each rollout batch (paper: 2)."""
    lr: PositiveFloat = 1e-7
    """Adam learning rate of the policy adapter and the value model (paper: 1e-7)."""
    value_lr: NonNegativeFloat = 0.0
    """Learning rate of the value model; 0 = the same as `lr`."""
    lora_r: PositiveInt = 64
    """LoRA rank of the policy adapter (language model only)."""
    lora_alpha: PositiveInt = 16
    """LoRA alpha of the policy adapter."""
    temperature: PositiveFloat = 1.0
    """Rollout sampling temperature (paper: 1.0)."""
    top_p: NucleusP = 1.0
    """Rollout nucleus threshold (paper: 1.0)."""
    max_new_tokens: PositiveInt = 64
    """Longest rollout response in tokens."""
    rollout_engine: Literal["auto", "generate", "static", "graph", "compile"] = "auto"
    """How rollouts are decoded (fgaif_utils.rollout): "auto" = a CUDA-graph static-cache decode on GPUs, transformers generate elsewhere."""
    beta: NonNegativeFloat = 0.1
    """KL coefficient: every response token gets -beta * (log pi - log pi_ref) (paper: 0.1)."""
    gamma: Probability = 1.0
    """GAE discount."""
    lam: Probability = 0.95
    """GAE lambda."""
    clip: PositiveFloat = 0.2
    """PPO ratio clip (paper: 0.2)."""
    value_clip: PositiveFloat = 0.2
    """Clip of the value prediction around its rollout value."""
    vf_coef: NonNegativeFloat = 0.5
    """Weight of the value loss when the policy and value losses are summed."""
    grad_clip: PositiveFloat = 1.0
    """Gradient-norm clip per model."""
    weights: RewardWeights = field(default_factory=RewardWeights)
    """Per-type weights of the fine-grained rewards (+1 correct, -1 hallucinated, 0 n/a, times the weight)."""
    sparse: bool = False
    """Ablation: put the same total fine-grained reward on the response's last token only (the paper's sparse baseline)."""
    reward_scale: NonNegativeFloat = 1.0
    """Multiply the fine-grained rewards by this before adding the KL term (after whiten_rewards)."""
    whiten_rewards: bool = False
    """Divide the fine-grained rewards by the standard deviation of the responses' total rewards over the rollout batch, before reward_scale and the KL term (not shifted: a shifted mean would reward or penalise every token; by totals, so that dense and sparse rewards of the same labels keep equal sums)."""
    reward_repeats: bool = True
    """Score every sub-sentence, including exact repeats of an earlier one in the same response (the paper). False: a repeat earns no fine-grained reward, the smallest fix for the repetition hack that per-sub-sentence rewards invite (measured on tiny: benchmarks/MEASUREMENTS.md)."""
    claim_bonus: NonNegativeFloat = 0.0
    """Counterweight against saying less (off in the paper profile): reward added on each sub-sentence the reward models judge correct for some type and hallucinated for none."""
    oracle_rewards: bool = False
    """A control, not FGAIF (synthetic world only): the ground-truth scorer's labels replace the reward models' (perfect feedback), to tell what the reward models get wrong from what the RL does with any reward."""
    kl_budget: NonNegativeFloat = 0.0
    """Stop when the mean per-token KL to the reference of an iteration's rollout exceeds this (nats; the k3 estimate, never negative, logged as kl_k3_per_token); 0 = no budget."""
    value_init: Literal["object_reward", "fresh"] = "object_reward"
    """Value model start (a fourth adapter on the reward models' backbone + a scalar head): the object reward model's LoRA weights (paper), or a fresh adapter. A value model from the policy: `reward.backbone: policy` (tiny world; on COCO the policy's hub id or folder) with "fresh"."""
    validate_every: PositiveInt = 10
    """Iterations between ground-truth/reward checks on the validation split (checkpoint choice, never the eval split)."""
    validation_images: PositiveInt = 200
    """Validation images per check."""
    checkpoint_every: PositiveInt = 10
    """Iterations between resumable checkpoints (adapter, value model, optimisers, loop state; every iteration reseeds its images, sampling and torch's random stream from (seed, iteration), so a resumed run repeats the uninterrupted one)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (less GPU memory, slower)."""
    launcher: Literal["none", "torchrun", "accelerate"] = "none"
    """Run the training function in the notebook's kernel ("none") or as a multi-process job."""
    nproc: PositiveInt = 1
    """Processes (GPUs) for torchrun / accelerate."""
    deepspeed: str = ""
    """A DeepSpeed config (JSON; relative to the repository or absolute) for the torchrun / accelerate job, e.g. params/deepspeed/zero3.json: ZeRO stage 3 partitions the frozen policy and reward bases, the adapters and the optimiser states over the ranks (13B-size models). These params fill in its batch size, gradient clipping and the client optimiser. "" = plain data parallel."""
    report_images: NonNegativeInt = 12
    """Eval-split images shown described before and after PPO."""


@dataclass
class EvaluateParams:
    n_images: PositiveInt = 500
    """Images per evaluation split (eval, eval_long, eval_ood; COCO: val2014) for descriptions and POPE (COCO without pope_files: the eval images with at least pope_objects categories, topped up from the rest of val2014)."""
    max_new_tokens: PositiveInt = 64
    """Longest description in tokens (greedy)."""
    batch_size: PositiveInt = 100
    """Images per generate call."""
    pope_objects: PositiveInt = 3
    """POPE: present and absent objects asked about per image (3 + 3 in Li et al. 2023); COCO without pope_files asks only about val2014 images with at least this many annotated categories."""
    pope_max_new_tokens: PositiveInt = 8
    """Longest POPE answer in tokens (greedy). The answer is read from its first sentence, so with the one-word suffix 8 is plenty; LLaVA-1.5's scripts allow 128, which a policy that explains its answer before saying no may need."""
    pope_suffix: str = ""
    """Appended to every POPE question (LLaVA-1.5 eval: " Answer the question using a single word or phrase.")."""
    pope_files: str = ""
    """A folder of official POPE question files (coco_pope_{random,popular,adversarial}.json); "" = build them here."""
    bootstrap: PositiveInt = 1000
    """Bootstrap resamples (over images) for the confidence intervals and paired tests."""
    confidence: OpenFraction = 0.95
    """Confidence level of the intervals."""
    compare_runs: list[str] = field(default_factory=list)
    """Other runs whose PPO policies are evaluated beside this one (the ablations), on the same images."""
    judge_model: str = "gpt-4-0613"
    """Judge for MMHal-Bench and LLaVA-Bench (any OpenAI-compatible model)."""
    judge_base_url: str = ""
    """OpenAI-compatible endpoint of the judge; "" = the OpenAI API."""
    judge_api_key_env: str = ""
    """The environment variable that holds the judge endpoint's key; "" = OPENAI_API_KEY for the OpenAI API and no key for a judge_base_url."""
    mmhal_path: str = ""
    """MMHal-Bench folder (response_template.json + images), supplied by the user; "" = skip."""
    llava_bench_path: str = ""
    """LLaVA-Bench in-the-wild folder (questions.jsonl, context.jsonl, answers_gpt4.jsonl, images/); "" = skip."""
    report_images: NonNegativeInt = 12
    """Images shown side by side for every policy."""


@dataclass
class Params:
    run: str = "tiny"
    """Default run name: artifacts go to outputs/<run>/<NN_stage>/."""
    seed: NonNegativeInt = 0
    """Seed for every random draw: the same params on the same machine give the same artifacts."""
    num_threads: PositiveInt = 2
    """torch CPU threads (keep at the machine's core count; two torch jobs at once oversubscribe)."""
    description: str = ""
    """Free text: what this profile is for."""
    data: DataParams = field(default_factory=DataParams)
    """Stage 00: which world, which splits."""
    models: ModelParams = field(default_factory=ModelParams)
    """Stage 01: base policy and verifier."""
    sampling: SamplingParams = field(default_factory=SamplingParams)
    """Stage 02: sampling responses for AI feedback."""
    feedback: FeedbackParams = field(default_factory=FeedbackParams)
    """Stage 03: atomic facts, verification, fine-grained labels."""
    reward: RewardParams = field(default_factory=RewardParams)
    """Stage 04: the three fine-grained reward models (object, attribute, relation) on one shared backbone."""
    ppo: PpoParams = field(default_factory=PpoParams)
    """Stage 05: PPO with fine-grained rewards."""
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)
    """Stage 06: POPE, CHAIR, the synthetic world's exact metrics, GPT-judged benchmarks, comparison."""
    reuse_run: str = ""
    """Read the stages in `reuse_stages` from this run's outputs instead of running them here (an ablation reuses the base run's data, models, feedback and reward models)."""
    reuse_stages: list[str] = field(default_factory=list)
    """Stage names (e.g. 00_data ... 04_reward_models) taken from `reuse_run`."""


def _field_docs(cls):
    """The string literal under each field of a dataclass."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for node, following in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(following, ast.Expr) \
                and isinstance(following.value, ast.Constant) and isinstance(following.value.value, str):
            docs[node.target.id] = following.value.value
    return docs


def describe(cls=Params, prefix=""):
    """Every key with its type, default and documentation, one line each."""
    lines = []
    docs = _field_docs(cls)
    hints = typing.get_type_hints(cls, include_extras=True)
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        if dataclasses.is_dataclass(hints[f.name]):
            lines.append(f"{key}: {docs.get(f.name, '')}")
            lines += describe(hints[f.name], key + ".")
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"{key} ({_type_name(hints[f.name])}, default {default!r}): {docs.get(f.name, '')}")
    return lines


def _type_name(tp):
    origin = typing.get_origin(tp)
    if origin is Annotated:
        inner, *extras = typing.get_args(tp)
        return " ".join([_type_name(inner)] + [str(extra) for extra in extras if isinstance(extra, Bounds)])
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin is typing.Union:
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list[{_type_name(typing.get_args(tp)[0])}]"
    return getattr(tp, "__name__", str(tp))


def _convert(value, tp, key, source):
    """Check `value` against type `tp`, returning the converted value; raise ParamsError naming key and file."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ParamsError(f"{source}: key '{key}' must be a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, key + ".", source)
    if origin is Annotated:
        inner, *extras = typing.get_args(tp)
        value = _convert(value, inner, key, source)
        for bounds in extras:
            if isinstance(bounds, Bounds) and not bounds.admits(value):
                raise ParamsError(f"{source}: key '{key}' must be {bounds}, got {value!r}")
        return value
    if origin is typing.Union:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(value, inner[0], key, source)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ParamsError(f"{source}: key '{key}' must be one of {list(choices)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ParamsError(f"{source}: key '{key}' must be a list, got {value!r}")
        return [_convert(v, typing.get_args(tp)[0], f"{key}[{i}]", source) for i, v in enumerate(value)]
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ParamsError(f"{source}: key '{key}' must be a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParamsError(f"{source}: key '{key}' must be an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ParamsError(f"{source}: key '{key}' must be true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ParamsError(f"{source}: key '{key}' must be a string, got {type(value).__name__} {value!r}")
        return value
    raise TypeError(f"schema type {tp} of '{key}' is not supported")


def _build(cls, mapping, prefix, source):
    hints = typing.get_type_hints(cls, include_extras=True)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in mapping:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise ParamsError(f"{source}: unknown key '{prefix}{key}'{hint}")
    values = {k: _convert(v, hints[k], prefix + k, source) for k, v in mapping.items()}
    return cls(**values)


def _deep_merge(base, override):
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


class _DuplicateKey(Exception):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load, except that a key given twice in one mapping is an error: an overlay that writes
    `feedback:` twice would otherwise lose the first one's settings without a word."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise _DuplicateKey(f"'{key}' (line {key_node.start_mark.line + 1})")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml_chain(path, _seen=()):
    """The merged mapping of a params file and everything it extends, plus the list of files read."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"params file not found: {path}")
    if path.resolve() in _seen:
        raise ParamsError(f"{path}: 'extends' loops back to itself")
    try:
        mapping = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}
    except _DuplicateKey as err:
        raise ParamsError(f"{path}: key {err} is given twice (YAML keeps only the last; say it once)") from None
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(mapping, dict):
        raise ParamsError(f"{path}: top level must be a mapping of keys, got {type(mapping).__name__}")
    files = [str(path)]
    parent = mapping.pop("extends", None)
    if parent is not None:
        if not isinstance(parent, str):
            raise ParamsError(f"{path}: key 'extends' must be a file name, got {parent!r}")
        parent_path = (path.parent / parent)
        if not parent_path.is_file():
            raise ParamsError(f"{path}: key 'extends' names {parent!r}, which does not exist ({parent_path})")
        base, parent_files = read_yaml_chain(parent_path, _seen + (path.resolve(),))
        mapping = _deep_merge(base, mapping)
        files = parent_files + files
    return mapping, files


def _url_holds_a_secret(url):
    """Whether an endpoint URL carries credentials: user:password@ or a query parameter named like a key."""
    parts = urllib.parse.urlsplit(url)
    names = [name.lower() for name, _ in urllib.parse.parse_qsl(parts.query, keep_blank_values=True)]
    return bool(parts.username or parts.password) or any(
        word in name for name in names for word in ("key", "token", "secret", "password", "sig"))


def _check_across_keys(params, source):
    """What no single field's bounds can say: keys that must agree with each other."""
    for key in ("feedback.llm_api_key_env", "feedback.vision_api_key_env", "evaluate.judge_api_key_env"):
        section, name = key.split(".")
        variable = getattr(getattr(params, section), name)
        if variable and not ENV_VARIABLE.fullmatch(variable):   # e.g. a key pasted where its variable's name goes
            raise ParamsError(f"{source}: key '{key}' must name an environment variable (upper-case letters, digits "
                              "and '_', like VLLM_API_KEY), not hold a key: secrets come from the environment only")
    for key in ("feedback.llm_base_url", "feedback.vision_base_url", "evaluate.judge_base_url"):
        section, name = key.split(".")
        if _url_holds_a_secret(getattr(getattr(params, section), name)):   # the message must not repeat it
            raise ParamsError(f"{source}: key '{key}' holds a user name, password or key in the URL; params are written "
                              f"into every manifest: put the key in an environment variable and name it in "
                              f"'{section}.{name.replace('base_url', 'api_key_env')}'")
    for fact_type, values in dataclasses.asdict(params.reward.claim_words).items():
        if len(values) == 1:   # one value: no other word to be hallucinated, whose logit is -inf (infinite loss)
            raise ParamsError(f"{source}: key 'reward.claim_words.{fact_type}' names one value; a naming head needs "
                              "at least two (or [] for the plain 3-way head)")
    world = params.data.world_params
    for low, high, strict in (("min_objects", "max_objects", False), ("long_min_objects", "long_max_objects", False),
                              ("radius_small", "radius_large", True)):
        low_value, high_value = getattr(world, low), getattr(world, high)
        if low_value > high_value or (strict and low_value == high_value):
            raise ParamsError(f"{source}: key 'data.world_params.{low}' ({low_value}) must be "
                              f"{'below' if strict else 'at most'} 'data.world_params.{high}' ({high_value})")
    if "eval_long" not in world.long_splits:
        raise ParamsError(f"{source}: key 'data.world_params.long_splits' ({world.long_splits}) must include "
                          "'eval_long': that split is the long one by definition")
    for run in params.evaluate.compare_runs:   # folder names under outputs/ and rows of stage 06's tables
        if not RUN_NAME.fullmatch(run):
            raise ParamsError(f"{source}: key 'evaluate.compare_runs' holds {run!r}; a run name is letters, digits, "
                              "'_', '-' or '.', not starting with '.'")
    held_out = params.reward.dev_fraction + params.reward.test_fraction
    if held_out >= 1:
        raise ParamsError(f"{source}: keys 'reward.dev_fraction' + 'reward.test_fraction' = {held_out:g} leave no "
                          "feedback images to train the reward models on; their sum must be below 1")
    if params.feedback.size_twins and params.data.world != "synthetic":
        raise ParamsError(f"{source}: key 'feedback.size_twins' needs data.world 'synthetic' (it flips the synthetic "
                          f"world's size words), got {params.data.world!r}")
    if params.reward.twin_share and not params.feedback.size_twins:
        raise ParamsError(f"{source}: key 'reward.twin_share' ({params.reward.twin_share:g}) trains on size-flipped "
                          "twins, which stage 03 labels only with 'feedback.size_twins: true'")
    ppo = params.ppo
    if ppo.rollout_batch % ppo.samples_per_image:
        raise ParamsError(f"{source}: key 'ppo.rollout_batch' ({ppo.rollout_batch}) must be a multiple of "
                          f"'ppo.samples_per_image' ({ppo.samples_per_image}): each prompt image is sampled that often")
    if ppo.launcher != "none" and ppo.rollout_batch % ppo.nproc:
        raise ParamsError(f"{source}: key 'ppo.rollout_batch' ({ppo.rollout_batch}) must be a multiple of 'ppo.nproc' "
                          f"({ppo.nproc}): each rank takes an equal share, or ranks that run different numbers of "
                          "minibatches wait for each other forever")
    if ppo.deepspeed:
        for clash, why in ((ppo.launcher == "none", "ppo.launcher 'torchrun' or 'accelerate' (ranks to partition over)"),
                           (params.models.load_in_4bit, "models.load_in_4bit: false (ZeRO cannot partition 4-bit weights)"),
                           (ppo.rollout_engine not in ("auto", "generate"),
                            "ppo.rollout_engine 'auto' or 'generate' (the static-cache engines read whole weights)")):
            if clash:
                raise ParamsError(f"{source}: key 'ppo.deepspeed' ({ppo.deepspeed!r}) needs {why}")
    if ppo.launcher != "none" and ppo.minibatch_size % ppo.nproc:
        raise ParamsError(f"{source}: key 'ppo.minibatch_size' ({ppo.minibatch_size}) must be a multiple of "
                          f"'ppo.nproc' ({ppo.nproc}): each rank takes an equal share of every minibatch")
    _check_models_exist(params, source)
    prompt_images = ppo.rollout_batch // ppo.samples_per_image
    if prompt_images > params.data.n_ppo:
        raise ParamsError(f"{source}: key 'ppo.rollout_batch' asks for {prompt_images} distinct prompt images per "
                          f"iteration, more than the {params.data.n_ppo} of 'data.n_ppo'")


def _check_models_exist(params, source):
    """Models that only stage 01 of the synthetic world trains must be trained there: a run that names one
    otherwise fails stages later, after the GPU work of the stages before."""
    models_, feedback = params.models, params.feedback
    needs = [("models.policy", models_.policy == "tiny", "data.world 'synthetic'", params.data.world == "synthetic"),
             ("feedback.verifier", feedback.verifier == "detector", "data.world 'synthetic'",
              params.data.world == "synthetic"),
             ("reward.backbone", params.reward.backbone in ("pretrained", "policy", "verifier_lvlm"),
              "data.world 'synthetic' (on COCO, name the model: a hub id or a local llava-hf folder)",
              params.data.world == "synthetic"),
             ("reward.backbone", params.reward.backbone == "verifier_lvlm", "models.train_lvlm_verifier: true",
              models_.train_lvlm_verifier),
             ("feedback.verifier", feedback.verifier == "hf" and models_.verifier == "tiny",
              "models.train_lvlm_verifier: true (models.verifier 'tiny' is stage 01's LVLM verifier)",
              models_.train_lvlm_verifier),
             ("feedback.question_suffix", feedback.verifier == "detector" and bool(feedback.question_suffix),
              "an empty suffix with the detector verifier (it reads only the world's own questions)", False)]
    for key, chosen, requirement, met in needs:
        if chosen and not met:
            value = getattr(params, key.split(".")[0]).__dict__[key.split(".")[1]]
            raise ParamsError(f"{source}: key '{key}' ({value!r}) needs {requirement}")


def _check_paths(params, source):
    data = params.data
    if data.world == "coco":
        if not data.coco_root:
            raise ParamsError(f"{source}: key 'data.coco_root' must name the COCO 2014 folder when data.world is 'coco'")
        root = Path(os.path.expanduser(data.coco_root))
        if not root.is_dir():
            raise ParamsError(f"{source}: key 'data.coco_root' names {data.coco_root!r}, which is not a folder")
    for key, value in (("models.policy", params.models.policy), ("models.verifier", params.models.verifier),
                       ("reward.backbone", params.reward.backbone)):
        if value.startswith(("/", "./", "../", "~")) and not Path(os.path.expanduser(value)).is_dir():
            raise ParamsError(f"{source}: key '{key}' names the local folder {value!r}, which does not exist")
    if params.ppo.deepspeed:
        deepspeed_config(params.ppo.deepspeed, source)
    for key, value, needed in (
            ("evaluate.pope_files", params.evaluate.pope_files,
             [f"coco_pope_{sampler}.json" for sampler in ("random", "popular", "adversarial")]),
            ("evaluate.mmhal_path", params.evaluate.mmhal_path, ["response_template.json"]),
            ("evaluate.llava_bench_path", params.evaluate.llava_bench_path,
             ["questions.jsonl", "context.jsonl", "answers_gpt4.jsonl"])):
        if not value:
            continue
        folder = Path(os.path.expanduser(value))
        if not folder.is_dir():
            raise ParamsError(f"{source}: key '{key}' names {value!r}, which is not a folder")
        missing = [name for name in needed if not (folder / name).is_file()]
        if missing:
            raise ParamsError(f"{source}: key '{key}' names {value!r}, which lacks {', '.join(missing)}")


def deepspeed_config(path, source="params"):
    """The DeepSpeed config that key ppo.deepspeed names, as a dict; a ParamsError naming the key and the file when it
    is missing, not JSON or has no zero_optimization.stage."""
    found = Path(os.path.expanduser(path))
    found = found if found.is_absolute() or found.is_file() else REPO_ROOT / path
    where = f"{source}: key 'ppo.deepspeed' names {path!r}"
    if not found.is_file():
        raise ParamsError(f"{where}, which is not a file")
    try:
        config = json.loads(found.read_text())
    except json.JSONDecodeError as err:
        raise ParamsError(f"{where}, which is not JSON: {err}") from err
    stage = config.get("zero_optimization", {}).get("stage") if isinstance(config, dict) else None
    if stage not in (0, 1, 2, 3):
        raise ParamsError(f"{where}, whose 'zero_optimization.stage' must be 0, 1, 2 or 3 (got {stage!r})")
    return config


def load(path, check_paths=True):
    """Read, merge and validate a params file; returns a `Params`.

    `check_paths=False` validates keys and types only (for a profile whose data lives on another machine)."""
    mapping, files = read_yaml_chain(path)
    source = " <- ".join(reversed(files)) if len(files) > 1 else files[0]
    params = _build(Params, mapping, "", source)
    _check_across_keys(params, source)
    if check_paths:
        _check_paths(params, source)
    return params


def to_dict(params):
    return dataclasses.asdict(params)


def resolve_params_path(path):
    """A params path as given on the command line or in a notebook (relative to cwd or to the repo root)."""
    path = Path(path)
    if path.is_file():
        return path.resolve()
    for candidate in (REPO_ROOT / path, REPO_ROOT / "params" / path, REPO_ROOT / "params" / f"{path}.yaml"):
        if candidate.is_file():
            return candidate.resolve()
    raise ParamsError(f"params file not found: {path} (looked in the current folder and in {REPO_ROOT / 'params'})")
