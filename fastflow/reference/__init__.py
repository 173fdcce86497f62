"""Pure-PyTorch implementations: the CPU path and the oracle for every kernel test."""

from . import autoregressive, made
from .made import masked_linear_fwd
from .mixture_cdf import (
    mixture_cdf_bwd,
    mixture_cdf_fwd,
    mixture_cdf_inverse_bwd,
    mixture_cdf_inverse_fwd,
)

__all__ = [
    "autoregressive",
    "made",
    "mixture_cdf_bwd",
    "mixture_cdf_fwd",
    "mixture_cdf_inverse_bwd",
    "mixture_cdf_inverse_fwd",
    "masked_linear_fwd",
]
