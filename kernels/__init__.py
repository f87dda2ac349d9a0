"""Triton kernels, installed as `vllm_specdiff.kernels` (`kernels` is also an unrelated PyPI
package, so this folder is never imported as a top-level `kernels`).

Importing this package does not import triton; `vllm_specdiff.kernels.rejection` does. Each kernel's
specification is a PyTorch reference in the package (`vllm_specdiff.verification`).
"""
