#!/usr/bin/env bash
# Skip Tuning ablations: base-to-new grid searches over the start layer, the CSkip top ratio and lambda.
# Runs presets/ablation_skiptuning.py with parallel_runner.py; --help lists the options.
PRESET=ablation_skiptuning
DESCRIPTION="Skip Tuning ablations: base-to-new grid searches over the start layer, the CSkip top ratio and lambda."
EXTRA_HELP=$'  --start-layers "N ..."  start layers searched                         [VLTUNE_START_LAYERS; default: 2 4 6 8 10]\n  --top-ratios "R ..."    CSkip top ratios searched                       [VLTUNE_TOP_RATIOS; default: 1.0 ... 0.1]\n  --lambdas "L ..."       CSkip lambdas searched                          [VLTUNE_LAMBDAS; default: 0.01 ... 1.0]\n'
source "$(dirname "${BASH_SOURCE[0]}")/_preset.sh"
