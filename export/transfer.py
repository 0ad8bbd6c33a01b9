"""A new head on a served model, fitted on your own classes in seconds, without PyTorch.

``python -m export.transfer SOURCE --data DIR --out REPO --name NAME`` reads every image of
DIR (an ImageFolder, ``DIR/<class>/<image>``, or a .tar.gz of one) through SOURCE's own
preprocessing into its ``embedding`` output (:mod:`export.embeddings`), holds a stratified
``--val-fraction`` of each class out (``--seed``), fits a logistic-regression head on the
rest with its regularisation C chosen on the held-out images (:mod:`export.logistic_head`),
and writes ``REPO/NAME/<version>/model.onnx``: SOURCE's graph with the nodes between
``embedding`` and ``logits`` replaced by the new head (:mod:`export.onnx_head`), the same
input, preprocessing and ``embedding``, and a card with the new labels, provenance
pointing at SOURCE and a ``transfer`` block (C, validation accuracy, counts).

The head kept is the one fitted on the training side, not refitted on everything: the
validation accuracy in the card and the report is then measured on the very head that is
served, on images it never saw, and the same ``--seed`` reproduces it; refitting would add
the held-out images to the training but leave what is served unmeasured.

Before anything is written, the new graph runs with ONNX Runtime on validation images at
batch sizes 1 and ``--batch-size``: its ``logits`` must equal scikit-learn's
``decision_function`` on SOURCE's embedding, and its ``embedding`` SOURCE's, within
1e-4 relative (:data:`export.agreement.TOLERANCE`, float32). SOURCE may be fp32, or an int8 or
fp16 variant: the backbone stays as it is, the head is float32.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import sys
from pathlib import Path

import numpy as np
import onnx
import sklearn

from export import agreement, embeddings, imagefolder, images, logistic_head, onnx_verify
from export.errors import ExportError, configure_logging, failed
from export.onnx_head import embedding_width, replace_head
from export.repository import (
    ExportResult,
    add_output_arguments,
    read_model,
    target,
    write_checked,
)
from export.transfer_card import TRANSFER_KEY, Transfer, provenance
from service.metadata import EMBEDDING_NAME, INPUT_NAME, LOGITS_NAME, Preprocessing

log = logging.getLogger(__name__)

MIN_PER_CLASS = 10
"""Images each class needs: at the default --val-fraction 0.2, 8 to fit on and 2 to
validate on, the least for which a per-class accuracy says anything."""
VAL_FRACTION = 0.2
VERIFY_IMAGES = 256
"""Validation images the written graph is verified on (all of them when fewer)."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m export.transfer",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("source", type=Path, help="a model.onnx exported by this project, or its folder")
    p.add_argument("--data", type=Path, required=True, help="ImageFolder directory or a .tar.gz")
    add_output_arguments(p)
    p.add_argument(
        "--val-fraction",
        type=float,
        default=VAL_FRACTION,
        help="share of each class held out to choose C and measure accuracy (default: 0.2)",
    )
    p.add_argument("--seed", type=int, default=0, help="of the validation split (default: 0)")
    p.add_argument(
        "--batch-size",
        type=int,
        default=embeddings.BATCH_SIZE,
        help="images per ONNX Runtime run (default: 64)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging(debug=args.debug)
    try:
        result = transfer_model(
            args.source,
            data=args.data,
            out=args.out,
            name=args.name,
            version=args.version,
            val_fraction=args.val_fraction,
            seed=args.seed,
            batch_size=args.batch_size,
            overwrite=args.overwrite,
            progress=not args.no_progress,
        )
    except Exception as exc:
        if args.debug:
            raise
        return failed(exc)
    print(result.report)
    print(f"{result.path}  ({result.card.num_classes} classes, version {result.version})")
    return 0


def transfer_model(
    source: Path,
    *,
    data: Path,
    out: Path,
    name: str,
    version: int | None = None,
    val_fraction: float = VAL_FRACTION,
    seed: int = 0,
    batch_size: int = embeddings.BATCH_SIZE,
    overwrite: bool = False,
    progress: bool = True,
) -> ExportResult:
    """Fit a head on ``data`` and write SOURCE with it to ``out/name/version/model.onnx``;
    ``report`` is what the command prints. Raises :class:`ExportError` for bad input."""
    data = Path(data)
    path, source_bytes, proto, card = read_model(Path(source))
    embedding_width(proto)  # refuses a graph without the contract's outputs before any work
    if not 0 < val_fraction <= 0.5:
        raise ExportError(f"--val-fraction must be in (0, 0.5], got {val_fraction}")
    if batch_size < 1:
        raise ExportError(f"--batch-size must be >= 1, got {batch_size}")
    target_dir, version = target(Path(out), name, version, overwrite=overwrite)
    folder = _scan(data)
    pre = card.preprocessing
    embedded = embeddings.embed(
        folder, onnx_verify.session(proto, str(path)), pre, batch_size=batch_size,
        progress=progress,
    )  # fmt: skip
    classes = folder.classes
    labels = np.array([classes.index(folder.entries[i].label) for i in embedded.indices])
    listed = {c: sum(e.label == c for e in folder.entries) for c in classes}
    _check_counts(data, {c: int(np.sum(labels == k)) for k, c in enumerate(classes)}, listed)

    x = embedded.embeddings
    train, val = logistic_head.split(labels, val_fraction, seed=seed)
    head = logistic_head.fit(x[train], labels[train], x[val], labels[val])
    summary = logistic_head.confusion(labels[val], head.logits(x[val]).argmax(1), classes)
    graph, replaced = replace_head(proto, *head.affine())
    checked = _spread(val, VERIFY_IMAGES)
    results, figures = _verify(graph, folder, embedded, checked, head, pre, batch_size)
    agreement.check(figures, reference="the source's embedding and the scikit-learn head")

    ref = _source_ref(path)
    new_card = card.model_copy(update={
        "labels": classes,
        "provenance": provenance(card, proto, ref, source_bytes),
        "verification": figures,
    })  # fmt: skip
    transfer = Transfer(
        source=ref,
        source_sha256=hashlib.sha256(source_bytes).hexdigest(),
        head="logistic-regression",
        library=f"scikit-learn {sklearn.__version__}",
        C=head.C,
        classes=len(classes),
        train_count=len(train),
        val_count=len(val),
        val_fraction=val_fraction,
        seed=seed,
        val_accuracy=summary.accuracy,
        skipped=len(folder.skipped) + len(embedded.unreadable),
    )
    del graph.metadata_props[:]
    onnx.helper.set_model_props(
        graph, {**new_card.to_metadata_props(), TRANSFER_KEY: transfer.to_json()}
    )
    lines = [
        f"new head on {path} ({replaced} replaced by a {len(classes)}-class logistic "
        f"regression on its {x.shape[1]}-wide embedding)",
        f"  --data {data}: {len(classes)} classes, {len(x)} images read "
        f"(skipped: {len(embedded.unreadable)} unreadable, {len(folder.skipped)} not images); "
        f"{len(train)} to fit, {len(val)} to validate "
        f"(--val-fraction {val_fraction}, --seed {seed})",
        "  C: " + ", ".join(f"{c:g} {a:.2%}" for c, a in head.scores) + f" -> C={head.C:g}",
        f"  validation accuracy: {summary.accuracy:.2%} "
        f"({sum(n for _, n, _ in summary.per_class)}/{len(val)})",
        *summary.lines(),
        agreement.report(results, figures, reference="the scikit-learn head"),
    ]
    model_path = target_dir / "model.onnx"
    os.replace(write_checked(graph, model_path, what="new-head"), model_path)
    log.info("wrote %s (%.1f MB)", model_path, model_path.stat().st_size / 1e6)
    return ExportResult(path=model_path, version=version, card=new_card, report="\n".join(lines))


def _scan(data: Path) -> imagefolder.ImageFolder:
    """The folder's listing, refused when it has fewer than two classes."""
    try:
        folder = imagefolder.scan(data, suffixes=images.IMAGE_SUFFIXES)
    except FileNotFoundError as exc:
        raise ExportError(f"--data {exc}") from exc
    classes = sorted({*folder.classes, *folder.empty})
    if len(classes) < 2:
        found = f"only {classes[0]!r}" if classes else "none"
        raise ExportError(
            f"--data {data}: a classifier needs at least 2 class folders (<class>/<image>), "
            f"found {found}"
        )
    if folder.skipped:
        log.warning("--data %s: skipped %d files that are not images: %s", data,
                    len(folder.skipped), ", ".join(folder.skipped[:5]))  # fmt: skip
    counts = {c: sum(e.label == c for e in folder.entries) for c in classes}
    _check_counts(data, counts, counts)  # from the listing, before any image is decoded
    return folder


def _check_counts(data: Path, readable: dict[str, int], listed: dict[str, int]) -> None:
    """Refuse a class with fewer than :data:`MIN_PER_CLASS` images, naming each such class."""
    few = []
    for label, n in readable.items():
        files = listed[label]
        if n < MIN_PER_CLASS:
            why = "" if n == files else f" of {files} readable"
            few.append(f"{label!r} ({n}{why}{': an empty folder' if not files else ''})")
    if few:
        raise ExportError(
            f"--data {data}: too few images in {', '.join(few)}; each class needs at least "
            f"{MIN_PER_CLASS}"
        )


def _spread(indices: np.ndarray, n: int) -> np.ndarray:
    """At most ``n`` of ``indices``, evenly spread (so every class is among them)."""
    if len(indices) <= n:
        return indices
    return indices[np.unique(np.linspace(0, len(indices) - 1, n).round().astype(int))]


def _verify(
    graph: onnx.ModelProto,
    folder: imagefolder.ImageFolder,
    embedded: embeddings.Embedded,
    checked: np.ndarray,
    head: logistic_head.Head,
    pre: Preprocessing,
    batch_size: int,
) -> onnx_verify.Figures:
    """The new graph on the ``checked`` rows (read again from ``folder``) against SOURCE's
    embedding of them and scikit-learn's logits on it, at batch 1 and ``batch_size``."""
    entries = embedded.indices[checked].tolist()
    read = dict(embeddings.rows(folder, pre, entries))
    rows = [row for i in entries if (row := read.get(i)) is not None]
    if len(rows) != len(entries):
        raise ExportError(f"--data {folder.source} changed while it was read")
    x = np.stack(rows)
    want_embedding = embedded.embeddings[checked]
    want_logits = head.logits(want_embedding)
    new = onnx_verify.session(graph, "the graph with its new head")
    results = []
    for b, n in sorted({(1, min(8, len(x))), (min(batch_size, len(x)), len(x))}):
        try:
            parts = [
                new.run([LOGITS_NAME, EMBEDDING_NAME], {INPUT_NAME: x[s : s + b]})
                for s in range(0, n, b)
            ]
        except Exception as exc:  # ORT's own exception types
            why = onnx_verify.first_line(exc)
            raise ExportError(f"the graph with its new head fails at batch {b}: {why}") from exc
        logits = np.concatenate([p[0] for p in parts])
        embedding = np.concatenate([p[1] for p in parts])
        (abs_l, rel_l), (abs_e, rel_e) = (
            agreement.diff(want_logits[:n], logits),
            agreement.diff(want_embedding[:n], embedding),
        )
        top1 = float(np.mean(want_logits[:n].argmax(1) == logits.argmax(1)))
        results.append(agreement.BatchResult(b, abs_l, rel_l, abs_e, rel_e, top1))
    inputs = f"{len(x)} {folder.source.name} validation"
    return results, agreement.summarize(results, inputs=inputs)


def _source_ref(path: Path) -> str:
    """``name/version/model.onnx`` for a file in a model repository, else the file's name."""
    model, version = path.parent.parent.name, path.parent.name
    return f"{model}/{version}/{path.name}" if version.isdigit() else path.name


if __name__ == "__main__":
    sys.exit(main())
