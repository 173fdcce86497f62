"""Pure-PyTorch masked linear layer: the CPU path and the oracle for kernels/made.py."""

import torch


def masked_linear_fwd(x, weight, mask, bias, activation: str):
    """act(x @ (weight * mask)^T + bias) for x (M, K), weight and mask (N, K)."""
    y = torch.nn.functional.linear(x, weight * mask, bias)
    return torch.relu(y) if activation == "relu" else y
