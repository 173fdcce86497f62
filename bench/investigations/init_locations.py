"""Test NLL of ``fastflow train`` under three initialisations of the autoregressive flows'
component locations, over several seeds: "base" (the output layer's default bias, every
location within 1/sqrt(fan_in) of 0), "first" (the first dimension in the order spread over
[-1, 1], which is what AutoregressiveMixtureFlow does) and "all" (every dimension's location
bias spread so).

    python bench/investigations/init_locations.py [--data two_moons digits] [--seeds 5] [--jobs 2]

Each run is one ``fastflow train`` with its data set's defaults and one CPU thread; prints the
mean and standard deviation of the test NLL (nats/dim) per variant and data set, and each
seed's value, so that variants can be compared seed by seed (they start from the same draw).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import io
import statistics
import tempfile

VARIANTS = ("base", "first", "all")


def _run(variant: str, data: str, seed: int) -> float:
    import torch

    from fastflow.cli.train import TrainOptions, train
    from fastflow.nn import transforms

    made_cls = transforms.MADE

    class Recording(made_cls):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.default_bias = self.output.bias.detach().clone()

    original = transforms.AutoregressiveMixtureFlow.__init__

    def init(self, features, components, *args, **kwargs):
        original(self, features, components, *args, **kwargs)
        with torch.no_grad():
            bias = self.made.output.bias
            if variant == "base":
                bias.copy_(self.made.default_bias)
            elif variant == "all":
                bias.view(features, 3 * components)[:, components:2 * components] = \
                    torch.linspace(-1.0, 1.0, components)

    # Patched for this run only: a worker process runs several variants in turn.
    transforms.MADE = Recording
    transforms.AutoregressiveMixtureFlow.__init__ = init
    try:
        with tempfile.TemporaryDirectory() as out:
            result = train(TrainOptions(data=data, seed=seed, out=out, progress=False),
                           stdout=io.StringIO())
    finally:
        transforms.MADE = made_cls
        transforms.AutoregressiveMixtureFlow.__init__ = original
    return result["metrics"]["test"]["nats_per_dim"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", nargs="+", default=["two_moons", "digits"])
    parser.add_argument("--seeds", type=int, default=5, help="seeds 0 .. N-1")
    parser.add_argument("--jobs", type=int, default=2, help="runs at once (one thread each)")
    args = parser.parse_args(argv)
    runs = [(v, d, s) for d in args.data for v in VARIANTS for s in range(args.seeds)]
    with concurrent.futures.ProcessPoolExecutor(args.jobs) as pool:
        nll = dict(zip(runs, pool.map(_run, *zip(*runs, strict=True)), strict=True))
    print("| data | init | test NLL nats/dim, mean | sd | per seed |")
    print("|---|---|---|---|---|")
    for d in args.data:
        for v in VARIANTS:
            vals = [nll[(v, d, s)] for s in range(args.seeds)]
            sd = statistics.stdev(vals) if len(vals) > 1 else float("nan")
            print(f"| {d} | {v} | {statistics.mean(vals):.4f} | {sd:.4f} | "
                  f"{', '.join(f'{x:.4f}' for x in vals)} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
