"""Served and offline engines under a mix of ordinary and bad requests (CPU, tiny local models).

Two real OpenAI servers on 127.0.0.1 (free ports, each in its own process group, always stopped by
process group), started together to overlap their start-ups:
- specdiff through vLLM's own `vllm serve` console script with the README's flags
  (--speculative-model / --speculative-method / --num-speculative-tokens) and the default verifier
  `auto` (vLLM's sampler on CPU: the configuration a top-k request used to kill);
- vLLM's own ngram method through `vllm-specdiff serve`, i.e. with the plugin loaded.
Each gets REQUEST_MIX (16 requests at once, official `openai` client): sampled with top_k, top_p,
top_k + top_p, seeds, n=2, streaming, penalties, logprobs, greedy, and bad requests (min_p and
logit_bias, which speculative decoding refuses, and invalid values). Every good request must
complete, every bad one must get a 400, and the server must stay healthy. An in-process LLM engine
gets the same mix with each verifier. Start-up errors are checked to print as one line.
"""
from __future__ import annotations

import faulthandler
import gc
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("vllm")
openai = pytest.importorskip("openai")

STARTUP_TIMEOUT_S = 420
REQUEST_TIMEOUT_S = 300
OFFLINE_HANG_GUARD_S = 900  # a hung in-process engine aborts the session with a traceback
MAX_TOKENS = 16
LONG_PROMPT = "river " * 600  # > max_model_len 512
ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1",
       "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
COMMON_FLAGS = ["--host", "127.0.0.1", "--dtype", "float32", "--max-model-len", "512",
                "--enforce-eager", "--max-num-seqs", "16", "--distributed-executor-backend", "uni"]

# name -> keyword arguments of client.completions.create (vLLM-only fields in extra_body).
GOOD_REQUESTS: dict[str, dict] = {
    "greedy": dict(temperature=0.0),
    "top_k": dict(temperature=0.8, extra_body={"top_k": 5}),
    "top_p": dict(temperature=1.0, top_p=0.9),
    "top_k_top_p": dict(temperature=0.9, top_p=0.8, extra_body={"top_k": 20}),
    "seed_a": dict(temperature=1.0, seed=1234, extra_body={"top_k": 50}),
    "seed_b": dict(temperature=1.0, seed=1234, extra_body={"top_k": 50}),
    "n2": dict(temperature=1.0, n=2),
    "stream": dict(temperature=0.7, stream=True, extra_body={"top_k": 20}),
    "penalties": dict(temperature=0.8, frequency_penalty=0.5, presence_penalty=0.3,
                      extra_body={"repetition_penalty": 1.2}),
    "logprobs": dict(temperature=1.0, logprobs=2),
    "greedy_top_k": dict(temperature=0.0, extra_body={"top_k": 3}),
}
# Speculative decoding refuses min_p and logit_bias (vLLM's SamplingParams._validate_spec_decode).
BAD_REQUESTS: dict[str, dict] = {
    "min_p": dict(temperature=1.0, extra_body={"min_p": 0.1}),
    "logit_bias": dict(temperature=1.0, logit_bias={"5": 10}),
    "negative_temperature": dict(temperature=-1.0),
    "top_p_above_1": dict(temperature=1.0, top_p=1.5),
    "prompt_too_long": dict(temperature=1.0, prompt=LONG_PROMPT),
}
assert len(GOOD_REQUESTS) + len(BAD_REQUESTS) == 16


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http(method: str, url: str, timeout: float = 60.0) -> tuple[int, str]:
    request = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def stop_process_group(process: subprocess.Popen) -> None:
    """SIGTERM to the server's whole process group (engine core included), SIGKILL if it lingers."""
    if process.poll() is not None:
        return
    pgid = os.getpgid(process.pid)
    os.killpg(pgid, signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(pgid, signal.SIGKILL)
        process.wait(timeout=30)


class Server:
    """A server process started at construction; `wait_ready()` blocks until /health answers."""

    def __init__(self, argv: list[str], log_path: Path, model: str, extra: list[str] = ()) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.model = model
        self.log_path = log_path
        with open(log_path, "w") as log:
            self.process = subprocess.Popen(
                [*argv, *COMMON_FLAGS, *extra, "--port", str(self.port)], stdout=log,
                stderr=subprocess.STDOUT, env={**os.environ, **ENV},
                start_new_session=True)  # own process group: stopped as a whole

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text()[-chars:]

    def wait_ready(self) -> "Server":
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if self.process.poll() is not None:
                pytest.fail(f"server exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                if http("GET", f"{self.base}/health", timeout=2)[0] == 200:
                    return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"server not up after {STARTUP_TIMEOUT_S} s:\n{self.log_tail()}")
            time.sleep(1)

    def client(self):
        return openai.OpenAI(base_url=f"{self.base}/v1", api_key="EMPTY", max_retries=0,
                             timeout=REQUEST_TIMEOUT_S)


def vllm_console_script() -> str:
    script = Path(sys.executable).with_name("vllm")
    return str(script) if script.exists() else shutil.which("vllm") or "vllm"


@pytest.fixture(scope="module")
def servers(tiny_target, tiny_drafter, tmp_path_factory):
    """{"specdiff": Server, "ngram": Server}, both started before either is waited for."""
    logs = tmp_path_factory.mktemp("server_logs")
    target = str(tiny_target)
    started = {
        # The README's command, through vLLM's own console script.
        "specdiff": Server([vllm_console_script(), "serve", target,
                            "--speculative-model", str(tiny_drafter),
                            "--speculative-method", "specdiff", "--num-speculative-tokens", "4",
                            "--specdiff-steps", "2", "--specdiff-window", "32",
                            "--specdiff-log-every", "1"], logs / "specdiff.log", target),
        "ngram": Server([sys.executable, "-m", "vllm_specdiff.vllm_plugin.serve", "serve", target,
                         "--speculative-config",
                         json.dumps({"method": "ngram", "num_speculative_tokens": 4,
                                     "prompt_lookup_max": 3, "prompt_lookup_min": 1})],
                        logs / "ngram.log", target),
    }
    try:
        yield {name: server.wait_ready() for name, server in started.items()}
    finally:
        for server in started.values():
            stop_process_group(server.process)


def send(client, model: str, index: int, name: str, request: dict):
    """One completion; returns (name, "ok", texts) or (name, "error", (status, message))."""
    request = dict(request)
    prompt = request.pop("prompt", f"The river ran past the mill {index}")
    extra_body = {"ignore_eos": True, **request.pop("extra_body", {})}
    try:
        response = client.completions.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS,
                                             extra_body=extra_body, **request)
        if request.get("stream"):
            texts, finish = [""], None
            for chunk in response:
                for choice in chunk.choices:
                    texts[0] += choice.text
                    finish = choice.finish_reason or finish
            assert finish == "length", (name, finish)
            return name, "ok", texts
        assert response.usage.completion_tokens == MAX_TOKENS * request.get("n", 1), (name, response)
        assert all(choice.finish_reason == "length" for choice in response.choices), name
        if request.get("logprobs"):
            assert all(len(c.logprobs.tokens) == MAX_TOKENS for c in response.choices), name
        return name, "ok", [choice.text for choice in response.choices]
    except openai.APIStatusError as err:
        return name, "error", (err.status_code, str(err))


def run_mix(server: Server, copies: int = 1) -> dict[str, tuple]:
    """REQUEST_MIX (`copies` times, names suffixed by the copy), 16 * copies requests at once, good and
    bad interleaved."""
    requests = [*GOOD_REQUESTS.items(), *BAD_REQUESTS.items()]
    order = [requests[i] for i in (list(range(0, 16, 2)) + list(range(1, 16, 2)))]
    if copies > 1:
        order = [(f"{name}#{c}", request) for c in range(copies) for name, request in order]
    client = server.client()
    with ThreadPoolExecutor(len(order)) as pool:
        futures = [pool.submit(send, client, server.model, i, name, request)
                   for i, (name, request) in enumerate(order)]
        results = {name: (status, value) for name, status, value in
                   (future.result() for future in futures)}
    return results


def check_mix(server: Server, results: dict[str, tuple]) -> None:
    def copies(name):
        return [key for key in results if key == name or key.startswith(name + "#")]

    for name in GOOD_REQUESTS:
        for key in copies(name):
            status, value = results[key]
            assert status == "ok", f"{key}: {value}\n{server.log_tail()}"
            assert all(isinstance(text, str) for text in value)
            if name == "n2":
                assert len(value) == 2
    for name in BAD_REQUESTS:
        for key in copies(name):
            status, value = results[key]
            assert status == "error" and value[0] == 400, f"{key}: {status} {value}"
            if name in ("min_p", "logit_bias"):
                assert "speculative decoding" in value[1], results[key]
    assert len(results) == sum(len(copies(n)) for n in [*GOOD_REQUESTS, *BAD_REQUESTS])
    # Still healthy and serving.
    assert server.process.poll() is None, server.log_tail()
    assert http("GET", f"{server.base}/health")[0] == 200
    name, status, _ = send(server.client(), server.model, 99, "after", GOOD_REQUESTS["top_k"])
    assert status == "ok", server.log_tail()


def spec_decode_counters(server: Server) -> dict[str, float]:
    status, metrics = http("GET", f"{server.base}/metrics")
    assert status == 200
    values: dict[str, float] = {}
    for line in metrics.splitlines():
        if line.startswith("vllm:spec_decode_num_"):
            name, value = line.rsplit(" ", 1)
            values[name.split("{")[0]] = values.get(name.split("{")[0], 0.0) + float(value)
    return values


def test_vllm_serve_with_readme_flags_survives_the_request_mix(servers):
    server = servers["specdiff"]
    check_mix(server, run_mix(server))
    counters = spec_decode_counters(server)
    assert counters.get("vllm:spec_decode_num_drafts_total", 0) > 0, counters
    assert counters.get("vllm:spec_decode_num_draft_tokens_total", 0) > 0
    assert "vllm:spec_decode_num_accepted_tokens_total" in counters
    log_text = server.log_path.read_text()
    assert "specdiff: drafter loaded on" in log_text  # engine core: the proposer ran
    assert "specdiff drafter: " in log_text and " ms/step" in log_text  # drafter time
    assert "guarded vLLM's top-k against empty batches" in log_text


@pytest.fixture(scope="module")
def conditioned_server(tmp_path_factory):
    """The embedded target (SmolLM2-135M) served with the shipped conditioned drafter, 32 seats."""
    from vllm_specdiff.assets import CONDITIONED_DRAFTER_DIR, prepare_target

    target = str(prepare_target())
    server = Server([vllm_console_script(), "serve", target,
                     "--speculative-model", str(CONDITIONED_DRAFTER_DIR),
                     "--speculative-method", "specdiff", "--num-speculative-tokens", "4",
                     "--specdiff-draft-policy", "auto", "--specdiff-log-every", "1"],
                    tmp_path_factory.mktemp("conditioned_logs") / "server.log", target,
                    extra=["--max-num-seqs", "32"])
    try:
        yield server.wait_ready()
    finally:
        stop_process_group(server.process)


def test_conditioned_drafter_serves_32_concurrent_requests_with_bad_ones_mixed_in(conditioned_server):
    """32 requests at once (22 good of every kind above, 10 bad) against the embedded target and the
    shipped conditioned drafter: every good one completes, every bad one gets a 400, the server
    stays up, and the conditioned drafter did draft and got tokens accepted."""
    server = conditioned_server
    results = run_mix(server, copies=2)
    assert len(results) == 32
    check_mix(server, results)
    counters = spec_decode_counters(server)
    assert counters.get("vllm:spec_decode_num_drafts_total", 0) > 0, counters
    assert counters.get("vllm:spec_decode_num_accepted_tokens_total", 0) > 0, counters
    assert "specdiff: conditioned drafter loaded on" in server.log_path.read_text()


def test_serve_client_example_against_the_conditioned_server(conditioned_server):
    """examples/serve_client.py, run as a user runs it, against the served embedded target."""
    server = conditioned_server
    done = subprocess.run([sys.executable, str(Path(__file__).resolve().parents[1] / "examples" /
                                               "serve_client.py"),
                           "--base-url", server.base, "--model", server.model, "--max-tokens", "16"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert done.stdout.startswith("+++ ") and "acceptance length" in done.stdout, done.stdout


def test_vllm_ngram_with_the_plugin_loaded_survives_the_request_mix(servers):
    server = servers["ngram"]
    check_mix(server, run_mix(server))
    assert "vllm-specdiff" in server.log_path.read_text()  # the plugin was loaded


# ---------------------------------------------------------------------------------------------------
# Offline, in-process engine
# ---------------------------------------------------------------------------------------------------
def sampling_params(request: dict):
    """SamplingParams equivalent of a request of the mix (streaming has no offline form)."""
    from vllm import SamplingParams

    request = {k: v for k, v in request.items() if k not in ("stream", "prompt")}
    extra = request.pop("extra_body", {})
    if "logit_bias" in request:
        request["logit_bias"] = {int(k): v for k, v in request["logit_bias"].items()}
    return SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True, **request, **extra)


@pytest.mark.parametrize("verifier", ["auto", "specdiff"])
def test_offline_engine_survives_the_request_mix(tiny_target, tiny_drafter, verifier):
    from vllm import LLM
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    try:
        from vllm.exceptions import VLLMClientError
        bad_request = (ValueError, VLLMClientError)
    except ImportError:
        bad_request = (ValueError,)
    llm = LLM(model=str(tiny_target), distributed_executor_backend="uni", enforce_eager=True,
              dtype="float32", max_model_len=512, max_num_seqs=16,
              speculative_config={"method": "specdiff", "model": str(tiny_drafter),
                                  "num_speculative_tokens": 4, "num_steps": 2, "window": 32,
                                  "verifier": verifier})
    faulthandler.dump_traceback_later(OFFLINE_HANG_GUARD_S, exit=True)
    try:
        names = list(GOOD_REQUESTS)
        outputs = llm.generate([f"The river ran past the mill {i}" for i in range(len(names))],
                               [sampling_params(GOOD_REQUESTS[name]) for name in names],
                               use_tqdm=False)
        for name, output in zip(names, outputs):
            assert len(output.outputs) == GOOD_REQUESTS[name].get("n", 1), name
            assert all(len(c.token_ids) == MAX_TOKENS for c in output.outputs), name
        for name, request in BAD_REQUESTS.items():
            with pytest.raises(bad_request):
                llm.generate([request.get("prompt", "The river")], sampling_params(request),
                             use_tqdm=False)
        after = llm.generate(["The river"], sampling_params(GOOD_REQUESTS["top_k"]), use_tqdm=False)
        assert len(after[0].outputs[0].token_ids) == MAX_TOKENS
        sampler = llm.collective_rpc(
            lambda worker: type(worker.model_runner.rejection_sampler).__name__)[0]
        assert sampler == ("SpecDiffRejectionSampler" if verifier == "specdiff"
                           else "RejectionSampler")
    finally:
        faulthandler.cancel_dump_traceback_later()
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
        cleanup_dist_env_and_memory()


# ---------------------------------------------------------------------------------------------------
# `vllm serve` on vllm-cpu, start-up errors
# ---------------------------------------------------------------------------------------------------
def test_vllm_alias_metadata_keeps_cpu_platform_detection(tmp_path):
    from importlib import metadata

    from vllm_specdiff.vllm_plugin.serve import write_vllm_alias

    dist_info = write_vllm_alias(tmp_path, "0.32.0")
    distribution = metadata.Distribution.at(dist_info)
    assert distribution.metadata["Name"] == "vllm"
    # vllm.platforms.cpu_platform_plugin: "cpu" in version("vllm") selects the CPU platform.
    assert distribution.version == "0.32.0+cpu"
    assert sorted(str(f) for f in distribution.files) == [
        f"{dist_info.name}/{name}" for name in ("INSTALLER", "METADATA", "RECORD")]
    assert not distribution.entry_points  # no second `vllm` script, no duplicate plugins


def test_startup_error_is_one_line(tiny_target, tiny_drafter):
    """A bad specdiff setting ends `vllm serve` with one line naming the fix, no traceback."""
    argv = [vllm_console_script(), "serve", str(tiny_target), "--speculative-model",
            str(tiny_drafter), "--speculative-method", "specdiff", "--num-speculative-tokens", "4",
            "--specdiff-steps", "9", *COMMON_FLAGS, "--port", str(free_port())]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=STARTUP_TIMEOUT_S,
                            env={**os.environ, **ENV})
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr[-3000:]
    assert "--specdiff-steps" in errors[0] and "[1, num_speculative_tokens = 4]" in errors[0]
    assert "Traceback" not in result.stderr


def test_startup_error_hook_prints_one_line_unless_asked(monkeypatch, capsys):
    from vllm_specdiff.vllm_plugin import patches

    patches.install_startup_error_hook()
    try:
        raise patches.SpecDiffConfigError("specdiff: bad value; use a good one") from KeyError("x")
    except patches.SpecDiffConfigError as err:
        error = err
    monkeypatch.delenv(patches.TRACEBACK_ENV, raising=False)
    sys.excepthook(type(error), error, error.__traceback__)
    assert capsys.readouterr().err.splitlines() == [
        f"error: specdiff: bad value; use a good one ({patches.TRACEBACK_ENV}=1 shows the "
        "traceback)"]
    monkeypatch.setenv(patches.TRACEBACK_ENV, "1")
    sys.excepthook(type(error), error, error.__traceback__)
    assert "Traceback" in capsys.readouterr().err
    other = RuntimeError("not ours")
    monkeypatch.delenv(patches.TRACEBACK_ENV)
    sys.excepthook(RuntimeError, other, None)
    assert "RuntimeError: not ours" in capsys.readouterr().err


def test_unsupported_rejection_sample_methods_are_refused_at_startup(tiny_target, tiny_drafter):
    """'block' (vLLM's V2 runner only) everywhere; 'synthetic' where vLLM's CPU kernels lack it."""
    from vllm import LLM
    from vllm.platforms import current_platform

    methods = {"block": {}, "synthetic": {"synthetic_acceptance_rates": [0.9, 0.8, 0.7, 0.6]}}
    for method, extra in methods.items():
        if method == "synthetic" and not current_platform.is_cpu():
            continue
        with pytest.raises(ValueError, match=f"rejection_sample_method '{method}'"):
            LLM(model=str(tiny_target), distributed_executor_backend="uni", enforce_eager=True,
                dtype="float32", max_model_len=512,
                speculative_config={"method": "specdiff", "model": str(tiny_drafter),
                                    "num_speculative_tokens": 4, "window": 32,
                                    "rejection_sample_method": method, **extra})
