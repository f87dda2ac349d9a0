"""Measure vLLM offline generation with and without speculation (the demo and bench_offline).

Each engine configuration runs in its own spawned process (a clean vLLM, no state carried over
from the previous engine) and reports tokens/s and vLLM's own speculative-decoding counters
(`llm.get_metrics()`): drafts, draft tokens, accepted tokens per position.
All methods run on Model Runner V1 without async scheduling, because `custom_class` (which
specdiff uses) forces both; the draft_model baseline is therefore measured on equal terms.
"""
from __future__ import annotations

import multiprocessing
import os
import time
from dataclasses import dataclass
from typing import Any, Sequence

METHODS = ("none", "ngram", "draft_model", "dflash", "specdiff")
PEERS = ("ngram", "draft_model", "dflash")  # what vLLM itself ships


@dataclass(frozen=True)
class EngineSpec:
    """One engine: no speculation, one of vLLM's speculators (ngram, draft_model, dflash), or
    specdiff (standalone SEDD or conditioned drafter; `options` = extra specdiff keys such as
    adaptive, lookup, draft_policy, as (key, value) pairs)."""

    method: str
    drafter: str | None = None
    num_draft_tokens: int = 0
    num_steps: int | None = None
    window: int | None = None
    options: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method {self.method!r} unknown: choose one of {METHODS}")
        if self.method != "none" and self.num_draft_tokens < 1:
            raise ValueError(f"method {self.method!r} needs num_draft_tokens >= 1")
        if self.method not in ("none", "ngram") and not self.drafter:
            raise ValueError(f"method {self.method!r} needs a drafter")

    @property
    def kind(self) -> str:
        """specdiff's drafter kind (conditioned / sedd), else the method."""
        if self.method != "specdiff":
            return self.method
        from ..models.conditioned_checkpoint import is_conditioned_checkpoint

        return "conditioned" if is_conditioned_checkpoint(self.drafter) else "sedd"

    @property
    def label(self) -> str:
        if self.method == "none":
            return "no speculation"
        if self.method != "specdiff":
            return f"{self.method} k={self.num_draft_tokens}"
        options = dict(self.options)
        # The plugin's defaults are on: a flag shows what the engine runs, not what was spelled out.
        flags = "".join(f" {name[0]}" for name in ("adaptive", "lookup") if options.get(name, True))
        return f"specdiff-{self.kind} k={self.num_draft_tokens} T={self.num_steps}{flags}"

    def speculative_config(self) -> dict[str, Any] | None:
        if self.method == "none":
            return None
        config: dict[str, Any] = {"method": self.method, "num_speculative_tokens": self.num_draft_tokens}
        if self.drafter:
            config["model"] = self.drafter
        if self.method == "draft_model":
            config["draft_sample_method"] = "probabilistic"
        elif self.method == "ngram":
            config.update(prompt_lookup_max=4, prompt_lookup_min=2)
        elif self.method == "specdiff":
            config.update({k: v for k, v in (("num_steps", self.num_steps), ("window", self.window))
                           if v is not None})
            config.update(dict(self.options))
        return config


def spec_counters(metrics) -> dict[str, Any]:
    """vLLM's spec-decode counters from llm.get_metrics() (zeros when speculation is off)."""
    out: dict[str, Any] = {"drafts": 0, "draft_tokens": 0, "accepted": 0, "accepted_per_pos": []}
    for metric in metrics:
        if metric.name == "vllm:spec_decode_num_drafts":
            out["drafts"] = int(metric.value)
        elif metric.name == "vllm:spec_decode_num_draft_tokens":
            out["draft_tokens"] = int(metric.value)
        elif metric.name == "vllm:spec_decode_num_accepted_tokens":
            out["accepted"] = int(metric.value)
        elif metric.name == "vllm:spec_decode_num_accepted_tokens_per_pos":
            out["accepted_per_pos"] = [int(v) for v in metric.values]
    return out


def acceptance_histogram(drafts: int, accepted_per_pos: Sequence[int], k: int) -> list[int]:
    """Rounds by number of accepted drafts [k + 1], from per-position acceptance counts."""
    per_pos = list(accepted_per_pos) + [0] * (k - len(accepted_per_pos))
    reached = [drafts] + per_pos[:k]  # rounds that accepted at least j drafts
    return [reached[j] - (reached[j + 1] if j < k else 0) for j in range(k + 1)]


def _delta(after: dict[str, Any], before: dict[str, Any]) -> dict[str, Any]:
    per_pos = [a - (before["accepted_per_pos"][i] if i < len(before["accepted_per_pos"]) else 0)
               for i, a in enumerate(after["accepted_per_pos"])]
    return {"drafts": after["drafts"] - before["drafts"],
            "draft_tokens": after["draft_tokens"] - before["draft_tokens"],
            "accepted": after["accepted"] - before["accepted"], "accepted_per_pos": per_pos}


def _plugin_stats(worker) -> dict[str, Any]:
    drafter = getattr(worker.model_runner, "drafter", None)
    stats = getattr(drafter, "stats", None)
    return dict(stats) if type(drafter).__name__ == "SpecDiffProposer" and stats else {}


def plugin_stats(llm) -> dict[str, Any]:
    """The specdiff proposer's counters ({} for other engines): engine steps, the plugin's own
    seconds (observe_seconds, proposer_seconds), drafter seconds and rows."""
    try:
        return llm.collective_rpc(_plugin_stats)[0]
    except (AttributeError, NotImplementedError):  # no collective_rpc: no plugin figures
        return {}


def _plugin_delta(after: dict[str, Any], before: dict[str, Any]) -> dict[str, Any]:
    """Per-cell plugin cost: ms per engine step of the plugin (all of it, and its observe part) and
    of the drafter model, and the steps they are averaged over."""
    if not after:
        return {}
    steps = after.get("engine_steps", 0) - before.get("engine_steps", 0)

    def per_step(key: str) -> float | None:
        return (1e3 * (after.get(key, 0.0) - before.get(key, 0.0)) / steps) if steps else None
    return {"verifier": after.get("verifier"), "engine_steps": steps,
            "plugin_ms_per_step": per_step("proposer_seconds"),
            "observe_ms_per_step": per_step("observe_seconds"),
            "drafter_ms_per_step": per_step("draft_seconds")}


def run_engine(spec: EngineSpec, target: str, prompts: Sequence[Sequence[int]], batches: Sequence[int],
               temperatures: Sequence[float], max_tokens: int, dtype: str = "bfloat16",
               seed: int = 0, max_model_len: int = 1024, repeats: int = 1,
               engine_kwargs: dict[str, Any] | None = None,
               min_prompts: int | None = None) -> list[dict[str, Any]]:
    """Build one engine and time every (temperature, batch) pair on `prompts` (in this process).
    engine_kwargs: more LLM(...) arguments (e.g. block_size). min_prompts: each cell runs
    max(batch, min_prompts) prompts (the list cycled) instead of all of them, so that a batch-1 cell
    costs as much wall time as a full batch-16 one rather than 16 times more."""
    llm, build_s = build_engine(spec, target, prompts, max(batches), dtype, seed, max_model_len,
                                engine_kwargs)
    return [run_cell(llm, spec, prompts, batch, temperature, max_tokens, dtype=dtype, seed=seed,
                     repeats=repeats, min_prompts=min_prompts, build_s=build_s)
            for temperature in temperatures for batch in batches]


def build_engine(spec: EngineSpec, target: str, prompts: Sequence[Sequence[int]], max_num_seqs: int,
                 dtype: str = "bfloat16", seed: int = 0, max_model_len: int = 1024,
                 engine_kwargs: dict[str, Any] | None = None) -> tuple[Any, float]:
    """An LLM for `spec` (in this process), warmed up; returns (llm, build seconds)."""
    os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
    # This process already isolates the engine; in-process engine core builds in seconds, not ~45 s.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    # CPU builds otherwise reserve 92% of RAM for the KV cache (ignored on GPUs); offline, no telemetry.
    for name, value in (("VLLM_CPU_KVCACHE_SPACE", "1"), ("HF_HUB_OFFLINE", "1"),
                        ("VLLM_NO_USAGE_STATS", "1"), ("DO_NOT_TRACK", "1")):
        os.environ.setdefault(name, value)
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    build_start = time.perf_counter()
    llm = LLM(model=target, dtype=dtype, enforce_eager=True, max_model_len=max_model_len, seed=seed,
              speculative_config=spec.speculative_config(), disable_log_stats=False,
              async_scheduling=False, distributed_executor_backend="uni", max_num_seqs=max_num_seqs,
              **(engine_kwargs or {}))
    build_s = time.perf_counter() - build_start
    # Warm-up: first-call allocations, lazy imports and the drafter's first passes (its weights
    # paged in: with eight engines alive the page cache is small, and a drafter engine's first
    # cell ran at ~0.6x of its second) are not part of any measurement. Greedy and sampled, long
    # enough for speculation to draft.
    for temperature in (0.0, 1.0):
        llm.generate([TokensPrompt(prompt_token_ids=list(prompts[0]))],
                     SamplingParams(max_tokens=32, temperature=temperature, seed=seed),
                     use_tqdm=False)
    return llm, build_s


def run_cell(llm: Any, spec: EngineSpec, prompts: Sequence[Sequence[int]], batch: int,
             temperature: float, max_tokens: int, dtype: str = "bfloat16", seed: int = 0,
             repeats: int = 1, min_prompts: int | None = None, build_s: float | None = None
             ) -> dict[str, Any]:
    """Time one (temperature, batch) cell on a built engine: tokens/s, vLLM's acceptance counters
    and the plugin's per-step costs."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    cell = list(prompts) if min_prompts is None else \
        [prompts[i % len(prompts)] for i in range(max(batch, min_prompts))]
    before = spec_counters(llm.get_metrics())
    plugin_before = plugin_stats(llm)
    tokens, texts = 0, []
    start = time.perf_counter()
    for _ in range(repeats):
        for first in range(0, len(cell), batch):
            group = cell[first:first + batch]
            params = [SamplingParams(max_tokens=max_tokens, temperature=temperature,
                                     ignore_eos=True, seed=seed + first + i)
                      for i in range(len(group))]
            outputs = llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in group],
                                   params, use_tqdm=False)
            tokens += sum(len(o.outputs[0].token_ids) for o in outputs)
            texts.extend(o.outputs[0].text for o in outputs)
    seconds = time.perf_counter() - start
    counters = _delta(spec_counters(llm.get_metrics()), before)
    plugin = _plugin_delta(plugin_stats(llm), plugin_before)
    k = spec.num_draft_tokens
    return {
        "method": spec.method, "kind": spec.kind, "label": spec.label, "drafter": spec.drafter,
        "options": dict(spec.options),
        "runner_settings": {"model_runner": "v1", "async_scheduling": False,
                            "enforce_eager": True},
        "num_draft_tokens": k, "num_steps": spec.num_steps, "window": spec.window,
        "batch": batch, "temperature": temperature, "dtype": dtype,
        "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
        "engine_build_s": build_s, "num_drafts": counters["drafts"],
        "num_accepted_tokens": counters["accepted"],
        "acceptance_histogram": acceptance_histogram(counters["drafts"],
                                                     counters["accepted_per_pos"], k) if k else [],
        "mean_acceptance_length": (1 + counters["accepted"] / counters["drafts"])
        if counters["drafts"] else None,
        "sample": texts[0] if texts else "",
        **plugin,
    }


def _cell_server(conn, spec: EngineSpec, build_args: tuple, cell_kwargs: dict) -> None:
    """An engine process of run_interleaved: build, say ready, then run cells on request."""
    try:
        llm, build_s = build_engine(spec, *build_args)
        conn.send(("ok", build_s))
        while True:
            command = conn.recv()
            if command is None:
                return
            temperature, batch = command
            conn.send(("ok", run_cell(llm, spec, build_args[1], batch, temperature,
                                      build_s=build_s, **cell_kwargs)))
    except BaseException as err:  # report, never hang the parent
        import traceback

        conn.send(("error", f"{type(err).__name__}: {err}\n{traceback.format_exc()}"))


def _reply(spec: EngineSpec, conn, process) -> Any:
    """The engine process's answer; a process that died (the OOM killer: eight engines take ~21 GB
    here) is named with the fix instead of an EOFError."""
    try:
        status, payload = conn.recv()
    except EOFError:
        process.join(timeout=5)
        raise RuntimeError(
            f"engine {spec.label} died (exit code {process.exitcode}); with every engine alive at "
            "once this needs ~2.7 GB per engine: run fewer engines (--engines) or pass "
            "--no-interleave") from None
    if status != "ok":
        raise RuntimeError(f"engine {spec.label} failed:\n{payload}")
    return payload


def run_interleaved(specs: Sequence[EngineSpec], target: str, prompts: Sequence[Sequence[int]],
                    batches: Sequence[int], temperatures: Sequence[float], max_tokens: int,
                    rounds: int = 1, dtype: str = "bfloat16", seed: int = 0,
                    max_model_len: int = 1024, min_prompts: int | None = None,
                    progress: Any = None) -> list[list[list[dict[str, Any]]]]:
    """Every engine in its own spawned process, all alive at once but one running at a time: each
    (temperature, batch) cell is timed on every engine in turn (the order rotating with the round),
    so that the host's drift (20-30% between minutes on this CPU) falls on all engines of a cell
    alike. Returns per engine, per round, its rows in cell order (as run_isolated's)."""
    context = multiprocessing.get_context("spawn")
    servers = []
    try:
        for spec in specs:  # built one after another: builds are CPU-heavy
            parent, child = context.Pipe()
            process = context.Process(
                target=_cell_server, daemon=True,
                args=(child, spec, (target, prompts, max(batches), dtype, seed, max_model_len, None),
                      {"max_tokens": max_tokens, "dtype": dtype, "seed": seed,
                       "min_prompts": min_prompts}))
            process.start()
            child.close()  # the parent's copy: a dead engine then reads as EOF, not a hang
            servers.append((spec, parent, process))
            build_s = _reply(spec, parent, process)
            if progress:
                progress(f"built {spec.label} ({build_s:.0f} s)")
        cells = [(t, b) for t in temperatures for b in batches]
        rows: list[list[list[dict[str, Any]]]] = [[[] for _ in range(rounds)] for _ in specs]
        for round_index in range(rounds):
            for temperature, batch in cells:
                order = list(range(len(specs)))
                shift = round_index % len(order)
                for index in order[shift:] + order[:shift]:
                    spec, conn, process = servers[index]
                    conn.send((temperature, batch))
                    rows[index][round_index].append(_reply(spec, conn, process))
                if progress:
                    progress(f"round {round_index + 1}/{rounds}: temperature {temperature:g}, "
                             f"batch {batch} done")
        return rows
    finally:
        for _, conn, process in servers:
            try:
                conn.send(None)
            except (BrokenPipeError, OSError):
                pass
            process.join(timeout=60)
            if process.is_alive():
                process.kill()


def _child(queue, args, kwargs) -> None:
    try:
        queue.put(("ok", run_engine(*args, **kwargs)))
    except BaseException as err:  # report, never hang the parent
        import traceback

        queue.put(("error", f"{type(err).__name__}: {err}\n{traceback.format_exc()}"))


def run_isolated(spec: EngineSpec, *args, **kwargs) -> list[dict[str, Any]]:
    """run_engine in a fresh spawned process (one engine per process, as vLLM prefers)."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_child, args=(queue, (spec, *args), kwargs))
    process.start()
    status, payload = queue.get()
    process.join()
    if status != "ok":
        raise RuntimeError(f"engine {spec.label} failed:\n{payload}")
    return payload


def add_speedups(results: list[dict[str, Any]], value: str = "tokens_per_s",
                 cell: tuple[str, str] = ("temperature", "batch")) -> None:
    """speedup: `value` (tokens/s) over no speculation (the mean of its runs) in the same `cell`
    (temperature and batch; bench_serve: temperature and concurrency), in the same run;
    speedup_vs_draft_model: over the fastest draft_model engine on Model Runner V1 without async
    scheduling (the fair baseline; rows without a runner ran there); speedup_vs_best_peer: over
    the fastest of what vLLM ships (PEERS), named in best_peer."""
    def mean(values: list[float]) -> float | None:
        return sum(values) / len(values) if values else None

    def key_of(r: dict[str, Any]) -> tuple:
        return tuple(r.get(name) for name in cell)

    ok = [r for r in results if r.get(value)]
    keys = {key_of(r) for r in ok}
    plain = {key: mean([r[value] for r in ok if r["method"] == "none" and key_of(r) == key])
             for key in keys}
    draft_model = {key: max([r[value] for r in ok if r["method"] == "draft_model"
                             and r.get("runner", "v1") == "v1" and key_of(r) == key], default=None)
                   for key in keys}
    best_peer = {key: max([(r[value], r["label"]) for r in ok if r["method"] in PEERS
                           and key_of(r) == key], default=None) for key in keys}
    for r in results:
        key, tps = key_of(r), r.get(value)
        r["speedup"] = tps / plain[key] if tps and plain.get(key) else None
        r["speedup_vs_draft_model"] = tps / draft_model[key] if tps and draft_model.get(key) else None
        peer = best_peer.get(key)
        r["best_peer"] = peer[1] if peer else None
        r["speedup_vs_best_peer"] = tps / peer[0] if tps and peer else None


def format_table(results: list[dict[str, Any]]) -> str:
    header = (f"{'method':<34} {'temp':>4} {'batch':>5} {'tok/s':>8} {'accept len':>10} "
              f"{'vs none':>8} {'vs draft_model':>14} {'vs best peer':>12} {'plugin ms/step':>14}")
    lines = [header, "-" * len(header)]
    for r in sorted(results, key=lambda r: (r["temperature"], r["batch"], METHODS.index(r["method"]),
                                            r["label"])):
        accept = f"{r['mean_acceptance_length']:.2f}" if r["mean_acceptance_length"] else "-"
        vs_none = f"{r['speedup']:.2f}x" if r.get("speedup") else "-"
        vs_dm = f"{r['speedup_vs_draft_model']:.2f}x" if r.get("speedup_vs_draft_model") else "-"
        vs_peer = f"{r['speedup_vs_best_peer']:.2f}x" if r.get("speedup_vs_best_peer") else "-"
        plugin = (f"{r['plugin_ms_per_step']:.1f}" if r.get("plugin_ms_per_step") is not None
                  else "-")
        lines.append(f"{r['label']:<34} {r['temperature']:>4g} {r['batch']:>5} "
                     f"{r['tokens_per_s']:>8.1f} {accept:>10} {vs_none:>8} {vs_dm:>14} {vs_peer:>12} "
                     f"{plugin:>14}")
    return "\n".join(lines)


def default_dtype(dtype: str = "auto") -> str:
    """"auto" -> float32 on CPU, bfloat16 on a GPU; any other value is returned as given.

    CPUs without AVX512-BF16/AMX (this project's 2-core AVX2 AMD EPYC among them) emulate bf16
    matmuls: there float32 decodes 1.2x (batch 1) to 5x (batch 16) faster in vLLM (bench_offline,
    measured), and float32 is also the batch-shape-invariant dtype the exactness tests use.
    """
    if dtype != "auto":
        return dtype
    import torch

    return "bfloat16" if torch.cuda.is_available() else "float32"


def device_name() -> str:
    import platform

    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU {platform.processor() or platform.machine()} x{os.cpu_count()}"


__all__ = ["EngineSpec", "run_engine", "run_isolated", "add_speedups", "format_table", "default_dtype",
           "acceptance_histogram", "spec_counters", "device_name"]
