"""``python -m vltune.clip check WEIGHTS [--backbone NAME]``: what a CLIP weights file holds (vltune.clip.check)."""

import sys

import vltune  # noqa: F401  (compat shim before torchvision/open_clip)

COMMANDS = ("check",)

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        print(f"usage: python -m vltune.clip {{{','.join(COMMANDS)}}} ... (--help after the command for its options)",
              file=sys.stderr)
        sys.exit(2)
    from vltune.clip.check import main

    sys.exit(main(sys.argv[2:]))
