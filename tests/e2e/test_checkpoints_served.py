"""Checkpoints as other tools save them, exported by ``python -m export`` and served for real.

Two CIFAR ResNet-20s with trained-like batch norms: one saved as a pre-0.4.1 PyTorch file
from a DataParallel run (``{"state_dict": {"module.…"}, "best_prec1": …}``, no
``num_batches_tracked``: the layout of a popular public CIFAR ResNet repository), one as
a PyTorch Lightning ``.ckpt`` (weights under ``model.``, beside a loss buffer, the epoch,
the optimizer and scheduler states). Each is served by a real server and its logits, for
the 50 fixture JPEGs sent over the v2 protocol, compared with the PyTorch module on
torchvision's eval transform of the same files.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest
import torch
import tritonclient.http as triton
from e2e_server import Server
from torch import nn
from weights_testlib import perturb

from export import cifar_resnet
from export.__main__ import main
from service.metadata import Preprocessing

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "cifar10-val"
IMAGES = sorted(FIXTURES.glob("*/*.jpg"))
SPEC = dict(resize=32, crop=32, mean=(0.49, 0.48, 0.45), std=(0.25, 0.24, 0.26))


def trained_like(seed: int) -> nn.Module:
    """A ResNet-20 whose batch norms are not identities (as after training)."""
    torch.manual_seed(seed)
    return perturb(cifar_resnet.build("cifar-resnet20"), seed=seed)


def old_dataparallel_file(model: nn.Module, path: Path) -> None:
    state = {
        f"module.{k}": v
        for k, v in model.state_dict().items()
        if not k.endswith("num_batches_tracked")  # BatchNorm had no such buffer before 0.4.1
    }
    torch.save({"state_dict": state, "best_prec1": 91.25, "epoch": 200}, path)


def lightning_file(model: nn.Module, path: Path) -> None:
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    state["loss.weight"] = torch.ones(10)  # a LightningModule's class-weighted loss
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=30)
    torch.save(
        {
            "epoch": 12,
            "global_step": 4692,
            "pytorch-lightning_version": "2.4.0",
            "state_dict": state,
            "optimizer_states": [optimizer.state_dict()],
            "lr_schedulers": [scheduler.state_dict()],
            "hyper_parameters": {"lr": 0.1, "arch": "resnet20"},
        },
        path,
    )


MODELS = {"old-dataparallel": (old_dataparallel_file, 20, "r20.th"),
          "lightning": (lightning_file, 21, "epoch=12-step=4692.ckpt")}  # fmt: skip


@pytest.fixture(scope="module")
def served(
    launch: Callable[..., Server], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Server, dict[str, nn.Module]]:
    root = tmp_path_factory.mktemp("checkpoints-served")
    modules = {}
    for name, (save, seed, filename) in MODELS.items():
        modules[name] = trained_like(seed)
        save(modules[name], root / filename)
        flags = ["--mean", *map(str, SPEC["mean"]), "--std", *map(str, SPEC["std"])]  # type: ignore[call-overload]
        argv = ["cifar-resnet20", "--checkpoint", str(root / filename), *flags]
        assert main([*argv, "--out", str(root / "models"), "--name", name]) == 0
    return launch(root / "models"), modules


def test_served_logits_equal_the_pytorch_module(
    served: tuple[Server, dict[str, nn.Module]],
    torchvision_eval: Callable[[bytes, Preprocessing], np.ndarray],
) -> None:
    server, modules = served
    spec = Preprocessing(**SPEC)  # type: ignore[arg-type]
    data = [p.read_bytes() for p in IMAGES]
    batch = torch.from_numpy(np.stack([torchvision_eval(d, spec) for d in data]))
    with triton.InferenceServerClient(urlsplit(server.url).netloc, network_timeout=60) as client:
        for name, module in modules.items():
            image = triton.InferInput("image", [len(data)], "BYTES")
            image.set_data_from_numpy(np.array(data, dtype=np.object_))
            result = client.infer(name, [image], outputs=[triton.InferRequestedOutput("logits")])
            got = result.as_numpy("logits")
            with torch.no_grad():
                want = module(batch).numpy()
            assert got.shape == (50, 10)
            assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max(), name
            assert np.array_equal(got.argmax(1), want.argmax(1)), name
            assert np.ptp(want, axis=0).min() > 0.5  # each logit varies over the images
