"""Fused optimizer-step ops on flat ZeRO shards (installed as ``dsforget.kernels``).

Each op lives in its own module beside a plain-PyTorch reference of the same math; every op
takes `backend=` ("torch", "cpu" or "triton", see `available_backends`). Importing this
package never needs a GPU or Triton.
"""

if __name__ == "kernels":  # imported by its folder's name, not as dsforget.kernels
    from ._name_clash import hand_over_top_level_name

    hand_over_top_level_name()
else:
    from .backends import available_backends, default_backend, resolve_backend
    from .hints import ThresholdHint
    from .histogram import abs_histogram
    from .masked_update import masked_adamw
    from .moments import update_moments
    from .radix import NUM_LEVELS, RadixState, level_bins, refine
    from .segments import DENSE, NO_ROWSCALE, SegmentTable
    from .step import topk_adamw_step
    from .tiles import TensorList

__all__ = [
    "DENSE",
    "NO_ROWSCALE",
    "NUM_LEVELS",
    "RadixState",
    "SegmentTable",
    "TensorList",
    "ThresholdHint",
    "abs_histogram",
    "available_backends",
    "default_backend",
    "level_bins",
    "masked_adamw",
    "refine",
    "resolve_backend",
    "topk_adamw_step",
    "update_moments",
]
