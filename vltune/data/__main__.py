"""``python -m vltune.data check --root DIR [--dataset NAME ...]``: is a data root ready (``vltune.data.check``)."""

import sys

import vltune  # noqa: F401  (compat shim before torchvision)

COMMANDS = ("check",)

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        print(f"usage: python -m vltune.data {{{','.join(COMMANDS)}}} ... (--help after the command for its options)",
              file=sys.stderr)
        sys.exit(2)
    from vltune.data.check import main

    sys.exit(main(sys.argv[2:]))
