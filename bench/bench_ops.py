"""W1-W3 (docs/design.md, Benchmark workloads): the mixture-CDF op against the same
computation in plain PyTorch eager and under torch.compile, and W1 against a device copy of the
same bytes. The variants are those ``fastflow bench`` times (fastflow/cli/bench.py: w1, w2, w3).

    pytest bench --benchmark-enable                      # CPU sizes, or full size on a GPU
    pytest bench --benchmark-enable --benchmark-group-by=group --benchmark-sort=mean

Each group times the variants of one workload in one run; compare within a group only.
"""

import pytest
import torch

from fastflow.cli.bench import OP_SIZES, op_inputs, w1, w2, w3

from conftest import DEVICE, sync

GROUPS = {"W1": "W1 forward + logabsdet", "W2": "W2 forward + backward", "W3": "W3 inverse"}
CASES = [("W1", v) for v in ("fastflow", "torch-eager", "torch-compile", "copy")] + [
    (w, v) for w in ("W2", "W3") for v in ("fastflow", "torch-eager", "torch-compile")]


@pytest.fixture(scope="module")
def op_variants(size_name):
    """{workload: {variant name: Variant}} at the session's size, and the x whose F(x) W3
    inverts (w3 takes its inputs from the same seeded op_inputs)."""
    n = OP_SIZES[size_name]
    found = {"W1": w1(n, DEVICE, True), "W2": w2(n, DEVICE, True), "W3": w3(n, DEVICE, True)[0]}
    return {w: {v.name: v for v in vs} for w, vs in found.items()}, op_inputs(n, DEVICE)[0]


@pytest.mark.parametrize("workload,variant", CASES, ids=[f"{w}-{v}" for w, v in CASES])
def test_op_workload(benchmark, op_variants, workload, variant):
    variants, x = op_variants
    benchmark.group = GROUPS[workload]
    v = variants[workload][variant]
    if v.nbytes is not None:
        benchmark.extra_info["bytes"] = v.nbytes

    def run():
        out = v.fn()
        sync()
        return out

    run()  # warm-up: compilation and autotuning stay out of the timings
    out = benchmark(run)
    if workload == "W3":  # each variant's root, against the x the targets came from
        err = (out[0] - x).abs().max().item()
        benchmark.extra_info["round_trip_max_abs_err"] = err
        assert err < 1e-3
    if variant != "copy":  # every output (y and logabsdet, or the gradients) is finite
        assert all(torch.isfinite(t).all() for t in out)
