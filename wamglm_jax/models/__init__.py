"""Model towers: SigLIP-style ViT, LLaVA projector, Llama-style decoder, WamGLM composition."""
from wamglm_jax.models.decoder import Decoder, init_cache
from wamglm_jax.models.projector import Projector
from wamglm_jax.models.vit import VisionTransformer
from wamglm_jax.models.wamglm import (ImageTokenError, WamGLM, check_image_tokens,
                                      num_image_tokens)

__all__ = ["Decoder", "ImageTokenError", "Projector", "VisionTransformer", "WamGLM",
           "check_image_tokens", "init_cache", "num_image_tokens"]
