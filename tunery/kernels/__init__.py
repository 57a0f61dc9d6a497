"""Fast paths for training, each beside its plain PyTorch reference (see linear_ce.py, apply.py)."""
