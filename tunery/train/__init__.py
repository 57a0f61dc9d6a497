"""Training: the SFT loop (loop.py), its data order and batches (batching.py), the loss (loss.py), checkpoints.

What other packages use, and all they may import from here:

    from tunery.train import train, held_out_loss
"""

from tunery.train.loop import train
from tunery.train.loss import held_out_loss

__all__ = ["held_out_loss", "train"]
