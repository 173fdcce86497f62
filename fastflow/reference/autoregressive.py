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

import torch

from .mixture_cdf import mixture_cdf_fwd
from .mixture_inverse import inverse_component_major
from .naive import compute_dtype

ACTIVATIONS = {"relu": torch.relu, "identity": lambda a: a}


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
        out_weight, out_bias = out_weight.to(cdt), column(out_bias)
        # hs[0]: the solved values in degree order; hs[l + 1]: layer l's activations. A step
        # reads only rows that earlier steps (or its own lower layers) wrote.
        hs = [v.new_empty(D, B)] + [v.new_empty(w.shape[0], B) for w in weights]
        result, lad = torch.empty_like(v), torch.empty_like(v)
        tab, cols = table.tolist(), order.tolist()
        for t in range(D):
            for layer, w in enumerate(weights):
                start, end = tab[layer + 1][t], tab[layer + 1][t + 1]
                if start == end:
                    continue
                seen = tab[layer][t + 1]
                a = hs[layer + 1][start:end]
                torch.mm(w[start:end, :seen], hs[layer][:seen], out=a)
                a.add_(biases[layer][start:end])
                if activation == "relu":
                    a.relu_()
                else:
                    a.copy_(act(a))
                if residual and layer > 0:
                    a.add_(hs[layer][start:end])
            col, seen = cols[t], tab[-1][t + 1]
            rows = slice(3 * K * col, 3 * K * (col + 1))
            params = torch.mm(out_weight[rows, :seen], hs[-1][:seen]).add_(out_bias[rows])
            if invert:
                r, r_lad = inverse_component_major(v[col], *params.split(K), kind, output)
            else:
                r, r_lad = mixture_cdf_fwd(v[col], *(p.T for p in params.split(K)), kind,
                                           output)
            hs[0][t] = r
            result[col] = r
            lad[col] = r_lad
    return result.T.contiguous().to(values.dtype), lad.T.contiguous().to(values.dtype)
