"""``python -m export.transfer``: a new head on the shipped ResNet-20, fitted on real JPEGs.

The data are real CIFAR-10 JPEGs regrouped into three classes the model was not trained
to output (flying: airplane + bird, pet: cat + dog, road: automobile + truck); the new
model is checked as the service loads it (:class:`Engine`), on the repository's fixture
JPEGs, against the source model's embedding and the head's own weights.
"""

from __future__ import annotations

import hashlib
import shutil
import tarfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from transfer_testlib import FIXTURES, SHIPPED, SHIPPED_INT8, grouped_folder

from export.images import read_rows
from export.quantize import quantize_model
from export.repository import ExportResult
from export.transfer import main, transfer_model
from export.transfer_card import Transfer, read_transfer
from service.engine import Engine

GROUP_OF = {"airplane": "flying", "bird": "flying", "cat": "pet", "dog": "pet"}
GROUP_OF |= {"automobile": "road", "truck": "road"}
IMAGES = sorted(FIXTURES.glob("*/*.jpg"))


@pytest.fixture(scope="module")
def groups(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """16 images per class: 8 of each of its two CIFAR-10 classes."""
    return grouped_folder(tmp_path_factory.mktemp("groups") / "groups")


@pytest.fixture(scope="module")
def made(groups: Path, tmp_path_factory: pytest.TempPathFactory) -> ExportResult:
    out = tmp_path_factory.mktemp("repo")
    return transfer_model(SHIPPED, data=groups, out=out, name="groups", progress=False)


def _props(path: Path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


def _transfer(path: Path) -> Transfer:
    block = read_transfer(_props(path))
    assert block is not None
    return block


def _head(path: Path) -> tuple[np.ndarray, np.ndarray]:
    weights = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}
    return weights["transfer_head.weight"], weights["transfer_head.bias"]


def _served(path: Path) -> dict[str, np.ndarray]:
    """What the service computes for the 50 fixture JPEGs with the model at ``path``."""
    engine = Engine(path, providers=("cpu",))
    rows = read_rows(IMAGES, engine.card.preprocessing, desc="fixtures", progress=False)
    return engine.run(rows.array)


def test_the_new_model_serves_the_new_classes_on_the_same_backbone(made: ExportResult) -> None:
    assert made.path == made.path.parents[2] / "groups" / "1" / "model.onnx"
    card, source = made.card, Engine(SHIPPED, providers=("cpu",)).card
    assert card.labels == ("flying", "pet", "road")
    assert card.preprocessing == source.preprocessing and card.quantization is None
    sha = hashlib.sha256(SHIPPED.read_bytes()).hexdigest()
    p = card.provenance
    assert (p.source, p.weights, p.checkpoint_sha256) == (
        "onnx",
        "cifar10-resnet20/1/model.onnx",
        sha,
    )
    assert p.arch == "cifar-resnet20" and p.torch_version is None
    v = card.verification
    assert v is not None and v.batch_sizes == (1, 9) and v.inputs == "9 groups validation"
    assert v.max_rel_diff_logits < 1e-5 and v.max_abs_diff_embedding == 0.0
    assert v.top1_agreement == 1.0

    t = _transfer(made.path)
    assert (t.source, t.source_sha256, t.head) == (
        "cifar10-resnet20/1/model.onnx",
        sha,
        "logistic-regression",
    )
    assert (t.classes, t.train_count, t.val_count, t.val_fraction, t.seed) == (3, 39, 9, 0.2, 0)
    assert (t.val_accuracy, t.C, t.skipped) == (1.0, 100.0, 0)

    served, original = _served(made.path), _served(SHIPPED)
    assert np.array_equal(served["embedding"], original["embedding"])
    weight, bias = _head(made.path)
    assert weight.shape == (3, 64) and bias.shape == (3,)
    # ONNX Runtime's Gemm and numpy's matmul sum in different orders (and ORT's kernels may
    # differ from run to run on this CPU): the command's own tolerance, 1e-4 relative.
    expected = served["embedding"] @ weight.T + bias
    np.testing.assert_allclose(served["logits"], expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(served["probabilities"].sum(1), 1.0, rtol=1e-6)
    predicted = [card.labels[i] for i in served["ranking"][:, 0]]
    truth = [GROUP_OF.get(p.parent.name) for p in IMAGES]
    assert sum(t == p for t, p in zip(truth, predicted, strict=True)) == 29  # of 30 grouped


def test_a_tarball_of_the_folder_gives_the_same_head(
    groups: Path, made: ExportResult, tmp_path: Path
) -> None:
    archive = tmp_path / "groups.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for path in sorted(groups.rglob("*.jpg")):
            tar.add(path, arcname=f"train/{path.relative_to(groups)}")
    again = transfer_model(SHIPPED, data=archive, out=tmp_path, name="g", progress=False)
    for a, b in zip(_head(again.path), _head(made.path), strict=True):
        assert np.array_equal(a, b)
    assert _transfer(again.path) == _transfer(made.path)


def test_two_classes_give_two_opposite_logits(groups: Path, tmp_path: Path) -> None:
    """scikit-learn fits one decision value d for two classes; the graph serves [-d/2, d/2]."""
    two = tmp_path / "two"
    for group in ("pet", "road"):
        shutil.copytree(groups / group, two / group)
    made = transfer_model(SHIPPED, data=two, out=tmp_path, name="two", progress=False)
    assert made.card.labels == ("pet", "road")
    assert (_transfer(made.path).train_count, _transfer(made.path).val_count) == (26, 6)
    served = _served(made.path)
    np.testing.assert_array_equal(served["logits"][:, 0], -served["logits"][:, 1])
    predicted = [made.card.labels[i] for i in served["logits"].argmax(1)]
    pets_and_roads = [
        (GROUP_OF[p.parent.name], label)
        for p, label in zip(IMAGES, predicted, strict=True)
        if GROUP_OF.get(p.parent.name) in ("pet", "road")
    ]
    assert sum(t == p for t, p in pets_and_roads) == 20 == len(pets_and_roads)


@pytest.mark.parametrize("precision", ["int8", "fp16"])
def test_a_quantized_source_keeps_its_backbone_and_precision(
    precision: str, groups: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if precision == "int8":
        source, replaced = SHIPPED_INT8, "3 DequantizeLinear, Gemm, QuantizeLinear"
    else:  # quantize's fp16 graph appends the input's Cast last: not topologically sorted
        source = quantize_model(
            SHIPPED, precision="fp16", out=tmp_path, name="fp16", eval_dir=FIXTURES,
            progress=False,
        ).path  # fmt: skip
        replaced = "Cast, Gemm"
    out = tmp_path / "repo"
    argv = [str(source), "--data", str(groups), "--out", str(out), "--name", "m", "--no-progress"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert f"({replaced} replaced by a 3-class logistic regression on its 64-wide" in printed
    path = out / "m" / "1" / "model.onnx"
    card = Engine(path, providers=("cpu",)).card
    assert card.precision == precision and card.labels == ("flying", "pet", "road")
    assert card.verification is not None and card.verification.max_abs_diff_embedding == 0.0
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert ("QuantizeLinear" in ops) == (precision == "int8")
    served, original = _served(path), _served(source)
    assert np.array_equal(served["embedding"], original["embedding"])


def test_the_report_and_the_files_left_out(
    groups: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    shutil.copytree(groups, data)
    (data / "pet" / "notes.txt").write_text("not an image")
    (data / "pet" / "broken.jpg").write_bytes(b"not a jpeg")
    (data / "LICENSE").write_text("outside any class folder")
    argv = [str(SHIPPED), "--data", str(data), "--out", str(tmp_path / "repo"), "--name", "m"]
    assert main([*argv, "--no-progress", "--seed", "1", "--val-fraction", "0.25"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == (
        f"  --data {data}: 3 classes, 48 images read (skipped: 1 unreadable, 2 not images); "
        "36 to fit, 12 to validate (--val-fraction 0.25, --seed 1)"
    )
    assert lines[3:10] == [
        "  validation accuracy: 91.67% (11/12)",
        "  per class:",
        "    flying      4/4     100.00%",
        "    pet         3/4      75.00%",
        "    road        4/4     100.00%",
        "  most confused (true -> predicted):",
        "    pet -> flying: 1",
    ]
    assert lines[-1] == f"{tmp_path / 'repo' / 'm' / '1' / 'model.onnx'}  (3 classes, version 1)"
    block = _transfer(tmp_path / "repo" / "m" / "1" / "model.onnx")
    assert (block.skipped, block.seed, block.val_count, block.C) == (3, 1, 12, 1.0)
    assert block.val_accuracy == pytest.approx(11 / 12)


def _fails(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main([*argv, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    return err.strip().removeprefix("error: ")


def test_bad_input_is_one_line_exit_2_and_writes_nothing(
    groups: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = tmp_path / "repo"
    out = ["--out", str(repo), "--name", "m"]
    data = ["--data", str(groups)]

    plain = tmp_path / "plain.onnx"
    proto = onnx.load(str(SHIPPED))
    del proto.metadata_props[:]
    onnx.save(proto, str(plain))
    assert "has no resnet-serve model card" in _fails([str(plain), *data, *out], capsys)
    assert _fails([str(tmp_path / "none.onnx"), *data, *out], capsys) == (
        f"{tmp_path / 'none.onnx'} does not exist (give a model.onnx or its version folder)"
    )
    headless = tmp_path / "headless.onnx"
    proto = onnx.load(str(SHIPPED))
    kept = [o for o in proto.graph.output if o.name != "embedding"]
    del proto.graph.output[:]
    proto.graph.output.extend(kept)
    onnx.save(proto, str(headless))
    assert _fails([str(headless), *data, *out], capsys).startswith(
        "the graph has no 'embedding' output (it has ['logits'])"
    )

    one = tmp_path / "one"
    shutil.copytree(groups / "pet", one / "pet")
    assert _fails([str(SHIPPED), "--data", str(one), *out], capsys) == (
        f"--data {one}: a classifier needs at least 2 class folders (<class>/<image>), "
        "found only 'pet'"
    )
    few = tmp_path / "few"
    shutil.copytree(groups / "pet", few / "pet")
    (few / "road").mkdir()
    for path in sorted((groups / "road").iterdir())[:3]:
        shutil.copy(path, few / "road")
    (few / "sky").mkdir()
    assert _fails([str(SHIPPED), "--data", str(few), *out], capsys) == (
        f"--data {few}: too few images in 'road' (3), 'sky' (0: an empty folder); "
        "each class needs at least 10"
    )
    broken = tmp_path / "broken"
    shutil.copytree(groups / "pet", broken / "pet")
    (broken / "road").mkdir()
    for i in range(12):
        (broken / "road" / f"{i}.jpg").write_bytes(b"not a jpeg")
    assert _fails([str(SHIPPED), "--data", str(broken), *out], capsys) == (
        f"--data {broken}: too few images in 'road' (0 of 12 readable); each class needs at "
        "least 10"
    )
    assert _fails([str(SHIPPED), "--data", str(tmp_path / "nowhere"), *out], capsys) == (
        f"--data '{tmp_path / 'nowhere'}' is neither an ImageFolder directory nor a tar "
        "archive of one"
    )
    assert _fails([str(SHIPPED), *data, *out, "--val-fraction", "0.7"], capsys) == (
        "--val-fraction must be in (0, 0.5], got 0.7"
    )
    assert not repo.exists()


def test_a_flip_tta_source_keeps_its_flip(groups: Path, tmp_path: Path) -> None:
    """With --tta flip the old head runs on both halves and averages them (Gemm, 2 Slice,
    Add, Div); the new Gemm on the averaged embedding is the same linear map, once."""
    from export.api import export_model  # torch: only to make the source

    source = export_model("cifar-resnet20", out=tmp_path, name="tta", tta="flip").path
    made = transfer_model(source, data=groups, out=tmp_path, name="g", progress=False)
    assert "(Add, Div, Gemm, 2 Slice replaced by a 3-class" in made.report
    assert made.card.provenance.test_time_augmentation == "flip"
    served, original = _served(made.path), _served(source)
    assert np.array_equal(served["embedding"], original["embedding"])
    weight, bias = _head(made.path)
    # ONNX Runtime's Gemm and numpy's matmul sum in different orders (and ORT's kernels may
    # differ from run to run on this CPU): the command's own tolerance, 1e-4 relative.
    expected = served["embedding"] @ weight.T + bias
    np.testing.assert_allclose(served["logits"], expected, rtol=1e-4, atol=1e-5)


def test_transfer_runs_without_torch(groups: Path, tmp_path: Path) -> None:
    """The whole command, in a process where importing torch fails (as where it is absent)."""
    import subprocess
    import sys

    out = tmp_path / "repo"
    argv = [str(SHIPPED), "--data", str(groups), "--out", str(out), "--name", "m", "--no-progress"]
    code = f"""
import sys
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "torch":
            raise ImportError("no torch here")
sys.meta_path.insert(0, NoTorch())
from export.transfer import main
sys.exit(main({argv!r}))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "validation accuracy: 100.00% (9/9)" in result.stdout
    assert (out / "m" / "1" / "model.onnx").is_file()
