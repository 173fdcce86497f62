"""The inverse's CPU time at W3's CPU size and C1's sampling time, for before/after checks.

    python bench/investigations/inverse_timing.py
    PYTHONPATH=/path/to/other/checkout python bench/investigations/inverse_timing.py

Prints the min over repeated calls of ``fastflow.mixture_cdf_inverse`` on W3's CPU inputs
(2^16 elements, K = 8, logistic, logit output) and of ``flow.sample(4096)`` for C1's model,
and which checkout ran. Alternate the two versions' processes a few times and compare the
mins: single runs on a small shared machine move by tens of percent.
"""

import sys
from pathlib import Path

import torch

import fastflow
from fastflow.cli.bench import flow_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from c1_validation import _best_ms as min_ms  # noqa: E402


def main():
    torch.set_num_threads(2)
    fastflow.set_validate_args(False)
    g = torch.Generator().manual_seed(0)
    n = 2**16
    x = 3 * torch.randn(n // 256, 256, generator=g)
    logits, loc = (torch.randn(n // 256, 256, 8, generator=g) for _ in range(2))
    log_scale = 0.5 * torch.randn(n // 256, 256, 8, generator=g)
    y, _ = fastflow.mixture_cdf(x, logits, loc, log_scale, kind="logistic", output="logit")
    w3 = min_ms(lambda: fastflow.mixture_cdf_inverse(y, logits, loc, log_scale,
                                                     kind="logistic", output="logit"), 15)
    model = flow_model(64, [256, 256], 8, "cpu")
    with torch.no_grad():
        sample = min_ms(lambda: model.sample(4096), 7)
    where = fastflow.__file__.rsplit("/fastflow/", 1)[0]
    print(f"{where}: W3 inverse {w3:.2f} ms, C1 sample {sample:.1f} ms")


if __name__ == "__main__":
    main()
