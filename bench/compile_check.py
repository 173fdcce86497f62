"""Compile every kernel specialisation the host launchers produce, for a GPU, without a GPU.

The interpreter (``TRITON_INTERPRET=1``) that runs fastflow's kernels on the CPU does not check
what the compiler checks: a kernel can pass every interpreted test and still fail to compile
(compiled Triton refuses module-level globals in a kernel, for one; the interpreter reads
them). This module runs each host launcher at tiny sizes with Triton's launch replaced by a
recorder, turns each recorded launch into the specialisation Triton would build (argument
types, constexprs, 16-byte divisibility, value-1 integers, warps), and compiles each distinct
one through the whole pipeline, ptxas included, for the given CUDA architectures. Triton's
wheel carries ptxas, so no GPU or CUDA toolkit is needed.

Run it from a checkout as ``python bench/compile_check.py [--arch 90 80] [--jobs N] [--sass DIR]``
(``TRITON_INTERPRET`` must be unset). ``--sass`` also writes each kernel's SASS and a summary
of its instruction mix, for reading what the compiler made of a kernel.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import hashlib
import importlib
import inspect
import itertools
import multiprocessing
import os
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

import torch

_DTYPES = {
    torch.float32: "fp32", torch.float64: "fp64", torch.bfloat16: "bf16",
    torch.float16: "fp16", torch.int32: "i32", torch.int64: "i64", torch.int16: "i16",
    torch.int8: "i8", torch.uint8: "u8", torch.bool: "i1",
}


@dataclass(frozen=True)
class Spec:
    """One kernel specialisation: everything triton.compile needs, in picklable form."""

    module: str
    kernel: str
    signature: tuple  # ((name, type), ...); type "constexpr" for constants
    constexprs: tuple  # ((name, value), ...); dtypes as ("dtype", "fp32")
    divisible: tuple  # argument indices with 16-divisibility
    options: tuple  # (("num_warps", 4), ...)
    labels: frozenset = field(default_factory=frozenset, compare=False)

    def name(self) -> str:
        consts = ",".join(f"{k}={v[1] if isinstance(v, tuple) else v}"
                          for k, v in self.constexprs if k.isupper())
        types = ",".join(sorted({t for _, t in self.signature if t.startswith("*f")
                                 or t.startswith("*b")}))
        return f"{self.kernel}[{consts}; {types}]"


def _arg_spec(value) -> tuple[str | None, bool]:
    """(signature type or None for a value-1 constant, 16-divisible) of a runtime argument."""
    if isinstance(value, torch.Tensor):
        return "*" + _DTYPES[value.dtype], value.data_ptr() % 16 == 0
    if isinstance(value, bool):
        return "i1", False
    if isinstance(value, int):
        if value == 1:
            return None, False
        return ("i32" if -2**31 <= value < 2**31 else "i64"), value % 16 == 0
    if isinstance(value, float):
        return "fp32", False
    raise TypeError(f"no signature type for an argument of type {type(value).__name__}")


def _constexpr(value):
    import triton.language as tl

    if isinstance(value, tl.dtype):
        return ("dtype", value.name)
    return value


def _specialise(fn, args, kwargs, label) -> Spec:
    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
    bound = inspect.signature(fn.fn).bind(*args, **kwargs)
    bound.apply_defaults()
    signature, constexprs, divisible = [], [], []
    for i, (param, (name, value)) in enumerate(zip(fn.params, bound.arguments.items(),
                                                   strict=True)):
        if param.is_constexpr:
            signature.append((name, "constexpr"))
            constexprs.append((name, _constexpr(value)))
            continue
        kind, div = _arg_spec(value)
        if kind is None:
            signature.append((name, "constexpr"))
            constexprs.append((name, value))
        else:
            signature.append((name, kind))
            if div:
                divisible.append(i)
    return Spec(fn.fn.__module__, fn.fn.__name__, tuple(signature), tuple(constexprs),
                tuple(divisible), tuple(sorted(options.items())), frozenset({label}))


@contextlib.contextmanager
def recording(into: list, label: str = ""):
    """Within the block, Triton kernel launches append a Spec to ``into`` instead of running."""
    from triton.runtime.jit import JITFunction

    original = JITFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        into.append(_specialise(self, args, dict(kwargs), label))

    JITFunction.run = record
    try:
        yield
    finally:
        JITFunction.run = original


# --------------------------------------------------------------------------------------------
# The launches: every launcher over its kinds, outputs, flags and input dtypes
# --------------------------------------------------------------------------------------------
FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _mixture(dtype, K=3, shape=(4, 5)):
    x = torch.randn(*shape, dtype=dtype)
    params = [torch.randn(*shape, K, dtype=dtype) for _ in range(3)]
    return x, params


def _cdf_launches(record):
    from fastflow.kernels import mixture_cdf as m
    from fastflow.kernels import mixture_inverse as inv

    from fastflow.ops.mixture_inverse import MAX_STEPS

    # K = 3 takes the kernels' general path, K = 4 (contiguous, a power of two) DENSE
    for kind, output, dtype, K in itertools.product(m.KINDS, m.OUTPUTS, FLOAT_DTYPES, (3, 4)):
        x, params = _mixture(dtype, K)
        label = f"{kind}/{output}/{dtype}/K={K}"
        # A cotangent of one value expanded over x (the gradient of a sum) is read with
        # stride 0, its own specialisation; its code does not depend on the dtype.
        one = torch.ones((), dtype=dtype).expand(x.shape) if dtype == torch.float32 else None
        with record(f"mixture_cdf {label}"):
            m.mixture_cdf_fwd(x, *params, kind, output)
            m.mixture_cdf_bwd(x, x, x, *params, kind, output)
            if one is not None:
                m.mixture_cdf_bwd(one, one, x, *params, kind, output)
        if output == "density":
            continue
        with record(f"inverse {label}"):
            inv.mixture_cdf_inverse_fwd(x, *params, kind, output, MAX_STEPS)
            steps = torch.zeros(inv.num_programs(x.numel(), K), dtype=torch.int32)
            inv.mixture_cdf_inverse_fwd(x, *params, kind, output, MAX_STEPS, steps_out=steps)
            inv.mixture_cdf_inverse_bwd(x, x, x, *params, kind, output)
            if one is not None:
                inv.mixture_cdf_inverse_bwd(one, one, x, *params, kind, output)


def _made_launches(record):
    from fastflow.kernels import made
    from fastflow.kernels.launch import KINDS, OUTPUTS

    from fastflow.nn.made import MADE

    for act, bias, dtype, tf32 in itertools.product(
            made.ACTIVATIONS, (True, False), FLOAT_DTYPES, (False, True)):
        x = torch.randn(6, 5, dtype=dtype)
        w = torch.randn(7, 5, dtype=dtype)
        mask = (torch.rand(7, 5) < 0.5).to(dtype)
        with _tf32(tf32), record(f"masked_linear {act}/{bias}/{dtype}/tf32={tf32}"):
            made.masked_linear_fwd(x, w, mask, torch.randn(7, dtype=dtype) if bias else None, act)
    for kind, output, dtype in itertools.product(KINDS, OUTPUTS, FLOAT_DTYPES):
        net = MADE(4, [8], 3 * 3).to(dtype)
        h = torch.randn(5, 8, dtype=dtype)
        x = torch.randn(5, 4, dtype=dtype)
        with record(f"made_head {kind}/{output}/{dtype}"):
            made.made_head_fwd(h, net.output.weight, net.output.bias, net.head_limits, x, 3,
                               kind, output)


def _solve_launches(record):
    from fastflow.kernels.autoregressive import autoregressive_solve
    from fastflow.kernels.launch import KINDS

    from fastflow.nn import AutoregressiveMixtureFlow

    for kind, output, invert, residual, dtype in itertools.product(
            KINDS, ("logit", "unit"), (True, False), (False, True), FLOAT_DTYPES):
        t = AutoregressiveMixtureFlow(4, 3, [8, 8], kind=kind, output=output,
                                      residual=residual).to(dtype)
        plan = t.made.sequential_plan()
        with torch.no_grad(), record(f"solve {kind}/{output}/{invert}/{residual}/{dtype}"):
            autoregressive_solve(
                torch.rand(5, 4, dtype=dtype), plan["weights"], plan["biases"], plan["table"],
                plan["order"], plan["out_weight"], plan["out_bias"], 3, kind, output, invert,
                residual, "relu")


@contextlib.contextmanager
def _tf32(allow: bool):
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = allow
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def collect() -> list[Spec]:
    """The distinct specialisations of every launcher's launches (labels merged)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")
    launches: list[Spec] = []

    def record(label):
        return recording(launches, label)

    for group in (_cdf_launches, _made_launches, _solve_launches):
        group(record)
    merged: dict[Spec, Spec] = {}
    for s in launches:
        seen = merged.get(s)
        merged[s] = s if seen is None else Spec(**{**seen.__dict__,
                                                   "labels": seen.labels | s.labels})
    return list(merged.values())


# --------------------------------------------------------------------------------------------
# Compilation
# --------------------------------------------------------------------------------------------
def compile_spec(spec: Spec, arch: int, sass_dir: str | None = None) -> dict:
    """Compile one specialisation for sm_<arch>; returns a result dict (error text on failure,
    never raises)."""
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(spec.module), spec.kernel)
    consts = {k: tl.dtype(v[1]) if isinstance(v, tuple) and v[0] == "dtype" else v
              for k, v in spec.constexprs}
    attrs = {(i,): [["tt.divisibility", 16]] for i in spec.divisible}
    start = time.perf_counter()
    try:
        src = ASTSource(fn=fn, signature=dict(spec.signature), constexprs=consts, attrs=attrs)
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                  options=dict(spec.options))
    except Exception as e:  # the report names the kernel and keeps the compiler's words
        while e.__cause__ is not None:  # down to the innermost function: the root cause
            e = e.__cause__
        text = str(e).strip().splitlines()
        return {"spec": spec, "arch": arch, "ok": False,
                "error": f"{type(e).__name__}: " + "\n  ".join(text[-8:])}
    result = {"spec": spec, "arch": arch, "ok": True, "seconds": time.perf_counter() - start,
              "shared": compiled.metadata.shared}
    if sass_dir is not None:
        result.update(_sass_summary(compiled.asm["cubin"], spec, arch, sass_dir))
    return result


def _cuobjdump() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                        "cuobjdump")


def _sass_summary(cubin: bytes, spec: Spec, arch: int, sass_dir: str) -> dict:
    """Write the SASS next to a count of its instructions by opcode; return registers, spill
    stores and the instruction count."""
    os.makedirs(sass_dir, exist_ok=True)
    digest = hashlib.sha1(repr((spec.signature, spec.constexprs)).encode()).hexdigest()[:8]
    stem = os.path.join(sass_dir, f"sm{arch}-{spec.kernel}-{digest}")
    with open(stem + ".cubin", "wb") as f:
        f.write(cubin)
    sass = subprocess.run([_cuobjdump(), "--dump-sass", stem + ".cubin"], check=True,
                          capture_output=True, text=True).stdout
    usage = subprocess.run([_cuobjdump(), "--dump-resource-usage", stem + ".cubin"],
                           check=True, capture_output=True, text=True).stdout
    ops = Counter()
    for line in sass.splitlines():
        body = line.split("*/", 1)[-1].strip() if line.lstrip().startswith("/*") else ""
        if body and not body.startswith("/*"):
            op = body.split()[0]
            if op.startswith("@"):
                op = body.split()[1]
            ops[op.rstrip(";").split(".")[0]] += 1
    with open(stem + ".sass", "w") as f:
        f.write(f"// {spec.name()}\n// {usage.strip()}\n" + sass)
    regs = _field(usage, "REG")
    return {"registers": regs, "spill": _field(usage, "STACK"),
            "instructions": sum(ops.values()), "ops": dict(ops.most_common()),
            "sass": stem + ".sass"}


def _field(usage: str, key: str) -> int | None:
    for token in usage.replace(",", " ").split():
        if token.startswith(key + ":"):
            return int(token.split(":")[1])
    return None


def check(arches=(90,), jobs: int | None = None, sass_dir: str | None = None,
          out=sys.stdout) -> list[dict]:
    """Compile every specialisation for each architecture; print a line per failure and a
    summary. Returns the results."""
    specs = collect()
    tasks = [(s, a) for a in arches for s in specs]
    jobs = jobs or os.cpu_count() or 1
    start = time.perf_counter()
    specs_, arches_ = [t[0] for t in tasks], [t[1] for t in tasks]
    with concurrent.futures.ProcessPoolExecutor(
            jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        results = list(pool.map(compile_spec, specs_, arches_,
                                itertools.repeat(sass_dir, len(tasks))))
    failed = [r for r in results if not r["ok"]]
    for r in failed:
        print(f"FAILED sm_{r['arch']} {r['spec'].name()}\n  used by: "
              f"{', '.join(sorted(r['spec'].labels))}\n  {r['error']}", file=out)
    if sass_dir is not None:
        for r in results:
            if r["ok"]:
                print(f"sm_{r['arch']} {r['spec'].name()}: {r['registers']} registers, "
                      f"stack {r['spill']}, {r['instructions']} instructions", file=out)
    import triton

    print(f"{len(results) - len(failed)}/{len(results)} specialisations of "
          f"{len({s.kernel for s in specs})} kernels compiled for "
          f"{', '.join(f'sm_{a}' for a in arches)} with Triton {triton.__version__} in "
          f"{time.perf_counter() - start:.0f} s", file=out)
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/compile_check.py",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90],
                        help="CUDA compute capabilities as integers (default: 90)")
    parser.add_argument("--jobs", type=int, default=None, help="parallel compiles (CPUs)")
    parser.add_argument("--sass", metavar="DIR", default=None,
                        help="also write each kernel's SASS and resource usage to DIR")
    args = parser.parse_args(argv)
    results = check(args.arch, args.jobs, args.sass)
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
