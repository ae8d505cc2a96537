#!/usr/bin/env bash
# Cross-dataset transfer: train on ImageNet (16 shots, all classes), evaluate on the 10 other datasets.
# Runs presets/cross_dataset.py with parallel_runner.py; --help lists the options.
PRESET=cross_dataset
DESCRIPTION="Cross-dataset transfer: train on ImageNet (16 shots, all classes), evaluate on the 10 other datasets."
source "$(dirname "${BASH_SOURCE[0]}")/_preset.sh"
