"""Measure the float32 accuracy contract of every op against the float64 oracle.

    python bench/investigations/accuracy_report.py

(the reference and the Triton kernels, interpreted on a CPU).

Prints, per backend, kind and output, the worst error over the contract's ranges (logits
spread +-50, log_scale in [-10, 10], K = 1, 3, 64, x out to 1e4 logistic / 30 Gaussian
component scales; inverse targets |logit| <= 80 or z in [1e-30, 1 - 1e-7]) in the contract's
own normalisation, so every figure must be <= 1 (the inverse: share of targets missed).
For the logit log-derivative it also counts the elements beyond the tolerance, and of those
the ones whose error exceeds what a one-ulp nudge of the float32 inputs does to the exact
value (an evaluation within that is as accurate as its inputs allow).

    SEED=1 python bench/investigations/accuracy_report.py             # another draw of parameters
"""

import os
import sys
from pathlib import Path

import numpy as np
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))

import fastflow  # noqa: E402

from helpers import (  # noqa: E402
    oracle,
    oracle_forward,
    oracle_root,
    random_mixture,
    rel_err,
    sample_x,
    ulp_sensitivity,
)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
U_MAX = {"logistic": 1e4, "gaussian": 30.0}


def forward_row(kind, output, K, shape=(64, 128)):
    params = random_mixture(shape, K, device=DEVICE, logit_spread=50.0,
                            log_scale_range=(-10.0, 10.0), loc_spread=3.0)
    x = sample_x(*params, shape, U_MAX[kind])
    o = oracle(x, *params, kind)
    if output == "density":
        lad = fastflow.mixture_log_prob(x, *params, kind=kind, validate_args=False)
        return {"lad": rel_err(lad, o["log_f"]).max() / 1e-5}
    y, lad = fastflow.mixture_cdf(x, *params, kind=kind, output=output, validate_args=False)
    if output == "unit":
        return {"y": np.abs(y.double().cpu().numpy() - o["unit"]).max() / 1e-6,
                "lad": rel_err(lad, o["log_f"]).max() / 1e-5}
    err = rel_err(lad, o["logit_lad"]) / 1e-5
    over = err > 1
    row = {"y": rel_err(y, o["logit"]).max() / 1e-5, "lad": err.max(), "lad over": over.sum()}
    if over.any():
        # beyond the tolerance but within what a one-ulp nudge of the inputs does to the
        # exact value (backward stable), versus beyond both
        sens = ulp_sensitivity(x, *params, kind, "logit_lad")
        abs_err = np.abs(lad.double().cpu().numpy() - o["logit_lad"])
        row["lad over, beyond 1-ulp sensitivity"] = (abs_err[over] > sens[over]).sum()
    return row


def inverse_row(kind, output, K, shape=(8, 64)):
    params = random_mixture(shape, K, device=DEVICE, logit_spread=50.0,
                            log_scale_range=(-10.0, 10.0), loc_spread=3.0)
    n = int(np.prod(shape))
    if output == "logit":
        y = torch.linspace(-80.0, 80.0, n, dtype=torch.float64)
    else:
        y = torch.cat([torch.logspace(-30, np.log10(0.5), n // 2, dtype=torch.float64),
                       1 - torch.logspace(-7, np.log10(0.5), n - n // 2, dtype=torch.float64)])
    y = y.reshape(shape).float().to(DEVICE)
    x, lad = fastflow.mixture_cdf_inverse(y, *params, kind=kind, output=output)
    x_star = oracle_root(y, *params, kind, output)
    s_min = torch.exp(params[2]).amin(-1).double().cpu().numpy()
    xn, yn = x.double().cpu().numpy(), y.double().cpu().numpy()
    x_err = np.abs(xn - x_star) / (1e-5 * (np.abs(x_star) + s_min))
    y_err = np.abs(oracle_forward(x, *params, kind, output)[0] - yn) / (
        1e-5 * np.maximum(1.0, np.abs(yn)))
    return {"x": float(np.median(x_err)), "missed": float(np.mean(np.minimum(x_err, y_err) > 1)),
            "finite": bool(torch.isfinite(x).all() and torch.isfinite(lad).all())}


def main():
    torch.manual_seed(int(os.environ.get("SEED", "0")))
    print("| backend | op | kind | output | K | worst error / contract tolerance |")
    print("|---|---|---|---|---|---|")
    for backend in ("reference", "triton"):
        os.environ["FASTFLOW_BACKEND"] = backend
        for kind in ("logistic", "gaussian"):
            for output in ("unit", "logit", "density"):
                for K in (1, 3, 64):
                    r = forward_row(kind, output, K)
                    cells = ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                      for k, v in r.items())
                    op = "mixture_log_prob" if output == "density" else "mixture_cdf"
                    print(f"| {backend} | {op} | {kind} | {output} | {K} | {cells} |")
            for output in ("unit", "logit"):
                for K in (1, 3, 64):
                    r = inverse_row(kind, output, K)
                    print(f"| {backend} | mixture_cdf_inverse | {kind} | {output} | {K} | "
                          f"median x error {r['x']:.3f}, targets missed {r['missed']:.3f}, "
                          f"all finite {r['finite']} |")


if __name__ == "__main__":
    main()
