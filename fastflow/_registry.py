"""torch.library registrations of fastflow's ops, with fake impls and the one backend switch.

Backend selection lives here and only here: CUDA tensors run the Triton kernels; CPU tensors
run the pure-PyTorch reference, unless ``FASTFLOW_BACKEND=triton`` (with ``TRITON_INTERPRET=1``
set before the first import of the kernels) sends them through the interpreted kernels.
``FASTFLOW_BACKEND=reference`` forces the reference everywhere.

Ops take already validated tensors: x of shape S and parameters broadcast (expanded) to
S + (K,). Forward ops return outputs in x's dtype; backward ops return per-element gradients
in the compute dtype (float64 for float64 inputs, float32 otherwise), which the autograd layer
reduces over broadcast dimensions.
"""

from __future__ import annotations

import os

import torch

from . import reference

# The inverse's iteration budget. The kernels iterate safeguarded Halley per tile until every
# element has converged, capped at MAX_STEPS iterations (a compile-time constant: the worst
# case of the earlier fixed schedule). reference.mixture_cdf's mixture_cdf_inverse_fixed runs
# that fixed schedule (BISECT_STEPS bisection, then NEWTON_STEPS Newton steps) and serves as a
# benchmark baseline; the CPU reference iterates to convergence.
BISECT_STEPS = 40
NEWTON_STEPS = 4
MAX_STEPS = BISECT_STEPS + NEWTON_STEPS

_BACKENDS = ("auto", "triton", "reference")
KINDS = ("logistic", "gaussian")
OUTPUTS = ("unit", "logit")


def check_choice(name: str, value, choices) -> None:
    """ValueError naming ``name`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _check_kind_output(kind, output=None) -> None:
    """The ops branch on these strings: an unknown one must raise, not fall through to
    another formula (the public autograd Functions and torch.ops.fastflow reach them)."""
    check_choice("kind", kind, KINDS)
    if output is not None:
        check_choice("output", output, OUTPUTS)


def backend_choice() -> str:
    """FASTFLOW_BACKEND, validated: "auto", "triton" or "reference"."""
    choice = os.environ.get("FASTFLOW_BACKEND", "auto").lower()
    if choice not in _BACKENDS:
        raise ValueError(f"FASTFLOW_BACKEND must be one of {_BACKENDS}, got {choice!r}")
    return choice


def backend_for(t: torch.Tensor) -> str:
    """"triton" or "reference" for a tensor on its device, honouring FASTFLOW_BACKEND."""
    choice = backend_choice()
    if choice == "auto":
        return "triton" if t.is_cuda else "reference"
    return choice


def _use_triton(t: torch.Tensor) -> bool:
    if backend_for(t) != "triton":
        return False
    if not t.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            "FASTFLOW_BACKEND=triton on CPU tensors needs the Triton interpreter: set "
            "TRITON_INTERPRET=1 before fastflow's kernels are first imported"
        )
    return True


def _impl(t: torch.Tensor):
    if _use_triton(t):
        from .kernels import mixture_cdf as cdf_kernels
        from .kernels import mixture_inverse as inverse_kernels

        return cdf_kernels, inverse_kernels
    return reference, reference


# The Python body of each op, by name, for :func:`call`.
BODIES: dict = {}


def _op(name: str):
    """Register the decorated function as the custom op ``fastflow::name`` (no mutation) and
    keep its plain body in BODIES."""
    def register(fn):
        BODIES[name] = fn
        return torch.library.custom_op(f"fastflow::{name}", mutates_args=())(fn)

    return register


_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)
_PLAIN_OTHERS = (str, int, bool, float, type(None))


def _plain_eager(args) -> bool:
    """Whether nothing but the op's own body needs to see this call: eager mode without
    gradient recording, no compiler, tracer, profiler, functorch transform, forward-mode AD
    level or Python mode active (a default device set by ``torch.set_default_device`` is such
    a mode), and only plain tensors (no fake, functional or other subclass; none on the meta
    device, which the registered fake implementations serve)."""
    if (torch.is_grad_enabled() or torch.compiler.is_compiling()
            or torch._C._len_torch_dispatch_stack() or torch._C._is_torch_function_mode_enabled()
            or torch._C._are_functorch_transforms_active() or torch.autograd._profiler_enabled()
            or torch._C._get_tracing_state() is not None
            or torch.autograd.forward_ad._current_level >= 0):
        return False
    for a in args:
        if type(a) in _PLAIN_OTHERS:
            continue
        for t in a if isinstance(a, list | tuple) else (a,):
            if isinstance(t, torch.Tensor) and (type(t) not in _PLAIN_TYPES or t.is_meta):
                return False
    return True


def call(name: str, *args):
    """Run op ``name``: its body directly where :func:`_plain_eager` allows (the custom-op
    dispatch adds 26-28 us of host time per call on a 2-core CPU: bench/host_overhead.py),
    else through ``torch.ops.fastflow`` so that compilers, tracers, fake tensors, modes and the
    profiler see the op."""
    if _plain_eager(args):
        return BODIES[name](*args)
    return getattr(torch.ops.fastflow, name)(*args)


def _contiguous(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Outputs are contiguous whatever the layout of the inputs, as the fake impls say."""
    return tuple(t.contiguous() for t in tensors)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return reference.mixture_cdf.compute_dtype(dtype)


def _empty_contiguous(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _fake_param_grads(x: torch.Tensor, logits: torch.Tensor):
    dtype = _compute_dtype(x.dtype)
    full = (*x.shape, logits.shape[-1])
    return [x.new_empty(full, dtype=dtype) for _ in range(3)]


# --------------------------------------------------------------------------------------------
# mixture_cdf: forward map (y, logabsdet) and its VJP
# --------------------------------------------------------------------------------------------
@_op("mixture_cdf_fwd")
def mixture_cdf_fwd(
    x: torch.Tensor, logits: torch.Tensor, loc: torch.Tensor, log_scale: torch.Tensor,
    kind: str, output: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    _check_kind_output(kind, output)
    y, lad = _impl(x)[0].mixture_cdf_fwd(x, logits, loc, log_scale, kind, output)
    return _contiguous(y, lad)


@mixture_cdf_fwd.register_fake
def _(x, logits, loc, log_scale, kind, output):
    return _empty_contiguous(x), _empty_contiguous(x)


@_op("mixture_cdf_bwd")
def mixture_cdf_bwd(
    grad_y: torch.Tensor, grad_lad: torch.Tensor, x: torch.Tensor, logits: torch.Tensor,
    loc: torch.Tensor, log_scale: torch.Tensor, kind: str, output: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_kind_output(kind, output)
    g = _impl(x)[0].mixture_cdf_bwd(grad_y, grad_lad, x, logits, loc, log_scale, kind, output)
    return _contiguous(*g)


@mixture_cdf_bwd.register_fake
def _(grad_y, grad_lad, x, logits, loc, log_scale, kind, output):
    return (x.new_empty(x.shape, dtype=_compute_dtype(x.dtype)), *_fake_param_grads(x, logits))


# --------------------------------------------------------------------------------------------
# mixture_log_prob: the density alone (the forward kernel without the CDF)
# --------------------------------------------------------------------------------------------
@_op("mixture_log_prob_fwd")
def mixture_log_prob_fwd(
    x: torch.Tensor, logits: torch.Tensor, loc: torch.Tensor, log_scale: torch.Tensor, kind: str
) -> torch.Tensor:
    _check_kind_output(kind)
    return _impl(x)[0].mixture_cdf_fwd(x, logits, loc, log_scale, kind, "density")[1].contiguous()


@mixture_log_prob_fwd.register_fake
def _(x, logits, loc, log_scale, kind):
    return _empty_contiguous(x)


@_op("mixture_log_prob_bwd")
def mixture_log_prob_bwd(
    grad: torch.Tensor, x: torch.Tensor, logits: torch.Tensor, loc: torch.Tensor,
    log_scale: torch.Tensor, kind: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_kind_output(kind)
    g = _impl(x)[0].mixture_cdf_bwd(None, grad, x, logits, loc, log_scale, kind, "density")
    return _contiguous(*g)


@mixture_log_prob_bwd.register_fake
def _(grad, x, logits, loc, log_scale, kind):
    return (x.new_empty(x.shape, dtype=_compute_dtype(x.dtype)), *_fake_param_grads(x, logits))


# --------------------------------------------------------------------------------------------
# mixture_cdf_inverse: safeguarded Newton inverse and its implicit-differentiation VJP
# --------------------------------------------------------------------------------------------
@_op("mixture_cdf_inverse_fwd")
def mixture_cdf_inverse_fwd(
    y: torch.Tensor, logits: torch.Tensor, loc: torch.Tensor, log_scale: torch.Tensor,
    kind: str, output: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    _check_kind_output(kind, output)
    if _use_triton(y):
        from .kernels import mixture_inverse

        x, lad = mixture_inverse.mixture_cdf_inverse_fwd(
            y, logits, loc, log_scale, kind, output, MAX_STEPS
        )
    else:
        x, lad = reference.mixture_cdf_inverse_fwd(y, logits, loc, log_scale, kind, output)
    return _contiguous(x, lad)


@mixture_cdf_inverse_fwd.register_fake
def _(y, logits, loc, log_scale, kind, output):
    return _empty_contiguous(y), _empty_contiguous(y)


@_op("mixture_cdf_inverse_bwd")
def mixture_cdf_inverse_bwd(
    grad_x: torch.Tensor, grad_lad: torch.Tensor, x: torch.Tensor, logits: torch.Tensor,
    loc: torch.Tensor, log_scale: torch.Tensor, kind: str, output: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_kind_output(kind, output)
    g = _impl(x)[1].mixture_cdf_inverse_bwd(
        grad_x, grad_lad, x, logits, loc, log_scale, kind, output
    )
    return _contiguous(*g)


@mixture_cdf_inverse_bwd.register_fake
def _(grad_x, grad_lad, x, logits, loc, log_scale, kind, output):
    return (x.new_empty(x.shape, dtype=_compute_dtype(x.dtype)), *_fake_param_grads(x, logits))


# --------------------------------------------------------------------------------------------
# masked_linear: y = act(x @ (W * M)^T + b), all-zero mask tiles skipped in the kernel
# --------------------------------------------------------------------------------------------
@_op("masked_linear_fwd")
def masked_linear_fwd(
    x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, bias: torch.Tensor | None,
    activation: str,
) -> torch.Tensor:
    if _use_triton(x):
        from .kernels import made as made_kernels

        return made_kernels.masked_linear_fwd(x, weight, mask, bias, activation)
    return reference.masked_linear_fwd(x, weight, mask, bias, activation).contiguous()


@masked_linear_fwd.register_fake
def _(x, weight, mask, bias, activation):
    return x.new_empty((x.shape[0], weight.shape[0]))


def _masked_linear_setup(ctx, inputs, output):
    x, weight, mask, bias, activation = inputs
    ctx.save_for_backward(x, weight, mask, output)
    ctx.has_bias, ctx.activation = bias is not None, activation


def _masked_linear_backward(ctx, grad):
    """Plain matmuls: cuBLAS does the backward well; the mask zeroes the weight grads."""
    x, weight, mask, y = ctx.saved_tensors
    if ctx.activation == "relu":
        grad = grad * (y > 0)
    grad_x = grad @ (weight * mask)
    grad_w = (grad.transpose(0, 1) @ x) * mask
    grad_b = grad.sum(0) if ctx.has_bias else None
    return grad_x, grad_w, None, grad_b, None


torch.library.register_autograd(
    "fastflow::masked_linear_fwd", _masked_linear_backward, setup_context=_masked_linear_setup
)


# --------------------------------------------------------------------------------------------
# made_head: the MADE output layer fused with the mixture-CDF forward
# --------------------------------------------------------------------------------------------
@_op("made_head_fwd")
def made_head_fwd(
    h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, limits: torch.Tensor,
    x: torch.Tensor, components: int, kind: str, output: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    if _use_triton(x):
        from .kernels import made as made_kernels

        return made_kernels.made_head_fwd(h, weight, bias, limits, x, components, kind, output)
    y, lad = reference.made.made_head_fwd(h, weight, bias, limits, x, components, kind, output)
    return _contiguous(y, lad)


@made_head_fwd.register_fake
def _(h, weight, bias, limits, x, components, kind, output):
    return _empty_contiguous(x), _empty_contiguous(x)


def _made_head_setup(ctx, inputs, output):
    h, weight, bias, limits, x, components, kind, out = inputs
    ctx.save_for_backward(h, weight, bias, limits, x)
    ctx.components, ctx.kind, ctx.output = components, kind, out


def _made_head_backward(ctx, grad_y, grad_lad):
    """Recompute the parameters (one matmul), take the mixture-CDF VJP, then the layer's."""
    h, weight, bias, limits, x = ctx.saved_tensors
    K = ctx.components
    params = reference.made.made_head_params(h, weight, bias, limits, K)
    g_x, *g_params = torch.ops.fastflow.mixture_cdf_bwd(
        grad_y, grad_lad, x, *params, ctx.kind, ctx.output)
    g_out = torch.cat(g_params, dim=-1).reshape(h.shape[0], -1).to(h.dtype)
    mask = reference.made.head_mask(limits, K, h.shape[1]).to(weight.dtype)
    grad_h = g_out @ (weight * mask)
    grad_w = (g_out.transpose(0, 1) @ h) * mask
    return grad_h, grad_w, g_out.sum(0), None, g_x.to(x.dtype), None, None, None


torch.library.register_autograd(
    "fastflow::made_head_fwd", _made_head_backward, setup_context=_made_head_setup
)


# --------------------------------------------------------------------------------------------
# autoregressive_solve: a degree-sorted MADE's sequential direction in one pass (no autograd:
# the modules take the D-pass route when gradients are needed)
# --------------------------------------------------------------------------------------------
@_op("autoregressive_solve")
def autoregressive_solve(
    values: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor],
    table: torch.Tensor, order: torch.Tensor, out_weight: torch.Tensor, out_bias: torch.Tensor,
    components: int, kind: str, output: str, invert: bool, residual: bool, activation: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    args = (values, weights, biases, table, order, out_weight, out_bias, components, kind,
            output, invert, residual, activation)
    if activation == "relu" and _use_triton(values):
        from .kernels import autoregressive as ar_kernels

        return ar_kernels.autoregressive_solve(*args, max_steps=MAX_STEPS)
    return _contiguous(*reference.autoregressive.autoregressive_solve(*args))


@autoregressive_solve.register_fake
def _(values, weights, biases, table, order, out_weight, out_bias, components, kind, output,
      invert, residual, activation):
    return _empty_contiguous(values), _empty_contiguous(values)
