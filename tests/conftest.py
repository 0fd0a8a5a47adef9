"""Shared test setup: one thread per torch op (the lead trains on the same cores) and the repo on sys.path."""
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


def pytest_configure(config):
    config.addinivalue_line("markers", "e2e: the end-to-end runs of every stage (smoke and COCO profiles); "
                                       "`-m \"not e2e\"` leaves them out")
    # pytest resets the warning filters fgaif_utils sets for the notebooks; the same two messages about code that
    # is not ours (peft reading a deprecated transformers property, torch importing its own deprecated
    # torch.jit.script_method when peft or deepspeed import inductor) are filtered here by their text.
    config.addinivalue_line("filterwarnings", "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
    config.addinivalue_line("filterwarnings", "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
