"""`vllm-specdiff serve` (vllm_specdiff.vllm_plugin.serve): vLLM's OpenAI server with the specdiff flags.

Starts a real server on 127.0.0.1 (a free port) in its own process group, sends 32 concurrent
completions plus bad requests, reads /metrics, and always stops the server by its process group.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("vllm")

STARTUP_TIMEOUT_S = 240
NUM_CONCURRENT = 32


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http(method: str, url: str, payload: dict | None = None, timeout: float = 120.0):
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
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


def test_serve_answers_openai_completions_with_specdiff(tiny_target, tiny_drafter, tmp_path):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "server.log"
    argv = [sys.executable, "-m", "vllm_specdiff.vllm_plugin.serve", "serve", str(tiny_target),
            "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
            "--max-model-len", "512", "--enforce-eager", "--max-num-seqs", "32",
            "--speculative-method", "specdiff", "--speculative-model", str(tiny_drafter),
            "--num-speculative-tokens", "4", "--specdiff-steps", "2", "--specdiff-window", "32",
            "--specdiff-order", "left_to_right", "--specdiff-draft-temperature", "1.0",
            "--specdiff-verifier", "specdiff", "--specdiff-log-every", "5",
            "--distributed-executor-backend", "uni"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
           "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
    with open(log_path, "w") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env,
                                   start_new_session=True)  # own process group: killed as a whole
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"server exited with {process.returncode}:\n{log_path.read_text()[-4000:]}")
            try:
                if http("GET", f"{base}/health", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"server not up after {STARTUP_TIMEOUT_S} s:\n"
                            f"{log_path.read_text()[-4000:]}")
            time.sleep(1)

        status, body = http("GET", f"{base}/v1/models")
        assert status == 200 and str(tiny_target) in body

        # Bad requests get a 4xx answer, and the engine keeps serving.
        status, body = http("POST", f"{base}/v1/completions",
                            {"model": str(tiny_target), "prompt": "river " * 600, "max_tokens": 8})
        assert status == 400, body
        status, body = http("POST", f"{base}/v1/completions",
                            {"model": str(tiny_target), "prompt": "The river", "max_tokens": 8,
                             "temperature": -1.0})
        assert status == 400, body

        def complete(i: int):
            return http("POST", f"{base}/v1/completions",
                        {"model": str(tiny_target), "prompt": f"The river ran past the mill {i}",
                         "max_tokens": 24, "temperature": 0.0 if i % 2 else 1.0, "seed": i,
                         "ignore_eos": True})

        with ThreadPoolExecutor(NUM_CONCURRENT) as pool:
            results = list(pool.map(complete, range(NUM_CONCURRENT)))
        for status, body in results:
            assert status == 200, body
            choice = json.loads(body)["choices"][0]
            assert choice["text"] and json.loads(body)["usage"]["completion_tokens"] == 24

        status, metrics = http("GET", f"{base}/metrics")
        assert status == 200
        values = {}
        for line in metrics.splitlines():
            if line.startswith("vllm:spec_decode_num_"):
                name, value = line.rsplit(" ", 1)
                values[name.split("{")[0]] = values.get(name.split("{")[0], 0.0) + float(value)
        assert values.get("vllm:spec_decode_num_drafts_total", 0) > 0, metrics[-3000:]
        assert values.get("vllm:spec_decode_num_draft_tokens_total", 0) > 0
        assert "vllm:spec_decode_num_accepted_tokens_total" in values
        log_text = log_path.read_text()
        assert "specdiff: drafter loaded on" in log_text  # engine core: the proposer ran
        assert "specdiff drafter: " in log_text and " ms/step" in log_text  # drafter time
    finally:
        stop_process_group(process)
    assert process.poll() is not None
