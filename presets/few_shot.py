"""Few-shot classification: 11 datasets, 1/2/4/8/16 shots, seeds 1-3, all classes.

A paper preset, run as ``parallel_runner.py --config presets/few_shot.py``.
``scripts/few_shot.sh`` sets the environment variables it reads (see ``vltune.runner.presets``).
"""

from vltune.runner.presets import experiment

globals().update(experiment("fewshot"))
