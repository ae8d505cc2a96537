"""Cross-dataset transfer: train on ImageNet (16 shots, all classes), evaluate on the 10 other datasets.

A paper preset, run as ``parallel_runner.py --config presets/cross_dataset.py``.
``scripts/cross_dataset.sh`` sets the environment variables it reads (see ``vltune.runner.presets``).
"""

from vltune.runner.presets import experiment

globals().update(experiment("xd"))
