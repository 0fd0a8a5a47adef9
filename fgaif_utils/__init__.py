"""fgaif_utils: the thin library behind the FGAIF notebooks (data, models, feedback, rewards, PPO, evaluation)."""
import warnings

# Two warnings every notebook showed about code that is not ours. transformers' progress bars import tqdm.auto, which
# in a kernel without ipywidgets falls back to the text bars this project uses anyway (they stream into papermill's
# notebooks and logs). peft 0.21 reads PreTrainedModel.is_gradient_checkpointing, which transformers 5.24 deprecates.
# A notebook must import fgaif_utils before transformers or peft for these to apply.
warnings.filterwarnings("ignore", message="IProgress not found")
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
