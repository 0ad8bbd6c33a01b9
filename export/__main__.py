"""``python -m export``: a trained ResNet becomes a verified, self-describing ONNX model."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, get_args

from export import agreement, builders, onnx_export
from export.api import export_model
from export.errors import ExportError, configure_logging, failed
from export.repository import ExportResult
from service.metadata import TestTimeAugmentation

DESCRIPTION = """\
Export a ResNet to models/<name>/<version>/model.onnx: input `input` float32 [N, 3, H, W]
(dynamic batch), outputs `logits` [N, classes] and `embedding` [N, D] (the pooled features
that feed the classifier). Labels, preprocessing and provenance are stored in the
file's metadata; PyTorch and ONNX Runtime are compared at batch sizes 1 and 8 and the
export fails if they differ beyond a float32 tolerance.

sources (the positional argument):
  torchvision   {tv}
  CIFAR         cifar-resnet<6n+2> (v1, option A shortcuts; 20, 32, 44, 56, 110),
                cifar-resnet<6n+2>-b (v1, option B), cifar-preact-resnet<9n+2> (v2; 56, 110, 164)
  timm          timm/<model name>, e.g. timm/resnet50d, timm/resnetv2_50, timm/seresnext50_32x4d
                (random weights, --checkpoint FILE, or --weights <pretrained tag> online)
  Hub folder    a directory as `hf download` (huggingface-cli) leaves it: a timm folder
                (config.json with `architecture`) or a transformers ResNet folder
                (config.json with "model_type": "resnet" and preprocessor_config.json)
  ONNX file     FILE.onnx written by another tool: adopted with the card given by
                --labels, --input-size, --resize, --mean and --std
  your own      package.module:function  (importable from . or --code-path; called with
                num_classes=len(labels) if it takes that argument)
"""

EPILOG = """\
examples:
  python -m export resnet50 --weights none --out models --name resnet50
  python -m export resnet50 --weights IMAGENET1K_V2 --out models --name resnet50   (online)
  python -m export cifar-resnet20 --checkpoint runs/r20/best.pt --out models --name cifar10-resnet20
  python -m export my_models.resnet:resnet20 --checkpoint r20.th --input-size 32 --resize 32 \\
      --mean 0.485 0.456 0.406 --std 0.229 0.224 0.225 --labels labels.txt \\
      --out models --name my-r20

checkpoints: a torch file (.pt, .pth, .th, .bin, a Lightning .ckpt) holding a state_dict, or
a dict holding one under state_dict / model / model_state_dict, read with
torch.load(weights_only=True); a .safetensors file; a sharded set by its index
(model.safetensors.index.json, pytorch_model.bin.index.json); or a folder holding
model.safetensors, pytorch_model.bin or their index. Keys may carry a wrapper's prefix
(module., _orig_mod., model., ...): the one that fits the model's keys is removed or added.
This project's training checkpoints (python -m export.train) also supply labels, mean, std
and input size.
Exit status 0 on success; 2 with a one-line `error: ...` on stderr for a problem with the
input (1 for an unexpected failure; --debug shows its traceback).
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m export",
        description=DESCRIPTION.format(tv=", ".join(builders.TORCHVISION_ARCHS)),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "arch", metavar="SOURCE", help="architecture, Hub folder or ONNX file (see above)"
    )
    src = p.add_argument_group("weights")
    src.add_argument(
        "--weights",
        default="none",
        help="torchvision weights name (IMAGENET1K_V2, DEFAULT) or timm pretrained tag "
        "(a1_in1k; needs the network), or none for random, untrained weights (default: none)",
    )
    src.add_argument("--checkpoint", type=Path, help="checkpoint file (.pt, .pth, .th)")
    src.add_argument(
        "--code-path", type=Path, help="directory to import a user's package.module from"
    )
    out = p.add_argument_group("output")
    out.add_argument("--out", type=Path, required=True, help="model repository, e.g. models")
    out.add_argument("--name", required=True, help="model name: the folder under --out")
    out.add_argument("--version", type=int, help="version number (default: the next free one)")
    out.add_argument("--overwrite", action="store_true", help="replace an existing version")
    out.add_argument(
        "--opset",
        type=int,
        default=onnx_export.DEFAULT_OPSET,
        help="ONNX opset (default: %(default)s)",
    )
    card = p.add_argument_group("model card (default: from the weights or checkpoint)")
    card.add_argument(
        "--labels",
        type=Path,
        metavar="FILE",
        help="text file, one class name per line, in output order",
    )
    card.add_argument(
        "--input-size",
        type=int,
        metavar="PX",
        help="side of the square model input, i.e. the center crop (ImageNet 224, CIFAR 32)",
    )
    card.add_argument(
        "--resize",
        type=int,
        metavar="PX",
        help="shorter side before the crop (default: keeps the source's "
        "resize/crop ratio, 256/224 or 1)",
    )
    card.add_argument(
        "--mean",
        type=float,
        nargs=3,
        metavar=("R", "G", "B"),
        help="per-channel mean on the 0..1 scale",
    )
    card.add_argument(
        "--std",
        type=float,
        nargs=3,
        metavar=("R", "G", "B"),
        help="per-channel standard deviation on the 0..1 scale",
    )
    card.add_argument(
        "--interpolation",
        choices=("bilinear", "bicubic", "nearest"),
        help="resize filter (default: bilinear)",
    )
    card.add_argument(
        "--channel-order",
        choices=("RGB", "BGR"),
        default="RGB",
        help="channel order the model expects (default: RGB)",
    )
    card.add_argument(
        "--embedding-layer",
        help="layer whose output is the embedding (default: the input of the last nn.Linear;"
        " for timm models, forward_head's pre-logits features)",
    )
    card.add_argument(
        "--tta",
        choices=get_args(TestTimeAugmentation),
        default="none",
        help="test-time augmentation in the graph: 'flip' averages each image with its mirror,"
        " more accurate for twice the compute (default: none)",
    )
    ver = p.add_argument_group("verification")
    ver.add_argument(
        "--verify-images", type=Path, help="folder of images to verify on (default: random images)"
    )
    ver.add_argument(
        "--verify-batch-sizes",
        type=int,
        nargs="+",
        default=list(agreement.BATCH_SIZES),
        metavar="N",
    )
    ver.add_argument(
        "--tolerance",
        type=float,
        default=agreement.TOLERANCE,
        help="largest allowed relative difference (default: %(default)s)",
    )
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging(debug=args.debug)
    try:
        adopting = args.arch.lower().endswith(".onnx")
        result = _adopt(args) if adopting else _export(args)
    except Exception as exc:
        if args.debug:
            raise
        return failed(exc)
    print(f"{result.path}  ({result.card.num_classes} classes, version {result.version})")
    return 0


def _adopt(args: argparse.Namespace) -> ExportResult:
    """An ONNX file another tool wrote, adopted into the repository with its card."""
    from export.adopt import adopt_onnx

    for flag in ("weights", "checkpoint", "code_path", "embedding_layer"):
        if getattr(args, flag) not in (None, "none"):
            raise ExportError(f"--{flag.replace('_', '-')} does not apply to an ONNX file")
    if args.tta != "none":
        raise ExportError("--tta does not apply to an ONNX file: it is added at PyTorch export")
    return adopt_onnx(Path(args.arch), **_common(args))


def _export(args: argparse.Namespace) -> ExportResult:
    """A PyTorch model (an architecture, or a Hub folder) exported and verified."""
    return export_model(
        args.arch,
        weights=args.weights,
        checkpoint_path=args.checkpoint,
        code_path=args.code_path,
        embedding_layer=args.embedding_layer,
        tta=args.tta,
        opset=args.opset,
        **_common(args),
    )


def _common(args: argparse.Namespace) -> dict[str, Any]:
    """The flags every source takes: where the model goes, its card, its verification."""
    return {
        "out": args.out,
        "name": args.name,
        "version": args.version,
        "overwrite": args.overwrite,
        "labels": args.labels,
        "input_size": args.input_size,
        "resize": args.resize,
        "mean": args.mean,
        "std": args.std,
        "interpolation": args.interpolation,
        "channel_order": args.channel_order,
        "verify_images": args.verify_images,
        "batch_sizes": tuple(args.verify_batch_sizes),
        "tolerance": args.tolerance,
    }


if __name__ == "__main__":
    sys.exit(main())
