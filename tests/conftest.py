"""Shared fixtures: tiny local models built on the fly (no model hub).

- `tiny_target`: an untied GPT-2 (n_embd 64, 2 heads of dim 32: the CPU attention backend rejects
  head_dim 16) with a real byte-level BPE tokenizer trained here, so vLLM serves text prompts.
- `tiny_drafter`: a SEDD drafter with the same vocabulary (and a copy of the tokenizer).
- `small_vocab_target` / `small_vocab_drafter` / `small_vocab_draft_gpt2`: vocabulary of
  SMALL_VOCAB tokens, no tokenizer, for exact-law tests (prompt_token_ids + skip_tokenizer_init).

All in float32 with fixed seeds; built once per test session.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# vLLM on CPU, offline, fast in-process engines (see shared/docs/vllm.md). Set before vLLM is imported.
for _key, _value in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1",
                     "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
                     "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}.items():
    os.environ.setdefault(_key, _value)

SMALL_VOCAB = 8
EOS_TOKEN = "<|endoftext|>"
DRAFTER_LENGTH = 64

_CORPUS = """
The river ran past the old mill and under the stone bridge, where children threw bread to the ducks.
In the morning the market opened early; farmers brought apples, cheese, bread and fresh eggs.
A small boat drifted along the river while the sun rose over the hills and the town woke up.
The teacher asked the students to write a story about a journey, a friend, and a lost key.
Rain fell on the roofs of the town for three days, and the river rose higher than anyone remembered.
Scientists measured the temperature of the water every hour and wrote the numbers in a notebook.
She opened the window, listened to the birds, and decided that today she would finally paint the door.
The train left the station at seven, crossed the valley, and arrived in the city before noon.
Numbers like 12, 345 and 6789 appear in reports, tables, prices and dates such as 2024-05-17.
def add(a, b): return a + b  # code also appears in text: for i in range(10): print(i)
"""


def _train_tokenizer(directory: Path):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([_CORPUS] * 20, vocab_size=384, min_frequency=2,
                            special_tokens=[EOS_TOKEN], show_progress=False)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token=EOS_TOKEN,
                                        eos_token=EOS_TOKEN, unk_token=EOS_TOKEN)
    tokenizer.save_pretrained(directory)
    return tokenizer


def _gpt2(vocab_size: int, seed: int, initializer_range: float, eos_token_id: int,
          n_layer: int = 2):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab_size, n_positions=512, n_embd=64, n_layer=n_layer, n_head=2,
                        tie_word_embeddings=False, initializer_range=initializer_range,
                        bos_token_id=eos_token_id, eos_token_id=eos_token_id,
                        pad_token_id=eos_token_id)
    return GPT2LMHeadModel(config).eval()


def _sedd(tokens: int, seed: int, length: int = DRAFTER_LENGTH, scale: float = 0.5):
    """A random SEDD whose logits are far from uniform (the published init zeroes the head)."""
    from vllm_specdiff import SEDD, SEDDConfig

    torch.manual_seed(seed)
    model = SEDD(SEDDConfig(tokens=tokens, hidden_size=64, cond_dim=32, length=length, n_blocks=1,
                            n_heads=2))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim >= 2:
                param.normal_(0.0, scale / param.shape[-1] ** 0.5 * 4)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_target(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("tiny_target")
    tokenizer = _train_tokenizer(directory)
    model = _gpt2(len(tokenizer), seed=0, initializer_range=0.2,
                  eos_token_id=tokenizer.convert_tokens_to_ids(EOS_TOKEN))
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_drafter(tmp_path_factory, tiny_target) -> Path:
    from transformers import AutoTokenizer

    directory = tmp_path_factory.mktemp("tiny_drafter")
    tokenizer = AutoTokenizer.from_pretrained(tiny_target)
    _sedd(len(tokenizer), seed=1).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def small_vocab_target(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("small_vocab_target")
    _gpt2(SMALL_VOCAB, seed=2, initializer_range=0.5, eos_token_id=0).save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def small_vocab_draft_gpt2(tmp_path_factory) -> Path:
    """A second small-vocabulary GPT-2, the draft model of vLLM's own draft_model method."""
    directory = tmp_path_factory.mktemp("small_vocab_draft_gpt2")
    _gpt2(SMALL_VOCAB, seed=3, initializer_range=0.5, eos_token_id=0,
          n_layer=1).save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def small_vocab_drafter(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("small_vocab_drafter")
    _sedd(SMALL_VOCAB, seed=4).save_pretrained(directory)
    return directory
