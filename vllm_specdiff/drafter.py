"""Moved to `vllm_specdiff.drafting.base` and `vllm_specdiff.drafting.diffusion`; kept so 0.1 imports
keep working."""
from .drafting.base import *  # noqa: F401,F403
from .drafting.diffusion import *  # noqa: F401,F403
