"""Target-conditioned drafter: exactness of its draft laws (enumeration on a tiny vocabulary, real
draft() samples), its context cache, its checkpoint format and the standalone loop."""
from __future__ import annotations

import itertools
from collections import Counter

import pytest
import torch
from scipy.stats import chisquare

from vllm_specdiff.drafting.conditioned import ConditionedDrafter, step_slices
from vllm_specdiff.models.conditioned import ConditionedConfig, ConditionedDenoiser, init_weights
from vllm_specdiff.models.conditioned_checkpoint import (ConditionedCheckpointError, check_target,
                                                         load_conditioned, save_conditioned)

from exact_law import VOCAB, continuation_law, round_output_law, total_variation

CONTEXT_LEN = 5


# Architecture variants whose drafting must be exact alike: the shipped one (anchor state and last
# revealed token added to the block), the first version, and the DFlash-format restriction.
VARIANTS = {"shipped": {"last_token_feature": True}, "plain": {},
            "dflash": {"anchor_feature": False, "fuse_scaling": False, "qk_norm": True}}


def tiny_model(block_size: int = 4, draft_vocab: list[int] | None = None, seed: int = 0,
               dtype: torch.dtype = torch.float64, variant: str = "shipped") -> ConditionedDenoiser:
    torch.manual_seed(seed)
    config = ConditionedConfig(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=2,
                               num_kv_heads=1, head_dim=16, intermediate_size=48,
                               block_size=block_size, target_layer_ids=(0, 2), target_num_layers=3,
                               target_hidden_size=8,
                               draft_vocab_size=len(draft_vocab) if draft_vocab else None,
                               **VARIANTS[variant])
    model = ConditionedDenoiser(config)
    init_weights(model, std=0.5)
    if draft_vocab:
        model.draft_vocab = torch.tensor(draft_vocab)
    gen = torch.Generator().manual_seed(seed + 1)
    model.attach_target(torch.randn(VOCAB, 32, generator=gen), torch.randn(VOCAB, 32, generator=gen))
    return model.to(dtype).requires_grad_(False)


def features(seed: int = 5, length: int = CONTEXT_LEN) -> torch.Tensor:
    return torch.randn(length, 16, generator=torch.Generator().manual_seed(seed))


def block_rows(model: ConditionedDenoiser, tokens: tuple[int, ...], k: int, lo: int, hi: int,
               known: dict[int, int] | None = None) -> torch.Tensor:
    """The drafter's law of slots lo..hi-1 given revealed slots `tokens` (0..len-1) and `known`,
    computed from the model directly: [hi - lo, VOCAB] float64."""
    block = k + 1
    ids = torch.zeros(1, block, dtype=torch.long)
    revealed = torch.zeros(1, block, dtype=torch.bool)
    ids[0, 0], revealed[0, 0] = 3, True  # anchor token
    for j, t in enumerate(tokens):
        ids[0, 1 + j], revealed[0, 1 + j] = t, True
    for j, t in (known or {}).items():
        ids[0, 1 + j], revealed[0, 1 + j] = t, True
    feats = features()[None].to(model.fc.weight.dtype)
    kv = model.context_key_values(feats, torch.arange(CONTEXT_LEN)[None])
    positions = CONTEXT_LEN + torch.arange(block)[None]
    mask = torch.ones(1, 1, block, CONTEXT_LEN + block, dtype=torch.bool)
    anchor_state = model.fuse(feats)[:, -1:]  # the last context position's fused state
    hidden = model.block_hidden(ids, revealed, positions, kv, mask, anchor_state)[0, 1 + lo:1 + hi]
    probs = torch.softmax(model.draft_logits(hidden).double(), -1)
    full = torch.zeros(hi - lo, VOCAB, dtype=torch.float64)
    full[:, model.draft_vocab] = probs
    return full


def enumerate_drafts(model, k: int, steps: int, known: dict[int, int] | None = None):
    """Every left-to-right draft with its probability and recorded rows (sampled policy, T = 1)."""
    known = known or {}
    paths = [((), 1.0, [])]
    for lo, hi in step_slices(k, steps):
        rows_cache = {}
        nxt = []
        for tokens, weight, rows in paths:
            law = block_rows(model, tokens, k, lo, hi, known)
            choices = [[known[j]] if j in known else range(VOCAB) for j in range(lo, hi)]
            for chunk in itertools.product(*choices):
                w = weight
                chunk_rows = []
                for i, j in enumerate(range(lo, hi)):
                    if j in known:
                        chunk_rows.append(torch.nn.functional.one_hot(torch.tensor(known[j]), VOCAB).double())
                    else:
                        w *= float(law[i, chunk[i]])
                        chunk_rows.append(law[i])
                if w > 0:
                    nxt.append((tokens + chunk, w, rows + chunk_rows))
        paths = nxt
    return paths


def draft_cache(model, num_slots: int = 1) -> ConditionedDrafter:
    return ConditionedDrafter(model, model.config.num_draft_tokens)


def make_cache(drafter: ConditionedDrafter, num_slots: int):
    cache = drafter.new_cache(num_slots, 32)
    cache.append(range(num_slots), [features().to(drafter.model.fc.weight.dtype)] * num_slots)
    return cache


@pytest.mark.parametrize("k, steps, variant", [(2, 1, "shipped"), (3, 1, "shipped"), (3, 2, "shipped"),
                                               (3, 3, "shipped"), (3, 2, "plain"), (3, 3, "dflash")])
def test_left_to_right_full_q_is_exact(k, steps, variant):
    model = tiny_model(block_size=k + 1, variant=variant)
    law = round_output_law((), enumerate_drafts(model, k, steps), horizon=k + 1)
    assert total_variation(law, continuation_law((), k + 1)) < 1e-9


def test_reduced_draft_vocabulary_is_exact():
    """q = 0 outside the draft vocabulary: the verifier's residual covers those tokens."""
    model = tiny_model(block_size=3, draft_vocab=[0, 2, 3])
    law = round_output_law((), enumerate_drafts(model, 2, 2), horizon=3)
    assert total_variation(law, continuation_law((), 3)) < 1e-9


def test_argmax_drafts_with_one_hot_q_are_exact():
    model = tiny_model(block_size=4)
    drafter = draft_cache(model)
    for steps in (1, 3):
        out = drafter.draft(make_cache(drafter, 1), [0], torch.tensor([3]), torch.tensor([1.0]),
                            policy="argmax", num_steps=steps)
        tokens = tuple(out.token_ids[0].tolist())
        assert torch.equal(out.draft_probs[0], torch.nn.functional.one_hot(out.token_ids[0], VOCAB).float())
        law = round_output_law((), [(tokens, 1.0, list(out.draft_probs[0].double()))], horizon=4)
        assert total_variation(law, continuation_law((), 4)) < 1e-9


def test_lookup_revealed_slots_are_exact():
    """Slots filled from the context (prompt lookup) are a point mass given the context."""
    model = tiny_model(block_size=4)
    known = {1: 2}
    law = round_output_law((), enumerate_drafts(model, 3, 2, known), horizon=4)
    assert total_variation(law, continuation_law((), 4)) < 1e-9


@pytest.mark.parametrize("steps, variant", [(1, "shipped"), (2, "shipped"), (2, "dflash")])
def test_draft_samples_follow_the_enumerated_law(steps, variant):
    """Ties the enumeration to draft(): 6k real drafts (float32) vs the enumerated law, and the
    recorded rows equal the enumerated conditional rows."""
    model = tiny_model(block_size=3, variant=variant)
    paths = enumerate_drafts(model, 2, steps)
    law = {tokens: w for tokens, w, _ in paths}
    rows = {tokens: torch.stack(r) for tokens, _, r in paths}
    model32 = model.float()
    drafter = ConditionedDrafter(model32, 2, num_steps=steps)
    num = 6000
    cache = make_cache(drafter, num)
    out = drafter.draft(cache, list(range(num)), torch.full((num,), 3), torch.ones(num),
                        generator=torch.Generator().manual_seed(0))
    counts = Counter(map(tuple, out.token_ids.tolist()))
    keys = sorted(law)
    observed = [counts.get(key, 0) for key in keys]
    assert sum(observed) == num
    assert chisquare(observed, [num * law[key] for key in keys]).pvalue > 1e-3
    for i in range(0, num, 401):
        tokens = tuple(out.token_ids[i].tolist())
        assert torch.allclose(out.draft_probs[i].double(), rows[tokens], atol=1e-5)


def test_temperature_zero_is_argmax_one_hot_under_both_policies():
    model = tiny_model(block_size=4).float()
    drafter = draft_cache(model)
    cache = make_cache(drafter, 2)
    outs = [drafter.draft(cache, [0, 1], torch.tensor([3, 3]), torch.zeros(2), policy=p,
                          generator=torch.Generator().manual_seed(s))
            for p, s in (("sampled", 1), ("argmax", 2))]
    assert torch.equal(outs[0].token_ids, outs[1].token_ids)
    assert torch.equal(outs[0].draft_probs.sum(-1), torch.ones(2, 3))
    assert set(outs[0].draft_probs.unique().tolist()) == {0.0, 1.0}


def test_seeded_rows_draft_alike_beside_rows_with_revealed_slots():
    """Per-row generators: a row drafts the same alone and beside a row whose first steps are all
    revealed (lookup); a step skipped for lack of masked slots still draws its noise. Drafting
    temperature 8 flattens the tiny model's peaked laws so that a shifted stream shows."""
    model = tiny_model(block_size=5).float()
    drafter = ConditionedDrafter(model, 4, num_steps=4, policy="sampled")
    cache = make_cache(drafter, 2)
    revealed = torch.tensor([[2, -1, -1, -1], [1, 0, -1, -1]])
    hot = torch.full((2,), 8.0)
    for seed in range(0, 20, 2):
        batch = drafter.draft(cache, [0, 1], torch.tensor([3, 3]), hot, revealed_tokens=revealed,
                              generator=[torch.Generator().manual_seed(seed + s) for s in (0, 1)])
        for row in range(2):
            alone = drafter.draft(cache, [row], torch.tensor([3]), hot[:1],
                                  revealed_tokens=revealed[row:row + 1],
                                  generator=[torch.Generator().manual_seed(seed + row)])
            assert torch.equal(alone.token_ids[0], batch.token_ids[row]), (seed, row)
            assert torch.allclose(alone.draft_probs[0], batch.draft_probs[row], atol=1e-5)
        assert batch.token_ids[1, :2].tolist() == [1, 0]


@pytest.mark.parametrize("variant", ["shipped", "dflash"])
def test_context_cache_appends_equal_one_encoding_and_batches_equal_single_rows(variant):
    model = tiny_model(block_size=4, variant=variant).float()
    drafter = draft_cache(model)
    feats = features(length=9).float()
    whole = drafter.new_cache(3, 16)
    whole.append([1], [feats])
    pieces = drafter.new_cache(3, 16)
    pieces.append([0, 2], [feats[:4], feats[:2]])
    pieces.append([2, 0], [feats[2:7], feats[4:9]])
    pieces.append([2], [feats[7:]])
    assert pieces.lengths == [9, 0, 9] and whole.lengths[1] == 9
    assert torch.allclose(pieces.k[:, 0, :, :9], whole.k[:, 1, :, :9], atol=1e-5)
    assert torch.allclose(pieces.v[:, 2, :, :9], whole.v[:, 1, :, :9], atol=1e-5)
    short = drafter.new_cache(1, 16)
    short.append([0], [feats[:3]])
    # A batch of ragged contexts drafts exactly what each context drafts alone.
    batch = drafter.draft(pieces, [0, 2], torch.tensor([1, 2]), torch.zeros(2))
    alone0 = drafter.draft(whole, [1], torch.tensor([1]), torch.zeros(1))
    assert torch.equal(batch.token_ids[0], alone0.token_ids[0])
    mixed_cache = drafter.new_cache(2, 16)
    mixed_cache.append([0, 1], [feats, feats[:3]])
    mixed = drafter.draft(mixed_cache, [0, 1], torch.tensor([1, 1]), torch.zeros(2))
    alone1 = drafter.draft(short, [0], torch.tensor([1]), torch.zeros(1))
    assert torch.equal(mixed.token_ids[1], alone1.token_ids[0])
    with pytest.raises(ValueError, match="exceed max_len"):
        short.append([0], [torch.cat([feats, feats])])


def test_checkpoint_round_trip_and_clear_errors(tmp_path):
    model = tiny_model(block_size=4, draft_vocab=[0, 1, 3]).float()
    save_conditioned(model, tmp_path / "d", dtype=torch.float32)
    loaded = load_conditioned(tmp_path / "d", model.embed_weight, model.head_weight)
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    from safetensors.torch import load_file

    stored = load_file(str(tmp_path / "d" / "model.safetensors"))
    trained = {n for n, _ in model.named_parameters()} | {"draft_vocab"}
    assert set(stored) == trained  # the target's embedding and head are not stored

    class Cfg:
        vocab_size, hidden_size, num_hidden_layers = VOCAB, 8, 30
    with pytest.raises(ConditionedCheckpointError, match="number of layers 3.*30"):
        check_target(model.config, Cfg())
    with pytest.raises(ValueError, match="LM head has shape"):
        model.attach_target(model.embed_weight, torch.zeros(VOCAB, 16))
    (tmp_path / "d" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ConditionedCheckpointError, match="corrupt"):
        load_conditioned(tmp_path / "d", model.embed_weight, model.head_weight)
    with pytest.raises(ConditionedCheckpointError, match="no config.json"):
        load_conditioned(tmp_path / "missing", model.embed_weight, model.head_weight)
    with pytest.raises(ValueError, match="num_steps 4 out of range"):
        ConditionedDrafter(model, 3, num_steps=4)
    with pytest.raises(ValueError, match="trained for blocks of up to 3"):
        ConditionedDrafter(model, 5)


def test_context_cache_restarts_on_a_gap_and_keeps_absolute_positions():
    """A recomputed sequence (start back at 0) restarts its slot; a context that begins late (prefix
    cache) keeps its absolute RoPE positions, equal to caching the same rows after a full prefix."""
    model = tiny_model(block_size=4).float()
    drafter = draft_cache(model)
    feats = features(length=9).float()
    late = drafter.new_cache(1, 16)
    late.append([0], [feats[4:]], starts=[4])
    assert late.lengths == [5] and late.end(0) == 9
    full = drafter.new_cache(1, 16)
    full.append([0], [feats])
    assert torch.allclose(late.k[:, 0, :, :5], full.k[:, 0, :, 4:9], atol=1e-5)
    late.append([0], [feats[:3]], starts=[0])  # preempted and recomputed from the start
    assert late.lengths == [3] and late.end(0) == 3


def test_last_token_feature_adds_the_last_revealed_token_of_the_same_block():
    """Masked slots get last_token_proj(embedding of the last revealed token before them), also in
    the training layout where one row concatenates several blocks (each starts revealed)."""
    model = tiny_model(block_size=3).float()
    ids = torch.tensor([[3, 1, 2, 0, 2, 1]])
    revealed = torch.tensor([[True, False, False, True, True, False]])
    x = model.embed_block(ids, revealed)
    emb, mask = model.embed_weight.float(), model.mask_embedding
    for slot, last in ((1, 0), (2, 0), (5, 4)):
        expect = mask + model.last_token_proj(emb[ids[0, last]])
        assert torch.allclose(x[0, slot], expect, atol=1e-6), slot
    for slot in (0, 3, 4):
        assert torch.allclose(x[0, slot], emb[ids[0, slot]], atol=1e-6)


def test_engine_state_projects_lazily_and_drafts_as_an_eager_cache():
    """The vLLM-side state buffers observed target states and projects them only when a slot drafts
    (or PENDING_LIMIT positions are waiting): its drafts, keys and values equal an eager cache's;
    decode rows with drafts keep only the accepted ones; a restart drops what was pending."""
    import numpy as np

    from vllm_specdiff.vllm_plugin.conditioned import PENDING_LIMIT, ConditionedState

    model = tiny_model(block_size=4).float()
    drafter = draft_cache(model)
    feats = features(length=PENDING_LIMIT + 40).float()
    state = ConditionedState(drafter, 2, 256)

    def observe(rows: torch.Tensor, start: int, drafts: int | None = None, accepted: int = 0):
        n = rows.shape[0]
        sampled = [[7] * (accepted + 1)]
        state.observe(["a"], [], sampled, [rows[:, :8], rows[:, 8:]], np.array([0, n]),
                      np.array([start + n]), None if drafts is None else [drafts])

    observe(feats[:5], 0)  # prefill
    slot = state.slot_of["a"]
    assert state.cache.lengths[slot] == 0 and state.pending_len[slot] == 5
    assert state.anchor_ready("a", 5) and not state.anchor_ready("a", 4)
    for pos in range(5, 8):  # plain decode steps
        observe(feats[pos:pos + 1], pos, drafts=0)
    # A decode step with 3 drafts of which 1 was accepted: rows [last, d1, d2, d3], 2 valid.
    observe(torch.cat([feats[8:10], torch.zeros(2, 16)]), 8, drafts=3, accepted=1)
    assert state.cache.lengths[slot] == 0 and state.end(slot) == 10
    eager = drafter.new_cache(1, 256)
    eager.append([0], [feats[:10]])
    lazy_out = state.draft(["a"], [3], torch.zeros(1), None, "argmax")
    eager_out = drafter.draft(eager, [0], torch.tensor([3]), torch.zeros(1))
    assert torch.equal(lazy_out.token_ids, eager_out.token_ids)
    assert state.cache.lengths[slot] == 10 and not state.pending_len
    assert torch.allclose(state.cache.k[:, slot, :, :10], eager.k[:, 0, :, :10], atol=1e-6)
    # A long chunk is projected at once (the buffers stay bounded without drafts).
    observe(feats[10:10 + PENDING_LIMIT], 10, drafts=0)
    assert state.cache.lengths[slot] == 10 + PENDING_LIMIT and not state.pending_len
    observe(feats[10 + PENDING_LIMIT:12 + PENDING_LIMIT], 10 + PENDING_LIMIT, drafts=0)
    assert state.pending_len[slot] == 2
    observe(feats[:3], 0)  # preempted and recomputed from the start: the slot restarts
    assert state.cache.lengths[slot] == 0 and state.pending_len[slot] == 3 and state.end(slot) == 3
    state.release("a")
    assert not state.pending and not state.slot_of
