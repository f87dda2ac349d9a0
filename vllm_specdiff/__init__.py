"""vllm-specdiff: Speculative Diffusion Decoding for vLLM.

`import vllm_specdiff` works without vLLM or a GPU: only the plugin glue imports vllm, lazily.
"""
from .diffusion import total_noise, rate_noise
from .models.sedd import SEDD, SEDDConfig
from .models.sedd_checkpoint import CheckpointError, SHORT_NAMES
from .drafting.base import DraftOutput, Drafter
from .drafting.diffusion import DiffusionDrafter
from .verification import PLACEHOLDER_TOKEN_ID, RejectionOutput, draw_random, rejection_sample

__version__ = "0.1.0"

__all__ = [
    "SEDD", "SEDDConfig", "CheckpointError", "DiffusionDrafter", "DraftOutput", "Drafter",
    "speculative_generate", "AutoregressiveDrafter", "GenerationResult", "total_noise", "rate_noise",
    "rejection_sample", "draw_random", "RejectionOutput", "PLACEHOLDER_TOKEN_ID", "SHORT_NAMES",
]


def __getattr__(name: str):
    # The standalone loop pulls in transformers-facing code; import it on first use.
    if name in ("speculative_generate", "GenerationResult"):
        from .engine import generate

        return getattr(generate, name)
    if name == "AutoregressiveDrafter":
        from .drafting.autoregressive import AutoregressiveDrafter

        return AutoregressiveDrafter
    raise AttributeError(f"module 'vllm_specdiff' has no attribute {name!r}")
