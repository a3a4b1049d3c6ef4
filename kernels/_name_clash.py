"""The top-level name `kernels` belongs to Hugging Face's `kernels` package, not to this folder.

dsforget's kernels are installed as `dsforget.kernels`. This folder sits at the checkout's root,
so when that root is on sys.path (`python -m ...` or pytest started from it, a PYTHONPATH
holding it), a plain `import kernels` finds the folder first. transformers >= 5.25 depends on
Hugging Face's `kernels` and imports it while loading any model (`from kernels import
CUDAProperties`, ...): without this handover every model load from the checkout's root fails.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys


def hand_over_top_level_name() -> None:
    """Replace this folder, imported as top-level `kernels`, by the `kernels` package that
    sys.path holds outside the checkout; ModuleNotFoundError if there is none, as if this
    folder were not there."""
    checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    elsewhere = [entry for entry in sys.path if os.path.abspath(entry or os.curdir) != checkout]
    spec = importlib.machinery.PathFinder.find_spec("kernels", elsewhere)
    if spec is None or spec.loader is None:
        raise ModuleNotFoundError(
            "No module named 'kernels' outside this checkout (dsforget's own kernels are "
            "imported as dsforget.kernels)",
            name="kernels",
        )
    module = importlib.util.module_from_spec(spec)
    sys.modules["kernels"] = module  # the import statement returns what sys.modules holds now
    spec.loader.exec_module(module)
