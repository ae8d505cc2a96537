"""Skip Tuning ablations (base-to-new grid searches over the start layer, the CSkip top ratio and lambda).

A paper preset, run as ``parallel_runner.py --config presets/ablation_skiptuning.py``.
``scripts/ablation_skiptuning.sh`` sets the environment variables it reads (see ``vltune.runner.presets``).
"""

from vltune.runner.presets import experiment

globals().update(experiment("ablation"))
