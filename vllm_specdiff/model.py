"""Moved to `vllm_specdiff.models.sedd`; kept so 0.1 imports keep working."""
from .models.sedd import *  # noqa: F401,F403
