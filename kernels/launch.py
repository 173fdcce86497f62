"""Host-side launch helpers shared by the kernels' launchers: dtype codes, tile sizes, the
(R, C, K) parameter views and cotangent strides the kernels take, and gradient buffers.
"""

import os

import torch
import triton.language as tl

# Kernel mode codes (constexpr KIND and OUTPUT).
KINDS = {"logistic": 0, "gaussian": 1}
OUTPUTS = {"unit": 0, "logit": 1, "density": 2}


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other floating dtype is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def tl_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


# Read once, as Triton decides at import whether its kernels are interpreted.
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


# Launch arithmetic in plain Python: triton.next_power_of_2 and triton.cdiv go through
# Triton's JIT call wrapper, microseconds of host time each on every launch.
def next_pow2(n: int) -> int:
    """The least power of two >= n (1 for n <= 1)."""
    return 1 << (n - 1).bit_length() if n > 1 else 1


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for a >= 0, b > 0."""
    return -(-a // b)


def block_sizes(K: int, lanes: int) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_K): ``lanes`` tile lanes on a GPU, 16384 under the interpreter."""
    block_k = next_pow2(K)
    if _INTERPRET:
        lanes = 16384
    return max(16, lanes // block_k), block_k


def flat(t: torch.Tensor) -> torch.Tensor:
    """A contiguous 1-D view (or copy) of t: the kernels index elements with unit stride."""
    return t.reshape(-1).contiguous()


def cotangent(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """A 1-D view of a cotangent and its element stride for the kernels: 0 where one stored
    value stands for every element (autograd expands the gradient of a sum so), which the
    kernels then read in place of a copy; else a contiguous view (or copy) and 1."""
    v = t.reshape(-1)
    if v.numel() > 1 and v.stride(0) == 0:
        return v, 0
    return v.contiguous(), 1


def param_views(x: torch.Tensor, *params: torch.Tensor):
    """Flatten x to (N,) and view each (S, K) parameter as (R, C, K) without copying.

    Returns (x_flat, rows, cols, views, strides) where strides is the flat list of the nine
    (row, col, component) strides the kernels take.
    """
    cols = x.shape[-1] if x.dim() > 0 else 1
    rows = x.numel() // cols if cols > 0 else 0
    views = []
    for p in params:
        K = p.shape[-1]
        try:
            views.append(p.view(rows, cols, K))
        except RuntimeError:  # broadcast pattern that no single row stride describes
            views.append(p.reshape(rows, cols, K))
    strides = [s for v in views for s in v.stride()]
    return flat(x), rows, cols, views, strides


def dense(views, block_k: int) -> bool:
    """Whether the kernels may take the DENSE path: each (R, C, K) parameter view is
    contiguous, so element n's K components start at n * K, and K == BLOCK_K."""
    return views[0].shape[-1] == block_k and all(v.is_contiguous() for v in views)


def tile(views, launch: dict, whole_rows: bool = False,
         warps: str = "num_warps") -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, DENSE) of a launch with ``launch``'s lanes and ``launch[warps]``
    warps: DENSE 1 (vector loads, a row shared by threads) where :func:`dense` allows, or 2
    with ``whole_rows``; else 0. Where a thread holds whole elements (DENSE 0 or 2,
    ``load_rows``) a tile has at least one element per thread: fewer would split an
    element's components over warps."""
    block_k = block_sizes(views[0].shape[-1], launch["lanes"])[1]
    mode = (2 if whole_rows else 1) if dense(views, block_k) else 0
    return tile_rows(views[0].shape[-1], launch, mode == 1, warps), block_k, mode


def tile_rows(K: int, launch: dict, shared_rows: bool, warps: str = "num_warps") -> int:
    """BLOCK_N of a launch (see :func:`tile`); ``shared_rows``: on DENSE 1."""
    block_n = block_sizes(K, launch["lanes"])[0]
    return block_n if shared_rows else max(block_n, 32 * launch[warps])


def alloc_grads(x, K):
    """Contiguous grad buffers in the compute dtype: (S,) for x and (S, K) per parameter."""
    dtype = compute_dtype(x.dtype)
    g_x = torch.empty(x.shape, dtype=dtype, device=x.device)
    return g_x, [torch.empty((*x.shape, K), dtype=dtype, device=x.device) for _ in range(3)]
