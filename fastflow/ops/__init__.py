"""fastflow's ops: each a torch.library custom op with its fake implementation, derivative (all
but the gradient-free one-pass solve) and batching rule, one module per op, over the Triton
kernels (``fastflow.kernels``) and the CPU path (:mod:`fastflow.reference`). :mod:`.dispatch`
decides where each runs; :mod:`.core` holds what they share. Importing this package registers
``torch.ops.fastflow.*``."""

from . import autoregressive, blocked, core, dispatch, made, mixture_cdf, mixture_inverse
from .mixture_cdf import MixtureCDF, MixtureLogProb
from .mixture_inverse import MixtureCDFInverse

__all__ = ["MixtureCDF", "MixtureCDFInverse", "MixtureLogProb", "autoregressive", "blocked",
           "core", "dispatch", "made", "mixture_cdf", "mixture_inverse"]
