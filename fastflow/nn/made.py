"""Masked linear layers and MADE (masked autoencoder for distribution estimation).

Degrees as in MADE (Germain et al., 2015, "MADE: Masked Autoencoder for Distribution
Estimation"; docs/design.md, MADE degrees and the one-pass solve): input i has degree d(i) in
1..D (its place in the order); hidden units have degrees in [1, D - 1]; a hidden unit sees
inputs with d(i) <= m(j); an output for dimension d sees hidden units with m(j) < d. Each
dimension's ``out_multiplier`` outputs share its degree, so the outputs for dimension d depend
only on the inputs that come before d in the order (and on the context, which enters every
hidden layer and the output layer unmasked). Hidden units are kept sorted by degree, which
makes every mask block-triangular.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import checks
from ..functional import masked_linear, prefix_blocks, prefix_plan_settings


class MaskedLinear(nn.Linear):
    """``y = x @ (W * mask).T + b`` with a fixed 0/1 mask of shape (out_features, in_features).

    Runs as :func:`fastflow.ops.dispatch.route` says for its ``role`` ("linear" or "head"):
    one library GEMM with the masked weight ("dense"), a few over row blocks of a prefix mask
    ("blocks": see ``fastflow/ops/blocked.py``; dense for any other mask), or the masked-linear
    kernel ("kernel": the mask applied in-kernel, all-zero mask tiles skipped).
    """

    def __init__(self, in_features: int, out_features: int, mask: torch.Tensor, bias: bool = True,
                 role: str = "linear"):
        super().__init__(in_features, out_features, bias=bias)
        if mask.shape != (out_features, in_features):
            raise ValueError(
                f"mask must have shape (out_features, in_features) = "
                f"{(out_features, in_features)}, got {tuple(mask.shape)}"
            )
        checks.check_choice("role", role, ("linear", "head"))
        self.role = role
        self.register_buffer("mask", mask.to(self.weight.dtype))
        self._plan = None  # (the mask's identity, its row blocks or None)

    def blocks(self) -> tuple[tuple[int, int, int], ...] | None:
        """The row blocks (first row, end row, columns read) of the current mask; None for the
        dense product (not a sorted prefix mask, or no cut pays). Planned again whenever the
        mask is replaced, moved or written to, or ``fastflow.ops.blocked.PLAN`` changes."""
        m = self.mask
        key = (m.data_ptr(), m._version, m.device, m.shape, prefix_plan_settings())
        if self._plan is None or self._plan[0] != key:
            self._plan = (key, prefix_blocks(m))
        return self._plan[1]

    def forward(self, x: torch.Tensor, activation: str = "identity") -> torch.Tensor:
        return masked_linear(x, self.weight, self.mask, self.bias, activation=activation,
                             role=self.role, blocks=self.blocks)


def _input_degrees(features: int, order, generator) -> torch.Tensor:
    """Degree (1..D) of each input: its position in the autoregressive order, plus one."""
    if isinstance(order, str):
        if order == "natural":
            return torch.arange(1, features + 1)
        if order == "random":
            return torch.randperm(features, generator=generator) + 1
        raise ValueError(f"order must be 'natural', 'random' or a permutation, got {order!r}")
    order = torch.as_tensor(order)
    if order.shape != (features,) or not torch.equal(order.sort().values, torch.arange(features)):
        raise ValueError(f"order must be a permutation of 0..{features - 1}, got {order.tolist()}")
    return order.long() + 1


def _hidden_degrees(features: int, size: int, mode: str, generator) -> torch.Tensor:
    top = max(1, features - 1)
    if mode == "sequential":
        degrees = torch.arange(size) % top + 1
    elif mode == "random":
        degrees = torch.randint(1, top + 1, (size,), generator=generator)
    else:
        raise ValueError(f"hidden_degrees must be 'sequential' or 'random', got {mode!r}")
    return degrees.sort().values


class MADE(nn.Module):
    """Autoregressive network: ``(B, D) -> (B, D, out_multiplier)``.

    Args:
        features: D, the number of inputs.
        hidden_features: sizes of the hidden layers (a list, or one int for one layer).
        out_multiplier: outputs per dimension (3K for a K-component mixture).
        order: "natural", "random", or a permutation tensor p (input i is generated p[i]-th).
        hidden_degrees: "sequential" or "random".
        residual: hidden layers after the first add their input (all sizes must be equal).
        context_features: size of an optional context vector, fed (through its own linear
            map) to every hidden layer and to the output layer.
        activation: the hidden nonlinearity (a module), ReLU by default.
        seed: seeds the random order / degrees, so a model can be rebuilt exactly.
    """

    def __init__(self, features: int, hidden_features, out_multiplier: int = 1, *,
                 order="natural", hidden_degrees: str = "sequential", residual: bool = False,
                 context_features: int | None = None, activation: nn.Module | None = None,
                 seed: int | None = None):
        super().__init__()
        features = checks.check_count("features", features)
        out_multiplier = checks.check_count("out_multiplier", out_multiplier)
        context_features = checks.check_optional_count("context_features", context_features)
        seed = checks.check_seed(seed)
        hidden = checks.hidden_sizes("hidden_features", hidden_features)
        if residual and len(set(hidden)) != 1:
            raise ValueError("residual=True needs hidden_features of one size")
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        self.features, self.out_multiplier = features, out_multiplier
        self.context_features, self.residual = context_features, residual
        self.activation = activation if activation is not None else nn.ReLU()

        d_in = _input_degrees(features, order, gen)
        self.register_buffer("input_degrees", d_in)
        degrees = [d_in]
        self.layers = nn.ModuleList()
        for i, size in enumerate(hidden):
            if residual and i > 0:
                m = degrees[-1]  # identical degrees keep the skip connection legal
            else:
                m = _hidden_degrees(features, size, hidden_degrees, gen)
            mask = m[:, None] >= degrees[-1][None, :]
            self.layers.append(MaskedLinear(len(degrees[-1]), size, mask))
            degrees.append(m)
        self._table = None  # (the masks' identity, the degree table)
        # Hidden units are sorted by degree, so dimension d's outputs see a prefix of the last
        # hidden layer: the fused head stops reading there.
        self.register_buffer("head_limits",
                             (degrees[-1][None, :] < d_in[:, None]).sum(1).to(torch.int32))
        d_out = d_in.repeat_interleave(out_multiplier)
        self.output = MaskedLinear(hidden[-1], features * out_multiplier,
                                   d_out[:, None] > degrees[-1][None, :], role="head")
        self.context = None
        if context_features is not None:
            # Every hidden layer and the output layer: the first dimension in the order sees no
            # hidden unit, and would otherwise ignore the context.
            self.context = nn.ModuleList(
                nn.Linear(context_features, h) for h in (*hidden, features * out_multiplier)
            )

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        h = self.hidden(x, context)
        out = self.output(h)
        if self.context is not None:
            out = out + self._context_term(-1, context.to(x.dtype))
        return out.reshape(*x.shape[:-1], self.features, self.out_multiplier)

    def sequential_plan(self, context: torch.Tensor | None = None) -> dict:
        """The network as the plain tensors of the one-pass sequential solve (see
        :func:`fastflow.reference.autoregressive.autoregressive_solve`): masked weights (the
        first layer's columns in degree order), biases with a (B, C) context's contribution
        folded in, the degree table and the order."""
        order = torch.argsort(self.input_degrees)
        weights = [layer.weight * layer.mask for layer in self.layers]
        weights[0] = weights[0][:, order]
        biases = [layer.bias for layer in self.layers]
        out_bias = self.output.bias
        if self.context is not None:
            biases = [b + self._context_term(i, context) for i, b in enumerate(biases)]
            out_bias = out_bias + self._context_term(-1, context)
        return {"weights": weights, "biases": biases, "table": self.degree_table(),
                "order": order, "out_weight": self.output.weight * self.output.mask,
                "out_bias": out_bias}

    def _context_term(self, i: int, context: torch.Tensor) -> torch.Tensor:
        """Context layer i applied in the context's dtype (callers pass it in x's: the masked
        layers also run in the input's dtype)."""
        layer = self.context[i]
        w, b = layer.weight, layer.bias
        if w.dtype != context.dtype:
            w, b = w.to(context.dtype), b.to(context.dtype)
        return nn.functional.linear(context, w, b)

    def degree_table(self) -> torch.Tensor:
        """(L + 1, D + 1) integers: ``table[l, m]`` counts the units of layer l (row 0: the
        inputs, in degree order) with degree below m.

        Read back from the masks (and the input degrees), not kept from construction, so that
        it always describes the network that runs, a loaded state dict's included. A hidden
        unit's degree here is the largest degree among the units it sees (0 if none): at most
        its nominal degree, so the sequential solve computes it no later than needed, and
        nondecreasing along the layer's degree-sorted units, so each step's units stay one
        contiguous range. Derived again whenever a mask is replaced, moved or written to.
        """
        masks = [layer.mask for layer in self.layers]
        if torch.compiler.is_compiling():  # traced: no cache (data pointers do not trace)
            return self._derive_table(masks)
        key = tuple((m.data_ptr(), m._version, m.device) for m in (*masks, self.input_degrees))
        if self._table is None or self._table[0] != key:
            self._table = (key, self._derive_table(masks))
        return self._table[1]

    def _derive_table(self, masks) -> torch.Tensor:
        d_in = self.input_degrees
        steps = torch.arange(self.features + 1, device=d_in.device)
        rows, prev = [(steps - 1).clamp(min=0)], d_in
        for m in masks:
            prev = torch.where(m != 0, prev, 0).amax(1)
            rows.append(torch.searchsorted(prev.contiguous(), steps))
        return torch.stack(rows)

    def hidden(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """The last hidden layer, (..., hidden_features[-1])."""
        if x.shape[-1] != self.features:
            raise ValueError(f"x must have {self.features} features, got shape {tuple(x.shape)}")
        checks.check_context(context, self.context_features, x)
        if context is not None:
            context = context.to(x.dtype)
        h = x
        # A ReLU goes into the masked layer's epilogue, unless the context must be added first.
        fuse = self.context is None and type(self.activation) is nn.ReLU
        for i, layer in enumerate(self.layers):
            if fuse:
                a = layer(h, activation="relu")
            else:
                a = layer(h)
                if self.context is not None:
                    a = a + self._context_term(i, context)
                a = self.activation(a)
            h = h + a if self.residual and i > 0 else a
        return h
