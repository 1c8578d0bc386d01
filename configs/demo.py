"""The embedded default demo (what `ift-jax train` runs with no --config): SmolLM2-135M-Instruct on Amazon
review ratings, review writing and Rotten Tomatoes sentiment."""

from ift_jax.configs.default import get_config  # noqa: F401
