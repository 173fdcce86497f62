"""One-pass solve of a degree-sorted MADE's sequential direction (docs/design.md, MADE
degrees and the one-pass solve).

Sampling a MAF (and evaluating an IAF on external data) is sequential: dimension d's mixture
parameters depend on the dimensions before it in the order. Solving it with D full network
passes repeats almost all the work. With hidden units sorted by degree, a unit of degree m
depends only on the first m dimensions of the order, so step t (which produces the dimension
of degree t + 1) computes exactly the units of degree t in each layer, then that dimension's
3K parameters, then its transform. Every unit is computed once: the whole solve costs about
one network pass of arithmetic plus D small transforms.

The network comes as a *plan* of plain tensors (see ``MADE.sequential_plan``), shared with the
Triton kernel in ``kernels/autoregressive.py``:

- ``weights[l]``: layer l's masked weight (H_l, H_{l-1}); layer 0's columns in degree order.
- ``biases[l]``: (H_l,), or (B, H_l) with a context's contribution folded in.
- ``table``: (L + 1, D + 1) integers; ``table[l, m]`` counts the units of layer l (row 0: the
  inputs, in degree order) with degree below m. Units of degree t in layer l are
  ``table[l + 1, t] : table[l + 1, t + 1]`` and see ``table[l, t + 1]`` units of layer l - 1.
- ``order``: (D,) the original column of the dimension with degree t + 1.
- ``out_weight`` (3KD, H_L) masked, rows grouped by original column; ``out_bias`` (3KD,) or
  (B, 3KD).
"""

from __future__ import annotations

import math

import torch

from .mixture_cdf import mixture_cdf_fwd
from .mixture_inverse import inverse_component_major
from .naive import compute_dtype

ACTIVATIONS = {"relu": torch.relu, "identity": lambda a: a}
# Steps per block of the one-pass solve's pre-activation GEMMs.
BLOCK = 8


def autoregressive_solve(values, weights, biases, table, order, out_weight, out_bias,
                         components: int, kind: str, output: str, invert: bool,
                         residual: bool, activation):
    """Solve for the MADE-side variable r of (B, D) ``values``, one degree at a time.

    ``invert=False``: r_d = F(values_d; theta_d(r_<d)) (an IAF's density direction);
    ``invert=True``: r_d = F^{-1}(values_d; theta_d(r_<d)) (a MAF's sampling direction).
    ``activation`` is a name in ACTIVATIONS or a callable. Returns (r, logabsdet), each (B, D)
    in values' dtype; logabsdet per dimension is log|dr_d/dvalues_d|.
    """
    act = ACTIVATIONS[activation] if isinstance(activation, str) else activation
    B, D = values.shape
    K = components
    cdt = compute_dtype(values.dtype)
    with torch.no_grad():
        # Everything unit-major, (units, B): a step's target column, its new units and its
        # results are rows (contiguous reads and writes), and its 3K parameters come out of
        # the GEMM component-major, the layout the CPU inverse iterates in.
        v = values.to(cdt).T.contiguous()

        def column(b):  # (H,) -> (H, 1), or a context-folded (B, H) -> (H, B)
            b = b.to(cdt)
            return b.unsqueeze(-1) if b.dim() == 1 else b.T

        weights = [w.to(cdt) for w in weights]
        biases = [column(b) for b in biases]
        # The output rows in degree order: step t's 3K parameters are rows 3K t : 3K (t + 1).
        out_rows = (order.to(torch.long, copy=False).view(D, 1) * (3 * K)
                    + torch.arange(3 * K, device=order.device)).reshape(-1)
        out_weight, out_bias = out_weight.to(cdt)[out_rows], column(out_bias)[out_rows]
        # hs[0]: the solved values in degree order; hs[l + 1]: layer l's activations. A step
        # reads only rows that earlier steps (or its own lower layers) wrote.
        hs = [v.new_empty(D, B)] + [v.new_empty(w.shape[0], B) for w in weights]
        result, lad = torch.empty_like(v), torch.empty_like(v)
        tab, cols = table.tolist(), order.tolist()
        # Each block of BLOCK steps starts with one GEMM per layer for the pre-activations of
        # all its units from the units already known (lower degrees); a step then adds only
        # its own degrees' part. A GEMM of a step's 4-odd units is slow per flop (a few rows
        # of a long matrix); this does most of the flops in GEMMs BLOCK times taller.
        w_all, b_all = [*weights, out_weight], [*biases, out_bias]
        bounds = [row[:D + 1] for row in tab[1:]] + [[3 * K * m for m in range(D + 1)]]
        pre = [None] * len(w_all)
        for t in range(D):
            if t % BLOCK == 0:
                t0, t1 = t, min(t + BLOCK, D)
                for layer, (w, b) in enumerate(zip(w_all, b_all, strict=True)):
                    rows = slice(bounds[layer][t0], bounds[layer][t1])
                    known = tab[layer][t0]
                    pre[layer] = torch.addmm(b[rows], w[rows, :known], hs[layer][:known])
            for layer, w in enumerate(w_all):
                start, end = bounds[layer][t], bounds[layer][t + 1]
                if start == end:
                    continue
                known, seen = tab[layer][t0], tab[layer][t + 1]
                first = bounds[layer][t0]
                a = pre[layer][start - first:end - first]
                if layer < len(weights):
                    out = hs[layer + 1][start:end]
                    if seen > known:
                        torch.addmm(a, w[start:end, known:seen], hs[layer][known:seen], out=out)
                    else:
                        out.copy_(a)
                    if activation == "relu":
                        out.relu_()
                    else:
                        out.copy_(act(out))
                    if residual and layer > 0:
                        out.add_(hs[layer][start:end])
                elif seen > known:
                    a = torch.addmm(a, w[start:end, known:seen], hs[layer][known:seen])
            params, col = a, cols[t]
            if invert:
                r, r_lad = inverse_component_major(v[col], *params.split(K), kind, output,
                                                   check_nan=False)
            else:
                r, r_lad = mixture_cdf_fwd(v[col], *(p.T for p in params.split(K)), kind,
                                           output)
            hs[0][t] = r
            result[col] = r
            lad[col] = r_lad
        if invert and bool(torch.stack([w.isnan().any() for w in w_all + b_all]).any()):
            # NaN weights (validation off lets them through) give NaN, not the plausible
            # numbers the per-step solves stop at.
            result.fill_(math.nan)
            lad.fill_(math.nan)
    return result.T.contiguous().to(values.dtype), lad.T.contiguous().to(values.dtype)
