"""Moved to `vllm_specdiff.models.sedd_checkpoint`; kept so 0.1 imports keep working."""
from .models.sedd_checkpoint import *  # noqa: F401,F403
