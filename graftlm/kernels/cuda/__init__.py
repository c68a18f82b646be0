"""Accelerator kernels: weight layouts for torch's CUDA int4 matmul."""
