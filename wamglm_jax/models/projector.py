"""LLaVA `mlp2x_gelu` projector (HF `LlavaMultiModalProjector`): linear_1 -> exact GELU -> linear_2.

float[B,N,Dv] -> float[B,N,D]; both linears have biases (`multimodal_projector_bias=True`).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax

from wamglm_jax.models.layers import DenseND, compute_dtype, constrain


class Projector(nn.Module):
    config: Any          # config.model

    @nn.compact
    def __call__(self, x):                                     # x float[B,N,Dv]
        cfg = self.config
        if cfg.projector.hidden_act != "gelu":
            raise ValueError(f"config.model.projector.hidden_act={cfg.projector.hidden_act!r}; "
                             "only 'gelu' (exact erf GELU, LLaVA mlp2x_gelu) is supported")
        dtype = compute_dtype(cfg)
        d = cfg.lm.hidden_size
        h = DenseND((d,), ("embed", "mlp"), ("mlp",), dtype=dtype, name="linear_1")(x)
        h = constrain(jax.nn.gelu(h, approximate=False), ("batch", "length", "mlp"))
        y = DenseND((d,), ("mlp", "embed"), ("embed",), dtype=dtype, name="linear_2")(h)
        return constrain(y, ("batch", "length", "act_embed"))          # float[B,N,D]
