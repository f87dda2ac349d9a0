"""Moved to `vllm_specdiff.engine.generate` (the AR drafter to `vllm_specdiff.drafting.autoregressive`);
kept so 0.1 imports keep working."""
from .drafting.autoregressive import AutoregressiveDrafter, left_pad  # noqa: F401
from .engine.generate import *  # noqa: F401,F403
