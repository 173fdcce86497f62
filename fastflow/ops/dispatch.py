"""Every backend and route decision of fastflow, in one module.

Backend (where an op runs). CUDA tensors run the Triton kernels; CPU tensors run the
pure-PyTorch CPU path (:mod:`fastflow.reference`), unless ``FASTFLOW_BACKEND=triton`` (with
``TRITON_INTERPRET=1`` set before the kernels are first imported) sends them through the
interpreted kernels. ``FASTFLOW_BACKEND=reference`` forces the CPU path everywhere.

Routes (how MADE's products run, :func:`route`). "dense": one library GEMM with the masked
weight (twice the multiply-adds of the mask's nonzeros); "blocks": a few library GEMMs over
row blocks of the degree-sorted masks, each reading only the columns its rows can see
(:mod:`fastflow.ops.blocked`; dense where a mask is not of that form, e.g. a random input
order); "kernel": fastflow's masked-linear and fused-head kernels, which skip the mask's zero
tiles but whose fp32 ``tl.dot`` runs on CUDA cores (IEEE fp32; tensor cores only with TF32
allowed or in half precision). "linear" is the hidden layers, "head" the output layer (with
"kernel", fused with the mixture CDF: :func:`head_fused`). A product whose result autograd
records (training) reads "linear"/"head"; one that it does not (log_prob or sampling under
no_grad) reads "linear_inference"/"head_inference", since "blocks" costs its backward more
than its forward saves at small batches. The defaults are the fastest measured on each device,
or within the measurements' noise of it (docs/tuning.md, "Current defaults and why").
``FASTFLOW_BACKEND=reference`` always takes "dense": the plain model, the tests' oracle.

Sequential direction (:func:`solve_in_one_pass`): an autoregressive flow's sampling (MAF) or
density (IAF) solves one degree at a time; without gradients in one pass over the network
(one kernel on a GPU for a ReLU MADE, :func:`solve_kernel`; other activations run the CPU
path's loop on the tensors' device), with gradients in D network passes so that autograd sees
every dependence.
"""

from __future__ import annotations

import importlib
import os

import torch

BACKENDS = ("auto", "triton", "reference")
GPU_ROUTE = {"linear": "dense", "head": "dense",
             "linear_inference": "dense", "head_inference": "blocks"}
CPU_ROUTE = {"linear": "blocks", "head": "blocks",
             "linear_inference": "blocks", "head_inference": "blocks"}
ROLES = ("linear", "head")


def backend_choice() -> str:
    """FASTFLOW_BACKEND, validated: "auto", "triton" or "reference"."""
    choice = os.environ.get("FASTFLOW_BACKEND", "auto").lower()
    if choice not in BACKENDS:
        raise ValueError(f"FASTFLOW_BACKEND must be one of {BACKENDS}, got {choice!r}")
    return choice


def backend_for(t: torch.Tensor) -> str:
    """"triton" or "reference" for a tensor on its device, honouring FASTFLOW_BACKEND."""
    choice = backend_choice()
    if choice == "auto":
        return "triton" if t.is_cuda else "reference"
    return choice


def use_triton(t: torch.Tensor) -> bool:
    """Whether an op on ``t`` runs its Triton kernel (RuntimeError where the kernels cannot
    run: a CPU tensor without the interpreter)."""
    if backend_for(t) != "triton":
        return False
    if not t.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            "FASTFLOW_BACKEND=triton on CPU tensors needs the Triton interpreter: set "
            "TRITON_INTERPRET=1 before fastflow's kernels are first imported"
        )
    return True


def kernels(name: str):
    """The kernel module ``fastflow.kernels.<name>``, imported on first use (Triton is not
    imported on the CPU path)."""
    return importlib.import_module(f"fastflow.kernels.{name}")


def route(x: torch.Tensor, part: str | None, grad: bool | None = None) -> str:
    """How MADE's ``part`` ("linear" or "head") runs for x: "dense", "blocks" or "kernel".
    ``grad``: whether autograd records the product (default: ``torch.is_grad_enabled()``).
    ``part`` None, a masked product outside MADE: "kernel" on the Triton backend, else
    "dense"."""
    if part is None:
        return "kernel" if backend_for(x) == "triton" else "dense"
    choice = backend_choice()
    if choice == "reference":
        return "dense"
    key = part if (torch.is_grad_enabled() if grad is None else grad) else part + "_inference"
    if x.is_cuda:
        how = GPU_ROUTE[key]
    else:
        how = "kernel" if choice == "triton" else CPU_ROUTE[key]
    return "dense" if how == "blocks" and not _blocks_allowed() else how


def _blocks_allowed() -> bool:
    """Whether the "blocks" route can run: its Python plan is not traceable by a compiler, and
    its autograd.Function has neither a batching rule nor a forward-mode derivative, so
    torch.compile, the torch.func transforms and forward-mode AD take the dense product."""
    return not (torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active()
                or torch.autograd.forward_ad._current_level >= 0)


def head_fused(values: torch.Tensor, recorded, context=None) -> bool:
    """Whether a MADE flow's density pass takes the fused head kernel (the head's route is
    "kernel" and there is no context, which the kernel does not take). ``recorded()`` says
    whether autograd records the pass; it is called only where the two modes' routes
    differ."""
    if context is not None or backend_for(values) != "triton":
        return False
    if route(values, "head", True) != "kernel" and route(values, "head", False) != "kernel":
        return False
    return route(values, "head", recorded()) == "kernel"


def solve_kernel(values: torch.Tensor, activation: str) -> bool:
    """Whether the one-pass solve runs its kernel: the Triton backend and a ReLU MADE (the
    kernel's one activation); otherwise the CPU path's loop, on the tensors' device."""
    return activation == "relu" and use_triton(values)


def solve_in_one_pass(enabled: bool, recorded: bool) -> bool:
    """Whether the sequential direction takes the one-pass solve: allowed (``enabled``,
    the transform's ``one_pass``), not recorded by autograd, and no forward-mode derivative
    being taken (``torch.func.jvp``/``jacfwd``, whose inputs need not require grad): the
    solve has no derivative."""
    return enabled and not recorded and torch.autograd.forward_ad._current_level < 0
