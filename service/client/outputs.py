"""Where results go, and how a rerun picks up where an interrupted run stopped.

Every record is written whole and flushed before the next, so whatever stops a run (Ctrl-C,
a crash, a kill) leaves complete records, at worst one torn last line, which the rerun cuts
off. Predictions are appended to their file, which is their own resume marker: paths
already in it are skipped. Embeddings go to ``OUT.partial/`` (float32 rows plus a journal
naming each row's path) and become ``OUT`` and its index only when every image is done.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from service.client.errors import EXIT_USAGE, Fatal
from service.client.sender import Rejected, Result

ROWS_PER_COPY = 4096


class Output(Protocol):
    """A destination for results: what it already holds, and how to add one."""

    done: set[str]
    """Paths recorded by earlier runs (results and rejections alike): not sent again."""

    def files(self) -> list[Path]:
        """Every file it may write (kept out of the folder scan)."""
        ...

    def write(self, path: str, answer: Result) -> None:
        """Record one image's result or rejection."""
        ...

    def close(self, *, complete: bool) -> str:
        """Close; ``complete`` when every image of the folder is recorded. Says what is where."""
        ...


def open_output(
    out: Path, *, top_k: int | None, identity: dict[str, Any], overwrite: bool
) -> Output:
    """The writer for ``out``'s extension, resuming what an earlier run left there."""
    if out.suffix == ".npy":
        return Embeddings(out, identity, overwrite=overwrite)
    if out.suffix == ".jsonl":
        return JsonLines(out, top_k, overwrite=overwrite)
    if out.suffix == ".csv":
        return CsvRows(out, top_k, overwrite=overwrite)
    raise Fatal(f"--out {out}: predictions go to a .jsonl or .csv file", EXIT_USAGE)


def _error(answer: Rejected) -> dict[str, Any]:
    return {"status": answer.status, "code": answer.code, "message": answer.message}


def _complete_lines(path: Path) -> list[str]:
    """The file's whole lines; a torn last line (the run was killed mid-write) is cut off."""
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end != len(data):
        with path.open("r+b") as file:
            file.truncate(end)
    return data[:end].decode("utf-8").splitlines()


class _Appended:
    """An append-only text file of records, opened on the first one written."""

    def __init__(self, path: Path, *, overwrite: bool) -> None:
        self.path = path
        self.done: set[str] = set()
        self._file: io.TextIOWrapper | None = None
        if overwrite:
            path.unlink(missing_ok=True)

    def files(self) -> list[Path]:
        return [self.path]

    def _append(self, line: str) -> None:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a", encoding="utf-8", newline="")
        self._file.write(line)
        self._file.flush()

    def close(self, *, complete: bool) -> str:
        if self._file is not None:
            self._file.close()
        return f"{self.path} holds {len(self.done)} images"

    def _mismatch(self, what: str) -> Fatal:
        return Fatal(f"{self.path} {what}; use another --out, or --overwrite", EXIT_USAGE)


class JsonLines(_Appended):
    """One JSON object per image: ``path``, ``model``, ``version``, ``predictions`` or ``error``."""

    def __init__(self, path: Path, top_k: int | None, *, overwrite: bool) -> None:
        super().__init__(path, overwrite=overwrite)
        if not path.exists():
            return
        for number, line in enumerate(_complete_lines(path), 1):
            try:
                record = json.loads(line)
                self.done.add(record["path"])
            except (ValueError, KeyError, TypeError):
                raise self._mismatch(f"line {number} is not a resnet-client record") from None
            found = len(record.get("predictions") or [])
            if top_k is not None and found not in (0, top_k):
                raise self._mismatch(f"holds top-{found} predictions, not top-{top_k}")

    def write(self, path: str, answer: Result) -> None:
        record: dict[str, Any] = {"path": path}
        if isinstance(answer, Rejected):
            record["error"] = _error(answer)
        else:
            record.update({key: answer[key] for key in ("model", "version", "predictions")})
        self._append(json.dumps(record) + "\n")
        self.done.add(path)


def _columns(ranks: int) -> list[str]:
    per_rank = [f"{c}_{r}" for r in range(1, ranks + 1) for c in ("label", "index", "score")]
    return ["path", "model", "version", *per_rank, "error"]


class CsvRows(_Appended):
    """One row per image: path, model, version, label/index/score per rank, error.

    The number of ranks is ``--top-k``, else that of the file being resumed, else that of
    the server's first prediction (its default: 5, or every class of a smaller model).
    Until that first prediction, rows of rejected images wait in memory: a run that gets
    none at all records none of them, and the next run sends them again.
    """

    def __init__(self, path: Path, top_k: int | None, *, overwrite: bool) -> None:
        super().__init__(path, overwrite=overwrite)
        rows = list(csv.reader(_complete_lines(path))) if path.exists() else []
        self.ranks = top_k
        if rows:
            found = (len(rows[0]) - 4) // 3
            if rows[0] != _columns(found) or top_k not in (None, found):
                wanted = f"top-{top_k}'s" if top_k else "resnet-client's"
                raise self._mismatch(f"has the columns {','.join(rows[0])}, not {wanted}")
            self.ranks = found
        self.done.update(row[0] for row in rows[1:] if row)
        self._header = not rows
        self._waiting: list[tuple[str, Rejected]] = []

    def write(self, path: str, answer: Result) -> None:
        self.done.add(path)
        if isinstance(answer, Rejected):
            if self.ranks is None:
                self._waiting.append((path, answer))
                return
            rows = [self._rejected(path, answer)]
        else:
            predictions = answer["predictions"]
            if self.ranks is None:
                self.ranks = len(predictions)
            elif len(predictions) != self.ranks:
                raise self._mismatch(
                    f"has top-{self.ranks} columns, the server answered top-{len(predictions)}"
                )
            rows = [self._rejected(*waiting) for waiting in self._waiting]
            self._waiting = []
            row: list[object] = [path, answer["model"], answer["version"]]
            for p in predictions:
                row += [p["label"], p["index"], p["score"]]
            rows.append([*row, ""])
        if self._header:
            rows.insert(0, [*_columns(self.ranks)])
            self._header = False
        text = io.StringIO()
        csv.writer(text, lineterminator="\n").writerows(rows)
        self._append(text.getvalue())

    def _rejected(self, path: str, answer: Rejected) -> list[object]:
        blanks = [""] * (2 + 3 * (self.ranks or 0))
        return [path, *blanks, f"{answer.status} {answer.code}: {answer.message}"]

    def close(self, *, complete: bool) -> str:
        self.done.difference_update(path for path, _ in self._waiting)
        return super().close(complete=complete)


class Embeddings:
    """``OUT.npy`` (float32 ``[N, D]``, rows in path order), ``OUT.paths.txt`` (row i's path,
    relative to the folder) and, when some images failed, ``OUT.errors.jsonl``.

    Until the run is complete they live in ``OUT.partial/``: ``rows.f32`` (raw rows in the
    order answered) and ``journal.jsonl`` (the arguments that must match on a rerun, the
    model that answered, then one line per image). A row is written before its journal line,
    so on a rerun any rows past the journal are dropped.
    """

    def __init__(self, out: Path, identity: dict[str, Any], *, overwrite: bool) -> None:
        self.out, self.identity = out, identity
        self.partial = out.with_name(out.name + ".partial")
        self.index = out.with_suffix(".paths.txt")
        self.errors = out.with_suffix(".errors.jsonl")
        self.journal, self.rows_file = self.partial / "journal.jsonl", self.partial / "rows.f32"
        self.done: set[str] = set()
        self.row_paths: list[str] = []
        self.rejected: list[dict[str, Any]] = []
        self.model: dict[str, Any] | None = None
        self._journal: io.TextIOWrapper | None = None
        self._rows: io.BufferedWriter | None = None
        if overwrite:
            shutil.rmtree(self.partial, ignore_errors=True)
            for path in (out, self.index, self.errors):
                path.unlink(missing_ok=True)
        if self.journal.exists():
            self._resume()
        elif out.exists():
            raise Fatal(
                f"{out} is already there (a finished run); delete it or pass --overwrite",
                EXIT_USAGE,
            )

    def files(self) -> list[Path]:
        return [self.out, self.index, self.errors, self.journal, self.rows_file]

    def _resume(self) -> None:
        try:
            self._read_journal()
        except (ValueError, KeyError, TypeError):
            raise Fatal(f"{self.journal} is damaged; pass --overwrite", EXIT_USAGE) from None
        size = len(self.row_paths) * (self.model["dim"] if self.model else 0) * 4
        if self.rows_file.exists() and self.rows_file.stat().st_size < size:
            raise Fatal(
                f"{self.rows_file} is shorter than its journal; pass --overwrite", EXIT_USAGE
            )
        if self.rows_file.exists():
            os.truncate(self.rows_file, size)

    def _read_journal(self) -> None:
        lines = _complete_lines(self.journal)
        header = json.loads(lines[0]) if lines else {"arguments": self.identity}
        if header.get("arguments") != self.identity:
            raise Fatal(
                f"{self.partial} was started with {header.get('arguments')}, not "
                f"{self.identity}; rerun with those arguments, or pass --overwrite",
                EXIT_USAGE,
            )
        for line in lines[1:]:
            record = json.loads(line)
            if "dim" in record:
                self.model = record
                continue
            if "row" in record:
                self.row_paths.append(record["path"])
            else:
                self.rejected.append(record)
            self.done.add(record["path"])

    def _log(self, record: dict[str, Any]) -> None:
        if self._journal is None:
            self.partial.mkdir(parents=True, exist_ok=True)
            self._journal = self.journal.open("a", encoding="utf-8")
            if self._journal.tell() == 0:
                self._log({"arguments": self.identity})
        self._journal.write(json.dumps(record) + "\n")
        self._journal.flush()

    def write(self, path: str, answer: Result) -> None:
        if isinstance(answer, Rejected):
            self.rejected.append({"path": path, "error": _error(answer)})
            self._log(self.rejected[-1])
        else:
            vector = np.asarray(answer["embedding"], dtype="<f4")
            model = {"model": answer["model"], "version": answer["version"], "dim": len(vector)}
            if self.model is None:
                self.model = model
                self._log(model)
            elif model != self.model:
                raise Fatal(
                    f"the server answered with {model}, but {self.partial} holds embeddings of "
                    f"{self.model}; pass --model and --model-version to finish with that one, "
                    "or --overwrite",
                    EXIT_USAGE,
                )
            if self._rows is None:
                self._rows = self.rows_file.open("ab")
            self._rows.write(vector.tobytes())
            self._rows.flush()
            self._log({"path": path, "row": len(self.row_paths)})
            self.row_paths.append(path)
        self.done.add(path)

    def close(self, *, complete: bool) -> str:
        for file in (self._rows, self._journal):
            if file is not None:
                file.close()
        if not self.journal.exists():
            return f"nothing written to {self.out}"
        if not complete:
            return f"{self.partial} holds {len(self.done)} images; rerun to finish {self.out}"
        self._finish()
        rejected = f", {self.errors} the {len(self.rejected)} rejected" if self.rejected else ""
        return (
            f"{self.out} holds {len(self.row_paths)} embeddings, {self.index} their paths{rejected}"
        )

    def _finish(self) -> None:
        """Write the outputs in path order, each through a temporary file, then drop the
        working folder; a crash in between leaves the journal, and a rerun finishes again."""
        n, dim = len(self.row_paths), self.model["dim"] if self.model else 0
        order = sorted(range(n), key=self.row_paths.__getitem__)
        temporary = self.out.with_name(self.out.name + ".tmp")
        if n == 0:
            with temporary.open("wb") as file:
                np.save(file, np.zeros((0, dim), dtype="<f4"))
        else:
            rows = np.memmap(self.rows_file, dtype="<f4", mode="r", shape=(n, dim))
            target = np.lib.format.open_memmap(temporary, mode="w+", dtype="<f4", shape=(n, dim))
            for start in range(0, n, ROWS_PER_COPY):
                target[start : start + ROWS_PER_COPY] = rows[order[start : start + ROWS_PER_COPY]]
            target.flush()
            del target, rows
        os.replace(temporary, self.out)
        _replace_text(self.index, "".join(self.row_paths[i] + "\n" for i in order))
        if self.rejected:
            errors = sorted(self.rejected, key=lambda record: str(record["path"]))
            _replace_text(self.errors, "".join(json.dumps(e) + "\n" for e in errors))
        else:
            self.errors.unlink(missing_ok=True)
        shutil.rmtree(self.partial)


def _replace_text(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)
