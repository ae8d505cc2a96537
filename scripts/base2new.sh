#!/usr/bin/env bash
# Base-to-new generalisation: 11 datasets, 16 shots, seeds 1-3; train on the base classes, test on base and new.
# Runs presets/base2new.py with parallel_runner.py; --help lists the options.
PRESET=base2new
DESCRIPTION="Base-to-new generalisation: 11 datasets, 16 shots, seeds 1-3; train on the base classes, test on base and new."
source "$(dirname "${BASH_SOURCE[0]}")/_preset.sh"
