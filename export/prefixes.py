"""The prefix that fits a checkpoint's keys to a model's, found from the model's own keys.

Wrappers prefix every key: ``module.`` (DataParallel), ``_orig_mod.`` (``torch.compile``),
``model.`` (a LightningModule holding ``self.model``), and nestings such as
``_orig_mod.model.``; a model that wraps a network does the reverse (``backbone.`` on the
model's side). :func:`fit` tries every prefix that turns some checkpoint key into a model key,
by stripping or by adding one, and keeps the one that matches the most model keys.
"""

from __future__ import annotations

import difflib
import logging
from collections import Counter, OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from export.errors import ExportError

log = logging.getLogger(__name__)

_NEAREST = 3  # checkpoint keys shown with their nearest model key when nothing matches
_NEAREST_POOL = 20  # checkpoint keys (in file order) searched for those pairs


@dataclass(frozen=True)
class Rekey:
    """Rename a checkpoint's keys: take ``strip`` off the keys that start with it (leaving
    out the others), then put ``add`` in front."""

    strip: str = ""
    add: str = ""

    def __str__(self) -> str:
        if self.strip:
            return f"keys read without their {self.strip!r} prefix"
        return f"keys read with the prefix {self.add!r} added" if self.add else "keys as saved"

    def outside(self, keys: Sequence[str]) -> list[str]:
        """The keys this renaming leaves out: those without the prefix to strip."""
        return [k for k in keys if not k.startswith(self.strip)]

    def note(self, keys: Sequence[str]) -> str:
        """`` (what was done to the keys)`` for a message; empty for keys as saved."""
        if not (self.strip or self.add):
            return ""
        left_out = self.outside(keys)
        extra = f", {_count(len(left_out), 'key')} outside it left out" if left_out else ""
        return f" ({self}{extra})"

    def apply(self, state: Mapping[str, torch.Tensor]) -> OrderedDict[str, torch.Tensor]:
        """The renamed state_dict, with its ``_metadata`` (the per-module versions that
        ``load_state_dict`` reads) renamed alike."""
        n = len(self.strip)
        out = OrderedDict(
            (self.add + k[n:], v) for k, v in state.items() if k.startswith(self.strip)
        )
        metadata = getattr(state, "_metadata", None)
        if metadata is not None:
            # Module names have no trailing dot: the prefix's own module becomes the root "".
            renamed = OrderedDict()
            for name, value in metadata.items():
                dotted = f"{name}." if name else ""
                if dotted.startswith(self.strip):
                    renamed[(self.add + dotted[n:]).removesuffix(".")] = value
            out._metadata = renamed  # type: ignore[attr-defined]
        return out


def fit(
    state: Mapping[str, torch.Tensor], model_keys: Sequence[str], *, what: str
) -> tuple[Rekey, OrderedDict[str, torch.Tensor]]:
    """The renaming whose keys match the most of ``model_keys``, and ``state`` renamed by it.

    Keys kept as saved win a tie; two prefixes that tie are refused as ambiguous, and so is a
    checkpoint of which no key matches under any prefix (the message shows the model keys
    nearest to a few of its keys). ``what`` names the model in messages.
    """
    keys = list(state)
    rekey = _best(keys, model_keys, what=what)
    if rekey.strip:
        left_out = rekey.outside(keys)
        log.info("checkpoint: removing the prefix %r from its keys", rekey.strip)
        if left_out:
            log.warning(
                "checkpoint: leaving out %s outside %r (%s)",
                _count(len(left_out), "key"),
                rekey.strip,
                ", ".join(left_out[:_NEAREST]) + (", ..." if len(left_out) > _NEAREST else ""),
            )
    elif rekey.add:
        log.info("checkpoint: adding the prefix %r to its keys", rekey.add)
    return rekey, rekey.apply(state)


def _best(keys: Sequence[str], model_keys: Sequence[str], *, what: str) -> Rekey:
    ours, theirs = set(model_keys), set(keys)
    # Each score is how many model keys the renaming produces.
    scores: Counter[Rekey] = Counter({Rekey(): len(theirs & ours)})
    for key in keys:
        for prefix in _prefixes(key):
            if key[len(prefix) :] in ours:
                scores[Rekey(strip=prefix)] += 1
    for key in model_keys:
        for prefix in _prefixes(key):
            if key[len(prefix) :] in theirs:
                scores[Rekey(add=prefix)] += 1
    best = max(scores.values())
    if best == 0:
        raise ExportError(
            f"checkpoint does not match {what}: none of its {len(keys)} keys is one of the "
            f"model's {len(model_keys)}, with or without a prefix; nearest (checkpoint key ~ "
            f"model key): {_nearest(keys, model_keys)}"
        )
    winners = [r for r, score in scores.items() if score == best]
    if Rekey() in winners:
        return Rekey()
    if len(winners) > 1:
        named = ", ".join(sorted(repr(r.strip or r.add) for r in winners))
        raise ExportError(
            f"checkpoint does not match {what} unambiguously: its keys match the model's "
            f"equally well with the prefixes {named}; re-save the weights to export alone"
        )
    return winners[0]


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _prefixes(key: str) -> list[str]:
    """``a.b.c`` -> ``a.``, ``a.b.``: every dotted prefix, never the whole key."""
    return [key[: i + 1] for i, c in enumerate(key) if c == "."]


def _nearest(keys: Sequence[str], model_keys: Sequence[str]) -> str:
    """A few checkpoint keys, each with the model key it most resembles, closest first."""
    pairs = []
    for key in keys[:_NEAREST_POOL]:
        matcher = difflib.SequenceMatcher(b=key)
        ratios = []
        for candidate in model_keys:
            matcher.set_seq1(candidate)
            ratios.append((matcher.ratio(), candidate))
        ratio, candidate = max(ratios, key=lambda pair: pair[0])
        pairs.append((ratio, key, candidate))
    pairs.sort(key=lambda pair: -pair[0])
    return ", ".join(f"{key} ~ {candidate}" for _, key, candidate in pairs[:_NEAREST])
