"""PSCL: prototype-supervised balanced contrastive loss (stage 1 of WamGLM).

The stage-1 loss of the method (FACTS.md, "The method"):

    loss = CE(logits of view 1) + pscl_weight * BalSCL(prototypes, z(view 2), z(view 3); y)

BalSCL (Zhu et al., CVPR 2022), exactly as the reference code computes it:
  * anchors: the 2B projected features of views 2 and 3 (rows [z2; z3]);
  * contrast set A: those 2B features plus all C prototypes (class-complement: every
    prototype is present even for classes absent from the batch; prototypes are never anchors);
  * s_ij = z_i . a_j / t for j != i; positives P(i) = the other members of A with the
    anchor's label (its class prototype included, so |P(i)| >= 2);
  * class-averaging: n_k = number of members of class k in A (2 * batch count + 1), and
        D_i = sum_{j in A, j != i} exp(s_ij) / (n_{y_j} - [y_j == y_i]);
  * L_i = -1/|P(i)| sum_{p in P(i)} (s_ip - log D_i); the loss is the mean over anchors.

Padding rows (valid=False) are neither anchors nor members of A and do not count in n_k.
All arithmetic is float32 whatever the input dtype; log D_i is a masked log-sum-exp, and every
masked entry is replaced with `jnp.where` *before* log/exp/division, so no NaN/Inf can reach
the gradients.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import optax

__all__ = ["balanced_contrastive_loss", "stage1_loss"]

_NEG = -1e30  # finite "minus infinity" for masked logits (keeps gradients NaN-free)


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(f"wamglm_jax/losses/pscl.py: {msg}")


def _masked_logsumexp(x: jax.Array, mask: jax.Array) -> jax.Array:
    """log(sum_j mask_j * exp(x_j)) for 1-D x; mask must have at least one True."""
    x = jnp.where(mask, x, _NEG)
    m = jax.lax.stop_gradient(jnp.max(x))
    return m + jnp.log(jnp.sum(jnp.where(mask, jnp.exp(x - m), 0.0)))


def balanced_contrastive_loss(z2: jax.Array, z3: jax.Array, labels: jax.Array,
                              prototypes: jax.Array, valid: Optional[jax.Array] = None,
                              temperature: float = 0.08) -> jax.Array:
    """BalSCL of views 2 and 3 against each other and the class prototypes.

    Args:
      z2, z3: float[B,D] projected features of views 2 and 3 (L2-normalised by the model;
        this function does not re-normalise). Any float dtype; computed in float32.
      labels: int[B] class ids in [0, C) (values of padding rows are ignored).
      prototypes: float[C,D] class prototypes (row c is the prototype of class c).
      valid: bool[B] (or None = all valid); padding rows are excluded everywhere.
      temperature: the softmax temperature t (reference 0.08).

    Returns:
      float32 scalar: mean of L_i over the 2 * sum(valid) anchors (0 if there are none).
    """
    _check(z2.ndim == 2 and z2.shape == z3.shape,
           f"z2/z3 must both be float[B,D]; got {z2.shape} and {z3.shape}")
    _check(prototypes.ndim == 2 and prototypes.shape[1] == z2.shape[1],
           f"prototypes must be float[C,{z2.shape[1]}]; got {prototypes.shape}")
    _check(labels.shape == z2.shape[:1], f"labels must be int[{z2.shape[0]}]; got {labels.shape}")
    b, num_classes = z2.shape[0], prototypes.shape[0]
    if valid is None:
        valid = jnp.ones((b,), bool)
    _check(valid.shape == (b,), f"valid must be bool[{b}]; got {valid.shape}")
    valid = valid.astype(bool)
    labels = jnp.where(valid, labels.astype(jnp.int32), 0)  # padding labels may be garbage

    # Contrast set A = [z2; z3; prototypes]: M = 2B + C members.
    feats = jnp.concatenate([z2, z3, prototypes], axis=0).astype(jnp.float32)  # float[M,D]
    member_label = jnp.concatenate([labels, labels, jnp.arange(num_classes, dtype=jnp.int32)])
    member_valid = jnp.concatenate([valid, valid, jnp.ones((num_classes,), bool)])  # bool[M]
    # n_k = 2 * (valid batch count of k) + 1 (its prototype).
    counts = jnp.zeros((num_classes,), jnp.float32).at[labels].add(valid.astype(jnp.float32))
    n_class = 2.0 * counts + 1.0                                                  # float[C]
    n_member = n_class[member_label]                                              # float[M]
    member_idx = jnp.arange(feats.shape[0])
    inv_t = 1.0 / jnp.asarray(temperature, jnp.float32)

    def per_anchor(z_i, y_i, i):
        # HIGHEST: full fp32 products on GPU/TPU too (no TF32/bf16 passes); s can reach 1/t.
        s = jnp.matmul(feats, z_i, precision=jax.lax.Precision.HIGHEST) * inv_t  # float[M]
        others = member_valid & (member_idx != i)                 # j in A, j != i
        same = member_label == y_i
        pos = others & same                                       # P(i)
        count = n_member - same.astype(jnp.float32)               # n_{y_j} - [y_j == y_i]
        # >= 1 for every valid anchor; only a padding anchor can see 0 (its prototype).
        count = jnp.where(others & (count > 0), count, 1.0)
        log_d = _masked_logsumexp(s - jnp.log(count), others)     # log D_i
        num_pos = jnp.sum(pos.astype(jnp.float32))
        mean_pos = jnp.sum(jnp.where(pos, s, 0.0)) / jnp.maximum(num_pos, 1.0)
        return log_d - mean_pos                                   # L_i

    anchors = feats[:2 * b]
    losses = jax.vmap(per_anchor)(anchors, member_label[:2 * b], member_idx[:2 * b])  # [2B]
    anchor_valid = member_valid[:2 * b]
    total = jnp.sum(jnp.where(anchor_valid, losses, 0.0))
    return total / jnp.maximum(jnp.sum(anchor_valid.astype(jnp.float32)), 1.0)


def _is_zero(x: Any) -> bool:
    return isinstance(x, (int, float)) and float(x) == 0.0


def stage1_loss(outputs_v1: Mapping[str, jax.Array],
                outputs_v2: Optional[Mapping[str, jax.Array]],
                outputs_v3: Optional[Mapping[str, jax.Array]],
                labels: jax.Array, valid: Optional[jax.Array] = None, *,
                pscl_weight: float = 0.35, temperature: float = 0.08,
                class_weights: Optional[jax.Array] = None, ce_all_views: bool = False,
                label_smoothing: float = 0.0):
    """Stage-1 objective: CE on view 1 + pscl_weight * BalSCL on views 2 and 3.

    ce_all_views=True averages the CE over the three views instead of taking view 1's (not
    the reference recipe: views 2 and 3 are computed anyway, so on a small compute budget
    they can feed the classifier too; the contrastive term is unchanged).

    Args:
      outputs_v1/v2/v3: Stage1Model output dicts of the three views (keys `logits`
        float[B,C], `z` float[B,D], `prototypes` float[C,D]). Prototypes are taken from
        view 2 (they depend on the parameters only, so every view has the same ones).
        With a Python `pscl_weight == 0` (the ablation), views 2 and 3 may be None.
      labels: int[B]; valid: bool[B] or None (padding rows count nowhere).
      class_weights: optional float[C] CE weights; the weighted CE is normalised like
        PyTorch's `CrossEntropyLoss(weight=...)`: sum_i w_{y_i} ce_i / sum_i w_{y_i}.
      label_smoothing: eps in [0, 1): the CE target is (1 - eps) one_hot(y) + eps / C (as
        PyTorch's `label_smoothing`; with class weights, ce_i is weighted by w_{y_i} as a
        whole, where PyTorch weights the smoothing term's classes by w_c instead).

    Returns:
      (loss float32 scalar, aux dict with float32 scalars `ce`, `scl`, `accuracy`)
      `accuracy` is view-1 top-1 accuracy over the valid rows. Pure and jittable.
    """
    logits = outputs_v1["logits"].astype(jnp.float32)                  # float[B,C]
    _check(logits.ndim == 2 and labels.shape == logits.shape[:1],
           f"outputs_v1['logits'] must be float[B,C] with labels int[B]; got "
           f"{logits.shape} and {labels.shape}")
    b, num_classes = logits.shape
    if valid is None:
        valid = jnp.ones((b,), bool)
    validf = valid.astype(jnp.float32)
    safe_labels = jnp.where(valid, labels.astype(jnp.int32), 0)
    w = validf
    if class_weights is not None:
        class_weights = jnp.asarray(class_weights, jnp.float32)
        _check(class_weights.shape == (num_classes,),
               f"class_weights must be float[{num_classes}]; got {class_weights.shape}")
        w = w * class_weights[safe_labels]

    eps = float(label_smoothing)
    _check(0.0 <= eps < 1.0, f"label_smoothing={eps}: expected 0 <= eps < 1")
    targets = optax.smooth_labels(jax.nn.one_hot(safe_labels, num_classes), eps)   # [B,C]

    def weighted_ce(view_logits):                                      # float[B,C] -> scalar
        ce_i = optax.softmax_cross_entropy(view_logits.astype(jnp.float32), targets)  # [B]
        return jnp.sum(ce_i * w) / jnp.maximum(jnp.sum(w), 1e-12)

    ce = weighted_ce(logits)
    if ce_all_views:
        _check(outputs_v2 is not None and outputs_v3 is not None,
               "outputs_v2/outputs_v3 are required when ce_all_views=True")
        ce = (ce + weighted_ce(outputs_v2["logits"]) + weighted_ce(outputs_v3["logits"])) / 3

    if _is_zero(pscl_weight) and (outputs_v2 is None or outputs_v3 is None):
        scl = jnp.zeros((), jnp.float32)
        loss = ce
    else:
        _check(outputs_v2 is not None and outputs_v3 is not None,
               "outputs_v2/outputs_v3 are required when pscl_weight != 0")
        scl = balanced_contrastive_loss(outputs_v2["z"], outputs_v3["z"], labels,
                                        outputs_v2["prototypes"], valid, temperature)
        # weight 0 (ablation with all views): report scl but keep it out of the gradient.
        loss = ce if _is_zero(pscl_weight) else ce + pscl_weight * scl
        if _is_zero(pscl_weight):
            scl = jax.lax.stop_gradient(scl)

    correct = (jnp.argmax(logits, axis=-1) == safe_labels).astype(jnp.float32) * validf
    accuracy = jnp.sum(correct) / jnp.maximum(jnp.sum(validf), 1.0)
    return loss, dict(ce=ce, scl=scl, accuracy=accuracy)
