"""The model repository scan and the registry's load, readiness, resolve and unload."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from service.errors import ModelNotFound, ModelNotReady, ModelRequired, ShuttingDown
from service.metrics import Metrics
from service.registry import ModelRegistry, State
from service.repository import RepositoryError, scan
from service.settings import Settings


def add_version(root: Path, name: str, version: int | str, source: Path) -> Path:
    target = root / name / str(version) / "model.onnx"
    target.parent.mkdir(parents=True)
    target.symlink_to(source)
    return target


def test_scan_finds_versions_and_overrides(tmp_path: Path, cifar_model_file: Path) -> None:
    add_version(tmp_path, "cifar", 1, cifar_model_file)
    add_version(tmp_path, "cifar", 3, cifar_model_file)
    add_version(tmp_path, "cifar", "v2", cifar_model_file)  # not a version: skipped
    (tmp_path / "cifar" / "4").mkdir()  # no model.onnx: skipped
    (tmp_path / "cifar" / "config.json").write_text('{"max_batch_size": 8, "max_delay_ms": 3}')
    (tmp_path / "empty").mkdir()
    (tmp_path / "README.txt").write_text("not a model")
    models = scan(tmp_path)
    assert list(models) == ["cifar"]
    entry = models["cifar"]
    assert list(entry.versions) == [1, 3] and entry.latest == 3
    assert (entry.overrides.max_batch_size, entry.overrides.max_delay_ms) == (8, 3.0)
    assert entry.overrides.max_queue_size is None and entry.config_error is None


def test_scan_reports_a_bad_config(tmp_path: Path, cifar_model_file: Path) -> None:
    add_version(tmp_path, "cifar", 1, cifar_model_file)
    (tmp_path / "cifar" / "config.json").write_text('{"max_batch": 8}')
    error = scan(tmp_path)["cifar"].config_error
    assert error is not None and "config.json is invalid" in error and "max_batch" in error


def test_scan_of_a_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(RepositoryError, match="does not exist"):
        scan(tmp_path / "nowhere")


def registry(root: Path, **settings: object) -> ModelRegistry:
    return ModelRegistry(Settings(models_dir=root, max_batch_size=4, **settings), Metrics())  # type: ignore[arg-type]


async def test_load_resolve_and_unload(tmp_path: Path, cifar_model_file: Path) -> None:
    add_version(tmp_path, "cifar", 1, cifar_model_file)
    add_version(tmp_path, "cifar", 2, cifar_model_file)
    (tmp_path / "cifar" / "config.json").write_text('{"max_delay_ms": 7}')
    add_version(tmp_path, "broken", 1, tmp_path / "README.txt")
    (tmp_path / "README.txt").write_text("not a model")
    models = registry(tmp_path, default_model="cifar")
    assert models.readiness() == (False, f"scanning {tmp_path}")
    await models.load_all()

    ready, reason = models.readiness()
    assert not ready and reason.startswith("broken v1: failed to load: ")
    served = models.resolve(None, None)  # the default model, latest version
    assert (served.name, served.version, served.state) == ("cifar", 2, State.READY)
    assert served.batching.max_batch_size == 4 and served.batching.max_delay_ms == 7.0
    assert models.resolve("cifar", 1).version == 1
    with pytest.raises(ModelNotReady, match="'broken' version 1 is failed to load"):
        models.resolve("broken", None)
    with pytest.raises(ModelNotFound, match="has no version 5; versions: 1, 2"):
        models.resolve("cifar", 5)
    with pytest.raises(ModelNotFound, match="unknown model 'other'; served models: broken, cifar"):
        models.resolve("other", None)
    labels = {"model": "cifar", "version": "2"}
    assert models.metrics.registry.get_sample_value("resnet_serve_model_ready", labels) == 1

    await models.unload("broken")
    assert models.readiness() == (True, "all models are ready")
    loaded = served.require_loaded()
    await models.unload("cifar")
    assert served.loaded is None and served.state is State.UNLOADED
    with pytest.raises(ModelNotReady, match="model 'cifar' version 2 was unloaded"):
        served.require_loaded()  # a request that resolved it before the unload gets a 503
    with pytest.raises(ShuttingDown):
        loaded.batcher.submit([])  # its batcher was stopped
    with pytest.raises(ModelNotFound, match="unknown model 'cifar'; served models: none"):
        models.resolve(None, None)  # the configured default is gone
    await models.load("cifar")  # back at run time, from the repository
    assert models.resolve("cifar", None).state is State.READY
    await models.close()


async def test_several_models_need_a_name(tmp_path: Path, cifar_model_file: Path) -> None:
    add_version(tmp_path, "a", 1, cifar_model_file)
    add_version(tmp_path, "b", 1, cifar_model_file)
    models = registry(tmp_path)
    await models.load_all()
    with pytest.raises(ModelRequired, match=r"several models are served \(a, b\)"):
        models.resolve(None, None)
    await models.close()


async def test_config_json_can_name_the_default_model(
    tmp_path: Path, cifar_model_file: Path
) -> None:
    for name in ("a", "b", "c"):
        add_version(tmp_path, name, 1, cifar_model_file)
    (tmp_path / "b" / "config.json").write_text('{"default": true}')
    models = registry(tmp_path)
    await models.load_all()
    assert models.resolve(None, None).name == "b" and models.default_name() == "b"
    await models.close()

    configured = registry(tmp_path, default_model="c")  # the setting wins
    await configured.load_all()
    assert configured.resolve(None, None).name == "c"
    await configured.close()

    (tmp_path / "a" / "config.json").write_text('{"default": true, "max_batch_size": 2}')
    both = registry(tmp_path)
    await both.load_all()
    assert both.default_name() is None
    with pytest.raises(
        ModelRequired,
        match=r'several models are served \(a, b, c\), and a, b all say "default": true; choose',
    ):
        both.resolve(None, None)
    await both.unload("a")
    assert both.resolve(None, None).name == "b"  # the one marked model left
    await both.close()


async def test_bad_config_fails_that_model_only(tmp_path: Path, cifar_model_file: Path) -> None:
    add_version(tmp_path, "a", 1, cifar_model_file)
    add_version(tmp_path, "b", 1, cifar_model_file)
    (tmp_path / "b" / "config.json").write_text(json.dumps({"max_batch_size": 0}))
    models = registry(tmp_path)
    await models.load_all()
    assert models.resolve("a", None).state is State.READY
    assert models.models["b"][1].state is State.FAILED
    assert "max_batch_size" in models.models["b"][1].reason
    await models.close()


async def test_empty_repository_is_not_ready_with_the_reason(tmp_path: Path) -> None:
    models = registry(tmp_path)
    await models.load_all()
    assert models.readiness() == (
        False,
        f"no models found under {tmp_path} (expected {tmp_path}/<name>/<version>/model.onnx)",
    )
    with pytest.raises(ModelNotReady, match="no models are served: no models found"):
        models.resolve(None, None)
