"""``resnet-client`` without a server: what it imports, which files it sends, how it resumes
from what an interrupted run left on disk, and the arguments it refuses (exit 2).

The end-to-end behaviour against a live server is in ``tests/e2e/test_client_e2e.py``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from service.client import main
from service.client.errors import EXIT_USAGE, Fatal
from service.client.folder import scan
from service.client.outputs import CsvRows, Embeddings, JsonLines
from service.client.sender import Rejected

REPO = Path(__file__).resolve().parents[2]
CAT = REPO / "tests/fixtures/cifar10-val/cat/0000.jpg"


def prediction(label: str) -> dict[str, object]:
    scores = [
        {"index": 3, "label": label, "score": 0.75},
        {"index": 0, "label": "x", "score": 0.25},
    ]
    return {"model": "m", "version": 1, "predictions": scores}


def python(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, *args]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=60)


def test_the_client_imports_neither_onnxruntime_nor_fastapi() -> None:
    code = (
        "import sys, service.client\n"
        "heavy = {'onnxruntime', 'fastapi', 'starlette', 'PIL', 'torch', 'service.app'}\n"
        "print(sorted(heavy & set(sys.modules)))\n"
    )
    imported = python("-c", code)
    assert imported.stdout.strip() == "[]", imported.stderr
    helped = python("-m", "service.client", "--help")
    assert helped.returncode == 0 and "usage: resnet-client" in helped.stdout


def test_scan_takes_images_by_extension_sorted_and_counts_the_rest(tmp_path: Path) -> None:
    for name in ("b/z.JPEG", "b/a.png", "a.webp", "c/d/e.TIF", "notes.txt", "b/README", "x.jpg"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "two\nlines.jpg").write_bytes(b"")  # cannot be one line of an index
    (tmp_path / "out.jsonl").write_text("")
    folder = scan(tmp_path, ignore=[tmp_path / "out.jsonl"])
    assert folder.images == ["a.webp", "b/a.png", "b/z.JPEG", "c/d/e.TIF", "x.jpg"]
    assert folder.skipped == ["b/README", "notes.txt", "two\nlines.jpg"]


def test_predictions_resume_from_whole_lines_and_cut_a_torn_one(tmp_path: Path) -> None:
    out = tmp_path / "preds.jsonl"
    first = JsonLines(out, 2, overwrite=False)
    first.write("a.jpg", prediction("cat"))
    first.write("b.jpg", Rejected(422, "invalid_image", "truncated"))
    first.close(complete=False)
    with out.open("a") as file:
        file.write('{"path": "c.jpg", "model": "m", "ver')  # killed mid-write

    again = JsonLines(out, 2, overwrite=False)
    assert again.done == {"a.jpg", "b.jpg"}
    again.write("c.jpg", prediction("dog"))
    again.close(complete=True)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["path"] for r in records] == ["a.jpg", "b.jpg", "c.jpg"]
    assert records[1]["error"] == {"status": 422, "code": "invalid_image", "message": "truncated"}
    assert records[2]["predictions"][0]["label"] == "dog"

    with pytest.raises(Fatal, match="holds top-2 predictions, not top-5") as error:
        JsonLines(out, 5, overwrite=False)
    assert error.value.exit_code == EXIT_USAGE
    assert len(JsonLines(out, None, overwrite=False).done) == 3  # no --top-k: any
    assert JsonLines(out, 5, overwrite=True).done == set()
    assert not out.exists()


def test_csv_resumes_its_own_columns_only(tmp_path: Path) -> None:
    out = tmp_path / "preds.csv"
    rows = CsvRows(out, 2, overwrite=False)
    rows.write("a.jpg", prediction("cat"))
    rows.write("b.jpg", Rejected(415, "unsupported_image", "not an image"))
    rows.close(complete=False)
    assert out.read_text().splitlines() == [
        "path,model,version,label_1,index_1,score_1,label_2,index_2,score_2,error",
        "a.jpg,m,1,cat,3,0.75,x,0,0.25,",
        "b.jpg,,,,,,,,,415 unsupported_image: not an image",
    ]
    assert CsvRows(out, 2, overwrite=False).done == {"a.jpg", "b.jpg"}
    assert CsvRows(out, None, overwrite=False).ranks == 2  # no --top-k: the file's
    with pytest.raises(Fatal, match="not top-3's"):
        CsvRows(out, 3, overwrite=False)


def test_csv_without_top_k_takes_its_columns_from_the_first_prediction(tmp_path: Path) -> None:
    out = tmp_path / "preds.csv"
    rows = CsvRows(out, None, overwrite=False)
    rows.write("a.jpg", Rejected(415, "unsupported_image", "not an image"))
    assert not out.exists()  # how many columns its blanks need is not known yet
    rows.write("b.jpg", prediction("cat"))
    with pytest.raises(Fatal, match="has top-2 columns, the server answered top-1"):
        rows.write("c.jpg", {**prediction("cat"), "predictions": [{"index": 1}]})
    rows.close(complete=True)
    assert out.read_text().splitlines() == [
        "path,model,version,label_1,index_1,score_1,label_2,index_2,score_2,error",
        "a.jpg,,,,,,,,,415 unsupported_image: not an image",
        "b.jpg,m,1,cat,3,0.75,x,0,0.25,",
    ]
    waiting = CsvRows(tmp_path / "rejected.csv", None, overwrite=False)
    waiting.write("a.jpg", Rejected(415, "unsupported_image", "not an image"))
    assert waiting.close(complete=True).endswith("holds 0 images")  # sent again next time
    assert not (tmp_path / "rejected.csv").exists()


def embedding(values: list[float]) -> dict[str, object]:
    return {"model": "m", "version": 1, "embedding": values}


def test_embeddings_resume_drop_rows_past_the_journal_and_finish_in_path_order(
    tmp_path: Path,
) -> None:
    out, identity = tmp_path / "feats.npy", {"dir": "/images", "model": None}
    first = Embeddings(out, identity, overwrite=False)
    first.write("b.jpg", embedding([1.0, 2.0]))
    first.write("bad.jpg", Rejected(422, "invalid_image", "truncated"))
    first.write("a.jpg", embedding([3.0, 4.0]))
    first.close(complete=False)
    assert not out.exists()
    with (tmp_path / "feats.npy.partial" / "rows.f32").open("ab") as rows:
        rows.write(
            np.array([9, 9], dtype=np.float32).tobytes()
        )  # a row whose journal line never came

    with pytest.raises(Fatal, match="was started with") as error:
        Embeddings(out, {**identity, "model": "other"}, overwrite=False)
    assert error.value.exit_code == EXIT_USAGE
    again = Embeddings(out, identity, overwrite=False)
    assert again.done == {"a.jpg", "b.jpg", "bad.jpg"}
    again.write("c.jpg", embedding([5.0, 6.0]))
    with pytest.raises(Fatal, match="holds embeddings of"):
        again.write("d.jpg", {"model": "m", "version": 2, "embedding": [0.0, 0.0]})
    message = again.close(complete=True)

    assert message.startswith(f"{out} holds 3 embeddings")
    np.testing.assert_array_equal(
        np.load(out), np.array([[3, 4], [1, 2], [5, 6]], dtype=np.float32)
    )
    assert (tmp_path / "feats.paths.txt").read_text() == "a.jpg\nb.jpg\nc.jpg\n"
    errors = (tmp_path / "feats.errors.jsonl").read_text().splitlines()
    assert [json.loads(line)["path"] for line in errors] == ["bad.jpg"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "feats.errors.jsonl",
        "feats.npy",
        "feats.paths.txt",
    ]
    with pytest.raises(Fatal, match="already there"):
        Embeddings(out, identity, overwrite=False)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["predict", "{tmp}/missing", "--out", "{tmp}/p.jsonl"], "is not a folder"),
        (["predict", "{tmp}/empty", "--out", "{tmp}/p.jsonl"], "no images under"),
        (["predict", "{tmp}/images", "--out", "{tmp}/p.txt"], "go to a .jsonl or .csv file"),
        (["embed", "{tmp}/images", "--out", "{tmp}/feats.csv"], "go to a .npy file"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("")
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "cat.jpg").write_bytes(CAT.read_bytes())
    argv = [arg.format(tmp=tmp_path) for arg in args]
    assert main([*argv, "--url", "http://127.0.0.1:9", "--no-progress"]) == EXIT_USAGE
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("resnet-client: error: ") and message in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "images"]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--url", "localhost:8000"], "'localhost:8000' is not an http:// or https:// URL"),
        (["--url", "http://[::1"], "'http://[::1' is not an http:// or https:// URL"),
        (["--retries", "-1"], "must be 0 or more, got -1"),
        (["--timeout", "0"], "must be more than 0, got 0"),
        (["--concurrency", "0"], "must be 1 or more, got 0"),
    ],
)
def test_argument_errors_exit_2(
    capsys: pytest.CaptureFixture[str], flags: list[str], message: str
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["predict", ".", "--out", "p.jsonl", *flags])
    assert exit_.value.code == EXIT_USAGE
    assert message in capsys.readouterr().err


def test_a_damaged_journal_is_refused_in_one_line(tmp_path: Path) -> None:
    journal = tmp_path / "feats.npy.partial" / "journal.jsonl"
    journal.parent.mkdir()
    journal.write_text('{"arguments": {}}\n{"path": "a.jpg", "row": \n')  # not a torn tail
    with pytest.raises(Fatal, match="is damaged; pass --overwrite"):
        Embeddings(tmp_path / "feats.npy", {}, overwrite=False)
