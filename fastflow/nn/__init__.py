"""Flow layers: MADE, masked autoregressive mixture-CDF flows, and their building blocks."""

from .coupling import CouplingMixtureFlow
from .dequantization import (
    UniformDequantization,
    VariationalDequantization,
    dequantized_log_prob,
)
from .flow import Flow, FlowDistribution
from .made import MADE, MaskedLinear
from .transforms import (
    AutoregressiveMixtureFlow,
    Compose,
    Logit,
    MixtureCDFFlow,
    Permutation,
    Reverse,
    Sigmoid,
    TorchTransform,
    Transform,
)

__all__ = [
    "MADE",
    "AutoregressiveMixtureFlow",
    "Compose",
    "CouplingMixtureFlow",
    "Flow",
    "FlowDistribution",
    "Logit",
    "MaskedLinear",
    "MixtureCDFFlow",
    "Permutation",
    "Reverse",
    "Sigmoid",
    "TorchTransform",
    "Transform",
    "UniformDequantization",
    "VariationalDequantization",
    "dequantized_log_prob",
]
