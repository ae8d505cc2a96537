"""vltune: one benchmark suite for adapting CLIP with prompt learners, adapters, fine-tuning and bypass tuners."""

import os

# Native libraries' chatter, which would otherwise fill every job's log and console: kineto's "USDT: profiler_start /
# profiler_stop" lines around the CPU memory meter's profiled step (kineto's levels: ... ERROR 4, USDT 5; it reads this
# when the profiler first starts), and c10's CPUAllocator warning about blocks allocated before profiling started (read
# when torch loads, so it takes effect where vltune is imported first: train.py, the runner and its job workers, which
# inherit the environment). A value the user set wins.
os.environ.setdefault("KINETO_LOG_LEVEL", "6")
os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")

from vltune import compat  # noqa: E402,F401  (must run before torchvision/open_clip are imported anywhere)

__version__ = "0.1.0"
