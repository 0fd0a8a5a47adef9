"""The model layer: one loader for every LVLM role, the tiny world's tokenizer and LLaVA, prompts, LoRA.

Every role (policy, reference, verifier, reward and value backbones) is a llava-hf checkpoint loaded through
`load_lvlm`: LLaVA-1.5 from the hub or a local folder in the real profile, the tiny models that stage 01
trains and saves in the same format in the embedded default.
"""
import math
import os
import types
from pathlib import Path

import numpy as np
import torch

from . import language
from .params import REPO_ROOT

SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>", "<image>"]

# LLaVA-1.5's conversation format ("USER: <image>\n{prompt} ASSISTANT:"), as a chat template so that the tiny
# processor formats prompts exactly as llava-hf's processor does.
LLAVA15_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %} "
    "{% else %}ASSISTANT: "
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}</s>"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message says what to do."""


def pick_device(device="auto"):
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


# ---------------------------------------------------------------------------------------------- tiny world

def build_tiny_tokenizer():
    """A word-level tokenizer over the world's fixed vocabulary, lower-casing, built without any download."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate(SPECIAL_TOKENS + language.vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)   # words joined by single spaces, as written
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                       special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", extra_special_tokens={"image_token": "<image>"},
                                   padding_side="left")


def _clip_image_processor_class():
    """transformers 5.24's CLIPImageProcessor needs torchvision, which breaks it here (requirements.txt), and falls
    back to CLIPImageProcessorPil with a warning that says to install torchvision: ask for that class by name. Both
    save the same config ("CLIPImageProcessor"), which AutoProcessor loads either way."""
    import transformers
    from transformers.utils import is_torchvision_available

    if not is_torchvision_available() and "CLIPImageProcessorPil" in dir(transformers):
        return transformers.CLIPImageProcessorPil
    return transformers.CLIPImageProcessor


def build_tiny_processor(tokenizer, image_size, patch_size):
    from transformers import LlavaProcessor

    image_processor = _clip_image_processor_class()(size={"shortest_edge": image_size},
                                                    crop_size={"height": image_size, "width": image_size},
                                                    image_mean=[0.5] * 3, image_std=[0.5] * 3)
    # num_additional_image_tokens=1 (the CLS token, dropped by the "default" strategy): without it the
    # processor writes one <image> token fewer than there are patches.
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=LLAVA15_CHAT_TEMPLATE)


def build_tiny_llava(arch, image_size, tokenizer, seed=0):
    """A small LlavaForConditionalGeneration (CLIP-style tower + Llama-style LM) built from config."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(image_size=image_size, patch_size=arch.patch_size, hidden_size=arch.vision_hidden,
                              intermediate_size=2 * arch.vision_hidden, num_hidden_layers=arch.vision_layers,
                              num_attention_heads=arch.heads)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=arch.text_hidden,
                       intermediate_size=2 * arch.text_hidden, num_hidden_layers=arch.text_layers,
                       num_attention_heads=arch.heads, num_key_value_heads=arch.heads, max_position_embeddings=512,
                       pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=tokenizer.image_token_id,
                         image_seq_length=(image_size // arch.patch_size) ** 2, vision_feature_layer=-1,
                         vision_feature_select_strategy="default")
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    if arch.vision_position_init == "sincos":
        side = image_size // arch.patch_size
        code = sincos_position_code(side, arch.vision_hidden) * arch.vision_position_scale
        table = vision_position_table(model)
        with torch.no_grad():   # row 0 of the table is CLIP's class token, which has no patch position
            table[1:] = code
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


def image_features(lvlm, pixel_values):
    """(B, N, D): the vision tower + projector output a LlavaForConditionalGeneration splices in at the N image
    tokens of each image, as its config selects them."""
    config = lvlm.config
    out = lvlm.model.get_image_features(pixel_values=pixel_values.to(lvlm.device, lvlm.dtype),
                                        vision_feature_layer=config.vision_feature_layer,
                                        vision_feature_select_strategy=config.vision_feature_select_strategy)
    features = getattr(out, "pooler_output", out)   # transformers 5.2x: an output object with a per-image list
    return torch.stack(list(features)) if isinstance(features, (list, tuple)) else features


def vision_position_table(model):
    """The CLIP tower's position-embedding weight (class token first), wherever this transformers version nests it."""
    return next(weight for name, weight in model.model.vision_tower.named_parameters()
                if name.endswith("embeddings.position_embedding.weight"))


def sincos_position_code(side, dim):
    """(side * side, dim) code of patch (row, column), row-major: the first half of the dimensions are sines and
    cosines of the row at dim / 4 frequencies from one cycle per grid to one per patch pair, the second half the same of
    the column; scaled to standard deviation 1."""
    if dim % 4:
        raise ValueError(f"the sincos position code needs a hidden size divisible by 4, got {dim}")
    frequencies = torch.logspace(0, 1, dim // 4, base=side / 2) * (2 * math.pi / side)   # radians per patch
    grid = torch.arange(side, dtype=torch.float32)
    rows, cols = grid.repeat_interleave(side), grid.repeat(side)

    def waves(x):
        angles = x[:, None] * frequencies[None]
        return torch.cat([angles.sin(), angles.cos()], 1)

    code = torch.cat([waves(rows), waves(cols)], 1)
    return code / code.std()


def save_lvlm(model, processor, folder):
    """Save in the llava-hf format (safetensors weights + processor + chat template), atomically."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        import shutil
        shutil.rmtree(tmp)
    model.save_pretrained(tmp, safe_serialization=True)
    processor.save_pretrained(tmp)
    if folder.exists():
        import shutil
        shutil.rmtree(folder)
    os.replace(tmp, folder)


# ---------------------------------------------------------------------------------------------- one loader

def _local_path(name):
    """The folder a model name means here, or None for a hub id: a path that starts with /, ./, ../ or ~, a folder
    that exists from the working folder, or one under the repository (artifacts record paths relative to it, and
    JupyterLab runs a notebook from its own folder, not the repository's)."""
    if name.startswith(("/", "./", "../", "~")) or Path(name).is_dir():
        return os.path.expanduser(name)
    if not Path(name).is_absolute() and (REPO_ROOT / name).is_dir():
        return str(REPO_ROOT / name)
    return None


def _looks_local(name):
    return _local_path(name) is not None


def resolve_checkpoint(name_or_path, local_files_only=True):
    """The local folder of a llava-hf checkpoint (a local path, or a hub id already in the local cache)."""
    if _looks_local(name_or_path):
        folder = Path(_local_path(name_or_path))
        if not (folder / "config.json").is_file():
            raise ModelLoadError(f"{name_or_path!r} is not a llava-hf checkpoint folder (no config.json)")
        return str(folder.resolve())
    from huggingface_hub import snapshot_download
    try:
        return snapshot_download(name_or_path, local_files_only=local_files_only)
    except Exception as err:  # the hub client raises several error types for "not cached" / "offline"
        raise ModelLoadError(
            f"{name_or_path!r} is not in the local Hugging Face cache and models.local_files_only is set "
            f"({err.__class__.__name__}). Download it where there is network "
            f"(`hf download {name_or_path} --local-dir DIR`), copy DIR here and set the params key "
            f"to that folder, or point HF_HOME at a cache that holds it.") from err


def safetensors_adapter(folder):
    """`folder`, a peft LoRA adapter folder, when it holds adapter_model.safetensors; peft would fall back to a
    pickled adapter_model.bin, which fgaif never loads (it saves every adapter as safetensors)."""
    folder = Path(folder)
    if not (folder / "adapter_model.safetensors").is_file():
        raise ModelLoadError(f"no adapter_model.safetensors in {folder}: adapters load from safetensors only")
    return folder


def load_lvlm(name_or_path, dtype="float32", device="auto", load_in_4bit=False, local_files_only=True):
    """Load any llava-hf format checkpoint (local folder or hub id) with its processor.

    Returns (model, processor) with the model in eval mode on `device`. 4-bit NF4 with double quantisation
    needs CUDA and bitsandbytes; anywhere else it fails with a clear message and never falls back silently.
    In bfloat16 / float16 the lm_head returns float32 logits (`float32_logits`).
    """
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    target = pick_device(device)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    local = _local_path(name_or_path)
    if local is not None and not Path(local).is_dir():
        raise ModelLoadError(f"model folder {name_or_path!r} does not exist")
    source = local or name_or_path
    kwargs = dict(dtype=torch_dtype, local_files_only=local_files_only, use_safetensors=True)   # never a pickle
    if load_in_4bit:
        kwargs["quantization_config"] = _four_bit_config(target, torch_dtype)
        kwargs["device_map"] = {"": target.index if target.index is not None else torch.cuda.current_device()}
    try:
        processor = AutoProcessor.from_pretrained(source, local_files_only=local_files_only)
        model = LlavaForConditionalGeneration.from_pretrained(source, **kwargs)
    except OSError as err:
        if _looks_local(name_or_path):
            raise ModelLoadError(f"could not load the llava-hf checkpoint in {name_or_path!r}: {err}") from err
        raise ModelLoadError(
            f"could not load {name_or_path!r} from the Hugging Face hub cache ({err.__class__.__name__}). "
            f"With no network, download it elsewhere (`hf download {name_or_path} --local-dir DIR`), "
            f"copy DIR here and set models.policy / models.verifier to that local path (e.g. /data/llava-1.5-7b-hf), "
            f"or point HF_HOME at a cache that holds it.") from err
    if load_in_4bit:
        _check_quantised(model)
    else:
        model.to(target)
    if torch_dtype != torch.float32:
        float32_logits(model)
    model.eval()
    return model, processor


def _float32_linear(head, hidden_states):
    bias = None if head.bias is None else head.bias.float()
    return torch.nn.functional.linear(hidden_states.float(), head.weight.float(), bias)


def float32_logits(model):
    """Make the model's lm_head compute in float32 from its (bfloat16 / float16) weights and hidden states.
    A bfloat16 logit of about 20 is stored in steps of 0.125, so PPO's ratio new/old and the per-token KL to the
    reference moved in steps of that size, whatever the update. Upcasting the weights inside the forward (not the
    module) leaves the checkpoint's dtype alone and works where DeepSpeed ZeRO-3 gathers the weights for the call;
    the float32 copy lives for one call."""
    head = model.get_output_embeddings()
    head.forward = types.MethodType(_float32_linear, head)
    return model


def _four_bit_config(target, compute_dtype):
    if target.type != "cuda":
        raise ModelLoadError("models.load_in_4bit needs a CUDA GPU (bitsandbytes NF4); this machine has none. "
                             "Set models.load_in_4bit: false to load in full precision.")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as err:
        raise ModelLoadError("models.load_in_4bit needs the bitsandbytes package: pip install bitsandbytes") from err
    from transformers import BitsAndBytesConfig
    # Module paths from the top: transformers 5 matches a skip pattern from the start of a module's name or as its
    # suffix, so a bare "vision_tower" skipped nothing and the CLIP tower and projector were quantised too (5.24
    # here; on 5.17 too, by the 258 Linear4bit layers of shared/notes/gpu-anchor.md's probe).
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype,
                              llm_int8_skip_modules=["model.vision_tower", "model.multi_modal_projector", "lm_head"])


def _check_quantised(model):
    import bitsandbytes as bnb
    if not any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules()):
        raise ModelLoadError("4-bit loading was asked for but no layer was quantised")


# ---------------------------------------------------------------------------------------------- prompts

def chat_prompt(processor, text):
    """The model's own chat template around one image and one user turn, ready for generation."""
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    return processor.apply_chat_template(conversation, add_generation_prompt=True)


def square_images(images, processor):
    """The images as LLaVA-1.5 saw them: each uint8 (H, W, 3) image (of a list, or a row of a stacked (B, H, W, 3)
    array) centred on a max(H, W) square filled with the image processor's mean colour; returns a list.

    LLaVA-1.5 was trained and evaluated with `image_aspect_ratio: pad` (its `expand2square`, fill
    tuple(int(x * 255) for x in image_mean): (122, 116, 104) for CLIP) before the CLIP processor, whose
    shortest-edge resize and centre crop then drop nothing. llava-hf's processor alone crops: a 640x480 COCO image
    loses a quarter of its width (transformers issue #33175). Square images come back as they are, not copied, so
    the synthetic world's inputs do not change. `processor`: a LlavaProcessor or its image processor."""
    mean = getattr(processor, "image_processor", processor).image_mean
    fill = np.array([int(x * 255) for x in mean], dtype=np.uint8)
    return [_pad_to_square(image, fill) for image in images]


def _pad_to_square(image, fill):
    """`image` itself if square, else a new max(H, W) square of `fill` with it pasted in the middle (as LLaVA-1.5's
    expand2square: an odd margin leaves the extra pixel below or to the right)."""
    pixels = np.asarray(image)
    height, width = pixels.shape[:2]
    if height == width:
        return image
    side = max(height, width)
    square = np.empty((side, side, pixels.shape[2]), dtype=pixels.dtype)
    square[:] = fill
    top, left = (side - height) // 2, (side - width) // 2
    square[top:top + height, left:left + width] = pixels
    return square


def pixel_values_from_uint8(images):
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float in [-1, 1]: what the tiny processor computes (mean = std = 0.5) for
    square images of its size, the synthetic world's (no padding, no resizing here)."""
    images = torch.as_tensor(np.asarray(images))
    return images.permute(0, 3, 1, 2).float() / 127.5 - 1.0


def suppressed_token_ids(processor):
    """Tokens generation must never emit: the image token (a sampled <image> breaks every later forward pass),
    padding and BOS. The image token's id comes from the processor: llava-hf tokenizers need not name it."""
    tokenizer = processor.tokenizer
    ids = {processor.image_token_id, tokenizer.pad_token_id, tokenizer.bos_token_id}
    return sorted(i for i in ids if i is not None and i != tokenizer.eos_token_id)


def sampling_args(do_sample, temperature, top_p):
    """generate()'s sampling keywords: temperature and top-p only. top_k=0, because generate() otherwise keeps only
    the 50 likeliest tokens (transformers' default), which neither the paper's sampling nor our engines do."""
    if not do_sample:
        return dict(do_sample=False)
    return dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)


@torch.no_grad()
def generate(model, processor, images, prompts, max_new_tokens=64, do_sample=False, temperature=1.0, top_p=1.0,
             seed=None):
    """Batched generation. Returns (new_token_ids list of lists without padding/EOS, texts).

    Token ids are what later stages place rewards on; the text is decoded from exactly those ids. Non-square
    images are padded to squares first (`square_images`), as LLaVA-1.5 saw them.
    """
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "left"
    batch = processor(images=square_images(images, processor), text=list(prompts), return_tensors="pt", padding=True)
    batch = {k: v.to(model.device) for k, v in batch.items()}
    if "pixel_values" in batch:
        batch["pixel_values"] = batch["pixel_values"].to(model.dtype)
    if seed is not None:
        torch.manual_seed(seed)
    out = model.generate(**batch, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, suppress_tokens=suppressed_token_ids(processor),
                         **sampling_args(do_sample, temperature, top_p))
    new_tokens = out[:, batch["input_ids"].shape[1]:].tolist()
    token_ids = [_strip_after_eos(seq, tokenizer.eos_token_id, tokenizer.pad_token_id) for seq in new_tokens]
    texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in token_ids]   # spans index into exactly this
    return token_ids, texts


def _strip_after_eos(ids, eos_id, pad_id):
    kept = []
    for token in ids:
        if token == eos_id:
            break
        if token != pad_id:
            kept.append(token)
    return kept


# ---------------------------------------------------------------------------------------------- LoRA

def add_lora(model, r=8, alpha=16, dropout=0.0, adapter_name="default", targets=LORA_TARGETS):
    """A LoRA adapter on the language model's projections only (a plain name list would also hit CLIP's)."""
    from peft import LoraConfig, get_peft_model
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets)
    return get_peft_model(model, config, adapter_name=adapter_name)


def lora_target_names(peft_model):
    """Names of the modules that carry a LoRA adapter."""
    return sorted(name for name, module in peft_model.named_modules() if hasattr(module, "lora_A")
                  and not name.endswith(("lora_A", "lora_B")))
