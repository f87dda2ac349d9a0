"""The examples run as a user runs them (a fresh process each) and do what they say."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_example(name: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, str(ROOT / "examples" / name), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_standalone_example_is_the_targets_greedy_output():
    done = run_example("standalone_conditioned.py", "--num-prompts", "2", "--max-tokens", "24")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "identical to the target's greedy output: True" in done.stdout


def test_offline_example_generates_with_the_conditioned_drafter():
    done = run_example("offline_batch.py", "--num-prompts", "2", "--max-tokens", "24")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert done.stdout.count("+++ ") == 2
    assert "acceptance length" in done.stdout, done.stdout[-2000:]
