"""Losses: the stage-1 PSCL/BalSCL objective (pscl) and, later, the language-model loss."""
from wamglm_jax.losses.pscl import balanced_contrastive_loss, stage1_loss

__all__ = ["balanced_contrastive_loss", "stage1_loss"]
