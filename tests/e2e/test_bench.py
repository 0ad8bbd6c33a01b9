"""``python -m tools.bench`` end to end: it starts a server, loads it and prints its figures.

Only that the command works and reports what it measured: the figures themselves are for
a quiet machine (README, Benchmarks), not for assertions in a shared CI runner.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures/cifar10-val"


def test_bench_reports_ceiling_http_figures_and_ratio(cifar_model_file: Path) -> None:
    repository = cifar_model_file.parents[2]  # <repo>/<name>/<version>/model.onnx
    command = [sys.executable, "-m", "tools.bench", "--models", str(repository)]
    command += ["--images", str(FIXTURES), "--count", "16", "--concurrency", "8"]
    command += ["--duration", "1", "--warmup", "0.2", "--lone-seconds", "0.5"]
    command += ["--inprocess-seconds", "0.05", "--repeat", "2"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, check=False)
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "16 images from" in out
    for size in (1, 2, 4, 8, 16, 32):  # every batch size up to the default max_batch_size
        assert re.search(rf"in-process batch +{size}: +[\d.]+ img/s", out), out
    lone = re.search(r"HTTP lone request +: +([\d.]+) img/s .* ok (\d+) +errors (\d+)", out)
    rounds = re.findall(
        r"HTTP concurrency +8: +([\d.]+) img/s .* ok (\d+) +errors (\d+) +"
        r"\(ceiling ([\d.]+) img/s, ratio ([\d.]+)",
        out,
    )
    assert lone and len(rounds) == 2, out  # one line per --repeat round
    for rate, ok, errors in [lone.groups(), *(r[:3] for r in rounds)]:
        assert float(rate) > 0 and int(ok) > 0 and errors == "0"
    for _, _, _, ceiling, round_ratio in rounds:
        assert float(ceiling) > 0 and float(round_ratio) > 0
    ratio = re.search(r"ratio HTTP / in-process: ([\d.]+) \(median of 2 rounds", out)
    assert ratio and float(ratio.group(1)) > 0, out
    assert re.search(r"lone request p50 - in-process batch-1 p50: [+-][\d.]+ ms", out), out


def test_bench_compares_a_model_with_its_int8_variant(tmp_path: Path) -> None:
    from export.quantize import quantize_model

    shipped = FIXTURES.parents[2] / "models" / "cifar10-resnet20" / "1" / "model.onnx"
    (tmp_path / "fp32" / "1").mkdir(parents=True)
    (tmp_path / "fp32" / "1" / "model.onnx").symlink_to(shipped)
    quantize_model(
        shipped, precision="int8", out=tmp_path, name="int8", calibration=FIXTURES, count=40,
        held_back=10, progress=False,
    )  # fmt: skip
    command = [sys.executable, "-m", "tools.bench", "--models", str(tmp_path), "--model", "fp32"]
    command += ["--compare", "int8", "--images", str(FIXTURES), "--count", "16"]
    command += ["--concurrency", "4", "--duration", "0.5", "--warmup", "0.1"]
    command += ["--lone-seconds", "0.3", "--inprocess-seconds", "0.05", "--repeat", "2"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, check=False)
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "model fp32 (" in out and "model int8 (" in out and ", int8)" in out
    for name in ("fp32", "int8"):  # interleaved: each model once per round
        assert len(re.findall(rf"^{name}: HTTP concurrency +4: +[\d.]+ img/s", out, re.M)) == 2
        assert re.search(rf"^{name}: ratio HTTP / in-process: [\d.]+ \(median of 2", out, re.M)
    for what in ("in-process", "HTTP"):
        found = re.search(rf"^int8 / fp32 {what}: ([\d.]+)x \(median of 2 rounds", out, re.M)
        assert found and float(found.group(1)) > 0, out


def test_bench_serves_the_null_model_with_each_worker_count() -> None:
    command = [sys.executable, "-m", "tools.bench", "--workers", "1,2", "--null"]
    command += ["--null-size", "32", "--images", str(FIXTURES), "--count", "16"]
    command += ["--concurrency", "4", "--duration", "0.5", "--warmup", "0.1"]
    command += ["--lone-seconds", "0.3", "--inprocess-seconds", "0.05", "--repeat", "2"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, check=False)
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert re.search(r"^model null \(.*null/1/model.onnx\)", out, re.M), out
    for workers in (1, 2):  # interleaved: each server once per round, no errors
        found = re.findall(rf"^round \d workers {workers}: +[\d.]+ img/s .* errors 0 ", out, re.M)
        assert len(found) == 2, out
    summary = re.search(r"^workers 2: +([\d.]+) img/s .* x workers 1: ([\d.]+) \(", out, re.M)
    assert summary and float(summary.group(1)) > 0 and float(summary.group(2)) > 0, out


@pytest.mark.skipif(
    shutil.which("wrk") is None, reason="wrk is not installed (apt-get install wrk)"
)
def test_bench_loads_with_wrk_when_asked(cifar_model_file: Path) -> None:
    """--client wrk: the loaded rounds come from wrk, with its own count and percentiles."""
    repository = cifar_model_file.parents[2]
    command = [sys.executable, "-m", "tools.bench", "--models", str(repository), "--client", "wrk"]
    command += ["--images", str(FIXTURES), "--count", "16", "--concurrency", "8"]
    command += ["--duration", "1", "--warmup", "1", "--lone-seconds", "0.3"]
    command += ["--inprocess-seconds", "0.05", "--repeat", "1"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, check=False)
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    found = re.search(
        r"HTTP concurrency +8: +([\d.]+) img/s +p50 +([\d.]+) ms +p95 +([\d.]+) ms +"
        r"p99 +([\d.]+) ms +ok (\d+) +errors (\d+)",
        out,
    )
    assert found, out
    rate, p50, p95, p99, ok, errors = found.groups()
    assert float(rate) > 0 and int(ok) > 0 and errors == "0"
    assert 0 < float(p50) <= float(p95) <= float(p99)


def test_bench_refuses_wrk_when_it_is_not_installed(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "tools.bench", "--client", "wrk"]
    env = {**os.environ, "PATH": str(tmp_path)}  # nothing on it, wrk included
    result = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    assert result.returncode == 2
    assert "--client wrk needs wrk on the PATH" in result.stderr
