"""Fusion training: the loop (``trainer.train``), its data (``data``), the accelerate/DeepSpeed
backends (``parallel``) and the model card (``card``). See docs/training.md."""

from .trainer import latest_checkpoint, train

__all__ = ["latest_checkpoint", "train"]
