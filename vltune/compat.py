"""Import shims that must run before torchvision or open_clip is imported.

The torchvision wheel pinned in constraints.txt is a CUDA build. On a CPU-only torch its module
``torchvision._meta_registrations`` registers meta kernels for ``torchvision::nms``, an operator the CPU torch never
defined, and ``import torchvision`` fails with "operator torchvision::nms does not exist". The meta registrations only
matter for torch.compile/fake tensors on CUDA ops, so on a CPU torch we replace that module with an empty one.
Transforms keep working; images are decoded with PIL, never with torchvision.io.
"""

from __future__ import annotations

import sys
import types

import torch


def apply() -> None:
    """Install the shims; idempotent."""
    if torch.version.cuda is None and "torchvision._meta_registrations" not in sys.modules:
        sys.modules["torchvision._meta_registrations"] = types.ModuleType("torchvision._meta_registrations")


apply()
