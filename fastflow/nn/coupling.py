"""Coupling mixture-CDF layer (Flow++): one part of the features conditions the rest.

The first ``features // 2`` features (the conditioner's half) pass through unchanged; a network
reads them (and an optional context) and returns, for each of the other features, a
K-component mixture whose CDF transforms that feature. Both directions are one network pass
and one mixture op, so sampling costs what the density costs.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import checks
from ..checks import check_count, check_kind_output, hidden_sizes
from ..functional import mixture_cdf, mixture_cdf_inverse
from .transforms import _MixtureTransform


def coupling_network(in_features: int, out_features: int, hidden_features) -> nn.Sequential:
    """The default conditioner: an MLP with ReLU, (..., in) -> (..., out)."""
    sizes = [in_features, *hidden_features]
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:], strict=True):
        layers += [nn.Linear(a, b), nn.ReLU()]
    layers.append(nn.Linear(sizes[-1], out_features))
    return nn.Sequential(*layers)


def _call_in_dtype(network: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """``network(inputs)`` in the inputs' dtype: a network whose floating parameters and
    buffers have another dtype runs with them cast to it (float64 data through a float32
    conditioner computes in float64, as MADE's layers do; the casts pass gradients back, and
    buffers the call updates, such as batch norm's running statistics, are copied back)."""
    params, buffers = dict(network.named_parameters()), dict(network.named_buffers())
    state = {**params, **buffers}
    if all(t.dtype == inputs.dtype or not t.is_floating_point() for t in state.values()):
        return network(inputs)
    cast = {k: t.to(inputs.dtype) if t.is_floating_point() else t for k, t in state.items()}
    out = torch.func.functional_call(network, cast, (inputs,))
    with torch.no_grad():
        for k, b in buffers.items():
            if b.is_floating_point() and cast[k] is not b:
                b.copy_(cast[k])
    return out


class CouplingMixtureFlow(_MixtureTransform):
    """Flow++'s coupling layer with a mixture-CDF transform of the second part.

    Args:
        features: D (at least 2).
        components: K, the mixture's components per transformed feature.
        hidden_features: hidden sizes of the default conditioner, an MLP (empty: one linear
            map; ignored with ``network``).
        kind: "logistic" or "gaussian".
        output: "logit" (the only choice: the conditioner's half stays in R, so the layer
            maps R^D to R^D).
        context_features: size of an optional context, concatenated to the conditioner's
            input.
        network: a replacement conditioner, any module mapping
            (..., D // 2 + context_features) to (..., (D - D // 2) * 3K); its outputs are read
            per transformed feature as (logits, loc, log_scale), K each.
    """

    def __init__(self, features: int, components: int, hidden_features=(64, 64), *,
                 kind: str = "logistic", output: str = "logit",
                 context_features: int | None = None, network: nn.Module | None = None):
        super().__init__()
        check_count("features", features, 1)
        if features < 2:
            raise ValueError(f"features must be >= 2 for a coupling layer, got {features}")
        check_count("components", components)
        check_kind_output(kind, output)
        if output != "logit":
            raise ValueError("output must be 'logit' for a coupling layer: its conditioner's "
                             "half stays in R, so the layer maps R^D to R^D")
        self.features, self.components = features, components
        self.kind, self.output = kind, output
        self.context_features = checks.check_optional_count("context_features",
                                                            context_features)
        self.split = features // 2
        n_in = self.split + (context_features or 0)
        n_out = (features - self.split) * 3 * components
        if network is not None and not isinstance(network, nn.Module):
            raise ValueError(f"network must be a torch.nn.Module, got {type(network).__name__}")
        if network is None:
            network = coupling_network(n_in, n_out,
                                       hidden_sizes("hidden_features", hidden_features,
                                                    allow_empty=True))
            # Start the transformed features' locations spread over [-1, 1].
            last = network[-1]
            with torch.no_grad():
                bias = last.bias.view(features - self.split, 3 * components)
                bias[:, components:2 * components] = torch.linspace(-1.0, 1.0, components)
        self.network = network

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, conditioner_features={self.split}"

    def _params(self, kept, context):
        inputs = kept if context is None else torch.cat([kept, context.to(kept.dtype)], -1)
        try:
            out = _call_in_dtype(self.network, inputs)
        except RuntimeError as e:
            if "shape" not in str(e):  # not an input width the network does not take
                raise
            raise ValueError(f"the network failed on inputs of shape {tuple(inputs.shape)} "
                             f"(D // 2 + context features per row): {e}") from e
        expected = (self.features - self.split) * 3 * self.components
        if out.shape[-1] != expected:
            raise ValueError(f"the network must return {expected} outputs per row "
                             f"((D - D // 2) * 3K), got {out.shape[-1]}")
        out = out.reshape(*kept.shape[:-1], self.features - self.split, 3 * self.components)
        return out.split(self.components, dim=-1)

    def _transform(self, values, context, invert: bool):
        checks.check_context(context, self.context_features, values)
        kept, moved = values[..., :self.split], values[..., self.split:]
        params, lost = self._params(kept, context), None
        if checks.should_validate():
            params, lost = self._finite_params(params, self.network)
        op = mixture_cdf_inverse if invert else mixture_cdf
        out, lad = self._mark_lost(*op(moved, *params, kind=self.kind, output=self.output), lost)
        return torch.cat([kept, out], -1), lad.sum(-1)

    def forward(self, x, context=None):
        self._check(x)
        return self._transform(x, context, invert=False)

    def inverse(self, z, context=None):
        self._check(z, "z")
        return self._transform(z, context, invert=True)
