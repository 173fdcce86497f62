"""Where a workload's time goes: torch.profiler over a few calls of benchmark variants.

    python bench/investigations/profile_gpu.py [--workloads W2,W4] [--variants fastflow,zuko-maf]
        [--calls 5]
        [--routes "head=blocks;linear=blocks,head=blocks"]

For each variant: wall time per call, the host's time to issue one (the calls' Python,
dispatch and launches, without waiting for the device), the device's busy time per call (the
sum of its kernels' times; far below the wall time, with the issue time near it, means the
host sets the pace), and the kernels that take the most device time. ``--routes`` profiles
the fastflow variants again under each listed change of MADE's routes (``;`` between
alternatives; see fastflow/ops/dispatch.py). Runs on a CPU too (then only host times). Under
the profiler fastflow's ops go through the dispatcher, so that they show by name: the wall
time under the profiler includes that; the plain wall and issue times do not.
"""

from __future__ import annotations

import argparse
import time
from unittest import mock

import torch
from torch.profiler import ProfilerActivity, profile

from fastflow.cli import bench as benchmark
from fastflow.ops import dispatch


def profile_variant(v, device, calls: int, rows: int, label: str = "") -> None:
    run = benchmark._backend_bound(v)
    for _ in range(3):
        run()
    benchmark._sync(device)
    # The host's time to issue a call: a few calls queue fewer launches than the device's
    # queue holds, so the host does not wait for the device before the final sync.
    t0 = time.perf_counter()
    for _ in range(calls):
        run()
    issue = (time.perf_counter() - t0) / calls
    benchmark._sync(device)
    wall_plain = (time.perf_counter() - t0) / calls
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda"
                                           else [])
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(calls):
            run()
        benchmark._sync(device)
        wall = (time.perf_counter() - t0) / calls
    events = prof.key_averages()
    attr = "device_time_total" if hasattr(events[0], "device_time_total") else "cuda_time_total"
    kernels = [e for e in events if getattr(e, "device_type", None) is not None
               and str(e.device_type).endswith("CUDA") and getattr(e, attr, 0) > 0
               and "#" not in e.key]  # record_function ranges such as "Optimizer.step#SGD.step"
    busy = sum(getattr(e, attr) for e in kernels) / calls / 1e3
    if device.type == "cuda" and not kernels:  # an event layout this filter does not know
        print(events.table(sort_by="self_" + attr, row_limit=rows))
    print(f"## {v.name}{label}: wall {wall_plain * 1e3:.3f} ms per call ({wall * 1e3:.3f} under "
          f"the profiler), host issue {issue * 1e3:.3f} ms, device busy {busy:.3f} ms, "
          f"{sum(e.count for e in kernels) / calls:.0f} kernels per call")
    print()
    print("| kernel | calls per call | ms per call | share of busy |")
    print("| --- | --- | --- | --- |")
    for e in sorted(kernels, key=lambda e: -getattr(e, attr))[:rows]:
        ms = getattr(e, attr) / calls / 1e3
        print(f"| {e.key[:90]} | {e.count / calls:.0f} | {ms:.4f} | "
              f"{ms / busy if busy else 0:.2f} |")
    print()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workloads", default="W2,W4")
    p.add_argument("--variants", default="fastflow,zuko-maf,torch-compile")
    p.add_argument("--size", choices=("tiny", "cpu", "full"), default=None)
    p.add_argument("--calls", type=int, default=5)
    p.add_argument("--rows", type=int, default=12)
    p.add_argument("--routes", default="", help="MADE route changes to profile fastflow under")
    args = p.parse_args(argv)
    args.routes = parse_routes(args.routes)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    size = args.size or ("full" if device.type == "cuda" else "tiny")
    wanted = set(args.variants.split(","))
    with benchmark.no_input_checks():  # as `fastflow bench` times them
        _profile(args, device, size, wanted)
    return 0


def parse_routes(text: str) -> list[dict[str, str]]:
    """"head=blocks;linear=blocks,head=blocks" -> [{"head": "blocks"}, {...}]."""
    out = []
    for alt in filter(None, text.split(";")):
        change = {}
        for item in alt.split(","):
            key, _, value = item.partition("=")
            if key not in dispatch.GPU_ROUTE or value not in ("dense", "blocks", "kernel"):
                raise ValueError(f"--routes: {item!r} is not KEY=dense|blocks|kernel with KEY "
                                 f"one of {sorted(dispatch.GPU_ROUTE)}")
            change[key] = value
        out.append(change)
    return out


def _profile(args, device, size, wanted) -> None:
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"# Profile, {name}, torch {torch.__version__}, size {size}")
    print()
    for name in args.workloads.split(","):
        wl = benchmark.build(name, size, device, "torch-compile" in wanted)
        table = dispatch.GPU_ROUTE if device.type == "cuda" else dispatch.CPU_ROUTE
        for v in wl.variants:
            if v.name not in wanted:
                continue
            for change in [{}] + (args.routes if v.name == "fastflow" else []):
                label = "".join(f" [{k}={c}]" for k, c in change.items())
                print(f"# {name}")
                with mock.patch.dict(table, change):
                    profile_variant(v, device, args.calls, args.rows, label)


if __name__ == "__main__":
    raise SystemExit(main())
