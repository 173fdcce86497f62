"""C1's sample / log_prob with fastflow's input checks off (as ``fastflow bench`` times it)
and on (the default a user gets), in one process.

The checks validate x before the density pass (one host sync per call) and add a few passes
over the data; sampling checks nothing of that size. So the ratio a user measures with the
defaults is lower than the benchmark's.

    python bench/investigations/c1_validation.py [--repeat 5] [--size cpu]
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch

from fastflow.cli.bench import FLOW_SIZES, flow_model, no_input_checks


def _best_ms(fn, repeat: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return 1e3 * best


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5, help="timed calls per variant")
    parser.add_argument("--size", choices=list(FLOW_SIZES), default="cpu",
                        help="W5's model and batch at this size (C1: cpu)")
    args = parser.parse_args(argv)
    D, hidden, K, _, batch = FLOW_SIZES[args.size]
    model = flow_model(D, hidden, K, torch.device("cpu"))
    x = torch.randn(batch, D, generator=torch.Generator().manual_seed(0))
    print("| input checks | log_prob min ms | sample min ms | sample / log_prob |")
    print("|---|---|---|---|")
    with torch.no_grad():
        for checks in (False, True):
            with contextlib.nullcontext() if checks else no_input_checks():
                lp = _best_ms(lambda: model.log_prob(x), args.repeat)
                sm = _best_ms(lambda: model.sample(batch), args.repeat)
            print(f"| {'on' if checks else 'off'} | {lp:.4g} | {sm:.4g} | {sm / lp:.3g} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
