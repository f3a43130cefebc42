"""Losses: the stage-1 PSCL/BalSCL objective (pscl) and the language-model loss (lm)."""
from wamglm_jax.losses.lm import lm_loss
from wamglm_jax.losses.pscl import balanced_contrastive_loss, stage1_loss

__all__ = ["balanced_contrastive_loss", "lm_loss", "stage1_loss"]
