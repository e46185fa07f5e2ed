"""Fusion losses on the target's logits and a sparse top-k teacher (SFT, Eq. 4's KL, reverse KL, JSD)."""
