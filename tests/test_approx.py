"""The compiled kernels' hardware approximations, checked on a CPU.

Compiled for a GPU, the float32 kernels take exponentials, reciprocals and logarithms from
ex2.approx.ftz, rcp.approx.ftz and lg2.approx.ftz (``fast_exp``, ``fast_rcp`` and ``sum_log``
in kernels/_math.py), which the interpreter cannot run. With FASTFLOW_APPROX_ERRORS=1 the
interpreted helpers add errors of the approximations' documented size instead, so the
float32 kernel tests below check the accuracy contract and the kernel-vs-reference bounds
against them. A GPU run of the suite checks the real instructions.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
FILES = ["tests/test_mixture_cdf.py", "tests/test_mixture_inverse.py",
         "tests/test_made.py", "tests/test_autoregressive.py"]

pytestmark = pytest.mark.skipif(torch.cuda.is_available(),
                                reason="a GPU runs the real approximations in the other tests")


def _env(emulate: bool = True):
    env = {**os.environ, "TRITON_INTERPRET": "1", "FASTFLOW_APPROX_ERRORS": "1"}
    if not emulate:
        del env["FASTFLOW_APPROX_ERRORS"]
    return env


SCRIPT = """
import os, torch, fastflow
from fastflow.kernels import _math
torch.manual_seed(0)
x, lg, loc, ls = (torch.randn(4096), torch.randn(4096, 8), torch.randn(4096, 8),
                  torch.randn(4096, 8) * 0.5)
os.environ["FASTFLOW_BACKEND"] = "triton"
y, lad = fastflow.mixture_cdf(x, lg, loc, ls, output="logit")
os.environ["FASTFLOW_BACKEND"] = "reference"
_, lad64 = fastflow.mixture_cdf(*(t.double() for t in (x, lg, loc, ls)), output="logit")
print(bool(_math.EMULATE), float((lad.double() - lad64).abs().max()))
"""


def test_emulated_errors_are_injected():
    """The switch takes effect: the float32 logit forward's logabsdet moves further from the
    float64 reference than with the exact library functions, by about the approximations'
    size and no more."""
    out = {}
    for emulate in (True, False):
        done = subprocess.run([sys.executable, "-c", SCRIPT], env=_env(emulate), cwd=ROOT,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        flag, err = done.stdout.split()
        assert flag == str(emulate)
        out[emulate] = float(err)
    assert out[False] < out[True] < 1e-5


def test_float32_kernel_tests_hold_with_the_approximations_errors():
    """The float32 kernel tests (accuracy contract, kernel against reference, gradients,
    inverse, fused head, one-pass solve) with the emulated approximation errors."""
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *FILES,
         "-k", "not fp64 and not reference] and not d784"],
        env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-6000:]
    assert " passed" in done.stdout
