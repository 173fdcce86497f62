"""The benchmark runner behind ``fastflow bench``: the benchmark workloads measured in one run.

Every workload times its variants in one process, in interleaved rounds (each variant once
per round, so that the machine's drifts hit them alike; min and median over rounds), and every
figure is reported as a ratio within that run: fastflow against the same computation in eager
PyTorch, under torch.compile, and against peers where they have the model and are
installed: zuko's and nflows' affine MAFs, and zuko's spline MAF (NSF, K bins: about the
mixture's parameters per dimension) with the same MADE sizes.
The elementwise ops are also reported as achieved GB/s next to a device-to-device copy of the
same bytes. Writes CSV and markdown (device, versions, date and the command on top) and, with
matplotlib, a PNG of fastflow's speedup against problem size for W1-W3.

Workloads (defined in docs/design.md, Benchmark workloads): W1 mixture CDF forward +
logabsdet, W2 forward + backward, W3 inverse (with its round-trip error), W4 a training step
of an autoregressive mixture-of-logistics flow, W5 sampling that flow against its log_prob,
and the same for a two-layer coupling flow of the same sizes (C1 is W5 at the CPU size).
Sizes: "full" (for a GPU), "cpu" (C1 and a reduced set) and "tiny" (a smoke run).

    fastflow bench                       # full on a GPU, cpu otherwise
    fastflow bench --size tiny --workloads W1,W5 --out runs/bench
    fastflow bench --workloads W4,W5 --autocast   # every variant in a bfloat16 region
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as _dt
import importlib
import importlib.metadata
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

OP_SIZES = {"tiny": 2**10, "cpu": 2**16, "full": 2**24}
FLOW_SIZES = {
    # (features, hidden, components, batch for W4, batch for W5)
    "tiny": (8, [32, 32], 3, 16, 16),
    "cpu": (64, [256, 256], 8, 256, 4096),
    "full": (784, [1024, 1024], 10, 256, 4096),
}
WORKLOADS = ("W1", "W2", "W3", "W4", "W5")
PEERS = ("zuko-maf", "zuko-nsf", "nflows-maf")
KIND, OUTPUT, COLS, K_OPS = "logistic", "logit", 256, 8


@dataclass
class Result:
    workload: str
    variant: str
    size: str
    min_ms: float
    median_ms: float
    gbps: float | None = None
    peak_mib: float | None = None
    note: str = ""


@dataclass
class Variant:
    name: str
    fn: Callable[[], object]
    nbytes: int | None = None
    backend: str | None = None  # FASTFLOW_BACKEND while it runs
    note: str = ""
    slow: bool = False          # timed once, no warm-up rounds beyond compilation


@dataclass
class Workload:
    name: str
    size: str
    variants: list[Variant] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@contextlib.contextmanager
def no_input_checks():
    """Input checks off (no host sync per call), as every variant is timed; the global
    setting as it was afterwards."""
    import fastflow

    old = fastflow.get_validate_args()
    fastflow.set_validate_args(False)
    try:
        yield
    finally:
        fastflow.set_validate_args(old)


def _plain_mixture_cdf(x, logits, loc, log_scale, *, kind, output, validate_args=None):
    from fastflow.reference.naive import forward as _forward

    return _forward(x, logits, loc, log_scale, kind, output)


@contextlib.contextmanager
def _backend(name: str | None):
    """FASTFLOW_BACKEND=name while inside. "plain" is the flows' baseline, the model as plain
    PyTorch computes it: the reference backend (dense MADE) with the flows' mixture CDF as
    the log-space formulas under autograd, no fastflow op (W1 and W2 time the same formulas
    as their torch-eager), which torch.compile can also trace and fuse."""
    from fastflow.nn import transforms

    old = os.environ.get("FASTFLOW_BACKEND")
    if name is not None:
        os.environ["FASTFLOW_BACKEND"] = "reference" if name == "plain" else name
    cdf = transforms.mixture_cdf
    if name == "plain":
        transforms.mixture_cdf = _plain_mixture_cdf
    try:
        yield
    finally:
        if name == "plain":
            transforms.mixture_cdf = cdf
        if old is None:
            os.environ.pop("FASTFLOW_BACKEND", None)
        else:
            os.environ["FASTFLOW_BACKEND"] = old


def plain_pytorch():
    """The flows' torch-eager / torch-compile baseline (``_backend("plain")``)."""
    return _backend("plain")


def _calls_per_timing(fn, device: torch.device, budget: float) -> int:
    """Warm up (compilation, autotuning) and pick how many calls one timing batches: enough
    to cover ``budget`` seconds."""
    fn()
    _sync(device)
    number = 1
    while number < 1 << 12:
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        _sync(device)
        if time.perf_counter() - t0 >= budget:
            break
        number *= 2
    return number


def _time_batch(fn, device: torch.device, number: int) -> float:
    t0 = time.perf_counter()
    for _ in range(number):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / number


def measure_interleaved(fns: dict, device: torch.device, repeat: int,
                        budget: float = 0.02) -> dict:
    """{name: (min, median) ms per call}. The functions take turns, one timing each per round,
    so that drifts of the machine (clocks, neighbours) hit all of them alike."""
    numbers = {name: _calls_per_timing(fn, device, budget) for name, fn in fns.items()}
    times = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            times[name].append(_time_batch(fn, device, numbers[name]))
    return {name: (1e3 * min(t), 1e3 * statistics.median(t)) for name, t in times.items()}


def _peak_mib(fn, device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


# --------------------------------------------------------------------------------------------
# Workloads
# --------------------------------------------------------------------------------------------
def op_inputs(n: int, device: torch.device, seed: int = 0):
    """W1-W3 inputs: n elements as (n / 256, 256), K = 8 per-element parameters, fp32."""
    gen = torch.Generator().manual_seed(seed)
    shape = (max(n // COLS, 1), COLS)
    x = torch.randn(shape, generator=gen) * 3
    logits = torch.randn((*shape, K_OPS), generator=gen)
    loc = torch.randn((*shape, K_OPS), generator=gen)
    log_scale = torch.randn((*shape, K_OPS), generator=gen) * 0.5
    return [t.to(device) for t in (x, logits, loc, log_scale)]


def _nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _compiled(fn, enabled: bool):
    return torch.compile(fn) if enabled else None


def w1(n, device, compile_: bool) -> list[Variant]:
    import fastflow
    from fastflow.reference import naive

    x, logits, loc, log_scale = op_inputs(n, device)
    nbytes = _nbytes(x, logits, loc, log_scale) + 2 * _nbytes(x)

    def fast():
        return fastflow.mixture_cdf(x, logits, loc, log_scale, kind=KIND, output=OUTPUT,
                                    validate_args=False)

    def eager(*a):
        return naive.forward(*a, KIND, OUTPUT)

    src = torch.zeros(nbytes // 8, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    out = [Variant("fastflow", fast, nbytes),
           Variant("torch-eager", lambda: eager(x, logits, loc, log_scale), nbytes),
           Variant("copy", lambda: dst.copy_(src), nbytes,
                   note="device copy moving the same number of bytes")]
    comp = _compiled(eager, compile_)
    if comp is not None:
        out.append(Variant("torch-compile", lambda: comp(x, logits, loc, log_scale), nbytes))
    return out


def w2(n, device, compile_: bool) -> list[Variant]:
    import fastflow
    from fastflow.reference import naive

    base = op_inputs(n, device)
    leaves = [t.clone().requires_grad_() for t in base]
    nbytes = 2 * _nbytes(*base) + 2 * _nbytes(base[0])

    def step(forward):
        def run():
            y, lad = forward(*leaves)
            return torch.autograd.grad((y + lad).sum(), leaves)
        return run

    def fast_fwd(*a):
        return fastflow.mixture_cdf(*a, kind=KIND, output=OUTPUT, validate_args=False)

    def eager_fwd(*a):
        return naive.forward(*a, KIND, OUTPUT)

    out = [Variant("fastflow", step(fast_fwd), nbytes),
           Variant("torch-eager", step(eager_fwd), nbytes)]
    comp = _compiled(step(eager_fwd), compile_)
    if comp is not None:
        out.append(Variant("torch-compile", comp, nbytes))
    return out


def w3(n, device, compile_: bool) -> tuple[list[Variant], float]:
    """Variants and the round-trip error max |F(F^-1(y)) - y| / max(1, |y|) of fastflow's."""
    import fastflow
    from fastflow.ops import mixture_inverse as inverse_op
    from fastflow.reference import naive

    x, logits, loc, log_scale = op_inputs(n, device)
    y, _ = fastflow.mixture_cdf(x, logits, loc, log_scale, kind=KIND, output=OUTPUT)
    nbytes = _nbytes(y, logits, loc, log_scale) + 2 * _nbytes(y)

    def fast():
        return fastflow.mixture_cdf_inverse(y, logits, loc, log_scale, kind=KIND, output=OUTPUT,
                                            validate_args=False)

    def fixed(*a):
        return naive.inverse_fixed(*a, KIND, OUTPUT, inverse_op.BISECT_STEPS,
                                   inverse_op.NEWTON_STEPS)

    x_back, _ = fast()
    y_back, _ = fastflow.mixture_cdf(x_back, logits, loc, log_scale, kind=KIND, output=OUTPUT)
    err = ((y_back - y).abs() / y.abs().clamp(min=1.0)).max().item()
    out = [Variant("fastflow", fast, nbytes),
           Variant("torch-eager", lambda: fixed(y, logits, loc, log_scale), nbytes,
                   note="a fixed 40 + 4 iteration schedule in PyTorch")]
    comp = _compiled(fixed, compile_)
    if comp is not None:
        out.append(Variant("torch-compile", lambda: comp(y, logits, loc, log_scale), nbytes))
    return out, err


def flow_model(features, hidden, components, device):
    """W4/W5's model: one MAF mixture-of-logistics layer over a standard normal base."""
    from fastflow.distributions import StandardNormal
    from fastflow.nn import AutoregressiveMixtureFlow, Flow

    torch.manual_seed(0)
    return Flow([AutoregressiveMixtureFlow(features, components, hidden, output="logit",
                                           seed=0)], StandardNormal(features)).to(device)


def coupling_model(features, hidden, components, device):
    """W5's coupling flow: two Flow++ coupling layers (each transforms half the features,
    the Reverse between them the other half) with W4/W5's hidden sizes and components."""
    from fastflow.flows import Coupling

    torch.manual_seed(0)
    return Coupling(features, transforms=2, components=components,
                    hidden_features=hidden).to(device)


def _peer(name: str):
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def _zuko_flow(name, features, hidden, device, **kwargs):
    """zuko.flows.<name> with one transform and the given MADE sizes, or None."""
    zuko = _peer("zuko")
    if zuko is None:
        return None
    torch.manual_seed(0)
    return getattr(zuko.flows, name)(features, transforms=1, hidden_features=hidden,
                                     **kwargs).to(device)


def _zuko_maf(features, hidden, device):
    return _zuko_flow("MAF", features, hidden, device)


def _zuko_nsf(features, hidden, components, device):
    # bins = K: 3 bins - 1 spline parameters per dimension against the mixture's 3K.
    return _zuko_flow("NSF", features, hidden, device, bins=components)


def _nflows_maf(features, hidden, device):
    nflows = _peer("nflows")
    if nflows is None:
        return None
    from nflows.distributions import StandardNormal as NStd
    from nflows.flows import Flow as NFlow
    from nflows.transforms import MaskedAffineAutoregressiveTransform

    torch.manual_seed(0)
    # nflows' MADE: an input layer, then num_blocks hidden-to-hidden layers, then the output.
    t = MaskedAffineAutoregressiveTransform(features, hidden[0], num_blocks=len(hidden) - 1,
                                            use_residual_blocks=False)
    return NFlow(t, NStd([features])).to(device)


# The device type whose bfloat16 autocast region W4's forward and W5's calls run in (None:
# none), set by ``fastflow bench --autocast``.
AUTOCAST: list = [None]


def _region():
    device = AUTOCAST[0]
    if device is None:
        return contextlib.nullcontext()
    return torch.autocast(device, dtype=torch.bfloat16)


def _train_step(loss_fn, params):
    opt = torch.optim.SGD(params, lr=1e-4)

    def step():
        with _region():  # the forward only, as PyTorch recommends
            loss = loss_fn()
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.detach()

    return step


def w4(size, device, compile_: bool, skipped: list[str]) -> list[Variant]:
    D, hidden, K, batch, _ = FLOW_SIZES[size]
    x = torch.randn(batch, D, generator=torch.Generator().manual_seed(0)).to(device)
    out = []
    for name, backend in (("fastflow", None), ("torch-eager", "plain")):
        model = flow_model(D, hidden, K, device)
        out.append(Variant(name, _train_step(lambda m=model: -m.log_prob(x).mean(),
                                             model.parameters()), backend=backend))
    if compile_:
        model = flow_model(D, hidden, K, device)
        step = torch.compile(_train_step(lambda: -model.log_prob(x).mean(), model.parameters()))
        out.append(Variant("torch-compile", step, backend="plain"))
    zmaf = _zuko_maf(D, hidden, device)
    if zmaf is None:
        skipped.append("zuko-maf: zuko is not installed (pip install -e '.[bench]')")
    else:
        out.append(Variant("zuko-maf", _train_step(lambda: -zmaf().log_prob(x).mean(),
                                                   zmaf.parameters()),
                           note="affine MAF, same MADE sizes"))
    znsf = _zuko_nsf(D, hidden, K, device)
    if znsf is not None:
        out.append(Variant("zuko-nsf", _train_step(lambda: -znsf().log_prob(x).mean(),
                                                   znsf.parameters()),
                           note=f"spline MAF, {K} bins, same MADE sizes"))
    nmaf = _nflows_maf(D, hidden, device)
    if nmaf is None:
        skipped.append("nflows-maf: nflows is not installed")
    else:
        out.append(Variant("nflows-maf", _train_step(lambda: -nmaf.log_prob(x).mean(),
                                                     nmaf.parameters()),
                           note="affine MAF, same MADE sizes"))
    return out


def w5(size, device, skipped: list[str]) -> list[Variant]:
    D, hidden, K, _, batch = FLOW_SIZES[size]
    x = torch.randn(batch, D, generator=torch.Generator().manual_seed(0)).to(device)
    model = flow_model(D, hidden, K, device)
    d_pass = flow_model(D, hidden, K, device)
    for t in d_pass.transforms:
        t.one_pass = False

    def no_grad(fn):
        def run():
            with torch.no_grad(), _region():
                return fn()
        return run

    out = [Variant("fastflow-log_prob", no_grad(lambda: model.log_prob(x))),
           Variant("torch-eager-log_prob", no_grad(lambda: model.log_prob(x)),
                   backend="plain", note="the same model in plain PyTorch"),
           Variant("fastflow-sample", no_grad(lambda: model.sample(batch)),
                   note="one pass (one kernel launch on a GPU)"),
           Variant("fastflow-sample-d-pass", no_grad(lambda: d_pass.sample(batch)), slow=True,
                   note="the same model by D network passes (what peers do)")]
    coupling = coupling_model(D, hidden, K, device)
    out += [Variant("coupling-log_prob", no_grad(lambda: coupling.log_prob(x)),
                    note="fastflow.flows.Coupling, 2 transforms, same hidden sizes"),
            Variant("coupling-sample", no_grad(lambda: coupling.sample(batch)),
                    note="one conditioner pass per transform")]
    zmaf = _zuko_maf(D, hidden, device)
    if zmaf is None:
        skipped.append("zuko-maf: zuko is not installed (pip install -e '.[bench]')")
    else:
        out += [Variant("zuko-maf-log_prob", no_grad(lambda: zmaf().log_prob(x))),
                Variant("zuko-maf-sample", no_grad(lambda: zmaf().sample((batch,))))]
        znsf = _zuko_nsf(D, hidden, K, device)
        out += [Variant("zuko-nsf-log_prob", no_grad(lambda: znsf().log_prob(x)),
                        note=f"spline MAF, {K} bins"),
                Variant("zuko-nsf-sample", no_grad(lambda: znsf().sample((batch,))))]
    nmaf = _nflows_maf(D, hidden, device)
    if nmaf is None:
        skipped.append("nflows-maf: nflows is not installed")
    else:
        out += [Variant("nflows-maf-log_prob", no_grad(lambda: nmaf.log_prob(x))),
                Variant("nflows-maf-sample", no_grad(lambda: nmaf.sample(batch)))]
    return out


# --------------------------------------------------------------------------------------------
# Running, ratios, output
# --------------------------------------------------------------------------------------------
def build(name: str, size: str, device: torch.device, compile_: bool) -> Workload:
    wl = Workload(name, size)
    if name == "W1":
        wl.variants = w1(OP_SIZES[size], device, compile_)
    elif name == "W2":
        wl.variants = w2(OP_SIZES[size], device, compile_)
    elif name == "W3":
        wl.variants, err = w3(OP_SIZES[size], device, compile_)
        wl.variants[0].note = f"round-trip error {err:.2e} (relative, max)"
    elif name == "W4":
        wl.variants = w4(size, device, compile_, wl.skipped)
    else:
        wl.variants = w5(size, device, wl.skipped)
    if not compile_ and name != "W5":
        wl.skipped.append("torch-compile: --no-compile")
    return wl


def _backend_bound(v: Variant):
    def run():
        with _backend(v.backend):
            return v.fn()
    return run


def run_workload(wl: Workload, device: torch.device, repeat: int) -> list[Result]:
    """Time the variants of one workload in interleaved rounds; "slow" ones once each."""
    with no_input_checks():
        fast = {v.name: _backend_bound(v) for v in wl.variants if not v.slow}
        timed = measure_interleaved(fast, device, repeat)
        for v in wl.variants:
            if v.slow:
                run = _backend_bound(v)
                if device.type == "cuda":
                    run()
                timed[v.name] = (1e3 * _time_batch(run, device, 1),) * 2
        results = []
        for v in wl.variants:
            t_min, t_med = timed[v.name]
            gbps = None if v.nbytes is None else v.nbytes / (t_min * 1e-3) / 1e9
            peak = _peak_mib(_backend_bound(v), device)
            results.append(Result(wl.name, v.name, wl.size, t_min, t_med, gbps, peak, v.note))
    return results


def ratios(results: list[Result]) -> list[tuple[str, str, float]]:
    """(workload, comparison, ratio) from min times of one run; > 1 favours fastflow except
    where the comparison says otherwise."""
    t = {(r.workload, r.variant): r.min_ms for r in results}
    g = {(r.workload, r.variant): r.gbps for r in results}
    out = []

    def add(w, text, num, den):
        if num in t and den in t:
            out.append((w, text, t[num] / t[den]))

    for w in ("W1", "W2", "W3", "W4"):
        add(w, "speedup vs torch eager", (w, "torch-eager"), (w, "fastflow"))
        add(w, "speedup vs torch.compile", (w, "torch-compile"), (w, "fastflow"))
    for peer in PEERS:
        add("W4", f"speedup vs {peer}", ("W4", peer), ("W4", "fastflow"))
    if ("W1", "fastflow") in g and ("W1", "copy") in g:
        out.append(("W1", "bandwidth / copy bandwidth", g[("W1", "fastflow")] / g[("W1", "copy")]))
    add("W3", "inverse time / W1 time", ("W3", "fastflow"), ("W1", "fastflow"))
    add("W5", "log_prob speedup vs torch eager", ("W5", "torch-eager-log_prob"),
        ("W5", "fastflow-log_prob"))
    add("W5", "fastflow sample / log_prob (lower is better)", ("W5", "fastflow-sample"),
        ("W5", "fastflow-log_prob"))
    add("W5", "sample speedup vs D-pass sampling", ("W5", "fastflow-sample-d-pass"),
        ("W5", "fastflow-sample"))
    add("W5", "coupling sample / log_prob (lower is better)", ("W5", "coupling-sample"),
        ("W5", "coupling-log_prob"))
    for peer in PEERS:
        add("W5", f"{peer} sample / log_prob (lower is better)", ("W5", f"{peer}-sample"),
            ("W5", f"{peer}-log_prob"))
        add("W5", f"sample speedup vs {peer} sampling", ("W5", f"{peer}-sample"),
            ("W5", "fastflow-sample"))
    return out


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict[str, str]:
    import numpy

    import fastflow

    env = {"date": _dt.date.today().isoformat(), "python": platform.python_version(),
           "torch": torch.__version__, "numpy": numpy.__version__,
           "fastflow": getattr(fastflow, "__version__", "dev"),
           "device": (torch.cuda.get_device_name(device) if device.type == "cuda"
                      else f"CPU ({_cpu_name()}, {torch.get_num_threads()} threads)")}
    for peer in ("triton", "zuko", "nflows"):
        try:
            env[peer] = importlib.metadata.version(peer)
        except importlib.metadata.PackageNotFoundError:
            env[peer] = "not installed"
    from fastflow.ops import dispatch

    triton = dispatch.backend_for(torch.empty(0, device=device)) == "triton"
    interpreted = os.environ.get("TRITON_INTERPRET") == "1" and device.type != "cuda"
    env["backend"] = ("PyTorch reference" if not triton else
                      "triton kernels (interpreted)" if interpreted else "triton kernels")
    return env


def _fmt(v, digits=3):
    return "-" if v is None else f"{v:.{digits}g}"


def markdown(results, rats, env, command, skipped) -> str:
    lines = [f"# fastflow bench, {env['date']}", ""]
    lines += [f"- {k}: {v}" for k, v in env.items() if k != "date"]
    lines += [f"- command: `{command}`", "", "## Ratios (min times, one run)", "",
              "| workload | comparison | ratio |", "|---|---|---|"]
    lines += [f"| {w} | {c} | {r:.3g} |" for w, c, r in rats]
    lines += ["", "## Times", "",
              "| workload | size | variant | min ms | median ms | GB/s | peak MiB | note |",
              "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r.workload} | {r.size} | {r.variant} | {r.min_ms:.4g} | {r.median_ms:.4g} | "
              f"{_fmt(r.gbps)} | {_fmt(r.peak_mib)} | {r.note} |" for r in results]
    if skipped:
        lines += ["", "Skipped: " + "; ".join(skipped)]
    return "\n".join(lines) + "\n"


def write_csv(path, results):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["workload", "size", "variant", "min_ms", "median_ms", "gbps", "peak_mib",
                    "note"])
        for r in results:
            w.writerow([r.workload, r.size, r.variant, f"{r.min_ms:.6g}", f"{r.median_ms:.6g}",
                        "" if r.gbps is None else f"{r.gbps:.6g}",
                        "" if r.peak_mib is None else f"{r.peak_mib:.6g}", r.note])


def sweep(size: str, device: torch.device, repeat: int, workloads) -> list[tuple]:
    """(workload, n, speedup vs eager) for W1-W3 at sizes 2^10, 2^12, ... up to the size's."""
    rows = []
    n = 2**10
    while n <= OP_SIZES[size]:
        for name in [w for w in ("W1", "W2", "W3") if w in workloads]:
            fn = {"W1": w1, "W2": w2, "W3": lambda *a: w3(*a)[0]}[name]
            variants = {v.name: v for v in fn(n, device, False)}
            t = measure_interleaved({k: variants[k].fn for k in ("fastflow", "torch-eager")},
                                    device, repeat)
            rows.append((name, n, t["torch-eager"][0] / t["fastflow"][0]))
        n *= 4
    return rows


def plot(path, rows, env) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in sorted({r[0] for r in rows}):
        pts = [(n, s) for w, n, s in rows if w == name]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("elements")
    ax.set_ylabel("speedup of fastflow vs eager PyTorch")
    ax.set_title(f"{env['device']}, {env['backend']}", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def parse_args(argv, parser_class=argparse.ArgumentParser):
    p = parser_class(prog="fastflow bench",
                     description=__doc__.split("\n\n")[0].replace("``", ""))
    p.add_argument("--size", choices=tuple(OP_SIZES), default=None,
                   help="workload sizes (default: full on a GPU, cpu otherwise)")
    p.add_argument("--workloads", default=",".join(WORKLOADS),
                   help="comma-separated subset of " + ",".join(WORKLOADS)
                   + " (default: all)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where to run (default: auto, CUDA where available)")
    p.add_argument("--repeat", type=int, default=5,
                   help="timed repetitions per variant (default: %(default)s)")
    p.add_argument("--no-compile", nargs="?", const=",".join(WORKLOADS), default="",
                   metavar="W4,...",
                   help="skip the torch.compile variants: of every workload, or of those listed")
    p.add_argument("--no-sweep", action="store_true", help="skip the size sweep and its plot")
    p.add_argument("--out", default=None,
                   help="directory for CSV, markdown and PNG (default: none, print only)")
    p.add_argument("--autocast", action="store_true",
                   help="W4's forward and W5's calls in a bfloat16 torch.autocast region, for "
                   "every variant (peers and baselines included)")
    args = p.parse_args(argv)
    wanted = [w.strip().upper() for w in args.workloads.split(",") if w.strip()]
    bad = [w for w in wanted if w not in WORKLOADS]
    if bad or not wanted:
        p.error(f"--workloads: unknown {bad or wanted}; choose from {','.join(WORKLOADS)}")
    if args.repeat < 1:
        p.error("--repeat must be >= 1")
    no_compile = [w.strip().upper() for w in args.no_compile.split(",") if w.strip()]
    if [w for w in no_compile if w not in WORKLOADS]:
        p.error(f"--no-compile: unknown {no_compile}; choose from {','.join(WORKLOADS)}")
    args.workloads, args.no_compile = wanted, set(no_compile)
    return args


def main(argv=None, parser_class=argparse.ArgumentParser) -> int:
    """``fastflow bench``; ``parser_class`` lets the CLI give its one-line errors."""
    args = parse_args(sys.argv[1:] if argv is None else argv, parser_class)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("fastflow bench: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if cuda else "cpu")
    size = args.size or ("full" if cuda else "cpu")
    command = "fastflow bench " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    env = environment(device)
    stem = os.path.join(args.out or "", f"bench-{env['date']}-{device.type}-{size}")
    if args.out:
        if os.path.exists(args.out) and not os.path.isdir(args.out):
            print(f"fastflow bench: --out {args.out} is a file; --out names a folder for the "
                  f"results", file=sys.stderr)
            return 2
        try:
            os.makedirs(args.out, exist_ok=True)
        except OSError as e:
            print(f"fastflow bench: --out {args.out}: cannot create the folder "
                  f"({e.strerror or e})", file=sys.stderr)
            return 2
    results, skipped = [], []
    AUTOCAST[0] = device.type if args.autocast else None
    try:
        _run(args, size, device, env, command, stem, results, skipped)
    finally:
        AUTOCAST[0] = None
    return 0


def _run(args, size, device, env, command, stem, results, skipped) -> None:
    for name in args.workloads:
        wl = build(name, size, device, name not in args.no_compile)
        print(f"{name} ({size}): {', '.join(v.name for v in wl.variants)}", flush=True)
        results += run_workload(wl, device, args.repeat)
        skipped += [f"{name} {s}" for s in wl.skipped]
        report = markdown(results, ratios(results), env, command.strip(), skipped)
        if args.out:  # after each workload, so that a run cut short keeps what it measured
            write_csv(stem + ".csv", results)
            with open(stem + ".md", "w") as f:
                f.write(report)
    print(report)
    if args.out:
        print(f"wrote {stem}.csv and {stem}.md")
        ops = [w for w in args.workloads if w in ("W1", "W2", "W3")]
        if ops and not args.no_sweep:
            rows = sweep(size, device, args.repeat, ops)
            if plot(stem + ".png", rows, env):
                print(f"wrote {stem}.png")
            else:
                print("no plot: matplotlib is not installed (pip install matplotlib)")


if __name__ == "__main__":
    raise SystemExit(main())
