"""Domain generalisation: train on ImageNet (16 shots), evaluate on ImageNet-V2, -Sketch, -A and -R.

A paper preset, run as ``parallel_runner.py --config presets/domain_generalization.py``.
``scripts/domain_generalization.sh`` sets the environment variables it reads (see ``vltune.runner.presets``).
"""

from vltune.runner.presets import experiment

globals().update(experiment("dg"))
