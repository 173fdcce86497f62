"""Test NLL of `fastflow train --data digits` trained in float32 and with the forward in a
bfloat16 autocast region (``--autocast``: MADE's products in bfloat16, the mixture ops in
float32), the same seeds for both; the NLL is evaluated in float32 either way.

    python bench/investigations/autocast_digits.py [--seeds 5] [--steps N] [--device cpu]

Prints a row per seed and the mean difference (autocast - float32) in bits per dimension.
"""

from __future__ import annotations

import argparse
import io
import statistics
import tempfile
import time

from fastflow.cli.train import TrainOptions, train


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=None, help="default: the data set's")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    print("| seed | float32 test bits/dim | autocast test bits/dim | difference | seconds "
          "float32 / autocast |")
    print("|---|---|---|---|---|")
    diffs = []
    for seed in range(args.seeds):
        bits, secs = [], []
        for autocast in (False, True):
            with tempfile.TemporaryDirectory() as out:
                opts = TrainOptions(data="digits", steps=args.steps, device=args.device,
                                    seed=seed, out=out, progress=False, autocast=autocast)
                start = time.perf_counter()
                result = train(opts, stdout=io.StringIO())
                secs.append(time.perf_counter() - start)
            bits.append(result["metrics"]["test"]["bits_per_dim"])
        diffs.append(bits[1] - bits[0])
        print(f"| {seed} | {bits[0]:.4f} | {bits[1]:.4f} | {diffs[-1]:+.4f} | "
              f"{secs[0]:.0f} / {secs[1]:.0f} |")
    spread = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
    print(f"\nmean difference {statistics.mean(diffs):+.4f} bits/dim (sd {spread:.4f}), "
          f"largest {max(diffs):+.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
