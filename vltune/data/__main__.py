"""``python -m vltune.data check --root DIR [--dataset NAME ...]``: is a data root ready (``vltune.data.check``)."""

import sys

import vltune  # noqa: F401  (compat shim before torchvision)
from vltune.cli import dispatch

if __name__ == "__main__":
    sys.exit(dispatch("python -m vltune.data", {"check": "vltune.data.check"}, sys.argv[1:]))
