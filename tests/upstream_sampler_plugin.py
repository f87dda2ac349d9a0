"""pytest plugin for running vLLM's own tests/v1/sample/test_rejection_sampler.py on CPU.

Loaded with `-p upstream_sampler_plugin` (and `--noconftest`: vLLM's conftest needs its whole test
tree) by tests/test_vllm_upstream_sampler.py. It does what a CPU worker does at start-up, in the same
order, so the tests see the kernels (and our CPU fixes) a real engine sees:
    load_general_plugins()                                (our register(): the CPU fixes)
    current_platform.import_kernels()                     (the C++ ops)
    current_platform.register_triton_kernel_overrides()   (C++ fallbacks of the Triton kernels)
With VLLM_SPECDIFF_UPSTREAM_SAMPLER=specdiff it then swaps the test module's `RejectionSampler` for our
SpecDiffRejectionSampler, so every test that builds a sampler builds ours.
"""
from __future__ import annotations

import os

SAMPLER_ENV = "VLLM_SPECDIFF_UPSTREAM_SAMPLER"
SAMPLERS = ("vllm", "specdiff")


def pytest_configure(config) -> None:
    sampler = os.environ.get(SAMPLER_ENV, "vllm")
    if sampler not in SAMPLERS:
        raise ValueError(f"{SAMPLER_ENV} must be one of {SAMPLERS}, got {sampler!r}")
    from vllm.platforms import current_platform
    from vllm.plugins import load_general_plugins

    load_general_plugins()
    current_platform.import_kernels()
    register_overrides = getattr(current_platform, "register_triton_kernel_overrides", None)
    if register_overrides is not None:
        register_overrides()


def pytest_collection_modifyitems(session, config, items) -> None:
    if os.environ.get(SAMPLER_ENV, "vllm") != "specdiff":
        return
    from vllm_specdiff.vllm_plugin.sampler import specdiff_rejection_sampler_class

    sampler_class = specdiff_rejection_sampler_class()
    modules = {item.module for item in items if getattr(item, "module", None) is not None}
    for module in modules:
        if hasattr(module, "RejectionSampler"):
            module.RejectionSampler = sampler_class
