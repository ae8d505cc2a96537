#!/usr/bin/env bash
# Domain generalisation: train on ImageNet (16 shots), evaluate on ImageNet-V2, -Sketch, -A and -R.
# Runs presets/domain_generalization.py with parallel_runner.py; --help lists the options.
PRESET=domain_generalization
DESCRIPTION="Domain generalisation: train on ImageNet (16 shots), evaluate on ImageNet-V2, -Sketch, -A and -R."
source "$(dirname "${BASH_SOURCE[0]}")/_preset.sh"
