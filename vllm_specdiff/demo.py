"""Moved to `vllm_specdiff.engine.demo`; kept so 0.1 imports keep working."""
from .engine.demo import *  # noqa: F401,F403
