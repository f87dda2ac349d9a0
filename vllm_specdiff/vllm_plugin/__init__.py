"""vLLM plugin: `specdiff` as a speculative method of `vllm serve` and `LLM`.

Entry point `vllm.general_plugins: specdiff = vllm_specdiff.vllm_plugin:register` (setup.py). vLLM calls
`register()` once per process (API process, engine core, every worker); it is idempotent and cheap:
it only installs the patches of `patches.py` (which import vLLM's own, already loaded modules). The
drafter, the proposer and the verifier are imported in workers of specdiff engines only.

Usage:
    vllm serve TARGET --speculative-method specdiff --speculative-model SEDD \
        --num-speculative-tokens 8 --specdiff-steps 4
    LLM(model=TARGET, speculative_config={"method": "specdiff", "model": SEDD,
                                          "num_speculative_tokens": 8, "num_steps": 4})
"""
from __future__ import annotations

_registered = False


def register() -> None:
    """Install the plugin's patches in this process (idempotent; never raises into vLLM)."""
    global _registered
    if _registered:
        return
    _registered = True
    from . import patches

    patches.install_process_patches()


__all__ = ["register"]
