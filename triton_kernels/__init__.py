"""Triton kernels of xception_fast, installed as xception_fast.triton_kernels."""
