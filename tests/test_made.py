"""masked_linear: the kernel against the reference (values and gradients), tile skipping, and
the reference against a dense matmul with the mask multiplied in."""

import pytest
import torch
from fastflow.kernels import made as made_kernels
from fastflow.kernels.made import block_sizes, nonzero_tiles

import fastflow
from fastflow.nn import AutoregressiveMixtureFlow
from fastflow.nn.made import MADE

from conftest import DEVICE

SHAPES = [
    pytest.param(5, 37, 23, id="5x37<-23"),
    pytest.param(70, 64, 128, id="70x64<-128"),
    pytest.param(1, 3, 1, id="1x3<-1"),
]


def _made_mask(n_out, n_in, seed=0, degrees=6):
    """A block-triangular mask as MADE builds it (degrees sorted)."""
    gen = torch.Generator().manual_seed(seed)
    d_in = torch.randint(1, degrees, (n_in,), generator=gen).sort().values
    d_out = torch.randint(1, degrees, (n_out,), generator=gen).sort().values
    return (d_out[:, None] >= d_in[None, :]).float()


def _run(backend, monkeypatch, x, w, mask, b, activation):
    monkeypatch.setenv("FASTFLOW_BACKEND", backend)
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, b)]
    y = fastflow.masked_linear(leaves[0], leaves[1], mask, leaves[2], activation=activation)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=y.dtype).to(y)
    return y, torch.autograd.grad((y * g).sum(), leaves)


@pytest.mark.parametrize("activation", ["identity", "relu"])
@pytest.mark.parametrize("M,N,K", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_kernel_matches_reference(monkeypatch, dtype, M, N, K, activation):
    x = torch.randn(M, K, dtype=dtype, device=DEVICE)
    w = torch.randn(N, K, dtype=dtype, device=DEVICE)
    b = torch.randn(N, dtype=dtype, device=DEVICE)
    mask = _made_mask(N, K).to(dtype=dtype, device=DEVICE)
    got = _run("triton", monkeypatch, x, w, mask, b, activation)
    want = _run("reference", monkeypatch, x, w, mask, b, activation)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got[0], want[0], **tol)
    for g, w_ in zip(got[1], want[1], strict=True):
        torch.testing.assert_close(g, w_, **tol)


def test_reference_is_dense_matmul_with_mask():
    x, w, b = torch.randn(4, 6), torch.randn(5, 6), torch.randn(5)
    mask = _made_mask(5, 6)
    y = fastflow.masked_linear(x, w, mask, b, activation="relu")
    want = torch.relu(x @ (w * mask).T + b)
    torch.testing.assert_close(y, want)


def test_tile_table_marks_exactly_the_nonzero_tiles():
    mask = _made_mask(100, 70, seed=2, degrees=30)
    tiles = nonzero_tiles(mask, 32, 16)
    for i in range(tiles.shape[0]):
        for j in range(tiles.shape[1]):
            block = mask[i * 32:(i + 1) * 32, j * 16:(j + 1) * 16]
            assert tiles[i, j] == int(block.any())
    assert (tiles == 0).any()  # MADE masks do have empty tiles


def test_kernel_skips_the_tiles_the_table_marks_empty():
    """Mark one nonzero tile empty: the kernel must leave out exactly its contribution."""
    M, N, K = 8, 160, 160
    mask = _made_mask(N, K, seed=3, degrees=40).to(DEVICE)
    _, bn, bk = block_sizes(M, N, K)
    tiles = nonzero_tiles(mask, bn, bk)
    i, j = (tiles == 1).nonzero()[0].tolist()
    tiles[i, j] = 0
    x, w = torch.randn(M, K, device=DEVICE), torch.randn(N, K, device=DEVICE)
    y = made_kernels.masked_linear_fwd(x, w, mask, None, "identity", tiles=tiles)
    kept = mask.clone()
    kept[i * bn:(i + 1) * bn, j * bk:(j + 1) * bk] = 0
    torch.testing.assert_close(y, x @ (w * kept).T, rtol=1e-5, atol=1e-5)


def test_made_on_the_kernel_path_equals_the_reference_path(monkeypatch):
    made = MADE(6, [32, 32], 3, order="random", seed=0, context_features=2).to(DEVICE)
    x, ctx = torch.randn(9, 6, device=DEVICE), torch.randn(9, 2, device=DEVICE)
    monkeypatch.setenv("FASTFLOW_BACKEND", "triton")
    got = made(x, ctx)
    monkeypatch.setenv("FASTFLOW_BACKEND", "reference")
    torch.testing.assert_close(got, made(x, ctx), rtol=1e-5, atol=1e-5)


def test_bad_input_names_the_argument():
    x, w = torch.randn(4, 6), torch.randn(5, 6)
    with pytest.raises(ValueError, match="mask the same shape"):
        fastflow.masked_linear(x, w, torch.ones(5, 5))
    with pytest.raises(ValueError, match="x must end in K = 6"):
        fastflow.masked_linear(torch.randn(4, 5), w, torch.ones(5, 6))
    with pytest.raises(ValueError, match="bias must have shape"):
        fastflow.masked_linear(x, w, torch.ones(5, 6), torch.randn(4))
    with pytest.raises(ValueError, match="activation must be one of"):
        fastflow.masked_linear(x, w, torch.ones(5, 6), activation="tanh")
    with pytest.raises(ValueError, match="x must be a floating-point"):
        fastflow.masked_linear(x.long(), w, torch.ones(5, 6))


def test_opcheck(backend):
    x = torch.randn(7, 6, dtype=torch.float64, device=DEVICE, requires_grad=True)
    w = torch.randn(5, 6, dtype=torch.float64, device=DEVICE, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, device=DEVICE, requires_grad=True)
    mask = _made_mask(5, 6).double().to(DEVICE)
    for act in ("identity", "relu"):
        torch.library.opcheck(torch.ops.fastflow.masked_linear_fwd, (x, w, mask, b, act))
        torch.library.opcheck(torch.ops.fastflow.masked_linear_fwd, (x, w, mask, None, act))


HEAD_CASES = [
    pytest.param(dict(features=5, components=3, hidden=[24, 24]), id="D5-K3"),
    pytest.param(dict(features=1, components=1, hidden=[16]), id="D1-K1"),
    pytest.param(dict(features=7, components=10, hidden=[40, 40], order="random",
                      residual=True), id="D7-K10-random-residual"),
]


@pytest.mark.parametrize("output", ["unit", "logit"])
@pytest.mark.parametrize("kind", ["logistic", "gaussian"])
@pytest.mark.parametrize("case", HEAD_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_fused_head_matches_unfused_reference(monkeypatch, dtype, case, kind, output):
    """The MAF forward through the fused MADE head (kernel) against MADE + mixture_cdf on
    the reference: outputs and every gradient (input and all parameters)."""
    case = dict(case)
    D, K, hidden = case.pop("features"), case.pop("components"), case.pop("hidden")
    flow = AutoregressiveMixtureFlow(D, K, hidden, kind=kind, output=output, seed=0,
                                     **case).to(device=DEVICE, dtype=dtype)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=gen, dtype=dtype).to(DEVICE))
    x = torch.randn(37, D, dtype=dtype, generator=gen).to(DEVICE)
    results = {}
    for backend in ("triton", "reference"):
        monkeypatch.setenv("FASTFLOW_BACKEND", backend)
        flow.zero_grad()
        xl = x.clone().requires_grad_()
        z, lad = flow(xl)
        (z.sum() + lad.sum()).backward()
        results[backend] = [z, lad, xl.grad] + [p.grad for p in flow.parameters()]
    tol = dict(rtol=2e-5, atol=2e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    for got, want in zip(results["triton"], results["reference"], strict=True):
        torch.testing.assert_close(got, want, **tol)


def test_fused_head_reads_only_each_dimensions_hidden_prefix():
    """The head's limits describe MADE's output mask exactly."""
    from fastflow.reference.made import head_mask

    made = MADE(6, [20, 20], 9, order="random", hidden_degrees="random", seed=2)
    mask = head_mask(made.head_limits, 3, 20)
    torch.testing.assert_close(mask.float(), made.output.mask)


def test_fused_head_opcheck(backend):
    flow = AutoregressiveMixtureFlow(3, 2, [16], seed=0).double().to(DEVICE)
    x = torch.randn(5, 3, dtype=torch.float64, device=DEVICE)
    h = flow.made.hidden(x).detach().requires_grad_()
    out = flow.made.output
    args = (h, out.weight.detach().requires_grad_(), out.bias.detach().requires_grad_(),
            flow.made.head_limits, x.requires_grad_(), 2, "logistic", "logit")
    torch.library.opcheck(torch.ops.fastflow.made_head_fwd, args)


def test_relu_fused_into_the_masked_layer_equals_a_separate_relu(backend):
    fused = MADE(5, [16, 16], 2, order="random", seed=1).to(DEVICE)
    separate = MADE(5, [16, 16], 2, order="random", seed=1,
                    activation=torch.nn.Sequential(torch.nn.ReLU())).to(DEVICE)
    separate.load_state_dict(fused.state_dict())
    x = torch.randn(8, 5, device=DEVICE)
    torch.testing.assert_close(fused(x), separate(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("layout", ["sliced", "broadcast"])
def test_a_non_contiguous_bias_gives_the_dense_product(backend, layout):
    """masked_linear and the fused head with a bias that is a slice (stride 2) or a
    broadcast (stride 0): the dense masked product's values and gradients, as for a
    contiguous bias. Before, the kernels read the bias with unit stride: wrong values, and
    past a broadcast bias's one-element buffer."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 4, generator=gen).to(DEVICE).requires_grad_()
    w = torch.randn(6, 4, generator=gen).to(DEVICE).requires_grad_()
    mask = (torch.rand(6, 4, generator=gen) > 0.4).float().to(DEVICE)
    store = torch.randn(12, generator=gen).to(DEVICE).requires_grad_()

    def bias():
        return store[::2] if layout == "sliced" else store[:1].expand(6)

    got = fastflow.masked_linear(x, w, mask, bias(), activation="relu")
    want = torch.relu(x @ (w * mask).T + bias())
    torch.testing.assert_close(got, want)
    cot = torch.randn(5, 6, generator=gen).to(DEVICE)
    g = torch.autograd.grad(got, (x, w, store), cot)
    g_want = torch.autograd.grad(want, (x, w, store), cot)
    for a, b in zip(g, g_want, strict=True):
        torch.testing.assert_close(a, b)
    # The fused head: a MAF forward whose output bias is a view of a wider tensor.
    flow = AutoregressiveMixtureFlow(3, 2, [8], seed=0).to(DEVICE)
    out = flow.made.output
    wide = torch.randn(out.bias.numel(), 2, generator=gen).to(DEVICE)
    wide[:, 0] = out.bias.detach()
    values = torch.randn(7, 3, generator=gen).to(DEVICE)
    h = flow.made.hidden(values)
    y, lad = fastflow.functional.made_head(h, out.weight, wide[:, 0], flow.made.head_limits,
                                           values, 2, kind="logistic", output="logit")
    y_want, lad_want = fastflow.functional.made_head(
        h, out.weight, out.bias, flow.made.head_limits, values, 2, kind="logistic",
        output="logit")
    torch.testing.assert_close(y, y_want)
    torch.testing.assert_close(lad, lad_want)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_made_flow_takes_inputs_of_another_dtype_than_its_parameters(backend, dtype):
    """A float32 MAF layer given float64 or float16 inputs, through the fused head: the
    head's weight and bias are cast to the inputs' dtype, as MADE's hidden layers cast
    theirs (before, the kernel refused the mixed operands)."""
    flow = AutoregressiveMixtureFlow(3, 2, (8,), seed=0).to(DEVICE)
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    with torch.no_grad():
        z, lad = flow(x.to(dtype))
        z_want, lad_want = flow.to(dtype)(x.to(dtype))
    assert z.dtype == lad.dtype == dtype
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float64 else dict(rtol=5e-3, atol=5e-3)
    torch.testing.assert_close(z, z_want, **tol)
    torch.testing.assert_close(lad, lad_want, **tol)


def test_relu_keeps_nan_as_torch_relu_does(backend):
    """The kernels' fused ReLU passes NaN on (a max with 0 would turn it into 0, hiding a
    NaN weight or input when validation is off)."""
    x = torch.tensor([[float("nan"), 1.0], [-1.0, 2.0]], device=DEVICE)
    w = torch.ones(3, 2, device=DEVICE)
    with fastflow_validation(False):
        y = fastflow.masked_linear(x, w, torch.ones(3, 2, device=DEVICE), activation="relu")
    assert y[0].isnan().all() and torch.equal(y[1].cpu(), torch.full((3,), 1.0))


class fastflow_validation:
    def __init__(self, on):
        self.on = on

    def __enter__(self):
        self.previous = fastflow.get_validate_args()
        fastflow.set_validate_args(self.on)

    def __exit__(self, *exc):
        fastflow.set_validate_args(self.previous)
