"""The embedded default demo (what `ift-jax train` runs with no --config): SmolLM2-135M-Instruct on Amazon
review ratings and review writing, Rotten Tomatoes sentiment, BoolQ yes/no questions and XSum summaries, with
one rating template held out of training."""

from ift_jax.configs.default import get_config  # noqa: F401
