"""fastflow: compiled-kernel mixture-CDF normalizing flows for PyTorch."""

from . import data, distributions, flows, nn
from .fit import fit
from .functional import (
    get_validate_args,
    masked_linear,
    mixture_cdf,
    mixture_cdf_inverse,
    mixture_log_prob,
    set_validate_args,
)
from .ops import MixtureCDF, MixtureCDFInverse, MixtureLogProb

__version__ = "0.1.0"

__all__ = [
    "MixtureCDF",
    "MixtureCDFInverse",
    "MixtureLogProb",
    "data",
    "distributions",
    "flows",
    "fit",
    "get_validate_args",
    "masked_linear",
    "mixture_cdf",
    "mixture_cdf_inverse",
    "mixture_log_prob",
    "nn",
    "set_validate_args",
]
