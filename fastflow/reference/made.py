"""Pure-PyTorch masked linear layer: the CPU path and the oracle for kernels/made.py."""

import torch


def masked_linear_fwd(x, weight, mask, bias, activation: str):
    """act(x @ (weight * mask)^T + bias) for x (M, K), weight and mask (N, K)."""
    y = torch.nn.functional.linear(x, weight * mask, bias)
    return torch.relu(y) if activation == "relu" else y


def head_mask(limits: torch.Tensor, components: int, hidden: int) -> torch.Tensor:
    """The output mask of a degree-sorted MADE head: row o sees hidden units j < limits[d(o)]."""
    dim_of_row = torch.arange(limits.numel() * 3 * components, device=limits.device)
    dim_of_row = dim_of_row // (3 * components)
    return torch.arange(hidden, device=limits.device)[None, :] < limits[dim_of_row][:, None]


def made_head_params(h, weight, bias, limits, components: int):
    """(logits, loc, log_scale), each (B, D, K), of the MADE head on the last hidden layer."""
    mask = head_mask(limits, components, h.shape[1]).to(weight.dtype)
    out = torch.nn.functional.linear(h, weight * mask, bias)
    out = out.reshape(h.shape[0], limits.numel(), 3 * components)
    return out.split(components, dim=-1)


def made_head_fwd(h, weight, bias, limits, x, components: int, kind: str, output: str):
    """The unfused head: parameters, then the mixture-CDF forward."""
    from .mixture_cdf import mixture_cdf_fwd

    return mixture_cdf_fwd(x, *made_head_params(h, weight, bias, limits, components), kind,
                           output)
