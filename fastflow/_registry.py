"""torch.library registrations of fastflow's ops, with fake impls and the one backend switch.

Backend selection lives here and only here: CUDA tensors run the Triton kernels; CPU tensors
run the pure-PyTorch reference, unless ``FASTFLOW_BACKEND=triton`` (with ``TRITON_INTERPRET=1``
set before the first import of the kernels) sends them through the interpreted kernels.
``FASTFLOW_BACKEND=reference`` forces the reference everywhere.

Ops take already validated tensors: x of shape S and parameters broadcast (expanded) to
S + (K,). Forward ops return outputs in x's dtype; backward ops return per-element gradients
in the compute dtype (float64 for float64 inputs, float32 otherwise), which the autograd layer
reduces over broadcast dimensions.

torch.func: every op has a batching rule (``torch.library.register_vmap``), and on tensors of
a torch.func transform :func:`call` applies the op through a setup_context-style
autograd.Function carrying its registered derivative (:func:`_function`), since the grad
transforms refuse the old-style Function that applies a custom op's registered derivative.
:func:`recorded` decides when a backward must itself be differentiable.
"""

from __future__ import annotations

import os

import torch

from . import reference
from .reference import naive

# The inverse's iteration budget. The kernels iterate safeguarded Halley per tile until every
# element has converged, capped at MAX_STEPS iterations (a compile-time constant: the worst
# case of the earlier fixed schedule). reference.naive's inverse_fixed runs
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
_functorch = torch._C._functorch
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
    on tensors of a torch.func transform through the op's autograd.Function
    (:func:`_function`), else through ``torch.ops.fastflow`` so that compilers, tracers, fake
    tensors, modes and the profiler see the op."""
    if _plain_eager(args):
        return BODIES[name](*args)
    if not torch.compiler.is_compiling() and _transformed(args):
        return _function(name).apply(*args)
    return getattr(torch.ops.fastflow, name)(*args)


def _transformed(args) -> bool:
    """Whether a tensor argument is wrapped by a torch.func transform (vmap, grad, jvp)."""
    for a in args:
        for t in a if isinstance(a, list | tuple) else (a,):
            if isinstance(t, torch.Tensor) and _functorch.is_functorch_wrapped_tensor(t):
                return True
    return False


# --------------------------------------------------------------------------------------------
# Differentiable formulations (higher derivatives and forward mode): plain PyTorch through
# the reference's log-space forward, in the compute dtype (half precision in float32).
# --------------------------------------------------------------------------------------------
def cdf_map(kind: str, output: str):
    """(x, logits, loc, log_scale) -> (y, logabsdet) (or logabsdet alone for "density"),
    in the compute dtype, with the parameters broadcast inside (their gradients summed)."""
    def fn(x, logits, loc, log_scale):
        x, logits, loc, log_scale = naive.upcast(x, logits, loc, log_scale)
        y, lad = naive.forward(x, *expand_params(x, logits, loc, log_scale), kind, output)
        return lad if output == "density" else (y, lad)
    return fn


def newton_inverse(x_star: torch.Tensor, kind: str, output: str):
    """(y, logits, loc, log_scale) -> (x, logabsdet) of the inverse, differentiable: two
    Newton steps x <- x - (g(x) - t) / g'(x) on g = logit F, from the solution x* (a
    constant), towards the target t = logit-space y.

    At the root Newton's map has zero derivative in x, so each step squares the error of its
    start as a function of (y, parameters): x2 agrees with the exact inverse to fourth order
    about the current point, and its derivatives up to the third are those of the inverse
    (the first are the implicit-function gradients). logabsdet = -(the forward's at x2) for
    the requested output. Elements whose solution is not finite (the boundary targets
    z = 0, 1, and NaN) get zero gradients, as in the first-order backward: they start at the
    location of their heaviest component, where g and g' are finite, with that point's own
    g as the target (a fixed point), so that no inf or NaN reaches a gradient.
    """
    def fn(y, logits, loc, log_scale):
        y, logits, loc, log_scale = naive.upcast(y, logits, loc, log_scale)
        logits, loc, log_scale = expand_params(y, logits, loc, log_scale)
        finite = torch.isfinite(x_star)
        with torch.no_grad():
            x_far = loc.gather(-1, logits.argmax(-1, keepdim=True)).squeeze(-1)
            x = torch.where(finite, x_star.to(y.dtype), x_far)
            t_far = naive.forward(x, logits, loc, log_scale, kind, "logit")[0]
        # The target, with y masked before the logit (its derivative is infinite at 0, 1).
        safe = torch.where(finite, y, 0.5 if output == "unit" else 0.0)
        t = torch.where(finite, naive.target_logit(safe, output), t_far)
        for _ in range(2):
            g, log_slope = naive.forward(x, logits, loc, log_scale, kind, "logit")
            x = x - (g - t) * torch.exp(-log_slope)
        lad = -naive.forward(x, logits, loc, log_scale, kind, output)[1]
        # Only derivatives are read from these outputs; at the boundary, the solver's values.
        return (torch.where(finite, x, x_star.to(x.dtype)),
                torch.where(finite, lad, torch.inf))
    return fn


def func_vjp(fn, primals, cotangents, needs):
    """Gradients of ``fn`` at ``primals`` for ``cotangents`` by ``torch.func.vjp`` (which
    records for higher derivatives, under autograd and under the torch.func transforms), in
    each primal's dtype; None where not needed."""
    out, vjp_fn = torch.func.vjp(fn, *primals)
    outs = out if isinstance(out, tuple) else (out,)
    cots = tuple(c.to(o.dtype) for c, o in zip(cotangents, outs, strict=True))
    grads = vjp_fn(cots if isinstance(out, tuple) else cots[0])
    return tuple(g if n else None for g, n in zip(grads, needs, strict=True))


def func_jvp(fn, primals, tangents, dtypes):
    """Tangents of ``fn``'s outputs by ``torch.func.jvp``, cast to ``dtypes`` (those of the
    Function's outputs). Inputs without a tangent get zeros."""
    tangents = tuple(torch.zeros_like(p) if t is None else t.to(p.dtype)
                     for p, t in zip(primals, tangents, strict=True))
    out = torch.func.jvp(fn, primals, tangents)[1]
    outs = out if isinstance(out, tuple) else (out,)
    res = tuple(o.to(d) for o, d in zip(outs, dtypes, strict=True))
    return res if isinstance(out, tuple) else res[0]


# --------------------------------------------------------------------------------------------
# torch.func: the ops as autograd.Functions, and when a backward must itself be recorded
# --------------------------------------------------------------------------------------------
# Derivatives registered on ops, by name: (setup_context, backward, differentiable).
_AUTOGRAD: dict = {}
# The autograd.Function of each op used so far under torch.func, by name.
_FUNCTIONS: dict = {}


def register_autograd(name: str, backward, setup_context, differentiable=None) -> None:
    """``torch.library.register_autograd`` for op ``name``, keeping the formula for the op's
    autograd.Function as well. ``differentiable(output, *args)``, if given: the op's outputs
    recomputed in plain PyTorch from its arguments (and its own output, for an inverse),
    through which the Function's forward-mode derivative (``jvp``) is taken."""
    torch.library.register_autograd(f"fastflow::{name}", backward, setup_context=setup_context)
    _AUTOGRAD[name] = (setup_context, backward, differentiable)
    _FUNCTIONS.pop(name, None)


def _no_setup(ctx, inputs, output):
    pass


def _function(name: str):
    """Op ``name`` as a torch.autograd.Function in the setup_context style with a generated
    vmap rule, for calls under torch.func transforms.

    A custom op's registered derivative is applied by an autograd.Function in the old style,
    which the torch.func grad transforms refuse (even where nothing will be differentiated,
    as for a backward op called inside a backward they run). This Function calls the op
    (the op's batching rule serves vmap) and carries the op's registered derivative, and a
    forward-mode one where the op has a plain-PyTorch formulation; an op without a
    derivative gets a backward that raises.
    """
    fn = _FUNCTIONS.get(name)
    if fn is not None:
        return fn
    op = getattr(torch.ops.fastflow, name)

    def no_derivative(ctx, *grads):
        raise RuntimeError(
            f"fastflow::{name} has no derivative. fastflow's backward ops are differentiated "
            "by recomputing them in PyTorch wherever a transform or autograd outside the one "
            "running the backward records it; a second derivative taken at the same "
            "torch.func level as the first (torch.autograd.grad(..., create_graph=True) "
            "inside a function that torch.func.grad transforms) is not supported: nest the "
            "torch.func transforms instead (grad(grad(f)), jacrev(jacrev(f)), hessian(f))")

    setup, backward, differentiable = _AUTOGRAD.get(name, (_no_setup, no_derivative, None))
    attrs = {"generate_vmap_rule": True, "forward": staticmethod(lambda *args: op(*args)),
             "setup_context": staticmethod(setup), "backward": staticmethod(backward)}
    if differentiable is not None:
        attrs["setup_context"] = staticmethod(_setup_with_forward_mode(setup))
        attrs["jvp"] = staticmethod(_forward_mode(differentiable))
    fn = type(f"{name}_function", (torch.autograd.Function,), attrs)
    _FUNCTIONS[name] = fn
    return fn


def _setup_with_forward_mode(setup):
    """The registered setup_context, and what :func:`_forward_mode` needs: every tensor
    argument and output saved for forward, the other arguments and the output's layout."""
    def setup_both(ctx, inputs, output):
        setup(ctx, inputs, output)
        outs = output if isinstance(output, tuple) else (output,)
        ctx.fwd_positions = [i for i, a in enumerate(inputs) if isinstance(a, torch.Tensor)]
        ctx.fwd_others = [None if isinstance(a, torch.Tensor) else a for a in inputs]
        ctx.fwd_outputs = (len(outs), isinstance(output, tuple), [o.dtype for o in outs])
        ctx.save_for_forward(*(inputs[i] for i in ctx.fwd_positions), *outs)
    return setup_both


def _forward_mode(differentiable):
    """A Function's jvp by ``torch.func.jvp`` through ``differentiable(output, *args)``:
    tangents of the floating-point arguments in, tangents of the outputs out."""
    def jvp(ctx, *tangents):
        n_out, is_tuple, dtypes = ctx.fwd_outputs
        saved = ctx.saved_tensors
        outs = saved[len(saved) - n_out:]
        args = list(ctx.fwd_others)
        for i, t in zip(ctx.fwd_positions, saved, strict=False):
            args[i] = t
        floats = [i for i in ctx.fwd_positions if args[i].is_floating_point()]

        def fn(*primals):
            full = list(args)
            for i, p in zip(floats, primals, strict=True):
                full[i] = p
            return differentiable(outs if is_tuple else outs[0], *full)

        return func_jvp(fn, tuple(args[i] for i in floats),
                        tuple(tangents[i] for i in floats), dtypes)
    return jvp


def _outer_grad_level(t: torch.Tensor):
    """The level of t's outermost torch.func grad wrapper (batched wrappers of vmap levels
    may lie outside it), None if it has none; negative for a level already exited (the
    saved inputs of ``torch.func.vjp``'s and ``jacrev``'s backward, run after their level
    has closed)."""
    while _functorch.is_functorch_wrapped_tensor(t):
        if _functorch.is_gradtrackingtensor(t):
            return _functorch.maybe_get_level(t)
        t = _functorch.get_unwrapped(t)
    return None


def recorded(saved, cotangents) -> bool:
    """Whether a backward computed now must itself be differentiable.

    ``saved``: the inputs the forward saved; ``cotangents``: the backward's incoming grads.
    Under plain autograd: grad mode is on inside it (``create_graph=True``) and some tensor
    requires grad. Under torch.func: a forward-mode level is open (``jvp``, ``jacfwd``,
    ``hessian``), or some tensor is tracked by another live grad level than the one whose
    backward runs (the highest level among the saved inputs' outermost grad wrappers, or an
    exited one where there is one), or by plain autograd outside the transforms: an
    enclosing ``grad``/``jacrev``, as in ``jacrev(jacrev(f))``. The running level records
    the backward too (``torch.func.grad`` differentiates with ``create_graph=True``), but
    nothing differentiates that record, so ``grad``, ``vmap(grad)`` and ``jacrev`` alone
    take the first-order backward ops (batched under vmap).
    """
    if not torch.is_grad_enabled() and torch.autograd.forward_ad._current_level < 0:
        return False
    if torch.autograd.forward_ad._current_level >= 0:
        return True
    tensors = [t for t in (*saved, *cotangents) if t is not None]
    if not any(_functorch.is_functorch_wrapped_tensor(t) for t in tensors):
        return any(t.requires_grad for t in tensors)
    from torch._functorch.pyfunctorch import TransformType, retrieve_all_functorch_interpreters

    if any(i.key() == TransformType.Jvp for i in retrieve_all_functorch_interpreters()):
        return True
    levels = [lv for lv in map(_outer_grad_level, saved) if lv is not None]
    running = None if not levels else (min(levels) if min(levels) < 0 else max(levels))
    for t in tensors:
        while _functorch.is_functorch_wrapped_tensor(t):
            if _functorch.is_gradtrackingtensor(t) and t.requires_grad:
                level = _functorch.maybe_get_level(t)
                if level >= 0 and level != running:
                    return True
            t = _functorch.get_unwrapped(t)
        if t.requires_grad:
            return True
    return False


def expand_params(x: torch.Tensor, *params: torch.Tensor) -> list[torch.Tensor]:
    """The parameters broadcast (as views) to x.shape + (K,), as the mixture ops take them."""
    full = (*x.shape, params[0].shape[-1])
    return [p.expand(full) for p in params]


def _contiguous(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Outputs are contiguous whatever the layout of the inputs, as the fake impls say."""
    return tuple(t.contiguous() for t in tensors)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return naive.compute_dtype(dtype)


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


register_autograd("masked_linear_fwd", _masked_linear_backward, _masked_linear_setup,
                  lambda out, *args: reference.masked_linear_fwd(*args))


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
    """Recompute the parameters (one matmul), take the mixture-CDF VJP, then the layer's.
    Where the backward itself is recorded (:func:`recorded`), by ``torch.func.vjp`` through
    the parameters and the log-space forward instead (differentiable to any order)."""
    h, weight, bias, limits, x = ctx.saved_tensors
    K = ctx.components
    if recorded((h, weight, bias, x), (grad_y, grad_lad)):
        def head(h, weight, bias, x):
            return _made_head_differentiable(None, h, weight, bias, limits, x, K, ctx.kind,
                                             ctx.output)

        g_h, g_w, g_b, g_x = func_vjp(head, (h, weight, bias, x), (grad_y, grad_lad),
                                       (True,) * 4)
        return g_h, g_w, g_b, None, g_x, None, None, None
    params = reference.made.made_head_params(h, weight, bias, limits, K)
    g_x, *g_params = call("mixture_cdf_bwd", grad_y, grad_lad, x, *params, ctx.kind,
                          ctx.output)
    g_out = torch.cat(g_params, dim=-1).reshape(h.shape[0], -1).to(h.dtype)
    mask = reference.made.head_mask(limits, K, h.shape[1]).to(weight.dtype)
    grad_h = g_out @ (weight * mask)
    grad_w = (g_out.transpose(0, 1) @ h) * mask
    return grad_h, grad_w, g_out.sum(0), None, g_x.to(x.dtype), None, None, None


def _made_head_differentiable(out, h, weight, bias, limits, x, components, kind, output):
    params = reference.made.made_head_params(h, weight, bias, limits, components)
    return cdf_map(kind, output)(x, *params)


register_autograd("made_head_fwd", _made_head_backward, _made_head_setup,
                  _made_head_differentiable)


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


# --------------------------------------------------------------------------------------------
# Batching rules (torch.vmap, and the torch.func transforms built on it): each op runs once
# on the whole batch. The rules receive the tensors below their vmap level, with the vmapped
# dimension at ``in_dims`` (None: not batched), and call the op again through
# ``torch.ops.fastflow``, so that an enclosing vmap level batches that call in turn. (They run
# inside the forward of an op's autograd.Function, below every grad level, which that
# Function serves; an autograd.Function cannot be applied inside a batching rule.)
# --------------------------------------------------------------------------------------------
def _front(info, in_dims, args) -> list:
    """Tensor arguments with the vmapped dimension first; unbatched ones expanded (views)."""
    out = []
    for a, d in zip(args, in_dims, strict=True):
        if not isinstance(a, torch.Tensor):
            out.append(a)
        elif d is None:
            out.append(a.expand(info.batch_size, *a.shape))
        else:
            out.append(a.movedim(d, 0))
    return out


def _zero_dims(out):
    return tuple(0 for _ in out) if isinstance(out, tuple | list) else 0


def _vmap_elementwise(name: str) -> None:
    """The mixture ops are elementwise over x's shape S, with every tensor argument of shape
    S or S + (K,) (parameters expanded): a batch is S's new leading dimension."""
    op = getattr(torch.ops.fastflow, name)

    def rule(info, in_dims, *args):
        out = op(*_front(info, in_dims, args))
        return out, _zero_dims(out)

    torch.library.register_vmap(f"fastflow::{name}", rule)


for _name in ("mixture_cdf_fwd", "mixture_cdf_bwd", "mixture_log_prob_fwd",
              "mixture_log_prob_bwd", "mixture_cdf_inverse_fwd", "mixture_cdf_inverse_bwd"):
    _vmap_elementwise(_name)


def _vmap_rows(name: str, rows: tuple[int, ...]):
    """Ops over independent rows (the first dimension of the arguments at positions
    ``rows``; every other tensor argument shared): a batch folds into the rows when only
    those arguments are batched; otherwise the op runs once per batch entry (a batch of
    weights, as in an ensemble)."""
    op = getattr(torch.ops.fastflow, name)

    def rule(info, in_dims, *args):
        shared = all(d is None for i, d in enumerate(in_dims)
                     if i not in rows and not isinstance(d, list | tuple))
        shared &= all(d is None or all(e is None for e in d) for d in in_dims
                      if isinstance(d, list | tuple))
        B = info.batch_size
        if shared:
            front = _front(info, [d if i in rows else None for i, d in enumerate(in_dims)],
                           [a if i in rows else None for i, a in enumerate(args)])
            flat = [front[i].flatten(0, 1) if i in rows else a for i, a in enumerate(args)]
            out = op(*flat)
            outs = out if isinstance(out, tuple) else (out,)
            outs = tuple(o.unflatten(0, (B, -1)) for o in outs)
            return (outs if isinstance(out, tuple) else outs[0]), _zero_dims(out)
        def pick(a, d, b):
            if isinstance(a, list | tuple):
                return [pick(t, e, b) for t, e in zip(a, d or [None] * len(a), strict=True)]
            return a if d is None else a.select(d, b)
        results = [op(*(pick(a, d, b) for a, d in zip(args, in_dims, strict=True)))
                   for b in range(B)]
        if isinstance(results[0], tuple):
            out = tuple(torch.stack(r) for r in zip(*results, strict=True))
        else:
            out = torch.stack(results)
        return out, _zero_dims(out)

    torch.library.register_vmap(f"fastflow::{name}", rule)


_vmap_rows("masked_linear_fwd", (0,))
_vmap_rows("made_head_fwd", (0, 4))
_vmap_rows("autoregressive_solve", (0,))
