"""Moved to `vllm_specdiff.engine.offline`; kept so 0.1 imports keep working."""
from .engine.offline import *  # noqa: F401,F403
from .engine.offline import METHODS, PEERS  # noqa: F401  (public, not in its __all__)
