"""The training recipe: a real (tiny) run on real images, exact resume, the augmentation."""

from __future__ import annotations

import csv
import io
import subprocess
import sys
import tarfile
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from export import data, evaluate, train
from export.labels import CIFAR10_CLASSES
from service.metadata import INPUT_NAME, LOGITS_NAME, ModelCard
from service.preprocess import Preprocessor

ROOT = Path(__file__).resolve().parents[2]
CIFAR_TAR = ROOT.parent / "shared" / "datasets" / "cifar10-train.tar.gz"
CIFAR_CLASSES = CIFAR10_CLASSES


@pytest.fixture(scope="module")
def data_source(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A small ImageFolder: real CIFAR-10 JPEGs from the shared tarball where it exists,
    generated images (one mean colour per class, something to learn) where it does not."""
    root = tmp_path_factory.mktemp("imagefolder")
    per_class = 30
    if CIFAR_TAR.exists():
        taken: dict[str, int] = {}
        with tarfile.open(CIFAR_TAR) as tar:
            for member in tar:
                path = PurePosixPath(member.name)
                cls = path.parent.name
                if member.isfile() and path.suffix == ".jpg" and taken.get(cls, 0) < per_class:
                    taken[cls] = taken.get(cls, 0) + 1
                    (root / cls).mkdir(exist_ok=True)
                    (root / cls / path.name).write_bytes(tar.extractfile(member).read())  # type: ignore[union-attr]
        return str(root)
    rng = np.random.default_rng(0)
    for i, name in enumerate(CIFAR_CLASSES):
        (root / name).mkdir()
        for j in range(per_class):
            pixels = rng.normal(25 * i, 40, (32, 32, 3)).clip(0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{j:04d}.jpg", quality=75)
    return str(root)


def _args(source: str, out: Path, *extra: str) -> list[str]:
    return [
        "--data", source, "--out", str(out), "--limit", "120", "--val-per-class", "2",
        "--batch-size", "32", "--no-progress", "--threads", "2", *extra,
    ]  # fmt: skip


def test_smoke_train_then_export(
    data_source: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """One epoch on a few hundred images writes every artefact, and the export accepts it."""
    run = tmp_path / "run"
    argv = [
        "--data", data_source, "--out", str(run), "--val-per-class", "5", "--epochs", "1",
        "--no-progress", "--threads", "2",
    ]  # fmt: skip
    assert train.main(argv) == 0
    for name in ("best.pt", "last.pt", "metrics.csv", "curve.png"):
        assert (run / name).stat().st_size > 0, name

    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert [r["epoch"] for r in rows] == ["1"]
    assert 0.0 <= float(rows[0]["val_acc"]) <= 1.0
    with Image.open(run / "curve.png") as im:
        assert im.format == "PNG"

    ckpt = torch.load(run / "best.pt", weights_only=True)  # must not need unpickling code
    assert ckpt["arch"] == "cifar-resnet20"
    assert tuple(ckpt["classes"]) == tuple(CIFAR_CLASSES)
    assert ckpt["input_size"] == 32 and len(ckpt["mean"]) == len(ckpt["std"]) == 3

    models = tmp_path / "models"
    subprocess.run(
        [sys.executable, "-m", "export", "cifar-resnet20", "--checkpoint", str(run / "best.pt"),
         "--out", str(models), "--name", "smoke", "--version", "1"],
        check=True, cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    session = ort.InferenceSession(
        str(models / "smoke" / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    card = ModelCard.from_metadata_props(session.get_modelmeta().custom_metadata_map)
    assert card.labels == tuple(CIFAR_CLASSES)
    assert card.preprocessing.crop == 32
    assert card.preprocessing.mean == pytest.approx(ckpt["mean"])
    assert card.preprocessing.std == pytest.approx(ckpt["std"])
    assert card.provenance.trained is True

    # The exported file, fed the held-out images' bytes through the service's preprocessing,
    # scores exactly what PyTorch scored on them during training.
    capsys.readouterr()
    model = models / "smoke" / "1" / "model.onnx"
    argv = [str(model), "--data", data_source, "--val-per-class", "5"]
    assert evaluate.main(argv) == 0
    correct = round(ckpt["val_acc"] * 50)
    assert f"{correct}/50 = {2 * correct:.2f}% top-1" in capsys.readouterr().out


def test_evaluate_scores_each_model_and_their_ensemble(
    data_source: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Given two models, one line each as if evaluated alone, and one for their averaged
    probabilities, which matches ONNX Runtime run on the held-out images directly."""
    run, models = tmp_path / "run", tmp_path / "models"
    assert train.main(_args(data_source, run, "--epochs", "1")) == 0
    labels = tmp_path / "reversed.txt"
    labels.write_text("\n".join(reversed(CIFAR_CLASSES)) + "\n")
    for name, extra in [
        ("plain", []),
        ("flip", ["--tta", "flip"]),
        ("other", ["--labels", str(labels)]),
    ]:
        subprocess.run(
            [sys.executable, "-m", "export", "cifar-resnet20", "--checkpoint", str(run / "best.pt"),
             "--out", str(models), "--name", name, "--version", "1", *extra],
            check=True, cwd=ROOT, capture_output=True, text=True,
        )  # fmt: skip
    plain, flip, other = (models / n / "1" / "model.onnx" for n in ("plain", "flip", "other"))
    split = ["--data", data_source, "--val-per-class", "2"]

    capsys.readouterr()
    assert evaluate.main([str(plain), *split]) == 0
    assert evaluate.main([str(flip), *split]) == 0
    alone = [line for line in capsys.readouterr().out.splitlines() if "top-1" in line]
    assert evaluate.main([str(plain), str(flip), *split]) == 0
    together = [line for line in capsys.readouterr().out.splitlines() if "top-1" in line]
    assert together[:2] == alone

    files = data.read_files(data_source)
    classes = sorted({c for c, _ in files})
    targets = torch.tensor([classes.index(c) for c, _ in files])
    _, val = data.stratified_split(targets, 2, seed=0)
    probs = 0
    for model in (plain, flip):
        session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
        card = ModelCard.from_metadata_props(session.get_modelmeta().custom_metadata_map)
        pre = Preprocessor(card.preprocessing, max_pixels=1 << 20)
        batch = np.stack([pre(files[i][1]) for i in val.tolist()])
        (logits,) = session.run([LOGITS_NAME], {INPUT_NAME: batch})
        probs = probs + torch.from_numpy(logits).double().softmax(1)
    correct = int((probs.argmax(1) == targets[val]).sum())
    assert together[2].startswith(f"ensemble of the 2 (probabilities averaged): {correct}/20 ")

    # A model with other classes (here, in another order) is refused, not averaged in.
    assert evaluate.main([str(plain), str(other), *split]) == 1
    assert "are not" in capsys.readouterr().err


def test_resume_repeats_the_run_exactly(
    data_source: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two epochs straight and one epoch + --resume end on the same weights (with
    --cutout, whose squares come from the same per-epoch generator as the crops)."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run = ("--epochs", "2", "--cutout", "8")
    assert train.main(_args(data_source, straight, *run)) == 0

    # Interrupt a 2-epoch run right after its first epoch's checkpoint is written (the
    # curve is plotted after the checkpoints), as a Ctrl-C or a lost machine would.
    real_plot = train.plot_curve

    def plot_then_interrupt(rows: list[dict[str, Any]], path: Path) -> None:
        real_plot(rows, path)
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "plot_curve", plot_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        train.main(_args(data_source, resumed, *run))
    monkeypatch.setattr(train, "plot_curve", real_plot)
    assert torch.load(resumed / "last.pt", weights_only=True)["epoch"] == 1

    assert train.main(_args(data_source, resumed, *run, "--resume")) == 0
    a = torch.load(straight / "last.pt", weights_only=True)
    b = torch.load(resumed / "last.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 2
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, rtol=0, atol=0, msg=key)
    assert [r["val_acc"] for r in a["history"]] == [r["val_acc"] for r in b["history"]]


def test_resume_without_checkpoint_fails_clearly(data_source: str, tmp_path: Path) -> None:
    assert train.main(_args(data_source, tmp_path / "none", "--epochs", "1", "--resume")) == 2


def test_init_starts_from_a_checkpoints_weights(data_source: str, tmp_path: Path) -> None:
    """--init: the earlier run's weights, a fresh schedule (a warm restart); wrong arch -> 2."""
    first, restart = tmp_path / "first", tmp_path / "restart"
    assert train.main(_args(data_source, first, "--epochs", "1")) == 0
    init = first / "best.pt"
    # A learning rate of ~0 leaves the weights where --init put them (BN statistics still
    # move: they are not trained by the optimizer).
    assert (
        train.main(
            _args(data_source, restart, "--epochs", "1", "--lr", "1e-12", "--init", str(init))
        )
        == 0
    )
    before = torch.load(init, weights_only=True)["model"]
    after = torch.load(restart / "last.pt", weights_only=True)
    assert after["epoch"] == 1 and len(after["history"]) == 1
    weights = [k for k in before if k.endswith(".weight")]
    assert weights
    for key in weights:
        torch.testing.assert_close(after["model"][key], before[key], rtol=0, atol=1e-9, msg=key)

    wrong = _args(data_source, tmp_path / "wrong", "--epochs", "1", "--init", str(init))
    assert train.main([*wrong, "--arch", "cifar-resnet32"]) == 2


def test_augment_crops_flips_and_normalizes() -> None:
    """Each output is a 32x32 window of the zero-padded image, maybe mirrored, normalized."""
    images = torch.randint(0, 256, (16, 32, 32, 3), dtype=torch.uint8)
    aug = train.Augment([0.5, 0.4, 0.3], [0.2, 0.25, 0.3])
    out = aug(images, torch.Generator().manual_seed(1))
    assert out.shape == (16, 3, 32, 32) and out.is_contiguous(memory_format=torch.channels_last)

    # Undo the normalization and find each output inside its padded source.
    pixels = (out * aug.std + aug.mean).round().permute(0, 2, 3, 1).to(torch.uint8)
    padded = torch.nn.functional.pad(images, (0, 0, 4, 4, 4, 4))
    flipped = 0
    for i in range(16):
        windows = {
            (y, x, f)
            for y in range(9)
            for x in range(9)
            for f in (False, True)
            if torch.equal(
                (
                    padded[i, y : y + 32, x : x + 32].flip(1)
                    if f
                    else padded[i, y : y + 32, x : x + 32]
                ),
                pixels[i],
            )
        }
        assert len(windows) >= 1, f"image {i} is not a padded crop of its source"
        flipped += all(f for _, _, f in windows)
    assert 0 < flipped < 16  # both branches taken with this seed

    again = aug(images, torch.Generator().manual_seed(1))
    assert torch.equal(out, again)


@pytest.mark.parametrize("size", [16, 5])
def test_cutout_blanks_one_square_and_leaves_the_rest(size: int) -> None:
    """--cutout: the same crops and flips as without it, plus one size x size square
    (clipped at the border, so at least half of it per side) set to 0, the mean colour."""
    images = torch.randint(1, 256, (32, 32, 32, 3), dtype=torch.uint8)
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    plain = train.Augment(mean, std)(images, torch.Generator().manual_seed(2))
    cut = train.Augment(mean, std, cutout=size)(images, torch.Generator().manual_seed(2))
    assert cut.is_contiguous(memory_format=torch.channels_last)

    clipped = 0
    for i in range(len(images)):
        hole = (cut[i] != plain[i]).any(0)  # [h, w]
        ys, xs = hole.nonzero(as_tuple=True)
        y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
        assert hole.sum() == (y1 - y0) * (x1 - x0), f"image {i}: the hole is not a rectangle"
        assert (cut[i, :, y0:y1, x0:x1] == 0).all()
        for lo, hi in ((y0, y1), (x0, x1)):
            assert size // 2 <= hi - lo <= size
            assert hi - lo == size or lo == 0 or hi == 32  # only the border clips it
        clipped += (y1 - y0, x1 - x0) != (size, size)
    assert 0 < clipped < len(images)  # both cases drawn with this seed


def test_stratified_split_is_fixed_and_balanced() -> None:
    targets = torch.arange(10).repeat_interleave(50)
    train_idx, val_idx = data.stratified_split(targets, 5, seed=0)
    assert len(val_idx) == 50 and len(train_idx) == 450
    assert torch.bincount(targets[val_idx]).tolist() == [5] * 10
    assert set(train_idx.tolist()).isdisjoint(val_idx.tolist())
    again = data.stratified_split(targets, 5, seed=0)[1]
    assert torch.equal(val_idx, again)
    assert not torch.equal(val_idx, data.stratified_split(targets, 5, seed=1)[1])


def test_channel_stats_on_known_pixels() -> None:
    images = torch.zeros(2, 1, 1, 3, dtype=torch.uint8)
    images[1] = 255
    mean, std = data.channel_stats(images)
    assert mean == pytest.approx([0.5, 0.5, 0.5])
    assert std == pytest.approx([2**-0.5] * 3)  # sample std of {0, 1}


def test_load_reads_an_imagefolder(tmp_path: Path) -> None:
    for name, colour in (("b", (0, 0, 255)), ("a", (255, 0, 0))):
        (tmp_path / name).mkdir()
        buf = io.BytesIO()
        Image.new("RGB", (40, 30), colour).save(buf, format="PNG")
        (tmp_path / name / "x.png").write_bytes(buf.getvalue())
    ds = data.load(str(tmp_path), size=32, progress=False)
    assert ds.classes == ("a", "b")
    assert ds.images.shape == (2, 32, 32, 3)
    assert ds.images[ds.targets == 0][0, 0, 0].tolist() == [255, 0, 0]


def test_bf16_autocast_trains_float32_weights(data_source: str, tmp_path: Path) -> None:
    """--amp bf16 runs the forward pass in bfloat16 (the weights move differently from a
    float32 run's), while the checkpoint keeps float32 weights the export takes as is."""
    fp32, bf16 = tmp_path / "fp32", tmp_path / "bf16"
    assert train.main(_args(data_source, fp32, "--epochs", "1", "--device", "cpu")) == 0
    assert train.main(_args(data_source, bf16, "--epochs", "1", "--amp", "bf16")) == 0
    a = torch.load(fp32 / "last.pt", weights_only=True)
    b = torch.load(bf16 / "last.pt", weights_only=True)
    assert b["args"]["amp"] == "bf16" and "scaler" not in b
    assert all(v.dtype == a["model"][k].dtype for k, v in b["model"].items())
    assert all(v.device.type == "cpu" for v in b["model"].values())
    moved = [k for k in a["model"] if k.endswith("conv1.weight")]
    assert moved and not torch.equal(a["model"][moved[0]], b["model"][moved[0]])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_device_and_amp_refused_where_unsupported(
    data_source: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert train.resolve_device("auto") == torch.device("cpu")
    for extra, message in (
        (("--device", "cuda"), "no CUDA device"),
        (("--device", "mps"), "only cpu and cuda"),
        (("--device", "gpu0"), "--device 'gpu0'"),
        (("--amp", "fp16"), "--amp fp16 needs a CUDA device"),
    ):
        assert train.main(_args(data_source, tmp_path / "x", "--epochs", "1", *extra)) == 2
        assert message in capsys.readouterr().err


def test_distillation_loss_mixes_labels_and_softened_teacher() -> None:
    """Weight 0 is plain cross-entropy; weight 1 is T^2 KL(teacher || student) at T, zero
    when the student already matches the teacher."""
    g = torch.Generator().manual_seed(0)
    logits, teacher = torch.randn(8, 10, generator=g), torch.randn(8, 10, generator=g)
    y = torch.randint(0, 10, (8,), generator=g)
    t = 4.0
    soft = torch.softmax(teacher / t, dim=1)

    ce = torch.nn.functional.cross_entropy(logits, y)
    torch.testing.assert_close(train.distillation_loss(logits, y, soft, 0.0, t), ce)
    matched = torch.softmax(logits / t, dim=1)
    assert train.distillation_loss(logits, y, matched, 1.0, t).abs() < 1e-6

    student = torch.log_softmax(logits / t, dim=1)
    kl = (soft * (soft.log() - student)).sum(1).mean() * t**2
    torch.testing.assert_close(train.distillation_loss(logits, y, soft, 1.0, t), kl)
    torch.testing.assert_close(
        train.distillation_loss(logits, y, soft, 0.9, t), 0.1 * ce + 0.9 * kl
    )


def test_distil_from_an_ensemble_of_teachers(
    data_source: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--teacher twice: the soft targets are the two models' averaged probabilities, the
    run trains and records its teachers, and teachers from another split or over other
    classes are refused before any training."""
    a, b, student = tmp_path / "a", tmp_path / "b", tmp_path / "student"
    assert train.main(_args(data_source, a, "--epochs", "1")) == 0
    assert train.main(_args(data_source, b, "--epochs", "1", "--lr", "0.05")) == 0
    teachers = [str(a / "best.pt"), str(b / "best.pt")]

    args = train.parse_args(
        _args(data_source, student, "--teacher", teachers[0], "--teacher", teachers[1])
    )
    ensemble = train.Teachers(args.teacher, args, list(CIFAR_CLASSES))
    x = torch.randn(4, 3, 32, 32)
    probs = []
    for path in teachers:
        state = torch.load(path, weights_only=True)
        model = train.cifar_resnet.build(state["arch"], num_classes=10)
        model.load_state_dict(state["model"])
        probs.append(torch.softmax(model.eval()(x) / 3.0, dim=1))
    torch.testing.assert_close(ensemble(x, 3.0), (probs[0] + probs[1]) / 2)
    assert not any(p.requires_grad for p in ensemble.parameters())

    distil = ("--epochs", "1", "--teacher", teachers[0], "--teacher", teachers[1])
    assert train.main(_args(data_source, student, *distil)) == 0
    ckpt = torch.load(student / "best.pt", weights_only=True)
    assert ckpt["args"]["teacher"] == teachers
    assert ckpt["args"]["distill_weight"] == 0.9 and ckpt["args"]["distill_temperature"] == 4.0

    other_split = tmp_path / "seed1"
    assert train.main(_args(data_source, other_split, "--epochs", "1", "--seed", "1")) == 0
    capsys.readouterr()
    wrong = _args(data_source, tmp_path / "x", "--epochs", "1", "--teacher")
    assert train.main([*wrong, str(other_split / "best.pt")]) == 2
    assert "trained on another split" in capsys.readouterr().err

    relabelled = torch.load(a / "best.pt", weights_only=True)
    relabelled["classes"] = [f"c{i}" for i in range(10)]
    torch.save(relabelled, tmp_path / "relabelled.pt")
    assert train.main([*wrong, str(tmp_path / "relabelled.pt")]) == 2
    assert "classifies ['c0'" in capsys.readouterr().err

    assert train.main([*wrong, teachers[0], "--distill-weight", "1.5"]) == 2
    assert "--distill-weight must be in [0, 1]" in capsys.readouterr().err
