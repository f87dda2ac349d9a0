"""Triton rejection-sampling kernels agree with the PyTorch reference token for token.

The comparisons run in a subprocess with TRITON_INTERPRET=1 (CPU tensors, no GPU): the variable must
be set before triton is first imported, and other tests in this process import vllm, which imports
triton. A second subprocess (without the interpreter) compiles the kernels for an H100 (sm_90) with
the ptxas bundled in the triton wheel, which catches type errors the interpreter lets through.
On a machine with a CUDA GPU a third subprocess runs the same cases (and large-vocabulary batches) on
the GPU with the compiled kernels; without one that test is skipped (CI has no GPU).

Run `python tests/test_kernels.py interpret` (with TRITON_INTERPRET=1), `... compile` or `... cuda`
by hand to see the per-case report.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BLOCK_SIZE = 16  # small vocab tile so that tiny vocabularies cross tile boundaries
VOCAB_SIZES = (1, BLOCK_SIZE - 1, BLOCK_SIZE + 1, 3 * BLOCK_SIZE + 5)


def _run_helper(mode: str, interpret: bool) -> dict:
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, __file__, mode], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, f"helper failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_kernels_equal_reference_in_interpreter() -> None:
    pytest.importorskip("triton")
    report = _run_helper("interpret", interpret=True)
    assert report["mismatches"] == [], report["mismatches"]
    assert report["num_cases"] >= 20
    # The cases must exercise every branch: greedy accepts, random accepts, recovered and bonus
    # tokens, with full draft probs and one-hot.
    for mode in ("full_q", "one_hot"):
        counts = report["events"][mode]
        assert counts["random_accepted"] > 0 and counts["recovered"] > 0 and counts["bonus"] > 0
        assert counts["greedy_accepted"] > 0 and counts["greedy_rejected"] > 0


def test_kernels_compile_for_sm90() -> None:
    pytest.importorskip("triton")
    report = _run_helper("compile", interpret=False)
    if report.get("skipped"):
        pytest.skip(report["skipped"])
    assert report["compiled"] >= 5


def test_kernels_equal_reference_on_cuda() -> None:
    torch = pytest.importorskip("torch")
    pytest.importorskip("triton")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU on this machine (run on a GPU machine: see the module docstring)")
    report = _run_helper("cuda", interpret=False)
    assert report["mismatches"] == [], report["mismatches"]
    assert report["num_cases"] >= 40


# ------------------------------------------------------------------------------------------------
# Helper process
# ------------------------------------------------------------------------------------------------

def _import_kernels():
    try:
        from vllm_specdiff.kernels import rejection
    except ModuleNotFoundError:  # package not pip-installed yet: load kernels/ by path
        import importlib.util

        spec = importlib.util.spec_from_file_location("vllm_specdiff_kernels_rejection",
                                                      REPO / "kernels" / "rejection.py")
        rejection = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(rejection)
    return rejection


def _make_case(vocab: int, logits_dtype, one_hot: bool, filtered: bool, seed: int,
               draft_dtype=None, num_draft=(3, 0, 1, 4, 2, 4), index_dtype=None,
               max_draft_len: int | None = None) -> dict:
    import torch

    from vllm_specdiff.verification import draw_random, request_index

    index_dtype = index_dtype or torch.int64
    generator = torch.Generator().manual_seed(seed)
    batch = len(num_draft)
    temperature = torch.tensor([0.0, 0.8, 1.0, 0.0, 1.5, 0.6]).repeat(batch // 6 + 1)[:batch]
    cu = torch.tensor(num_draft).cumsum(0)
    num_tokens = int(cu[-1])
    token_request = request_index(torch.tensor(num_draft), num_tokens)
    token_row = torch.arange(num_tokens) + token_request
    target_logits = torch.randn(num_tokens + batch, vocab, generator=generator) * 2
    if logits_dtype == torch.bfloat16:
        target_logits = (target_logits * 2).round() / 2  # many exact ties for the greedy argmax
    target_logits = target_logits.to(logits_dtype)
    row_temperature = torch.where(temperature == 0, 1.0, temperature)[token_request]
    # A drafter close to the target, so that chains of accepted tokens occur.
    draft_logits = (target_logits[token_row].float() / row_temperature.unsqueeze(1)
                    + 0.7 * torch.randn(num_tokens, vocab, generator=generator))
    draft_probs = draft_logits.softmax(-1)
    drafts = torch.multinomial(draft_probs, 1, generator=generator).squeeze(1) if num_tokens \
        else torch.zeros(0, dtype=torch.int64)
    # Greedy requests: the first draft agrees with the target argmax, later ones by chance.
    argmax = target_logits.float().argmax(-1)
    first = (cu - torch.tensor(num_draft))[(temperature == 0) & (torch.tensor(num_draft) > 0)]
    drafts[first] = argmax[token_row[first]]
    uniform, exponential = draw_random(cu, vocab, generator, "cpu")
    return dict(
        draft_token_ids=drafts.to(index_dtype), cu_num_draft_tokens=cu.to(index_dtype),
        draft_probs=None if one_hot else draft_probs.to(draft_dtype or torch.float32),
        target_logits=target_logits, temperature=temperature,
        top_k=torch.tensor([0, 5, 0, 3, 2, 0]).repeat(batch // 6 + 1)[:batch] if filtered else None,
        top_p=torch.tensor([1.0, 0.9, 0.7, 1.0, 1.0, 0.5]).repeat(batch // 6 + 1)[:batch]
        if filtered else None,
        uniform_samples=uniform, exponential_samples=exponential, max_draft_len=max_draft_len)


def _fallback_case(vocab: int, seed: int) -> dict:
    """q = 1.001 p everywhere and u = 0.9995: every random draft is rejected with max(p - q, 0) all
    zero, so the recovered token comes from the target law itself."""
    import torch

    from vllm_specdiff.verification import request_index, target_scaled_logits

    case = _make_case(vocab, torch.float32, one_hot=False, filtered=False, seed=seed)
    num_draft = torch.diff(case["cu_num_draft_tokens"], prepend=torch.zeros(1, dtype=torch.int64))
    token_row = torch.arange(case["draft_token_ids"].shape[0]) + request_index(
        num_draft, case["draft_token_ids"].shape[0])
    target_probs = target_scaled_logits(case["target_logits"], case["cu_num_draft_tokens"],
                                        case["temperature"], None, None).softmax(-1)
    case["draft_probs"] = target_probs[token_row] * 1.001
    case["uniform_samples"] = torch.full_like(case["uniform_samples"], 0.9995)
    return case


def _cases() -> list[tuple[str, dict]]:
    import torch

    cases = []
    seed = 0
    for vocab in VOCAB_SIZES:
        for dtype in (torch.float32, torch.bfloat16):
            for one_hot in (False, True):
                seed += 1
                name = f"vocab={vocab} {str(dtype)[6:]} {'one_hot' if one_hot else 'full_q'}"
                cases.append((name, _make_case(vocab, dtype, one_hot, filtered=False, seed=seed)))
    for vocab in VOCAB_SIZES[2:]:
        for one_hot in (False, True):
            seed += 1
            name = f"vocab={vocab} top-k/top-p {'one_hot' if one_hot else 'full_q'}"
            cases.append((name, _make_case(vocab, torch.bfloat16, one_hot, filtered=True,
                                           seed=seed)))
    cases += [
        ("bf16 draft probs", _make_case(53, torch.float32, False, False, 100,
                                        draft_dtype=torch.bfloat16)),
        ("int32 indices, padded width", _make_case(17, torch.float32, False, True, 101,
                                                   index_dtype=torch.int32, max_draft_len=7)),
        ("no drafts at all", _make_case(17, torch.bfloat16, True, False, 102, num_draft=(0, 0, 0))),
        ("all-zero residual fallback", _fallback_case(53, 103)),
        ("long chains", _make_case(17, torch.float32, False, False, 104, num_draft=(9, 12, 1, 16))),
    ]
    return cases


def _count_events(case: dict, out, events: dict) -> None:
    import torch

    num_draft = torch.diff(case["cu_num_draft_tokens"].long(),
                           prepend=torch.zeros(1, dtype=torch.int64))
    greedy = case["temperature"] == 0
    accepted, rejected = out.num_accepted, out.num_accepted < num_draft
    counts = events["one_hot" if case["draft_probs"] is None else "full_q"]
    counts["greedy_accepted"] += int(accepted[greedy].sum())
    counts["greedy_rejected"] += int(rejected[greedy].sum())
    counts["random_accepted"] += int(accepted[~greedy].sum())
    counts["recovered"] += int(rejected[~greedy].sum())
    counts["bonus"] += int((~rejected[~greedy]).sum())


def _interpret_main() -> dict:
    import torch

    from vllm_specdiff.verification import rejection_sample_reference

    assert os.environ.get("TRITON_INTERPRET") == "1"
    rejection = _import_kernels()
    mismatches, cases = [], _cases()
    events = {mode: dict.fromkeys(("greedy_accepted", "greedy_rejected", "random_accepted",
                                   "recovered", "bonus"), 0) for mode in ("full_q", "one_hot")}
    start = time.time()
    for name, case in cases:
        expected = rejection_sample_reference(**case)
        actual = rejection.rejection_sample_triton(**case, block_size=BLOCK_SIZE)
        if not (torch.equal(expected.output_token_ids, actual.output_token_ids)
                and torch.equal(expected.num_accepted, actual.num_accepted)):
            mismatches.append({"case": name, "reference": expected.output_token_ids.tolist(),
                               "triton": actual.output_token_ids.tolist()})
        _count_events(case, expected, events)
        print(f"{name:40s} accepted {expected.num_accepted.tolist()}", file=sys.stderr)
    # Launchers reject layouts the kernels cannot index.
    logits = torch.zeros(4, 3)
    try:
        rejection.launch_target_row_stats(
            torch.empty(2, 4).T, torch.empty(4, 2, dtype=torch.int32), logits,
            torch.ones(2, 3), torch.zeros(2, dtype=torch.int64), torch.tensor([1, 2]),
            torch.ones(2), 1, True, BLOCK_SIZE)
        mismatches.append({"case": "non-contiguous row_stats was not rejected"})
    except AssertionError:
        pass
    return {"num_cases": len(cases), "mismatches": mismatches, "events": events,
            "seconds": round(time.time() - start, 1)}


def _large_cases() -> list[tuple[str, dict]]:
    """Real vocabularies (GPT-2 50257, SmolLM2 49152), batches of 1-64 with up to 16 drafts."""
    import torch

    cases, seed = [], 200
    for vocab in (50257, 49152):
        for logits_dtype in (torch.float32, torch.bfloat16):
            for one_hot in (False, True):
                for num_draft in ((8,), (4,) * 16, (0, 16, 3, 8) * 16):
                    seed += 1
                    name = (f"vocab={vocab} {str(logits_dtype)[6:]} "
                            f"{'one_hot' if one_hot else 'full_q'} batch={len(num_draft)}")
                    cases.append((name, _make_case(vocab, logits_dtype, one_hot, filtered=False,
                                                   seed=seed, num_draft=num_draft)))
    return cases


def _cuda_main() -> dict:
    """Every interpreter case plus large-vocabulary batches on the GPU with compiled kernels (the
    vocab tile of the interpreter cases and the default tile), against the PyTorch reference on
    the CPU with the same random numbers."""
    import torch

    from vllm_specdiff.verification import rejection_sample, rejection_sample_reference

    if not torch.cuda.is_available():
        return {"skipped": "no CUDA GPU"}
    rejection = _import_kernels()
    device = torch.device("cuda")
    mismatches, events, num_cases = [], {mode: dict.fromkeys(
        ("greedy_accepted", "greedy_rejected", "random_accepted", "recovered", "bonus"), 0)
        for mode in ("full_q", "one_hot")}, 0
    start = time.time()
    cases = _cases()
    runs = [(name, case, block_size) for block_size in (BLOCK_SIZE, 1024) for name, case in cases]
    runs += [(name, case, 1024) for name, case in _large_cases()]
    for name, case, block_size in runs:
        expected = rejection_sample_reference(**case)
        on_gpu = {key: value.to(device) if isinstance(value, torch.Tensor) else value
                  for key, value in case.items()}
        actual = rejection.rejection_sample_triton(**on_gpu, block_size=block_size)
        dispatched = rejection_sample(**on_gpu)  # the public entry point picks the kernels on CUDA
        num_cases += 1
        for label, result in (("triton", actual), ("rejection_sample", dispatched)):
            tokens, accepted = result.output_token_ids.cpu(), result.num_accepted.cpu()
            if not (torch.equal(expected.output_token_ids, tokens)
                    and torch.equal(expected.num_accepted, accepted)):
                differ = (expected.output_token_ids != tokens).any(1).nonzero().flatten()
                mismatches.append({"case": f"{name} block={block_size} {label}",
                                   "rows": differ.tolist()[:8],
                                   "reference": expected.output_token_ids[differ[:2]].tolist(),
                                   "gpu": tokens[differ[:2]].tolist()})
        _count_events(case, expected, events)
        print(f"{name:48s} block {block_size:5d} accepted {expected.num_accepted.tolist()[:8]}",
              file=sys.stderr)
    return {"num_cases": num_cases, "mismatches": mismatches, "events": events,
            "device": torch.cuda.get_device_name(device), "torch": torch.__version__,
            "triton": __import__("triton").__version__, "seconds": round(time.time() - start, 1)}


def _compile_main() -> dict:
    try:
        import triton
        from triton.backends.compiler import GPUTarget
    except ImportError as error:
        return {"skipped": f"triton GPU compiler unavailable: {error}"}
    rejection = _import_kernels()
    target = GPUTarget("cuda", 90, 32)

    def compile_kernel(kernel, signature: dict, constexprs: dict) -> None:
        signature = {**signature, **{name: "constexpr" for name in constexprs}}
        triton.compile(triton.compiler.ASTSource(kernel, signature, constexprs), target=target)

    common = dict(exponential_ptr="*fp32", draft_token_ids_ptr="*i64",
                  cu_num_draft_tokens_ptr="*i32", temperature_ptr="*fp32", vocab_size="i32")
    compiled = 0
    try:
        for logits, one_hot in (("fp32", True), ("bf16", False), ("fp16", True)):
            compile_kernel(rejection._target_row_stats_kernel,
                           dict(row_stats_ptr="*fp32", row_tokens_ptr="*i32",
                                target_logits_ptr=f"*{logits}", **common),
                           dict(ONE_HOT=one_hot, BLOCK_SIZE=1024))
            compiled += 1
        for logits, draft in (("fp32", None), ("bf16", "bf16"), ("fp32", "fp32")):
            signature = dict(output_token_ids_ptr="*i64", num_accepted_ptr="*i64",
                             row_stats_ptr="*fp32", row_tokens_ptr="*i32",
                             target_logits_ptr=f"*{logits}", uniform_samples_ptr="*fp64",
                             output_width="i32", **common)
            constexprs = dict(HAS_DRAFT_PROBS=draft is not None, BLOCK_SIZE=1024)
            if draft is None:
                constexprs["draft_probs_ptr"] = None
            else:
                signature["draft_probs_ptr"] = f"*{draft}"
            compile_kernel(rejection._verify_kernel, signature, constexprs)
            compiled += 1
    except RuntimeError as error:
        if "ptxas" in str(error).lower() and "not found" in str(error).lower():
            return {"skipped": f"no ptxas: {error}"}
        raise
    return {"compiled": compiled}


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    mode = sys.argv[1] if len(sys.argv) > 1 else "interpret"
    result = {"interpret": _interpret_main, "compile": _compile_main, "cuda": _cuda_main}[mode]()
    print(json.dumps(result))
