"""Iterations per tile of the inverse kernel on W1-W3's inputs.

The inverse kernel loops per tile until every element has converged; this runs it on
W1's inputs (K = 8, logit output, fp32, the GPU's tile size) and prints how many iterations the
tiles took, and the round trip's error. The counts do not depend on the device, so on a CPU
the kernel runs under the Triton interpreter (slow: keep ``--n`` at a few 10^4).

    python bench/investigations/inverse_steps.py [--n 16384] [--kind logistic|gaussian]
        [--lanes 512]

``--lanes`` overrides the inverse's tile lanes (``LAUNCH["lanes"]``): a tile of fewer
elements waits for fewer slow ones.
"""

import argparse
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from fastflow.kernels import launch, mixture_cdf, mixture_inverse  # noqa: E402

from fastflow.cli import bench as benchmark  # noqa: E402
from fastflow.ops.mixture_inverse import MAX_STEPS  # noqa: E402


def tile_steps(n: int, kind: str, lanes: int | None = None):
    """(iterations per tile, max relative round-trip error) on n of W1's elements."""
    saved_launch = dict(mixture_inverse.LAUNCH)
    if lanes is not None:
        mixture_inverse.LAUNCH["lanes"] = lanes
    try:
        return _tile_steps(n, kind)
    finally:
        mixture_inverse.LAUNCH.update(saved_launch)


def _tile_steps(n: int, kind: str):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    x, logits, loc, log_scale = benchmark.op_inputs(n, device)
    params = (logits, loc, log_scale)
    y, _ = mixture_cdf.mixture_cdf_fwd(x, *params, kind, benchmark.OUTPUT)
    # the GPU's tiles, also under the interpreter (whose launcher default is one big tile)
    lanes = mixture_inverse.LAUNCH["lanes"]
    block_k = launch.block_sizes(logits.shape[-1], lanes)[1]
    saved = launch.block_sizes
    gpu_tiles = lambda K, _lanes=None: (max(16, lanes // block_k), block_k)  # noqa: E731
    launch.block_sizes = gpu_tiles
    try:
        programs = mixture_inverse.num_programs(n, logits.shape[-1])
        steps = torch.zeros(programs, dtype=torch.int32, device=device)
        back, _ = mixture_inverse.mixture_cdf_inverse_fwd(
            y, *params, kind, benchmark.OUTPUT, MAX_STEPS, steps_out=steps)
    finally:
        launch.block_sizes = saved
    err = ((back - x).abs() / (1 + x.abs())).max().item()
    return steps.cpu(), err


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1 << 14)
    parser.add_argument("--kind", choices=list(launch.KINDS), default=benchmark.KIND)
    parser.add_argument("--lanes", type=int, default=None, help="override LAUNCH['lanes']")
    args = parser.parse_args(argv)
    steps, err = tile_steps(args.n, args.kind, args.lanes)
    hist = torch.bincount(steps.long()).tolist()
    print(f"{args.kind}, n = {args.n}, {steps.numel()} tiles of "
          f"{args.n // steps.numel() if steps.numel() else 0} elements: iterations mean "
          f"{steps.float().mean().item():.2f}, max {steps.max().item()}, histogram {hist}; "
          f"round-trip error {err:.1e}")
    return steps, err


if __name__ == "__main__":
    main()
