"""Settings: defaults, environment, flags over environment, and clear validation errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from service.__main__ import banner, build_parser
from service.settings import (
    Settings,
    SettingsError,
    available_cpus,
    cgroup_cpu_quota,
    load_settings,
)


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("RESNET_SERVE_"):
            monkeypatch.delenv(name)


def test_defaults() -> None:
    settings = load_settings()
    assert (settings.host, settings.port, settings.models_dir) == ("0.0.0.0", 8000, Path("models"))
    assert settings.providers == ("auto",)
    assert (settings.max_batch_size, settings.max_delay_ms, settings.max_queue_size) == (
        32,
        0,
        1024,
    )
    assert settings.default_model is None


def test_environment_with_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RESNET_SERVE_PORT", "9001")
    monkeypatch.setenv("RESNET_SERVE_PROVIDERS", "cuda, cpu")
    monkeypatch.setenv("RESNET_SERVE_MAX_DELAY_MS", "2.5")
    monkeypatch.setenv("RESNET_SERVE_ALLOW_SPINNING", "true")
    monkeypatch.setenv("RESNET_SERVE_DEFAULT_MODEL", "")  # empty: unset, as compose passes it
    settings = load_settings()
    assert settings.port == 9001
    assert settings.providers == ("cuda", "cpu")
    assert settings.max_delay_ms == 2.5
    assert settings.allow_spinning is True
    assert settings.default_model is None


def test_flags_override_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RESNET_SERVE_PORT", "9001")
    monkeypatch.setenv("RESNET_SERVE_MAX_BATCH_SIZE", "8")
    args = build_parser().parse_args(["--models", "/srv/models", "--port", "7000"])
    flags = {k: v for k, v in vars(args).items() if v is not None}
    settings = load_settings(**flags)
    assert settings.port == 7000
    assert settings.models_dir == Path("/srv/models")
    assert settings.max_batch_size == 8  # from the environment, no flag given
    text = banner(settings, set(flags))
    assert "port                     7000" in text and "(flag, RESNET_SERVE_PORT)" in text
    assert "(env, RESNET_SERVE_MAX_BATCH_SIZE)" in text


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"port": "0"},
            "port (RESNET_SERVE_PORT) = '0': Input should be greater than or equal to 1",
        ),
        ({"max_batch_size": "lots"}, "max_batch_size (RESNET_SERVE_MAX_BATCH_SIZE) = 'lots'"),
        ({"max_delay_ms": "-1"}, "max_delay_ms (RESNET_SERVE_MAX_DELAY_MS) = '-1'"),
        ({"providers": "gpu"}, "unknown provider 'gpu'; use 'auto', 'cuda', 'cpu', 'tensorrt'"),
        ({"providers": "auto,cpu"}, "'auto' cannot be combined with other providers"),
        ({"log_level": "loud"}, "log_level (RESNET_SERVE_LOG_LEVEL) = 'loud'"),
    ],
)
def test_bad_values_are_named_with_their_variable(overrides: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings(**overrides)
    assert message in str(caught.value)


def test_every_setting_has_a_flag_and_a_description() -> None:
    parser = build_parser()
    flags = {action.dest for action in parser._actions}
    for name, field in Settings.model_fields.items():
        assert name in flags
        assert field.description, name


def test_cli_exits_with_status_2_and_the_message(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "service", "--models", str(tmp_path), "--port", "http"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "port (RESNET_SERVE_PORT) = 'http': Input should be a valid integer" in result.stderr


@pytest.mark.parametrize(
    ("cpu_max", "expected"),
    [
        ("200000 100000\n", 2),
        ("150000 100000\n", 2),  # 1.5 CPUs: two threads, each busy part of the time
        ("50000 100000\n", 1),
        ("max 100000\n", None),
        ("", None),
        ("garbage\n", None),
    ],
)
def test_cgroup_quota_is_read_from_cpu_max(
    tmp_path: Path, cpu_max: str, expected: int | None
) -> None:
    path = tmp_path / "cpu.max"
    path.write_text(cpu_max)
    assert cgroup_cpu_quota(path, tmp_path / "no-v1") == expected


@pytest.mark.parametrize(
    ("quota_us", "period_us", "expected"),
    [("300000", "100000", 3), ("-1", "100000", None), ("150000", "100000", 2), ("x", "1", None)],
)
def test_a_cgroup_v1_quota_is_read_where_v2_is_absent(
    tmp_path: Path, quota_us: str, period_us: str, expected: int | None
) -> None:
    (tmp_path / "cpu.cfs_quota_us").write_text(quota_us + "\n")
    (tmp_path / "cpu.cfs_period_us").write_text(period_us + "\n")
    assert cgroup_cpu_quota(tmp_path / "no-cpu.max", tmp_path) == expected


def test_cpus_are_capped_by_the_quota_and_missing_files_are_no_quota(tmp_path: Path) -> None:
    import os

    path = tmp_path / "cpu.max"
    path.write_text("100000 100000\n")
    assert available_cpus(path, tmp_path / "no-v1") == 1
    mine = len(os.sched_getaffinity(0))
    assert available_cpus(tmp_path / "absent", tmp_path / "no-v1") == mine


def test_cpus_follow_the_process_affinity() -> None:
    """An affinity mask (taskset, a cpuset) shrinks what the service sizes its threads by."""
    code = (
        "import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
        "from service.settings import available_cpus; print(available_cpus())"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "1"


def test_engine_threads_are_always_an_explicit_count() -> None:
    """0 never reaches ONNX Runtime, whose own default pins its threads to cores."""
    cpus = available_cpus()
    settings = load_settings()
    assert settings.intra_op_threads == 0
    assert settings.intra_op_threads_for(1) == cpus
    assert settings.intra_op_threads_for(2) == max(1, cpus // 2)
    assert settings.intra_op_threads_for(64) == 1
    assert settings.effective_preprocess_threads() == cpus
    pinned = load_settings(intra_op_threads=3)
    assert pinned.intra_op_threads_for(1) == pinned.intra_op_threads_for(2) == 3
