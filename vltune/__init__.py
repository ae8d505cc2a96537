"""vltune: one benchmark suite for adapting CLIP with prompt learners, adapters, fine-tuning and bypass tuners."""

from vltune import compat  # noqa: F401  (must run before torchvision/open_clip are imported anywhere)

__version__ = "0.1.0"
