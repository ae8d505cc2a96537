#!/usr/bin/env bash
# Few-shot classification: 11 datasets, 1/2/4/8/16 shots, seeds 1-3, all classes.
# Runs presets/few_shot.py with parallel_runner.py; --help lists the options.
PRESET=few_shot
DESCRIPTION="Few-shot classification: 11 datasets, 1/2/4/8/16 shots, seeds 1-3, all classes."
source "$(dirname "${BASH_SOURCE[0]}")/_preset.sh"
