"""``tools/gpu_check.sh``: the GPU check's logic, run here with the CPU standing in.

This machine has no GPU, which is the one thing mocked: ``--provider cpu`` runs every
step (provider profile, agreement, engine rates, the HTTP service under load) on the CPU,
and the shell wrapper must refuse clearly where there is no GPU.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures" / "cifar10-val"


def test_every_step_runs_and_reports_with_the_cpu_standing_in(cifar_model_file: Path) -> None:
    command = [sys.executable, "-m", "tools.gpu_check", "--provider", "cpu"]
    command += ["--model", str(cifar_model_file), "--images", str(FIXTURES)]
    command += ["--batches", "1,4", "--clients", "4", "--seconds", "0.3", "--workers", "2"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, cwd=REPO)
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    nodes = re.search(r"^1\. nodes by provider: \{'CPUExecutionProvider': (\d+)\}", out, re.M)
    assert nodes and int(nodes.group(1)) > 20, out  # every node of ResNet-20, on that provider
    assert re.search(r"^2\. .* max \|logit diff\| 0\.00e\+00, top-1 agree 100%", out, re.M)
    assert len(re.findall(r"^3\. engine batch +[14]: +[\d.]+ img/s", out, re.M)) == 2, out
    assert re.search(r"^4\. HTTP +4 clients, workers 2: +[\d.]+ img/s .* errors 0$", out, re.M)


def test_a_provider_this_onnxruntime_lacks_is_refused(cifar_model_file: Path) -> None:
    command = [sys.executable, "-m", "tools.gpu_check", "--provider", "cuda"]
    command += ["--model", str(cifar_model_file), "--images", str(FIXTURES)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=REPO)
    assert result.returncode == 2
    assert "CUDAExecutionProvider is not in this onnxruntime" in result.stderr


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="a GPU is here")
def test_the_script_says_there_is_no_gpu_and_exits_2() -> None:
    result = subprocess.run(
        ["bash", "tools/gpu_check.sh"], capture_output=True, text=True, timeout=60, cwd=REPO
    )
    assert result.returncode == 2
    assert "gpu_check: no NVIDIA GPU here" in result.stderr
