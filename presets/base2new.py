"""Base-to-new generalisation: 11 datasets, 16 shots, seeds 1-3; train on the base classes, test on base and new.

A paper preset, run as ``parallel_runner.py --config presets/base2new.py``.
``scripts/base2new.sh`` sets the environment variables it reads (see ``vltune.runner.presets``).
"""

from vltune.runner.presets import experiment

globals().update(experiment("b2n"))
