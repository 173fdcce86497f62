"""The benchmark runner behind ``fastflow bench``: a tiny run writes its files, and the ratio
arithmetic is checked on made-up times. Nothing here is timed for its own sake."""

import csv
import importlib.util
from pathlib import Path

import pytest

import fastflow
from fastflow.cli import bench as benchmark
from fastflow.cli.bench import Result, ratios


def test_ratios_from_one_run():
    res = [Result("W1", "fastflow", "tiny", 2.0, 2.0, gbps=50.0),
           Result("W1", "torch-eager", "tiny", 6.0, 6.0),
           Result("W1", "copy", "tiny", 1.0, 1.0, gbps=100.0),
           Result("W3", "fastflow", "tiny", 5.0, 5.0),
           Result("W5", "fastflow-log_prob", "tiny", 4.0, 4.0),
           Result("W5", "torch-eager-log_prob", "tiny", 6.0, 6.0),
           Result("W5", "fastflow-sample", "tiny", 10.0, 10.0),
           Result("W5", "zuko-maf-sample", "tiny", 300.0, 300.0),
           Result("W5", "coupling-log_prob", "tiny", 3.0, 3.0),
           Result("W5", "coupling-sample", "tiny", 4.5, 4.5)]
    got = {(w, c): r for w, c, r in ratios(res)}
    assert got[("W5", "coupling sample / log_prob (lower is better)")] == pytest.approx(1.5)
    assert got[("W1", "speedup vs torch eager")] == pytest.approx(3.0)
    assert got[("W1", "bandwidth / copy bandwidth")] == pytest.approx(0.5)
    assert got[("W3", "inverse time / W1 time")] == pytest.approx(2.5)
    assert got[("W5", "fastflow sample / log_prob (lower is better)")] == pytest.approx(2.5)
    assert got[("W5", "log_prob speedup vs torch eager")] == pytest.approx(1.5)
    assert got[("W5", "sample speedup vs zuko-maf sampling")] == pytest.approx(30.0)
    assert ("W1", "speedup vs torch.compile") not in got  # not measured: not invented


def test_tiny_run_writes_csv_markdown_and_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="matplotlib is in the test extra")
    code = benchmark.main(["--size", "tiny", "--repeat", "1", "--workloads", "W1,W3,W4,W5",
                           "--out", str(tmp_path)])
    assert code == 0
    stem = next(tmp_path.glob("*.csv")).with_suffix("")
    rows = list(csv.DictReader(open(stem.with_suffix(".csv"))))
    variants = {(r["workload"], r["variant"]) for r in rows}
    for want in [("W1", "fastflow"), ("W1", "torch-compile"), ("W1", "copy"),
                 ("W3", "torch-eager"), ("W4", "torch-compile"), ("W5", "fastflow-sample"),
                 ("W5", "torch-eager-log_prob"), ("W5", "fastflow-sample-d-pass"),
                 ("W4", "zuko-maf"), ("W4", "nflows-maf"), ("W4", "zuko-nsf"),
                 ("W5", "zuko-maf-sample"), ("W5", "nflows-maf-sample"),
                 ("W5", "zuko-nsf-log_prob"), ("W5", "zuko-nsf-sample"),
                 ("W5", "coupling-log_prob"), ("W5", "coupling-sample")]:
        assert want in variants
    assert all(float(r["min_ms"]) > 0 for r in rows)
    md = stem.with_suffix(".md").read_text()
    assert "command: `fastflow bench --size tiny" in md and "torch:" in md
    assert "sample / log_prob" in md
    assert stem.with_suffix(".png").stat().st_size > 1000
    assert "round-trip error" in capsys.readouterr().out


def test_autocast_runs_w4_and_w5_in_a_bfloat16_region(monkeypatch, capsys):
    """--autocast: every W4 and W5 variant runs in a bfloat16 region (W4's forward only), and
    none is left on after the run."""
    real, regions = benchmark.torch.autocast, []

    def spy(*args, **kwargs):
        if kwargs.get("enabled", True):  # (fastflow's float32 ops turn regions off inside)
            regions.append(kwargs.get("dtype"))
        return real(*args, **kwargs)

    monkeypatch.setattr(benchmark.torch, "autocast", spy)
    assert benchmark.main(["--size", "tiny", "--repeat", "1", "--workloads", "W4,W5",
                           "--no-compile", "--autocast"]) == 0
    out = capsys.readouterr().out
    assert "zuko-nsf" in out and "speedup vs zuko-nsf" in out
    assert regions and set(regions) == {benchmark.torch.bfloat16}
    assert benchmark.AUTOCAST == [None]
    regions.clear()
    assert benchmark.main(["--size", "tiny", "--repeat", "1", "--workloads", "W5"]) == 0
    assert not regions


def test_bad_arguments_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        benchmark.main(["--workloads", "W9"])
    assert e.value.code == 2
    assert "--workloads" in capsys.readouterr().err


def test_no_compile_takes_every_workload_or_those_listed(capsys):
    all_ = benchmark.parse_args(["--no-compile", "--repeat", "1"])
    assert all_.no_compile == set(benchmark.WORKLOADS)
    assert benchmark.parse_args([]).no_compile == set()
    assert benchmark.parse_args(["--no-compile", "w4,W2"]).no_compile == {"W4", "W2"}
    with pytest.raises(SystemExit) as e:
        benchmark.parse_args(["--no-compile", "W7"])
    assert e.value.code == 2
    assert "--no-compile" in capsys.readouterr().err


def test_cli_bench_runs_the_runner(capsys):
    from fastflow import cli

    code = cli.main(["bench", "--size", "tiny", "--workloads", "W1", "--no-compile",
                     "--repeat", "1"])
    assert code == 0
    out = capsys.readouterr().out
    assert "| W1 | speedup vs torch eager |" in out
    assert "command: `fastflow bench --size tiny" in out


def test_inverse_steps_script_counts_tiles():
    """bench/investigations/inverse_steps.py (the iteration counts docs/numerics.md and
    docs/tuning.md quote) runs, counts every tile of the GPU's size and round-trips W1's inputs."""
    module = _script("inverse_steps")
    steps, err = module.main(["--n", "2048"])
    from fastflow.kernels.mixture_inverse import LAUNCH

    assert steps.numel() == 2048 // (LAUNCH["lanes"] // 8)  # the GPU's tiles, K = 8
    assert (steps >= 1).all() and (steps <= 8).all()
    assert err < 1e-5


def test_cpu_sampler_script_times_a_checkout(capsys):
    """bench/investigations/cpu_sampler.py (the CPU sampler figures in bench/results) runs a fresh
    process per checkout and round and reports positive times for each measurement."""
    module = _script("cpu_sampler")
    root = str(Path(fastflow.__file__).resolve().parent.parent)
    assert module.main(["--rounds", "1", root]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and "min over processes" in lines[1]
    for key in ("inverse op ms", "sample ms", "log_prob ms"):
        assert f"'{key}': " in lines[1]


def test_made_blocks_script_times_every_layer_and_restores_the_plan(capsys):
    """bench/investigations/made_blocks.py (docs/tuning.md's per-layer table) runs, prints a row per
    layer and batch, and leaves the route and plan settings as it found them."""
    from fastflow.ops import blocked, dispatch

    module = _script("made_blocks")
    before = dict(dispatch.CPU_ROUTE), dict(blocked.PLAN)
    module.main(["--features", "6", "--hidden", "16", "16", "--components", "2",
                 "--batch", "3", "--repeat", "1"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 3 |")]
    assert [r.split(" | ")[1] for r in rows] == ["6 -> 16", "16 -> 16", "16 -> 36"]
    assert (dict(dispatch.CPU_ROUTE), dict(blocked.PLAN)) == before


def test_profile_script_reports_each_chosen_variant(capsys):
    """bench/investigations/profile_gpu.py (the profile under bench/results) runs and reports each
    variant asked for, workload by workload."""
    module = _script("profile_gpu")
    assert module.main(["--workloads", "W2,W1", "--variants", "fastflow,copy", "--size", "tiny",
                        "--calls", "1"]) == 0
    heads = [line.split(":")[0] for line in capsys.readouterr().out.splitlines()
             if line.startswith("## ")]
    assert heads == ["## fastflow", "## fastflow", "## copy"]


def test_profile_script_profiles_fastflow_under_each_route_change(capsys):
    """--routes profiles the fastflow variant again under each change, and puts the routes
    back; a change it cannot apply is a ValueError naming it."""
    import pytest

    from fastflow.ops import dispatch

    module = _script("profile_gpu")
    before = (dict(dispatch.GPU_ROUTE), dict(dispatch.CPU_ROUTE))
    seen, profile = [], module.profile_variant

    def recording(*args, **kwargs):
        seen.append((dispatch.CPU_ROUTE["linear"], dispatch.CPU_ROUTE["head"]))
        return profile(*args, **kwargs)

    module.profile_variant = recording
    assert module.main(["--workloads", "W4", "--variants", "fastflow", "--size", "tiny",
                        "--calls", "1", "--routes", "head=dense;linear=dense,head=dense"]) == 0
    heads = [line.split(":")[0] for line in capsys.readouterr().out.splitlines()
             if line.startswith("## ")]
    assert heads == ["## fastflow", "## fastflow [head=dense]",
                     "## fastflow [linear=dense] [head=dense]"]
    lin, head = before[1]["linear"], before[1]["head"]
    assert seen == [(lin, head), (lin, "dense"), ("dense", "dense")]
    assert (dict(dispatch.GPU_ROUTE), dict(dispatch.CPU_ROUTE)) == before
    with pytest.raises(ValueError, match="head=fast"):
        module.main(["--routes", "head=fast"])


def _script(name: str):
    """A script under bench/ as a module."""
    path = Path(__file__).resolve().parent.parent / "bench" / "investigations" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_second_derivatives_script_prints_its_table(capsys):
    """bench/investigations/second_derivatives.py (the figures in docs/numerics.md): one row
    per point, float64 close to the exact value where float32 has lost half of it."""
    _script("second_derivatives").main()
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines()[2:]]
    assert len(rows) == 6
    assert float(rows[-2][3]) == pytest.approx(0.5, abs=0.01)  # float32 at x = -20
    assert float(rows[-2][5]) < 1e-6  # float64 there


def test_host_overhead_script_times_each_variant_and_restores_what_it_patches():
    """bench/investigations/host_overhead.py (the host times in docs/tuning.md) times the op and the
    W4 step, and puts back the backend switch, the kernels, the routes, the input checks, the
    threads and the random state."""
    import torch
    from fastflow.kernels import mixture_cdf as cdf_kernels

    import fastflow
    from fastflow.ops import dispatch

    before = (dispatch.use_triton, cdf_kernels._mixture_cdf_fwd_kernel,
              cdf_kernels._mixture_cdf_bwd_kernel, dict(dispatch.CPU_ROUTE),
              fastflow.get_validate_args(), torch.get_num_threads())
    rng = torch.get_rng_state()
    best = _script("host_overhead").main(["--calls", "2", "--rounds", "1"])
    assert torch.equal(torch.get_rng_state(), rng)
    assert set(best) == {"op", "dispatch", "W4"}
    assert set(best["dispatch"]) == {"torch.ops.fastflow", "direct (ops.core.call)"}
    assert set(best["op"]) == {"fastflow op layer", "plain autograd"}
    assert {"fastflow", "torch-eager"} <= set(best["W4"])
    assert min(v for b in best.values() for v in b.values()) > 0
    after = (dispatch.use_triton, cdf_kernels._mixture_cdf_fwd_kernel,
             cdf_kernels._mixture_cdf_bwd_kernel, dict(dispatch.CPU_ROUTE),
             fastflow.get_validate_args(), torch.get_num_threads())
    assert after == before


def test_tune_script_runs_every_table_at_tiny_size_and_restores_the_settings(capsys):
    """bench/investigations/tune_gpu.py (the sweeps under bench/results) at tiny sizes on this
    device: every table prints, and the launch, route, plan and iteration-cap settings are put
    back."""
    from fastflow.kernels import made as k_made
    from fastflow.kernels import mixture_cdf as k_cdf
    from fastflow.kernels import mixture_inverse as k_inv

    from fastflow.ops import blocked, dispatch, mixture_inverse

    tables = (k_cdf.LAUNCH, k_inv.LAUNCH, k_made.LAUNCH, dispatch.GPU_ROUTE, dispatch.CPU_ROUTE,
              blocked.PLAN)
    fastflow.set_validate_args(True)
    before = [dict(t) for t in tables], mixture_inverse.MAX_STEPS
    assert _script("tune_gpu").main(["--only", "W1,W3,W5,W5diag,W4,W4tiles", "--size", "tiny",
                                     "--repeat", "1"]) == 0
    heads = [line for line in capsys.readouterr().out.splitlines() if line.startswith("### ")]
    assert len(heads) == 10, heads
    assert ([dict(t) for t in tables], mixture_inverse.MAX_STEPS) == before
    assert fastflow.get_validate_args()


def test_plain_baseline_runs_the_flow_without_fastflow_ops(monkeypatch):
    """The flows' torch-eager / torch-compile baseline computes the same log-density as the
    model on fastflow's path, with the mixture CDF's log-space formulas under autograd: no
    fastflow mixture-CDF op runs, the gradients agree, and leaving (also by an exception)
    restores the flows and the backend."""
    import os

    import torch

    from fastflow.nn import transforms
    from fastflow.reference import mixture_cdf as cpu_path

    model = benchmark.flow_model(3, [8, 8], 2, "cpu").double()
    weight = model.transforms[0].made.output.weight
    x = torch.randn(5, 3, dtype=torch.float64)
    lp = model.log_prob(x)
    (g,) = torch.autograd.grad(lp.sum(), [weight])
    calls = []
    for name in ("mixture_cdf_fwd", "mixture_cdf_bwd"):
        body = getattr(cpu_path, name)
        monkeypatch.setattr(cpu_path, name,
                            lambda *a, _n=name, _b=body: calls.append(_n) or _b(*a))
    lp_spied = model.log_prob(x)
    torch.autograd.grad(lp_spied.sum(), [weight])
    assert calls == ["mixture_cdf_fwd", "mixture_cdf_bwd"]  # the spies see the ops
    calls.clear()
    backend, cdf = os.environ.get("FASTFLOW_BACKEND"), transforms.mixture_cdf
    with benchmark.plain_pytorch():
        assert os.environ["FASTFLOW_BACKEND"] == "reference"
        lp_plain = model.log_prob(x)
        (g_plain,) = torch.autograd.grad(lp_plain.sum(), [weight])
    assert calls == []
    torch.testing.assert_close(lp_plain, lp, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(g_plain, g, rtol=1e-9, atol=1e-10)
    with pytest.raises(RuntimeError), benchmark.plain_pytorch():
        raise RuntimeError
    assert transforms.mixture_cdf is cdf
    assert os.environ.get("FASTFLOW_BACKEND") == backend


def test_c1_validation_script_prints_both_ratios(capsys):
    """bench/investigations/c1_validation.py (the checks-on / checks-off ratio docs/tuning.md
    quotes) runs at the tiny size and prints a row per setting whose ratio is its two times'
    quotient."""
    assert _script("c1_validation").main(["--size", "tiny", "--repeat", "1"]) == 0
    rows = [r.split("|")[1:-1] for r in capsys.readouterr().out.splitlines()[2:]]
    assert [r[0].strip() for r in rows] == ["off", "on"]
    for _, lp, sm, ratio in rows:
        assert float(ratio) == pytest.approx(float(sm) / float(lp), rel=0.02, abs=0.01)


def test_results_name_the_backend_that_ran(monkeypatch):
    """The environment block of a results file says which backend the ops took, from the same
    decision the ops make (FASTFLOW_BACKEND included), not from the device alone."""
    import torch

    cpu = torch.device("cpu")
    monkeypatch.setenv("FASTFLOW_BACKEND", "reference")
    assert benchmark.environment(cpu)["backend"] == "PyTorch reference"
    monkeypatch.setenv("FASTFLOW_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert benchmark.environment(cpu)["backend"] == "triton kernels (interpreted)"
