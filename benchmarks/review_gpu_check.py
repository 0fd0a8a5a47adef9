"""GPU checks of what the 2026-12-07 review fixed and the CPU suite cannot reach. Prints one line per check and
exits 1 when one fails; about half a minute on a GPU, nothing downloaded:

    .venv/bin/python benchmarks/review_gpu_check.py                       # on a lent GPU, before device_check.sh
    .venv/bin/python benchmarks/review_gpu_check.py --backend gloo        # the same logic on a CPU (4-bit skipped)

1. NCCL: a one-rank NCCL group (what torchrun and accelerate give on GPUs), then PPO's reductions of CPU tensors:
   the advantage whitening's statistics and the log row. A plain NCCL group reduces CUDA tensors only, so before
   the fix every multi-GPU PPO run failed at its first whitening.
2. 4-bit: a tiny llava-hf model saved and loaded with `load_in_4bit` (bitsandbytes, CUDA): quantised layers only in
   the language model. transformers 5 matched the old skip names ("vision_tower") to nothing.
"""
import argparse
import os
import socket
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fgaif_utils import models, params, ppo  # noqa: E402


def check_reductions(backend):
    """PPO's reductions of CPU tensors under a one-rank group of `backend`: (name, passed, detail) rows."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    if backend == "nccl":
        torch.cuda.set_device(0)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
        mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
        total = ppo._global_sum(values.sum())
        whitened = ppo.whiten(values, mask)
        row = ppo._mean_over_ranks({"iteration": 1, "kl": 0.5, "missing": None})
        return [("sum of a CPU tensor", total.device.type == "cpu" and float(total) == 10.0, f"{float(total)}"),
                ("whitening on CPU tensors", abs(float(whitened[mask > 0].mean())) < 1e-6, "mean 0 over the mask"),
                ("log row over ranks", row["kl"] == 0.5 and row["missing"] is None, f"{row}")]
    finally:
        dist.destroy_process_group()


def check_four_bit():
    """The 4-bit load of a tiny llava-hf model: where its quantised layers are."""
    import bitsandbytes  # noqa: F401   (ImportError: the caller reports the check as skipped)
    arch = params.TinyArchParams(vision_hidden=64, text_hidden=64, text_layers=2, vision_layers=2, heads=2)
    tokenizer = models.build_tiny_tokenizer()
    processor = models.build_tiny_processor(tokenizer, 32, 8)
    with tempfile.TemporaryDirectory() as folder:
        models.save_lvlm(models.build_tiny_llava(arch, 32, tokenizer, seed=0), processor, Path(folder) / "m")
        model, _ = models.load_lvlm(str(Path(folder) / "m"), dtype="bfloat16", device="cuda", load_in_4bit=True)
    quantised = [name for name, module in model.named_modules() if type(module).__name__ == "Linear4bit"]
    outside = [name for name in quantised if not name.startswith("model.language_model.")]
    return [("4-bit layers in the language model", bool(quantised), f"{len(quantised)} Linear4bit"),
            ("no 4-bit layer in CLIP or the projector", not outside, ", ".join(outside[:3]) or "none")]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="nccl" if torch.cuda.is_available() else "gloo")
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    rows = check_reductions(args.backend)
    if torch.cuda.is_available():
        try:
            rows += check_four_bit()
        except ImportError:
            rows.append(("4-bit", None, "bitsandbytes not installed: skipped"))
    else:
        rows.append(("4-bit", None, "no CUDA: skipped"))
    print(f"backend {args.backend}, torch {torch.__version__}, cuda {torch.cuda.is_available()}")
    for name, passed, detail in rows:
        print(f"{'skip' if passed is None else 'ok  ' if passed else 'FAIL'}  {name}: {detail}")
    return 1 if any(passed is False for _, passed, _ in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
