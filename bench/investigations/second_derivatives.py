"""Second derivatives of the mixture CDF's logabsdet in a logistic tail, against the exact
value.

Second and higher derivatives come from autograd through the log-space formulas, whose
terms there are computed by cancelling sigmoid values near one, so their error is of order
the dtype's epsilon in absolute terms, not relative to a value that is itself tiny. This
prints d^2/dx^2 of the "unit" logabsdet of one standard logistic, log s(x) + log(1 - s(x)),
whose exact value is -2 s(x) (1 - s(x)), at points down its left tail, in float32 and
float64.

    python bench/investigations/second_derivatives.py
"""

import math

import torch

import fastflow


def second_derivative(x0: float, dtype: torch.dtype) -> float:
    x = torch.tensor([x0], dtype=dtype, requires_grad=True)
    zero = torch.zeros(1, 1, dtype=dtype)
    _, lad = fastflow.mixture_cdf(x, zero, zero, zero, kind="logistic", output="unit")
    (g,) = torch.autograd.grad(lad.sum(), x, create_graph=True)
    (h,) = torch.autograd.grad(g.sum(), x)
    return h.item()


def main() -> None:
    print("| x | exact | float32 | rel. error | float64 | rel. error |")
    print("|---|---|---|---|---|---|")
    for x0 in (-4.0, -8.0, -12.0, -16.0, -20.0, -30.0):
        s = 1.0 / (1.0 + math.exp(-x0))
        exact = -2.0 * s * (1.0 - s)
        f32, f64 = (second_derivative(x0, d) for d in (torch.float32, torch.float64))
        print(f"| {x0:g} | {exact:.4e} | {f32:.4e} | {abs(f32 / exact - 1):.1e} | {f64:.4e} | "
              f"{abs(f64 / exact - 1):.1e} |")


if __name__ == "__main__":
    main()
