"""Instructions per element of the W1-W3 kernels, from their SASS, without a GPU.

Compiles the specialisations that W1 (forward), W2 (backward) and W3 (inverse) launch at
the benchmark shapes (K = 8, contiguous fp32 parameters) for sm_90, for both component kinds, and
prints per kernel: registers, the instructions one thread executes (static count; the
forward and backward kernels have no loops, the inverse's Newton loop body is counted once),
that count per element, and the special-function (MUFU) instructions per element. A proxy for
time, not a measurement: the elementwise kernels are instruction-bound on an H200 (see
docs/tuning.md), so fewer instructions per element is the direction to go.

    python bench/investigations/sass_count.py [--arch 90] [--lanes 1024] [--warps 4] [--sass DIR]
        [--flows]

``--flows`` adds the forward and backward on the flows' parameters: slices of a MADE output
of shape (64, 784, 3K) with K = 10 (W4/W5's sizes), which take the kernels' general path.

TRITON_INTERPRET must be unset.
"""

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from fastflow.kernels import launch, mixture_cdf, mixture_inverse

from fastflow.cli.bench import K_OPS, OUTPUT, op_inputs

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import compile_check  # noqa: E402  (bench/compile_check.py)


def _table(arch, sass_dir, x, params, inverse: bool):
    """Compile the launches of both kinds for x and params; print a row per kernel."""
    print("| kernel | kind | registers | instructions / thread | per element | MUFU / element |")
    print("| --- | --- | --- | --- | --- | --- |")
    for kind in launch.KINDS:
        specs = []
        with compile_check.recording(specs):
            mixture_cdf.mixture_cdf_fwd(x, *params, kind, OUTPUT)
            mixture_cdf.mixture_cdf_bwd(x, x, x, *params, kind, OUTPUT)
            if inverse:
                mixture_inverse.mixture_cdf_inverse_fwd(x, *params, kind, OUTPUT, 44)
        for spec in specs:
            r = compile_check.compile_spec(spec, arch, sass_dir)
            if not r["ok"]:
                raise SystemExit(f"{spec.name()} did not compile:\n{r['error']}")
            threads = 32 * dict(spec.options)["num_warps"]
            per = threads / dict(spec.constexprs)["BLOCK_N"]
            mufu = r["ops"].get("MUFU", 0)
            print(f"| {spec.kernel} | {kind} | {r['registers']} | {r['instructions']} | "
                  f"{r['instructions'] * per:.0f} | {mufu * per:.0f} |")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--lanes", type=int, default=None, help="override LAUNCH['lanes']")
    parser.add_argument("--warps", type=int, default=None,
                        help="override every kernel's warps (LAUNCH's num_warps, bwd_warps)")
    parser.add_argument("--sass", default=None, help="keep the SASS files in this folder")
    parser.add_argument("--flows", action="store_true",
                        help="also the flows' parameter slices (general path, K = 10)")
    args = parser.parse_args(argv)
    for table in (mixture_cdf.LAUNCH, mixture_inverse.LAUNCH):
        if args.lanes:
            table["lanes"] = args.lanes
        if args.warps:
            table.update({k: args.warps for k in table if k.endswith("warps")})
    x, logits, loc, log_scale = op_inputs(1 << 14, torch.device("cpu"))
    sass_dir = args.sass or tempfile.mkdtemp(prefix="fastflow-sass-")
    print(f"sm_{args.arch}, K = {K_OPS}, output {OUTPUT!r}, fp32, contiguous parameters\n")
    _table(args.arch, sass_dir, x, (logits, loc, log_scale), inverse=True)
    if args.flows:
        out = torch.randn(64, 784, 30)
        slices = (out[..., :10], out[..., 10:20], out[..., 20:])
        print(f"\nsm_{args.arch}, K = 10, output {OUTPUT!r}, fp32, slices of a (64, 784, 30) "
              "MADE output\n")
        _table(args.arch, sass_dir, torch.randn(64, 784), slices, inverse=False)
    print(f"\nSASS in {sass_dir}")


if __name__ == "__main__":
    main()
