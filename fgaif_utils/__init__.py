"""fgaif_utils: the thin library behind the FGAIF notebooks (data, models, feedback, rewards, PPO, evaluation)."""
