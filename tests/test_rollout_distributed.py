"""Rollouts under `accelerate launch` with two CPU processes (gloo) whose prompts finish at different lengths."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two_cpu_processes(script: Path, *args: str, timeout: int = 180) -> subprocess.CompletedProcess:
    """accelerate's multi-process launcher with the CPU forced on (MULTI_CPU would silently run one process)."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "accelerate_configs/cpu_2proc.yaml"),
           "--main_process_port", str(free_port()), str(script), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


@pytest.mark.parametrize("alpha", ["0.0", "0.5"])
def test_two_processes_finishing_at_different_lengths(tmp_path, alpha):
    out = tmp_path / "result.json"
    proc = launch_two_cpu_processes(ROOT / "tests/helpers/rollout_2proc.py", str(out), alpha)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["world_size"] == 2  # really two processes
    (steps0, max0, min0), (steps1, max1, min1) = result["stats"]
    assert (max0, min0) == (1, 1)  # rank 0 ended at its first token
    assert (max1, min1) == (6, 6)  # rank 1 ran to max_new_tokens
    assert steps0 == steps1 == 6  # rank 0 kept stepping (with padding) until rank 1 was done


def test_heldout_evaluation_sharded_over_two_processes_gives_the_one_process_numbers(tmp_path):
    """Each process evaluates its share of the held-out batches (3 batches over 2 ranks: one rank repeats a batch
    to stay in step); the gathered summary and predictions equal a one-process run's exactly."""
    helper = ROOT / "tests/helpers/heldout_2proc.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    one = subprocess.run([sys.executable, str(helper), str(tmp_path / "one.json")], capture_output=True, text=True,
                         timeout=180, env=env, cwd=ROOT)
    assert one.returncode == 0, one.stderr[-3000:]
    proc = launch_two_cpu_processes(helper, str(tmp_path / "two.json"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    single, sharded = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert (single["world_size"], sharded["world_size"]) == (1, 2)
    assert len(sharded["predictions"]) == 5 and "reverse_kl_refs" in sharded["summary"]
    assert sharded["predictions"] == single["predictions"]  # in prompt order, the same texts and metrics
    assert sharded["summary"] == single["summary"]  # to the last digit
