"""The machinery every fastflow op shares: registration as a torch.library custom op, the
eager fast path, torch.func support, higher derivatives and batching rules.

Each op lives in its own module (:mod:`.mixture_cdf`, :mod:`.mixture_inverse`, :mod:`.made`,
:mod:`.autoregressive`): the custom op ``fastflow::<name>`` with its fake implementation, its
derivative (registered with :func:`register_autograd` and shared with the op's public
autograd.Function; the one-pass solve has none, as it runs only without gradients) and its
batching rule. Ops take already validated tensors (the checks are in :mod:`fastflow.checks`);
x of shape S and parameters broadcast (expanded) to S + (K,).
Forward ops return outputs in x's dtype; backward ops return per-element gradients in the
compute dtype (float64 for float64 inputs, float32 otherwise), which the Functions reduce over
broadcast dimensions. Where each op runs is decided in :mod:`.dispatch`.

torch.func: every op has a batching rule (``torch.library.register_vmap``), and on tensors of
a torch.func transform :func:`call` applies the op through a setup_context-style
autograd.Function carrying its registered derivative (:func:`_function`), since the grad
transforms refuse the old-style Function that applies a custom op's registered derivative.
:func:`recorded` decides when a backward must itself be differentiable.
"""

from __future__ import annotations

import torch

from ..reference import naive

# The Python body of each op, by name, for :func:`call`.
BODIES: dict = {}
# Each op's treatment under torch.autocast, by name: "float32" (floating inputs cast to
# float32, as autocast treats its own float32 ops: the mixture maps, their inverse and the
# solve keep float32 numerics) or "lower" (cast to the region's dtype: MADE's products).
AUTOCAST: dict = {}
AUTOCAST_DEVICES = ("cpu", "cuda")


def op(name: str, autocast: str = "float32"):
    """Register the decorated function as the custom op ``fastflow::name`` (no mutation) and
    keep its plain body in BODIES; ``autocast`` as in AUTOCAST."""
    def register(fn):
        BODIES[name] = fn
        AUTOCAST[name] = autocast
        custom = torch.library.custom_op(f"fastflow::{name}", mutates_args=())(fn)
        if autocast == "float32":  # for direct torch.ops.fastflow calls; call() casts itself
            for device in AUTOCAST_DEVICES:
                torch.library.register_autocast(f"fastflow::{name}", device, torch.float32)
        return custom

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
    dispatch adds 26-28 us of host time per call on a 2-core CPU:
    bench/investigations/host_overhead.py), on tensors of a torch.func transform through the op's
    autograd.Function (:func:`_function`), else through ``torch.ops.fastflow`` so that compilers,
    tracers, fake tensors, modes and the profiler see the op."""
    if _any_autocast():
        device = _autocast_device(args)
        if device is not None:
            return _call_autocast(name, device, args)
    if _plain_eager(args):
        return BODIES[name](*args)
    refuse_dual_tensors(args)
    if not torch.compiler.is_compiling() and _transformed(args):
        return _function(name).apply(*args)
    return getattr(torch.ops.fastflow, name)(*args)


_any_autocast = getattr(torch._C, "_is_any_autocast_enabled",
                        lambda: any(map(torch.is_autocast_enabled, AUTOCAST_DEVICES)))


def _autocast_device(args) -> str | None:
    """The device type of the first tensor argument if autocast is on for it, else None."""
    for a in args:
        t = a[0] if isinstance(a, list | tuple) and a else a
        if isinstance(t, torch.Tensor):
            device = t.device.type
            return device if (device in AUTOCAST_DEVICES
                              and torch.is_autocast_enabled(device)) else None
    return None


def _call_autocast(name: str, device: str, args):
    """Op ``name`` in an autocast region: its floating inputs (but float64) cast as AUTOCAST
    says, and the op run with autocast off, so that the ops inside it see the dtypes it
    chose."""
    target = (torch.float32 if AUTOCAST[name] == "float32"
              else torch.get_autocast_dtype(device))

    def cast(a):
        if isinstance(a, list | tuple):
            return type(a)(cast(t) for t in a)
        if isinstance(a, torch.Tensor) and a.is_floating_point() and a.dtype != torch.float64:
            return a.to(target)
        return a

    with torch.autocast(device, enabled=False):
        return call(name, *(cast(a) for a in args))


def _transformed(args) -> bool:
    """Whether a tensor argument is wrapped by a torch.func transform (vmap, grad, jvp)."""
    for a in args:
        for t in a if isinstance(a, list | tuple) else (a,):
            if isinstance(t, torch.Tensor) and _functorch.is_functorch_wrapped_tensor(t):
                return True
    return False


def func_vjp(fn, primals, cotangents, needs):
    """Gradients of ``fn`` at ``primals`` for ``cotangents`` by ``torch.func.vjp`` (which
    records for higher derivatives, under autograd and under the torch.func transforms), in
    each primal's dtype; None where not needed."""
    out, vjp_fn = torch.func.vjp(fn, *primals)
    outs = out if isinstance(out, tuple) else (out,)
    cots = tuple(c.to(o.dtype) for c, o in zip(cotangents, outs, strict=True))
    grads = vjp_fn(cots if isinstance(out, tuple) else cots[0])
    return tuple(g if n else None for g, n in zip(grads, needs, strict=True))


_DUAL_TENSORS = ("fastflow's ops take forward-mode derivatives through torch.func.jvp and "
                 "torch.func.jacfwd; torch.autograd.forward_ad's dual tensors are not "
                 "supported (use torch.func.jvp(f, primals, tangents) instead)")


def refuse_dual_tensors(args) -> None:
    """NotImplementedError where a tensor argument carries a forward-mode tangent of
    ``torch.autograd.forward_ad`` outside the torch.func transforms: the ops' forward-mode
    derivative is a ``torch.func.jvp``, which that API's level cannot nest."""
    if (torch.autograd.forward_ad._current_level < 0
            or torch._C._are_functorch_transforms_active()):
        return
    for a in args:
        for t in a if isinstance(a, list | tuple) else (a,):
            if isinstance(t, torch.Tensor) and \
                    torch.autograd.forward_ad.unpack_dual(t).tangent is not None:
                raise NotImplementedError(_DUAL_TENSORS)


def func_jvp(fn, primals, tangents, dtypes):
    """Tangents of ``fn``'s outputs by ``torch.func.jvp``, cast to ``dtypes`` (those of the
    Function's outputs). Inputs without a tangent get zeros."""
    if not torch._C._are_functorch_transforms_active():
        raise NotImplementedError(_DUAL_TENSORS)  # a forward_ad level (see refuse_dual_tensors)
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


def contiguous(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Outputs are contiguous whatever the layout of the inputs, as the fake impls say."""
    return tuple(t.contiguous() for t in tensors)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64, float32 otherwise (half precision is computed in float32)."""
    return naive.compute_dtype(dtype)


def empty_contiguous(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def fake_param_grads(x: torch.Tensor, logits: torch.Tensor):
    dtype = compute_dtype(x.dtype)
    full = (*x.shape, logits.shape[-1])
    return [x.new_empty(full, dtype=dtype) for _ in range(3)]


# --------------------------------------------------------------------------------------------
# The public autograd.Functions' shared pieces
# --------------------------------------------------------------------------------------------
def reduce_grad(grad: torch.Tensor | None, like: torch.Tensor, needed: bool):
    """Sum a per-element grad over broadcast dimensions (in its float32/64) and cast."""
    if grad is None or not needed:
        return None
    if grad.shape != like.shape:
        grad = grad.sum_to_size(like.shape)
    return grad if grad.dtype == like.dtype else grad.to(like.dtype)


def grads_out(grads, inputs, needs):
    """Per-element gradients reduced to their inputs' shapes and dtypes."""
    return tuple(reduce_grad(g, t, n) for g, t, n in zip(grads, inputs, needs, strict=True))


def eager_twin(fn: type) -> type:
    """The Function ``fn`` in the old style (forward taking ctx), with the same forward,
    saved state and backward, applied outside torch.func transforms.

    ``autograd.Function.apply`` binds the arguments of a setup_context-style Function to
    its forward's signature (``inspect.signature``) on every call, about 20 us of host time
    on a 2-core CPU, as much as the rest of a small op's host overhead; the old style skips
    that, but the torch.func transforms accept only the setup_context style. Without ``jvp``
    (forward mode goes through ``fn``), which torch.compile does not trace.
    """
    def forward(ctx, *args):
        output = fn.forward(*args)
        fn.save(ctx, args, output)
        return output

    return type(f"{fn.__name__}Eager", (torch.autograd.Function,), {
        "__doc__": f"{fn.__name__} in the old style, for calls outside torch.func transforms.",
        "forward": staticmethod(forward),
        "backward": staticmethod(fn.backward),
    })


def eager() -> bool:
    """Whether to apply the old-style twins: outside torch.func transforms and forward-mode
    AD, and while torch.compile traces (which takes either style, but no custom jvp)."""
    return torch.compiler.is_compiling() or not (
        torch._C._are_functorch_transforms_active()
        or torch.autograd.forward_ad._current_level >= 0)


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


def vmap_elementwise(name: str) -> None:
    """The mixture ops are elementwise over x's shape S, with every tensor argument of shape
    S or S + (K,) (parameters expanded): a batch is S's new leading dimension."""
    op = getattr(torch.ops.fastflow, name)

    def rule(info, in_dims, *args):
        out = op(*_front(info, in_dims, args))
        return out, _zero_dims(out)

    torch.library.register_vmap(f"fastflow::{name}", rule)


def vmap_rows(name: str, rows: tuple[int, ...], row_aligned: tuple[int, ...] = ()):
    """Ops over independent rows (the first dimension of the arguments at positions
    ``rows``; every other tensor argument shared): a batch folds into the rows when only
    those arguments are batched; otherwise the op runs once per batch entry (a batch of
    weights, as in an ensemble). At positions ``row_aligned`` (a tensor or a list of them),
    a tensor of two or more dimensions holds one row per row of the values (biases with a
    context's term folded in): it folds with them, batched or not (then repeated per batch
    entry); a one-dimensional one is shared."""
    op = getattr(torch.ops.fastflow, name)

    def items(a, d):
        return (list(zip(a, d or [None] * len(a), strict=True)) if isinstance(a, list | tuple)
                else [(a, d)])

    def per_row(t, d):
        return isinstance(t, torch.Tensor) and t.dim() - (d is not None) >= 2

    def fold(info, t, d):
        return _front(info, [d], [t])[0].flatten(0, 1)

    def rule(info, in_dims, *args):
        B = info.batch_size
        shared = all(e is None or (i in row_aligned and per_row(t, e))
                     for i, (a, d) in enumerate(zip(args, in_dims, strict=True)) if i not in rows
                     for t, e in items(a, d))
        if shared:
            flat = []
            for i, (a, d) in enumerate(zip(args, in_dims, strict=True)):
                if i in rows:
                    flat.append(fold(info, a, d))
                elif i in row_aligned:
                    done = [fold(info, t, e) if per_row(t, e) else t for t, e in items(a, d)]
                    flat.append(done if isinstance(a, list | tuple) else done[0])
                else:
                    flat.append(a)
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

