"""WamGLM-JAX: a LLaVA-style wafer-map language model in JAX/Flax."""
__version__ = "0.1.0"
