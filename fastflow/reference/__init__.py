"""Pure-PyTorch implementations: the CPU path of every op, and :mod:`.naive`, the mixture
CDF's log-space oracle that the kernels and the CPU path are tested against."""

from . import autoregressive, made, mixture_cdf, mixture_inverse, naive
from .made import masked_linear_fwd
from .mixture_cdf import mixture_cdf_bwd, mixture_cdf_fwd
from .mixture_inverse import mixture_cdf_inverse_bwd, mixture_cdf_inverse_fwd

__all__ = [
    "autoregressive",
    "made",
    "mixture_cdf",
    "mixture_inverse",
    "naive",
    "mixture_cdf_bwd",
    "mixture_cdf_fwd",
    "mixture_cdf_inverse_bwd",
    "mixture_cdf_inverse_fwd",
    "masked_linear_fwd",
]
