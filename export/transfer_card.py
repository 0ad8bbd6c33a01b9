"""What a model with a new head says about itself: the ``transfer`` block beside its card.

:mod:`export.transfer` writes the card of :mod:`service.metadata` (new labels, provenance
pointing at the source, the verification) and, under its own ``metadata_props`` key
``transfer``, how the head was made: from which file, which C, on how many images, with
what validation accuracy. It follows the card's conventions (frozen, ``extra="forbid"``,
one JSON string, fields at their default left out) but lives beside it rather than in
:class:`ModelCard`, whose reader takes only the keys it knows: every server, this one and
older ones, loads such a file and ignores the block. Moving it into the card (a
``transfer`` field and key in :mod:`service.metadata`) would let ``GET /models`` show it.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Mapping
from typing import Literal

import onnx
import onnxruntime as ort
import sklearn
from pydantic import BaseModel, ConfigDict, Field

from export import onnx_graph
from service.metadata import ModelCard, Provenance

TRANSFER_KEY = "transfer"


class Transfer(BaseModel):
    """How a new head was fitted on a served model's embeddings (``python -m export.transfer``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    source: str = Field(description="The source model: name/version/model.onnx, or its file name.")
    source_sha256: str
    head: Literal["logistic-regression"]
    library: str = Field(description="What fitted it, e.g. 'scikit-learn 1.9.1'.")
    C: float = Field(gt=0, description="Inverse L2 strength, chosen on the validation split.")
    classes: int = Field(ge=2)
    train_count: int = Field(ge=1)
    val_count: int = Field(ge=1)
    val_fraction: float = Field(gt=0, le=0.5)
    seed: int
    val_accuracy: float = Field(ge=0.0, le=1.0)
    skipped: int = Field(default=0, ge=0, description="Files of the folder that were not images.")

    def to_json(self) -> str:
        return json.dumps(
            self.model_dump(mode="json", exclude_defaults=True), separators=(",", ":")
        )


def read_transfer(props: Mapping[str, str]) -> Transfer | None:
    """The block from ``metadata_props`` (or ORT's ``custom_metadata_map``); None if absent."""
    value = props.get(TRANSFER_KEY)
    return None if value is None else Transfer.model_validate_json(value)


def provenance(card: ModelCard, proto: onnx.ModelProto, source: str, data: bytes) -> Provenance:
    """The new model's provenance: an ONNX file (``source``, its hash) with a fitted head."""
    versions = f"onnx {onnx.__version__}, onnxruntime {ort.__version__}"
    return Provenance(
        arch=card.provenance.arch,
        source="onnx",
        weights=source,
        checkpoint_sha256=hashlib.sha256(data).hexdigest(),
        library=f"scikit-learn {sklearn.__version__}",
        trained=True,
        opset=onnx_graph.opset(proto),
        exporter_version=f"export.transfer ({versions})",
        torch_version=None,
        exported_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        test_time_augmentation=card.provenance.test_time_augmentation,
    )
