"""The autoregressive solve: ``fastflow::autoregressive_solve``, a degree-sorted MADE's
sequential direction (MAF sampling, IAF density) in one pass: each hidden unit computed once,
one kernel on a GPU. No derivative: the flows take the D-pass route when gradients are needed
(:func:`.dispatch.solve_in_one_pass`).

Kernel: :mod:`fastflow.kernels.autoregressive`; CPU path: :mod:`fastflow.reference.autoregressive`.
"""

from __future__ import annotations

import torch

from ..reference import autoregressive as cpu_path
from . import dispatch, mixture_inverse
from .core import call, contiguous, empty_contiguous, op, vmap_rows


@op("autoregressive_solve")
def autoregressive_solve(
    values: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor],
    table: torch.Tensor, order: torch.Tensor, out_weight: torch.Tensor, out_bias: torch.Tensor,
    components: int, kind: str, output: str, invert: bool, residual: bool, activation: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    args = (values, weights, biases, table, order, out_weight, out_bias, components, kind,
            output, invert, residual, activation)
    if dispatch.solve_kernel(values, activation):
        kernel = dispatch.kernels("autoregressive").autoregressive_solve
        return kernel(*args, max_steps=mixture_inverse.MAX_STEPS)
    return contiguous(*cpu_path.autoregressive_solve(*args))


@autoregressive_solve.register_fake
def _(values, weights, biases, table, order, out_weight, out_bias, components, kind, output,
      invert, residual, activation):
    return empty_contiguous(values), empty_contiguous(values)


# The biases (2) and the output bias (6) are per row where a context's term is folded in.
vmap_rows("autoregressive_solve", (0,), row_aligned=(2, 6))


def solve(values, plan: dict, components: int, kind: str, output: str, invert: bool,
          residual: bool, activation):
    """The one-pass solve on (N, D) values with a MADE's ``sequential_plan``; ``activation``
    "relu" (the op: kernel or CPU path) or any other callable (the CPU path, with it)."""
    args = (values, plan["weights"], plan["biases"], plan["table"], plan["order"],
            plan["out_weight"], plan["out_bias"], components, kind, output, invert, residual)
    if activation == "relu":
        return call("autoregressive_solve", *args, "relu")
    return cpu_path.autoregressive_solve(*args, activation)
