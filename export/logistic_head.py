"""A logistic-regression classifier on embeddings, folded into one affine layer for ONNX.

What :mod:`export.transfer` fits: scikit-learn's ``StandardScaler`` then
``LogisticRegression`` (L2, lbfgs; multinomial over the classes, binomial for two), its
regularisation ``C`` chosen from :data:`C_GRID` by accuracy on the validation split (ties:
the lower validation log-loss). Standardising makes one grid fit every backbone (pooled
ReLU features differ in scale from model to model) and helps lbfgs converge; both steps
are affine, so they fold into the ``weight`` and ``bias`` of a single Gemm.

The logits are what the served model outputs: ``decision_function`` for several classes,
and for two ``[-d/2, d/2]`` where ``d`` is the binomial decision value, so that their
softmax is ``predict_proba`` in both cases. Needs numpy and scikit-learn only.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

log = logging.getLogger(__name__)

C_GRID = (0.001, 0.01, 0.1, 1.0, 10.0, 100.0)
"""Inverse regularisation strengths tried: a decade apart, from nearly constant to nearly
unregularised on standardised features."""
MAX_ITER = 2000


@dataclass(frozen=True)
class Head:
    """The fitted classifier, the C it was fitted with and each C's validation accuracy."""

    pipeline: Pipeline
    C: float
    scores: tuple[tuple[float, float], ...]
    converged: bool

    def logits(self, embeddings: np.ndarray) -> np.ndarray:
        """[N, K] float64 logits of ``embeddings`` [N, D], computed by scikit-learn itself."""
        d = np.asarray(self.pipeline.decision_function(embeddings), dtype=np.float64)
        return np.stack([-d / 2, d / 2], axis=1) if d.ndim == 1 else d

    def affine(self) -> tuple[np.ndarray, np.ndarray]:
        """``(weight [K, D], bias [K])``, float32, with ``logits = x @ weight.T + bias``."""
        scaler: StandardScaler = self.pipeline[0]
        model: LogisticRegression = self.pipeline[-1]
        coef = model.coef_ / scaler.scale_
        bias = model.intercept_ - coef @ scaler.mean_
        if len(coef) == 1:  # binomial: class 1 against class 0
            coef, bias = np.concatenate([-coef / 2, coef / 2]), np.array([-bias[0], bias[0]]) / 2
        return coef.astype(np.float32), bias.astype(np.float32)


def split(labels: np.ndarray, fraction: float, *, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted indices (train, val): ``round(fraction * n)`` of each class's n images held out,
    at least one and never all, drawn with ``seed`` (the same on every machine)."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_val = min(max(1, round(fraction * len(idx))), len(idx) - 1)
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def fit(x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray) -> Head:
    """Fit one head per C of :data:`C_GRID` on the training side; keep the best on the
    validation side (accuracy, then log-loss)."""
    labels = np.unique(np.concatenate([y_train, y_val]))
    best: tuple[float, float] | None = None
    chosen: Head | None = None
    scores = []
    for c in C_GRID:
        # One BLAS thread: on matrices this small (images x embedding width) threads cost
        # more than they save, and on a busy machine their spin-waiting makes a fit many
        # times slower than a single thread.
        with warnings.catch_warnings(record=True) as caught, threadpool_limits(1):
            warnings.simplefilter("always", ConvergenceWarning)
            pipeline = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=MAX_ITER))
            pipeline.fit(x_train, y_train)
        converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
        accuracy = float(np.mean(pipeline.predict(x_val) == y_val))
        loss = float(log_loss(y_val, pipeline.predict_proba(x_val), labels=labels))
        log.debug("C=%g: validation accuracy %.4f, log-loss %.4f", c, accuracy, loss)
        scores.append((c, accuracy))
        if best is None or (-accuracy, loss) < best:
            best, chosen = (-accuracy, loss), Head(pipeline, c, (), converged)
    if chosen is None:  # C_GRID is not empty
        raise RuntimeError("no C to fit")
    if not chosen.converged:
        log.warning("the head with C=%g did not converge in %d iterations", chosen.C, MAX_ITER)
    return Head(chosen.pipeline, chosen.C, tuple(scores), chosen.converged)


@dataclass(frozen=True)
class Confusion:
    """How a classifier did on labelled rows: overall, per class, and its commonest mistakes."""

    accuracy: float
    per_class: tuple[tuple[str, int, int], ...]
    """(label, correct, images) in label order."""
    confused: tuple[tuple[str, str, int], ...]
    """(true label, predicted label, images), most frequent first."""

    def lines(self, *, pairs: int = 5) -> list[str]:
        """The summary for a terminal: per-class accuracy and the most confused pairs."""
        out = ["  per class:"]
        width = max(len(label) for label, _, _ in self.per_class)
        for label, correct, total in self.per_class:
            share = correct / total if total else 0.0
            out.append(f"    {label:<{width}}  {correct:>5}/{total:<5} {share:7.2%}")
        if self.confused:
            out.append("  most confused (true -> predicted):")
            out += [f"    {t} -> {p}: {n}" for t, p, n in self.confused[:pairs]]
        return out


def confusion(truth: np.ndarray, predicted: np.ndarray, classes: tuple[str, ...]) -> Confusion:
    """Per-class accuracy and the off-diagonal counts of ``truth`` vs ``predicted`` (indices)."""
    k = len(classes)
    matrix = np.zeros((k, k), dtype=np.int64)
    np.add.at(matrix, (truth, predicted), 1)
    per_class = tuple((classes[i], int(matrix[i, i]), int(matrix[i].sum())) for i in range(k))
    mistakes = [
        (classes[i], classes[j], int(matrix[i, j]))
        for i in range(k)
        for j in range(k)
        if i != j and matrix[i, j]
    ]
    mistakes.sort(key=lambda t: -t[2])  # stable: equal counts stay in label order
    return Confusion(float(np.trace(matrix) / max(len(truth), 1)), per_class, tuple(mistakes))
