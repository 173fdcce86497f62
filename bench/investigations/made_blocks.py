"""Forward + backward time of each MADE layer on the blocks route, by block count.

For each layer of a MADE (natural order, sequential degrees) and each fixed block count G
(G = 1 is one product reading the mask's columns up to its last limit, about the dense
product), times ``layer(h)`` and its backward in interleaved rounds and prints the min in
ms, and what the default plan (``fastflow.ops.blocked.PLAN``) picks. Any device.

    python bench/investigations/made_blocks.py [--features 64] [--hidden 256 256] [--components 8]
                                [--batch 256 4096] [--repeat 7]
"""

import argparse
import time

import torch

from fastflow.nn import MADE
from fastflow.ops import blocked, dispatch

COUNTS = (1, 2, 4, 8, 16)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--features", type=int, default=64)
    p.add_argument("--hidden", type=int, nargs="+", default=[256, 256])
    p.add_argument("--components", type=int, default=8)
    p.add_argument("--batch", type=int, nargs="+", default=[256, 4096])
    p.add_argument("--repeat", type=int, default=7)
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    table = dispatch.GPU_ROUTE if device.type == "cuda" else dispatch.CPU_ROUTE
    saved = dict(table), dict(blocked.PLAN)
    try:
        table.update(linear="blocks", head="blocks", linear_inference="blocks",
                     head_inference="blocks")
        _run(args, device)
    finally:
        table.update(saved[0])
        blocked.PLAN.update(saved[1])


def _run(args, device):
    made = MADE(args.features, args.hidden, 3 * args.components, seed=0).to(device)
    layers = [*made.layers, made.output]
    picked = [layer.blocks() for layer in layers]
    print(f"MADE D = {args.features}, hidden {args.hidden}, K = {args.components}; {device}; "
          f"torch {torch.__version__}; min of {args.repeat} interleaved rounds, ms")
    print()
    print("| batch | layer | " + " | ".join(f"G = {g}" for g in COUNTS) + " | default plan |")
    print("| --- | --- | " + " | ".join("---" for _ in COUNTS) + " | --- |")
    for batch in args.batch:
        inputs, h = [], torch.randn(batch, args.features, device=device)
        with torch.no_grad():
            for layer in made.layers:
                inputs.append(h)
                h = torch.relu(layer(h))
        inputs.append(h)
        times = {}
        for _ in range(args.repeat):
            for g in COUNTS:
                blocked.PLAN.update(counts=(g,), overhead=0.0, min_columns=0)
                for i, layer in enumerate(layers):
                    x = inputs[i].clone().requires_grad_()
                    y = layer(x)  # plans (and warms up) outside the timing
                    y.backward(torch.ones_like(y))
                    _sync(device)
                    t0 = time.perf_counter()
                    y = layer(x)
                    y.backward(torch.ones_like(y))
                    _sync(device)
                    dt = 1e3 * (time.perf_counter() - t0)
                    times[i, g] = min(times.get((i, g), float("inf")), dt)
        for i, layer in enumerate(layers):
            plan = "dense" if picked[i] is None else f"G = {len(picked[i])}"
            row = " | ".join(f"{times[i, g]:.2f}" for g in COUNTS)
            print(f"| {batch} | {layer.in_features} -> {layer.out_features} | {row} | {plan} |")


if __name__ == "__main__":
    main()
