"""Stage-1 model: the ViT plus the PSCL head (classifier, projection head, prototypes).

    images float[B,S,S,3] -> vision (VisionTransformer) -> pooled float[B,Dv]
                                                  (float[B,2Dv] with pooling='mean_max')
    head:
      logits     = pooled @ W_cls + b_cls                        float[B,C]
      z          = normalize(Dense -> BatchNorm -> ReLU -> Dense(proj_dim))(pooled)
                                                                 float[B,proj_dim]
      prototypes = normalize(ProtoMLP(W_cls^T))                  float[C,proj_dim]

Prototypes are derived on every call from the current classifier kernel through their own
small learnable MLP (Dense -> ReLU -> Dense; no EMA, no memory bank), so gradients of the
contrastive loss reach both the MLP and the classifier (FACTS.md, "The method").

Variables: {'params': {'vision': <same tree as WamGLM's 'vision'>, 'head': {...}},
            'batch_stats': {'head': {'proj_bn': {mean, var}}}}
    init:  Stage1Model(cfg, C).init(rng, images, train=False)
    train: model.apply(vars, images, train=True, mutable=['batch_stats'])
    eval:  model.apply(vars, images, train=False)
BatchNorm: flax momentum 0.9 (= PyTorch momentum 0.1), eps 1e-5; flax keeps the biased batch
variance in its running average (PyTorch the unbiased one): a tiny difference at eval time.
Params are boxed with logical axes (`embed`, `classes`, `mlp`, `norm`) like the other towers.
`apply_views` runs several augmented views in one forward pass (what the trainer calls).
"""
from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from wamglm_jax.models.layers import DenseND
from wamglm_jax.models.vit import VisionTransformer

__all__ = ["Stage1Model", "Stage1Head", "apply_views", "l2_normalize"]


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """x / max(||x||_2, eps) along the last axis (torch F.normalize), computed in float32."""
    x = x.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))
    return x / jnp.maximum(norm, eps)


class _Classifier(nn.Module):
    """Linear(Dv -> C). Returns (logits float[B,C], kernel float[Dv,C]) so that the head can
    derive the prototypes from the very kernel used for the logits."""
    num_classes: int

    @nn.compact
    def __call__(self, x):                                               # x float[B,Dv]
        d = x.shape[-1]
        kernel = self.param("kernel", nn.with_logical_partitioning(
            nn.initializers.normal(d ** -0.5), ("embed", "classes")), (d, self.num_classes),
            jnp.float32)
        bias = self.param("bias", nn.with_logical_partitioning(
            nn.initializers.zeros, ("classes",)), (self.num_classes,), jnp.float32)
        return x.astype(jnp.float32) @ kernel + bias, kernel


class Stage1Head(nn.Module):
    """PSCL head on the pooled ViT feature. See the module docstring."""
    num_classes: int
    proj_dim: int = 256

    @nn.compact
    def __call__(self, pooled, train: bool):                             # float[B,Dv]
        d = pooled.shape[-1]
        pooled = pooled.astype(jnp.float32)
        logits, w_cls = _Classifier(self.num_classes, name="classifier")(pooled)

        h = DenseND((d,), ("embed", "mlp"), ("mlp",), name="proj_fc1")(pooled)
        # use_fast_variance=False: two-pass variance (E[x^2]-E[x]^2 cancels badly here).
        h = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                         use_fast_variance=False,
                         scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("mlp",)),
                         bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)),
                         name="proj_bn")(h)
        h = nn.relu(h)
        z = DenseND((self.proj_dim,), ("mlp", None), (None,), name="proj_fc2")(h)
        z = l2_normalize(z)                                              # float[B,P]

        p = DenseND((d,), ("embed", "mlp"), ("mlp",), name="proto_fc1")(w_cls.T)   # [C,Dv]
        p = DenseND((self.proj_dim,), ("mlp", None), (None,), name="proto_fc2")(nn.relu(p))
        prototypes = l2_normalize(p)                                     # float[C,P]
        return dict(logits=logits, z=z, prototypes=prototypes)


class Stage1Model(nn.Module):
    """VisionTransformer (`vision`) + Stage1Head (`head`).

    __call__(images float[B,S,S,3], train: bool) -> dict(
        logits float32[B,C], z float32[B,proj_dim] (unit norm),
        prototypes float32[C,proj_dim] (unit norm), pooled float32[B,Dv])
    """
    config: Any          # config.model
    num_classes: int
    proj_dim: int = 256
    pooling: str = "mean"    # vit.POOLINGS; 'mean_max' doubles Dv of `pooled` and the head

    @nn.compact
    def __call__(self, images, train: bool = False):
        if self.num_classes < 2:
            raise ValueError(f"Stage1Model: num_classes={self.num_classes}, expected >= 2")
        _, pooled = VisionTransformer(config=self.config, pooling=self.pooling, name="vision")(
            images, deterministic=not train)
        out = Stage1Head(self.num_classes, self.proj_dim, name="head")(pooled, train)
        out["pooled"] = pooled.astype(jnp.float32)
        return out


def apply_views(model: Stage1Model, variables, views: jax.Array, *, train: bool,
                rngs: Optional[dict] = None):
    """Run V augmented views of a batch through the model in ONE forward pass.

    Args:
      model: a Stage1Model; variables: {'params': ..., 'batch_stats': ...} (unboxed or boxed).
      views: float[B,V,S,S,3] (the pipeline's `views` batch entry).
      train: BatchNorm in training mode (statistics over all B*V rows, as the reference
        stacks its three views) and batch_stats updated.

    Returns:
      (outputs, batch_stats): outputs is a list of V dicts like Stage1Model's, one per view
      (`logits`, `z`, `pooled` float[B,...]; the same `prototypes` float[C,P] in each);
      batch_stats is the updated collection when train else the one passed in.
      The rows are flattened batch-major (b*V + v) so a batch-sharded input stays local.
    """
    if views.ndim != 5:
        raise ValueError(f"apply_views: views must be float[B,V,S,S,C]; got shape {views.shape}")
    b, v = views.shape[:2]
    flat = views.reshape((b * v,) + views.shape[2:])                    # float[B*V,S,S,C]
    if train:
        out, updates = model.apply(variables, flat, train=True, mutable=["batch_stats"],
                                   rngs=rngs)
        batch_stats = updates["batch_stats"]
    else:
        out = model.apply(variables, flat, train=False, rngs=rngs)
        batch_stats = variables.get("batch_stats")
    per_view = []
    for i in range(v):
        d = {k: out[k].reshape((b, v) + out[k].shape[1:])[:, i]
             for k in ("logits", "z", "pooled")}
        d["prototypes"] = out["prototypes"]
        per_view.append(d)
    return per_view, batch_stats
