"""fgaif_utils: the thin library behind the FGAIF notebooks (data, models, feedback, rewards, PPO, evaluation)."""
import logging
import warnings

# Messages every notebook showed about code that is not ours; a notebook imports fgaif_utils before transformers,
# peft or bitsandbytes for these to apply.
# - transformers' progress bars import tqdm.auto, which in a kernel without ipywidgets falls back to the text bars this
#   project uses anyway (they stream into papermill's notebooks and logs);
# - peft 0.21 reads PreTrainedModel.is_gradient_checkpointing, which transformers 5.24 deprecates;
# - bitsandbytes on a CPU with AVX-512 BF16 looks for an optional CPU 4-bit kernel package (4-bit loads need CUDA here);
# - DeepSpeed, when installed, is imported by transformers / peft and warns on a CPU that it found no GPU (the tiny
#   profile runs on CPUs by design); its other warnings stay.
warnings.filterwarnings("ignore", message="IProgress not found")
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


class _WithoutMessage(logging.Filter):
    def __init__(self, text):
        super().__init__()
        self.text = text

    def filter(self, record):
        return self.text not in record.getMessage()


logging.getLogger("DeepSpeed").addFilter(_WithoutMessage("Setting accelerator to CPU"))
