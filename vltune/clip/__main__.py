"""``python -m vltune.clip check WEIGHTS [--backbone NAME]``: what a CLIP weights file holds (vltune.clip.check)."""

import sys

import vltune  # noqa: F401  (compat shim before torchvision/open_clip)
from vltune.cli import dispatch

if __name__ == "__main__":
    sys.exit(dispatch("python -m vltune.clip", {"check": "vltune.clip.check"}, sys.argv[1:]))
