"""Every kernel specialisation the launchers produce compiles for a GPU (sm_90), checked on
the CPU: the interpreter that runs the kernel tests here does not check what the compiler
does. Compilation runs in a subprocess, since this process has TRITON_INTERPRET set."""

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

KERNELS_DIR = Path(__file__).resolve().parent.parent / "kernels"
BENCH_DIR = Path(__file__).resolve().parent.parent / "bench"  # compile_check.py is a bench tool


def _run(script: str, cwd=None) -> subprocess.CompletedProcess:
    """Run ``script`` in a fresh interpreter without TRITON_INTERPRET, bench/ importable."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = f"import sys; sys.path.insert(0, {str(BENCH_DIR)!r})\n" + textwrap.dedent(script)
    return subprocess.run([sys.executable, "-c", script], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=1800)


def test_every_kernel_specialisation_compiles_for_sm90():
    done = _run("""
        import json, sys
        import compile_check as c
        results = c.check((90,), out=sys.stderr)
        print(json.dumps({
            "kernels": sorted({r["spec"].kernel for r in results}),
            "failed": [f"{r['spec'].name()}: {r['error']}" for r in results if not r["ok"]],
            "count": len(results)}))
    """)
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["failed"] == [], "\n".join(report["failed"])
    # every kernel defined in the package is launched by some recorded launcher
    defined = {name for f in KERNELS_DIR.glob("*.py")
               for name in re.findall(r"^def (_\w+_kernel)\(", f.read_text(), re.M)}
    assert defined and set(report["kernels"]) == defined
    assert report["count"] > 100  # kinds x outputs x dtypes x flags, not one per kernel


def test_compile_check_reports_what_the_interpreter_accepts(tmp_path):
    """A module-level float inside a kernel runs under the interpreter but does not compile:
    the check must say so, and name the global."""
    (tmp_path / "two_kernels.py").write_text(textwrap.dedent("""
        import triton
        import triton.language as tl

        HALF = 0.5

        @triton.jit
        def _bad_kernel(x_ptr, N, BLOCK: tl.constexpr):
            offs = tl.arange(0, BLOCK)
            x = tl.load(x_ptr + offs, mask=offs < N)
            tl.store(x_ptr + offs, x * HALF, mask=offs < N)

        @triton.jit
        def _good_kernel(x_ptr, N, BLOCK: tl.constexpr):
            offs = tl.arange(0, BLOCK)
            x = tl.load(x_ptr + offs, mask=offs < N)
            tl.store(x_ptr + offs, x * 0.5, mask=offs < N)
    """))
    done = _run("""
        import json, torch
        import compile_check as c
        from two_kernels import _bad_kernel, _good_kernel
        specs = []
        with c.recording(specs, "test"):
            _bad_kernel[(1,)](torch.zeros(64), 64, BLOCK=64)
            _good_kernel[(1,)](torch.zeros(64), 64, BLOCK=64)
        bad, good = (c.compile_spec(s, 90) for s in specs)
        print(json.dumps({"bad": bad["ok"], "error": bad.get("error", ""), "good": good["ok"],
                          "signature": dict(specs[0].signature)}))
    """, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["signature"] == {"x_ptr": "*fp32", "N": "i32", "BLOCK": "constexpr"}
    assert report["good"] and not report["bad"]
    assert "HALF" in report["error"] and "global" in report["error"]


def test_sass_count_reports_every_w1_to_w3_kernel():
    """bench/investigations/sass_count.py (the instruction counts docs/tuning.md quotes) runs and
    covers the forward, backward and inverse kernels for both kinds."""
    script = Path(__file__).resolve().parent.parent / "bench" / "investigations" / "sass_count.py"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    rows = [line.split("|")[1:-1] for line in done.stdout.splitlines()
            if line.startswith("| _")]
    assert {(r[0].strip(), r[1].strip()) for r in rows} == {
        (k, kind) for k in ("_mixture_cdf_fwd_kernel", "_mixture_cdf_bwd_kernel",
                            "_mixture_cdf_inverse_fwd_kernel")
        for kind in ("logistic", "gaussian")}
    assert all(int(r[3]) > 0 for r in rows)
