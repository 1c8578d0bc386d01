"""ift-jax: instruction fine-tuning of pretrained causal language models in JAX."""

__version__ = "0.1.0"
