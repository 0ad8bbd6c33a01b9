"""``resnet-client`` against real ``python -m service`` processes serving the shipped model.

The client runs as users run it, in its own process (``python -m service.client`` or the
``resnet-client`` script), on the 50 CIFAR-10 JPEGs of ``tests/fixtures/cifar10-val``
plus files that are not images. Its outputs are compared with what ``/predict`` and
``/embed`` answer for the same images. Interruptions are real (SIGINT, SIGKILL, a server
stopped mid-run), each gated on the records written so far, and so are the 503s: the one
admission slot of a server is held by a request whose body does not come.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest
from e2e_server import REPO, Server, free_port, wait_for

FIXTURES = REPO / "tests/fixtures/cifar10-val"
SHIPPED = REPO / "models/cifar10-resnet20/1/model.onnx"
IMAGES = sorted(p.relative_to(FIXTURES).as_posix() for p in FIXTURES.rglob("*.jpg"))


def client_command(*args: object) -> list[str]:
    return [sys.executable, "-m", "service.client", *map(str, args), "--no-progress"]


def client_env(**variables: str) -> dict[str, str]:
    """This process's environment without the client's own variables, plus ``variables``."""
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("RESNET_CLIENT_")}
    return inherited | variables


def run_client(*args: object, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        client_command(*args),
        cwd=REPO,
        env=client_env(**env),
        capture_output=True,
        text=True,
        timeout=120,
    )


def start_client(*args: object) -> subprocess.Popen[str]:
    command = client_command(*args)
    return subprocess.Popen(command, cwd=REPO, env=client_env(), stderr=subprocess.PIPE, text=True)


def summary(stderr: str) -> dict[str, int]:
    """The counts of the client's summary line (``done 50, failed 0, ...``)."""
    found = re.search(
        r"done (\d+), failed (\d+), skipped (\d+) \(not images\), already done (\d+), "
        r"retries (\d+)",
        stderr,
    )
    assert found, stderr
    keys = ("done", "failed", "skipped", "already", "retries")
    return dict(zip(keys, map(int, found.groups()), strict=True))


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def repo_of(root: Path, config: dict[str, object] | None = None) -> Path:
    """A model repository serving the shipped model as cifar10-resnet20 v1."""
    (root / "cifar10-resnet20" / "1").mkdir(parents=True)
    (root / "cifar10-resnet20" / "1" / "model.onnx").symlink_to(SHIPPED)
    if config is not None:
        (root / "cifar10-resnet20" / "config.json").write_text(json.dumps(config))
    return root


@pytest.fixture(scope="module")
def fast(launch: Callable[..., Server], tmp_path_factory: pytest.TempPathFactory) -> Server:
    """The shipped model with the service's defaults."""
    return launch(repo_of(tmp_path_factory.mktemp("fast")))


@pytest.fixture(scope="module")
def slow_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same model, but a lone image waits 100 ms for company: a run takes seconds."""
    return repo_of(tmp_path_factory.mktemp("slow"), {"max_delay_ms": 100})


@pytest.fixture(scope="module")
def slow(launch: Callable[..., Server], slow_repo: Path) -> Server:
    return launch(slow_repo)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 50 fixture JPEGs in their class folders, plus two files that are not images."""
    root = tmp_path_factory.mktemp("folder") / "images"
    shutil.copytree(FIXTURES, root)
    (root / "notes.txt").write_text("not an image")
    (root / "cat" / "labels.json").write_text("{}")
    return root


@pytest.fixture(scope="module")
def expected(fast: Server, folder: Path) -> dict[str, dict]:
    """Path -> what /predict answers for that image alone (top 5)."""
    with fast.client() as client:
        return {
            path: client.post("/predict", content=(folder / path).read_bytes()).json()
            for path in IMAGES
        }


def assert_same_predictions(record: dict, answer: dict, top_k: int) -> None:
    """Same model, classes and order; scores equal to float32 rounding (batches differ)."""
    want = answer["results"][0]["predictions"][:top_k]
    assert (record["model"], record["version"]) == (answer["model"], answer["version"])
    assert [p["index"] for p in record["predictions"]] == [p["index"] for p in want]
    assert [p["label"] for p in record["predictions"]] == [p["label"] for p in want]
    got = [p["score"] for p in record["predictions"]]
    np.testing.assert_allclose(got, [p["score"] for p in want], rtol=1e-5, atol=1e-7)


def test_predict_writes_one_json_line_per_image_as_predict_answers(
    fast: Server, folder: Path, expected: dict[str, dict], tmp_path: Path
) -> None:
    out = tmp_path / "preds.jsonl"
    result = run_client("predict", folder, "--url", fast.url, "--out", out)
    assert result.returncode == 0, result.stderr
    assert summary(result.stderr) == dict(done=50, failed=0, skipped=2, already=0, retries=0)
    records = [json.loads(line) for line in lines(out)]
    assert [r["path"] for r in records] == IMAGES  # every image once, in path order
    for record in records:
        assert_same_predictions(record, expected[record["path"]], top_k=5)
    assert "Traceback" not in result.stderr


def test_predict_csv_through_the_console_script(
    fast: Server, folder: Path, expected: dict[str, dict], tmp_path: Path
) -> None:
    out = tmp_path / "preds.csv"
    script = Path(sys.executable).parent / "resnet-client"
    command = [str(script), "predict", str(folder), "--url", fast.url, "--out", str(out)]
    command += ["--top-k", "3", "--batch-size", "4", "--concurrency", "3", "--no-progress"]
    result = subprocess.run(command, env=client_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    with out.open(newline="") as file:
        rows = list(csv.DictReader(file))
    assert [row["path"] for row in rows] == IMAGES
    columns = ["path", "model", "version"]
    columns += [f"{c}_{r}" for r in (1, 2, 3) for c in ("label", "index", "score")] + ["error"]
    assert list(rows[0]) == columns
    for row in rows:
        record = {
            "model": row["model"],
            "version": int(row["version"]),
            "predictions": [
                {"label": row[f"label_{r}"], "index": int(row[f"index_{r}"])}
                | {"score": float(row[f"score_{r}"])}
                for r in (1, 2, 3)
            ],
        }
        assert row["error"] == ""
        assert_same_predictions(record, expected[row["path"]], top_k=3)


def test_embed_writes_npy_rows_in_path_order_as_embed_answers(
    fast: Server, folder: Path, tmp_path: Path
) -> None:
    out = tmp_path / "feats.npy"
    result = run_client("embed", folder, "--url", fast.url, "--out", out, "--batch-size", "5")
    assert result.returncode == 0, result.stderr
    files = [file.relative_to(tmp_path).as_posix() for file in tmp_path.iterdir()]
    assert sorted(files) == ["feats.npy", "feats.paths.txt"]  # no working files left
    assert lines(tmp_path / "feats.paths.txt") == IMAGES
    features = np.load(out)
    parts = [("file", (p, (folder / p).read_bytes(), "image/jpeg")) for p in IMAGES]
    with fast.client() as client:
        answer = client.post("/embed", files=parts, headers={"Accept": "application/x-npy"})
    reference = np.load(io.BytesIO(answer.content))
    assert features.dtype == np.float32 and features.shape == reference.shape == (50, 64)
    np.testing.assert_allclose(features, reference, rtol=1e-5, atol=1e-6)


def test_images_the_server_rejects_are_recorded_and_counted_not_fatal(
    fast: Server, tmp_path: Path
) -> None:
    folder = tmp_path / "mixed"
    folder.mkdir()
    good = IMAGES[:3]
    for path in good:
        (folder / path.replace("/", "_")).write_bytes((FIXTURES / path).read_bytes())
    (folder / "torn.jpg").write_bytes((FIXTURES / good[0]).read_bytes()[:300])
    (folder / "text.PNG").write_text("hello")
    (folder / "notes.txt").write_text("skipped")
    out = tmp_path / "preds.jsonl"
    # One request of all five: the bad files spoil it, so each image is sent alone.
    result = run_client("predict", folder, "--url", fast.url, "--out", out, "--batch-size", "8")
    assert result.returncode == 1, result.stderr
    assert summary(result.stderr) == dict(done=3, failed=2, skipped=1, already=0, retries=0)
    records = {r["path"]: r for r in map(json.loads, lines(out))}
    assert len(records) == 5
    assert records["torn.jpg"]["error"]["code"] == "invalid_image"
    assert records["torn.jpg"]["error"]["status"] == 422
    assert records["text.PNG"]["error"]["code"] == "unsupported_image"
    assert sum("predictions" in r for r in records.values()) == 3

    again = run_client("predict", folder, "--url", fast.url, "--out", out)
    assert again.returncode == 0, again.stderr
    assert summary(again.stderr) == dict(done=0, failed=0, skipped=1, already=5, retries=0)
    assert len(lines(out)) == 5


def test_limit_stops_early_and_reruns_continue(fast: Server, folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "preds.jsonl"
    counts = []
    for _ in range(3):
        result = run_client("predict", folder, "--url", fast.url, "--out", out, "--limit", 20)
        assert result.returncode == 0, result.stderr
        counts.append(len(lines(out)))
    assert counts == [20, 40, 50]
    assert [json.loads(line)["path"] for line in lines(out)] == IMAGES


def interrupt_after(client: subprocess.Popen[str], records: Callable[[], int], sig: int) -> str:
    """Send ``sig`` once the client has written 5 records; its stderr."""
    wait_for(lambda: records() >= 5 or client.poll() is not None, "5 records")
    assert client.poll() is None, "the run ended before it could be interrupted"
    client.send_signal(sig)
    _, stderr = client.communicate(timeout=60)
    return stderr


def test_ctrl_c_leaves_whole_records_and_a_rerun_sends_only_the_rest(
    slow: Server, fast: Server, folder: Path, expected: dict[str, dict], tmp_path: Path
) -> None:
    out = tmp_path / "preds.jsonl"
    flags = ["--out", out, "--concurrency", 2, "--batch-size", 1]
    client = start_client("predict", folder, "--url", slow.url, *flags)
    stderr = interrupt_after(client, lambda: len(lines(out)), signal.SIGINT)
    assert client.returncode == 130, stderr
    assert "interrupted; rerun the same command to resume" in stderr
    assert "Traceback" not in stderr
    first = lines(out)
    assert 5 <= len(first) < 50 and out.read_text().endswith("\n")

    rerun = run_client("predict", folder, "--url", fast.url, *flags)
    assert rerun.returncode == 0, rerun.stderr
    assert summary(rerun.stderr)["already"] == len(first)
    assert summary(rerun.stderr)["done"] == 50 - len(first)
    records = [json.loads(line) for line in lines(out)]
    assert sorted(r["path"] for r in records) == IMAGES  # each image exactly once
    for record in records:
        assert_same_predictions(record, expected[record["path"]], top_k=5)


def test_a_killed_embed_run_resumes_to_the_same_npy(
    slow: Server, fast: Server, folder: Path, tmp_path: Path
) -> None:
    out = tmp_path / "feats.npy"
    journal = tmp_path / "feats.npy.partial" / "journal.jsonl"
    flags = ["--out", out, "--concurrency", 2, "--batch-size", 1]
    client = start_client("embed", folder, "--url", slow.url, *flags)
    rows = lambda: sum('"row"' in line for line in lines(journal))  # noqa: E731
    interrupt_after(client, rows, signal.SIGKILL)
    assert client.returncode == -signal.SIGKILL
    assert not out.exists() and journal.exists()  # only the working files, with their marker

    rerun = run_client("embed", folder, "--url", fast.url, *flags)
    assert rerun.returncode == 0, rerun.stderr
    assert summary(rerun.stderr)["done"] + summary(rerun.stderr)["already"] == 50
    assert lines(tmp_path / "feats.paths.txt") == IMAGES
    whole = tmp_path / "whole.npy"
    assert run_client("embed", folder, "--url", fast.url, "--out", whole).returncode == 0
    np.testing.assert_allclose(np.load(out), np.load(whole), rtol=1e-5, atol=1e-6)
    assert not journal.parent.exists()


def test_a_server_stopped_mid_run_exits_3_and_a_rerun_finishes(
    launch: Callable[..., Server], slow_repo: Path, fast: Server, folder: Path, tmp_path: Path
) -> None:
    doomed = launch(slow_repo)
    out = tmp_path / "preds.jsonl"
    flags = ["--out", out, "--concurrency", 2, "--batch-size", 1, "--retries", 1]
    client = start_client("predict", folder, "--url", doomed.url, *flags)
    wait_for(lambda: len(lines(out)) >= 5, "5 records")
    assert doomed.stop() == 0
    _, stderr = client.communicate(timeout=60)
    assert client.returncode == 3, stderr
    assert f"lost the server at {doomed.url}" in stderr and "rerun the same command" in stderr
    assert "Traceback" not in stderr
    done = len(lines(out))

    rerun = run_client("predict", folder, "--url", fast.url, *flags)
    assert rerun.returncode == 0, rerun.stderr
    assert summary(rerun.stderr)["already"] == done
    assert sorted(json.loads(line)["path"] for line in lines(out)) == IMAGES


def hold_the_only_slot(server: Server, jpeg: bytes) -> socket.socket:
    """A POST that sends its headers and a byte of its body, then waits: while its socket is
    open it holds the server's one admission slot. Returns once a probe gets the 503 that
    proves it (a hold that met a probe in flight is itself refused, and is made again)."""
    address = urlsplit(server.url)
    request = b"POST /predict HTTP/1.1\r\nHost: test\r\nContent-Length: 1000\r\n\r\n\xff"
    with server.client() as probe:
        while True:
            hold = socket.create_connection((address.hostname, address.port))
            hold.sendall(request)
            while not select.select([hold], [], [], 0)[0]:  # no answer: not refused (yet)
                if probe.post("/predict", content=jpeg).status_code == 503:
                    return hold
            hold.close()


def test_503_overloaded_is_retried_after_retry_after_until_every_image_is_done(
    launch: Callable[..., Server], tmp_path: Path, folder: Path
) -> None:
    server = launch(repo_of(tmp_path / "repo"), "--max-concurrent-requests", "1")
    jpeg = (folder / IMAGES[0]).read_bytes()
    out = tmp_path / "preds.jsonl"
    held = hold_the_only_slot(server, jpeg)
    # One request at a time: the client's requests meet only the held slot, not each other.
    flags = ["--out", out, "--concurrency", 1, "--batch-size", 10, "--verbose"]
    client = start_client("predict", folder, "--url", server.url, *flags)
    assert client.stderr is not None
    stderr: list[str] = []
    for line in client.stderr:  # -v logs each retry as it is decided
        stderr.append(line)
        if "503 overloaded; retry" in line:
            break
    held.close()  # the server sees its client leave, and frees the slot
    stderr.append(client.communicate(timeout=60)[1])
    text = "".join(stderr)
    assert client.returncode == 0, text
    assert re.search(r"503 overloaded; retry 1 of 5 in 1\.\d s", text), text  # Retry-After: 1
    assert summary(text)["done"] == 50 and summary(text)["retries"] >= 1
    assert [json.loads(line)["path"] for line in lines(out)] == IMAGES


def test_a_server_that_is_down_is_one_line_and_exit_3(folder: Path, tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    result = run_client("predict", folder, "--url", url, "--out", tmp_path / "preds.jsonl")
    assert result.returncode == 3
    assert result.stderr.splitlines() == [
        f"resnet-client: error: cannot reach {url}: connection refused; is the server "
        "running, and is --url right?"
    ]
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_an_unknown_model_shows_the_servers_404_and_exits_2(
    fast: Server, folder: Path, tmp_path: Path
) -> None:
    out = tmp_path / "feats.npy"
    result = run_client("embed", folder, "--url", fast.url, "--out", out, "--model", "nope")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "resnet-client: error: the server refused the request: unknown model 'nope'; "
        "served models: cifar10-resnet20 (404 model_not_found)"
    ]
    assert list(tmp_path.iterdir()) == []


def test_the_usage_examples_of_docs_client_md_run_as_written(fast: Server, tmp_path: Path) -> None:
    """The ``## Usage`` commands and the ``.npy`` reading snippet, from a stand-in root."""
    text = (REPO / "docs/client.md").read_text()
    usage = re.search(r"^## Usage\n.*?^```bash\n(.*?)^```", text, re.MULTILINE | re.DOTALL)
    reading = re.search(r"^```python\n(.*?)^```", text, re.MULTILINE | re.DOTALL)
    assert usage and reading
    (tmp_path / "tests").symlink_to(REPO / "tests")
    (tmp_path / ".venv").symlink_to(Path(sys.prefix))
    script = usage.group(1).replace("http://localhost:8000", fast.url)
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=tmp_path,
        env=client_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert [json.loads(line)["path"] for line in lines(tmp_path / "preds.jsonl")] == IMAGES
    assert len(lines(tmp_path / "preds.csv")) == 51
    assert np.load(tmp_path / "feats.npy").shape == (50, 64)
    snippet = subprocess.run(
        [sys.executable, "-c", reading.group(1)], cwd=tmp_path, capture_output=True, text=True
    )
    assert snippet.returncode == 0, snippet.stderr


def test_api_keys_from_the_flag_or_the_environment(
    launch: Callable[..., Server], tmp_path: Path, folder: Path
) -> None:
    server = launch(repo_of(tmp_path / "repo"), "--api-keys", "change-me")
    out = tmp_path / "preds.jsonl"
    refused = run_client("predict", folder, "--url", server.url, "--out", out)
    assert refused.returncode == 2
    [line] = refused.stderr.splitlines()
    assert line.startswith("resnet-client: error: the server refused the request: ")
    assert line.endswith("(401 unauthorized); pass --api-key or set RESNET_CLIENT_API_KEY")
    assert not out.exists()

    key = ["--api-key", "change-me"]
    with_flag = run_client(
        "predict", folder, "--url", server.url, "--out", out, "--limit", 10, *key
    )
    assert with_flag.returncode == 0, with_flag.stderr
    from_env = run_client(
        "predict", folder, "--url", server.url, "--out", out, RESNET_CLIENT_API_KEY="change-me"
    )
    assert from_env.returncode == 0, from_env.stderr
    assert summary(from_env.stderr)["already"] == 10
    assert len(lines(out)) == 50
