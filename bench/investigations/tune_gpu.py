"""Sweep the kernels' launch parameters on a GPU and print one markdown table per kernel.

Every row of a table is timed in the same interleaved rounds as the others (and as the
baseline that gives the ratios), so the ratios are comparable; lone times are not. The
kernels' defaults are the first row of each table. Configurations whose outputs differ from
the default's beyond rounding are marked, so a faster but wrong tile shape cannot win.

    python bench/investigations/tune_gpu.py --out tune.md   # a CUDA device, full sizes
    python bench/investigations/tune_gpu.py --size tiny     # a smoke run (CPU too)
"""

import argparse
import contextlib
import sys
import time

import torch
from fastflow.kernels import autoregressive as k_ar
from fastflow.kernels import made as k_made
from fastflow.kernels import mixture_cdf as k_cdf
from fastflow.kernels import mixture_inverse as k_inv

from fastflow.cli import bench as benchmark
from fastflow.ops import blocked, dispatch
from fastflow.ops import mixture_inverse as inverse_op


@contextlib.contextmanager
def patched(table: dict, **values):
    old = dict(table)
    table.update(values)
    try:
        yield
    finally:
        table.clear()
        table.update(old)


def emit(lines: list[str], out) -> None:
    text = "\n".join(lines) + "\n"
    sys.stdout.write(text)
    sys.stdout.flush()
    if out is not None:
        out.write(text)
        out.flush()


def sweep(title, table, configs, make_fn, baseline, device, repeat, out, check=None):
    """Time make_fn() under each configuration of ``table``; ``baseline`` (name, fn) is timed
    in the same rounds. ``check(result)`` returns an error against the default's result."""
    configs = [dict(table)] + [c for c in configs if {**table, **c} != table]
    fns, errs, ref = {}, {}, None
    for i, cfg in enumerate(configs):
        with patched(table, **cfg):
            fn = make_fn()
            res = fn()
            benchmark._sync(device)
            if check is not None:
                if i == 0:
                    ref = res
                errs[i] = check(res, ref)
        fns[i] = fn
    # measure_interleaved calls each function under the configuration it was built with.

    def bound(i, fn):
        def run():
            with patched(table, **configs[i]):
                return fn()
        return run

    timed = benchmark.measure_interleaved(
        {**{str(i): bound(i, f) for i, f in fns.items()}, baseline[0]: baseline[1]},
        device, repeat)
    base = timed[baseline[0]][0]
    lines = [f"### {title}", "", f"baseline: {baseline[0]} {base:.4g} ms (min)", "",
             "| config | min ms | median ms | baseline / config | error vs default |",
             "| --- | --- | --- | --- | --- |"]
    for i, cfg in enumerate(configs):
        t_min, t_med = timed[str(i)]
        err = "" if check is None else f"{errs[i]:.2e}"
        lines.append(f"| {cfg} | {t_min:.4g} | {t_med:.4g} | {base / t_min:.3f} | {err} |")
    emit(lines + [""], out)


def max_err(a, b):
    if isinstance(a, (tuple, list)):
        return max(max_err(x, y) for x, y in zip(a, b, strict=True))
    return (a.double() - b.double()).abs().max().item() / max(1.0, b.double().abs().max().item())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="markdown file to write (also printed)")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--only", default="W1,W3,W5,W4", help="comma-separated tables to run")
    p.add_argument("--size", choices=("full", "tiny"), default="full")
    args = p.parse_args(argv)
    only = set(args.only.split(","))
    if args.size == "full" and not torch.cuda.is_available() and only != {"W4"}:
        # The MADE route tables (W4) also mean something on a CPU; the kernel sweeps do not.
        print("tune_gpu.py --size full needs a CUDA device (or --only W4)", file=sys.stderr)
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    max_steps = inverse_op.MAX_STEPS
    out = open(args.out, "w") if args.out else None
    try:
        with benchmark.no_input_checks():
            _tables(args, argv, only, device, out)
    finally:  # the settings the sweeps patch, as they were
        inverse_op.MAX_STEPS = max_steps
        if out is not None:
            out.close()
    return 0


def _tables(args, argv, only, device, out) -> None:
    env = benchmark.environment(device)
    emit([f"# Launch-parameter sweep, {env['date']}", "",
          f"device {env['device']}; torch {torch.__version__}; "
          f"triton {__import__('triton').__version__}", "",
          "command: `python bench/investigations/tune_gpu.py "
          + " ".join(argv or sys.argv[1:]) + "`", ""], out)
    n = benchmark.OP_SIZES[args.size]

    if "W1" in only:
        variants = {v.name: v for v in benchmark.w1(n, device, False)}
        copy = ("copy", variants["copy"].fn)
        configs = [{"lanes": 2048, "num_warps": 4}, {"lanes": 1024, "num_warps": 4},
                   {"lanes": 4096, "num_warps": 4}, {"lanes": 4096, "num_warps": 8},
                   {"lanes": 8192, "num_warps": 8}, {"lanes": 1024, "num_warps": 2}]
        sweep("W1 forward (mixture_cdf), K = 8", k_cdf.LAUNCH, configs,
              lambda: variants["fastflow"].fn, copy, device, args.repeat, out, max_err)
        w2 = {v.name: v for v in benchmark.w2(n, device, False)}
        configs2 = [{"lanes": 1024, "bwd_warps": 4}, {"lanes": 2048, "bwd_warps": 4},
                    {"lanes": 2048, "bwd_warps": 2}, {"lanes": 512, "bwd_warps": 1},
                    {"lanes": 1024, "bwd_warps": 1}, {"lanes": 4096, "bwd_warps": 8}]
        sweep("W2 forward + backward, K = 8 (baseline: autograd through the "
              "reference)", k_cdf.LAUNCH, configs2, lambda: w2["fastflow"].fn,
              ("torch-eager", w2["torch-eager"].fn), device, args.repeat, out)

    if "W3" in only:
        variants, _ = benchmark.w3(n, device, False)
        variants = {v.name: v for v in variants}
        w1f = {v.name: v for v in benchmark.w1(n, device, False)}["fastflow"].fn
        # The inverse's threads hold whole elements: BLOCK_N = max(lanes / 8, 32 * warps).
        configs = [{"lanes": 256, "num_warps": 1}, {"lanes": 512, "num_warps": 2},
                   {"lanes": 512, "num_warps": 4}, {"lanes": 1024, "num_warps": 4},
                   {"lanes": 2048, "num_warps": 8}]
        sweep("W3 inverse, K = 8 (baseline: W1's forward)", k_inv.LAUNCH, configs,
              lambda: variants["fastflow"].fn, ("W1-fastflow", w1f), device, args.repeat, out,
              max_err)
        # MAX_STEPS: the iterations per tile before the remaining lanes only bisect (in the
        # floats' integer order, one iteration per bit at most).
        for cap in (44, 12, 8, 6):
            inverse_op.MAX_STEPS = cap
            t0 = time.perf_counter()
            vs, err = benchmark.w3(n, device, False)
            t = benchmark.measure_interleaved({"inv": vs[0].fn, "fwd": w1f}, device,
                                              args.repeat)
            emit([f"- W3 with Newton steps for at most {cap} iterations per tile: "
                  f"inverse / forward time {t['inv'][0] / t['fwd'][0]:.3f}, "
                  f"round-trip error {err:.2e} ({time.perf_counter() - t0:.1f} s)"], out)
        inverse_op.MAX_STEPS = inverse_op.BISECT_STEPS + inverse_op.NEWTON_STEPS
        emit([""], out)

    if only & {"W5", "W5diag", "W4", "W4tiles"}:
        D, hidden, K, _, batch = benchmark.FLOW_SIZES[args.size]
        model = benchmark.flow_model(D, hidden, K, device)
        x = torch.randn(batch, D, device=device)
        emit([f"flow: D = {D}, hidden {hidden}, K = {K}, batch {batch}", ""], out)

        def log_prob():
            with torch.no_grad():
                return model.log_prob(x)

        def eager():
            with torch.no_grad(), benchmark._backend("reference"):
                return model.log_prob(x)

        def sample():
            torch.manual_seed(0)
            with torch.no_grad():
                return model.sample(batch)

    if "W5" in only:
        configs = [{"block_b": 32, "block_n": 16, "block_h": 32, "num_warps": 4},
                   {"block_b": 16, "block_n": 16, "block_h": 32, "num_warps": 4},
                   {"block_b": 16, "block_n": 16, "block_h": 64, "num_warps": 4},
                   {"block_b": 16, "block_n": 32, "block_h": 32, "num_warps": 4},
                   {"block_b": 32, "block_n": 16, "block_h": 64, "num_warps": 8},
                   {"block_b": 64, "block_n": 16, "block_h": 32, "num_warps": 8},
                   {"block_b": 16, "block_n": 16, "block_h": 32, "num_warps": 2}]
        sweep("W5 one-pass sample (baseline: log_prob)", k_ar.LAUNCH, configs, lambda: sample,
              ("log_prob", log_prob), device, max(2, args.repeat // 2), out, max_err)

    if "W5diag" in only:
        # Where the one-pass sampler's time goes: the same kernel and plan in the forward
        # direction (no Newton solve), and the inverse with its per-step iterations capped
        # (truncated, so wrong values: timing only).
        layer = model.transforms[0]
        z = torch.randn(batch, D, device=device)

        def solve(invert):
            def run():
                with torch.no_grad():
                    return layer._solve_in_one_pass(z, None, invert)
            return run

        t = benchmark.measure_interleaved(
            {"inverse": solve(True), "forward": solve(False), "log_prob": log_prob}, device,
            max(2, args.repeat // 2))
        lines = ["### W5's one-pass solve by direction (min ms)", "",
                 f"- inverse (sampling) {t['inverse'][0]:.4g}, forward direction "
                 f"{t['forward'][0]:.4g}, log_prob {t['log_prob'][0]:.4g}"]
        for cap in (8, 3):
            inverse_op.MAX_STEPS = cap
            tc = benchmark.measure_interleaved({"inverse": solve(True)}, device, 2)
            lines.append(f"- inverse with Newton steps for at most {cap} iterations per step: "
                         f"{tc['inverse'][0]:.4g}")
        inverse_op.MAX_STEPS = inverse_op.BISECT_STEPS + inverse_op.NEWTON_STEPS
        # PyTorch's default (allow_tf32 False) compiles the kernel's dots as IEEE fp32 FMAs;
        # with TF32 they take the tensor cores (bench/investigations/sass_solve.py).
        tf32 = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = not tf32
        try:
            tt = benchmark.measure_interleaved({"inverse": solve(True)}, device, 2)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = tf32
        lines.append(f"- inverse with allow_tf32 {not tf32} (the run's default: {tf32}): "
                     f"{tt['inverse'][0]:.4g}")
        emit(lines + [""], out)

    if "W4" in only:
        pairs = [("dense", "dense"), ("blocks", "blocks"), ("dense", "blocks"),
                 ("blocks", "dense")]
        routes = [{"linear": a, "head": b} for a, b in pairs]  # autograd records: training
        routes_inf = [{"linear_inference": a, "head_inference": b} for a, b in pairs]
        # The "kernel" routes lost to dense by 2x (linear) and 5x (head) on the first GPU runs
        # (docs/tuning.md); --only W4tiles still times the masked-linear kernel.
        table = dispatch.GPU_ROUTE if device.type == "cuda" else dispatch.CPU_ROUTE

        sweep("W5's log_prob by MADE route (baseline: the reference in eager PyTorch)",
              table, routes_inf, lambda: log_prob, ("reference", eager), device,
              args.repeat, out, max_err)
        D4, hidden4, K4, batch4, _ = benchmark.FLOW_SIZES[args.size]
        model4 = benchmark.flow_model(D4, hidden4, K4, device)
        x4 = torch.randn(batch4, D4, device=device)
        model4r = benchmark.flow_model(D4, hidden4, K4, device)

        def step4():
            return benchmark._train_step(lambda: -model4.log_prob(x4).mean(),
                                         model4.parameters())

        def eager4():
            with benchmark._backend("reference"):
                return train_ref()

        train_ref = benchmark._train_step(lambda: -model4r.log_prob(x4).mean(),
                                          model4r.parameters())
        sweep(f"W4 training step by MADE route, batch {batch4} (baseline: the reference)",
              table, routes, step4, ("reference", eager4), device, args.repeat, out)
        # The blocks route's plan: the default cost model, then fixed block counts.
        plans = [{"counts": (g,), "overhead": 0.0, "min_columns": 0} for g in (2, 4, 8, 16)]
        with patched(table, linear="blocks", head="blocks", linear_inference="blocks",
                     head_inference="blocks"):
            sweep("W5's log_prob on the blocks route, by plan (baseline: the reference)",
                  blocked.PLAN, plans, lambda: log_prob, ("reference", eager), device,
                  args.repeat, out, max_err)
            sweep(f"W4 training step on the blocks route, by plan, batch {batch4} (baseline: "
                  "the reference)", blocked.PLAN, plans, step4, ("reference", eager4), device,
                  args.repeat, out)
    if "W4tiles" in only:
        configs = [{"linear_blocks": (64, 64, 64), "linear_warps": 4},
                   {"linear_blocks": (128, 64, 32), "linear_warps": 4},
                   {"linear_blocks": (128, 128, 32), "linear_warps": 8},
                   {"linear_blocks": (64, 128, 32), "linear_warps": 4}]
        with patched(dispatch.GPU_ROUTE, linear_inference="kernel"):
            sweep("log_prob with the masked-linear kernel, by tile (baseline: the reference)",
                  k_made.LAUNCH, configs, lambda: log_prob, ("reference", eager), device,
                  args.repeat, out, max_err)


if __name__ == "__main__":
    sys.exit(main())
