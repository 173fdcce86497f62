"""Triton kernels of fastflow (installed as ``fastflow.kernels``); imports nothing from fastflow."""
