"""Triton kernels of worldvla (importable as worldvla.kernels once installed)."""
