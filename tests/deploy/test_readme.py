"""The docs cannot rot: their curl and tritonclient examples run against a live server, the
settings table matches service/settings.py, and the README stays a short user's guide.

Rule for authors of README.md, docs/*.md and models/*/README.md: every ```bash block that
contains `curl` is one runnable example against http://localhost:8000, run from the
repository root. It may hold one curl call plus commands that read what curl wrote. A
`# -> NNN` line sets the expected HTTP status (default 200). Commands that need Docker or a
cluster go in blocks without curl. The one ```python block that imports tritonclient runs
too, and prints what its comments say.
"""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from deployfiles import REPO, LiveServer
from prometheus_client.parser import text_string_to_metric_families
from readme_tables import SETTINGS_DOC, settings_table, splice

README = REPO / "README.md"
# Long narrative (training runs, benchmark figures) belongs in docs/, not in the guide,
# which stays "a few hundred lines" (it gained your-own-classes and the peer table).
README_MAX_LINES = 400
_FENCE = re.compile(r"^```bash\n(.*?)^```", re.MULTILINE | re.DOTALL)
# curl reports each response's status and type on stderr; stdout stays the body.
_CURL_WRAPPER = (
    "curl() { command curl --write-out '%{stderr}HTTP %{http_code} %{content_type}\\n' \"$@\"; }\n"
)


def doc_files() -> list[Path]:
    """Every file whose examples run: the README, docs/ and the shipped models' cards."""
    return [
        README,
        *sorted((REPO / "docs").glob("*.md")),
        *sorted((REPO / "models").glob("*/README.md")),
    ]


@dataclass(frozen=True)
class Example:
    path: Path
    line: int
    script: str

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"

    @property
    def expected_status(self) -> int:
        match = re.search(r"^# -> (\d{3})\b", self.script, re.MULTILINE)
        return int(match.group(1)) if match else 200

    @property
    def images(self) -> int:
        return len(re.findall(r"@tests/\S+", self.script))

    @property
    def output_file(self) -> str | None:
        match = re.search(r"\s-o (\S+)", self.script)
        return match.group(1) if match else None


def curl_examples() -> list[Example]:
    examples: list[Example] = []
    for path in doc_files():
        text = path.read_text()
        examples += [
            Example(path=path, line=text.count("\n", 0, m.start()) + 1, script=m.group(1))
            for m in _FENCE.finditer(text)
            if re.search(r"\bcurl\b", m.group(1))
        ]
    return examples


EXAMPLES = curl_examples()


def test_the_readme_starts_with_the_two_commands() -> None:
    first_block = _FENCE.search(README.read_text())
    assert first_block is not None
    commands = [line.split("#")[0].strip() for line in first_block.group(1).splitlines()]
    assert commands == ["make serve", "make test"]


def test_the_readme_is_a_guide_not_a_notebook() -> None:
    lines = len(README.read_text().splitlines())
    assert lines <= README_MAX_LINES, (
        f"README.md has {lines} lines, over {README_MAX_LINES}: move the narrative to docs/"
    )


def test_the_examples_cover_the_api() -> None:
    scripts = [e.script for e in EXAMPLES]
    predict = [s for s in scripts if "/predict" in s and "# -> " not in s]
    embed = [s for s in scripts if "/embed" in s]
    assert any("--data-binary @" in s for s in predict), "/predict with a raw body"
    assert any("-F file=@" in s for s in predict), "/predict with multipart files"
    assert any("application/x-npy" not in s for s in embed), "/embed as JSON"
    assert any("application/x-npy" in s for s in embed), "/embed as .npy"
    assert all("localhost:8000" in s for s in scripts)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Stands in for the repository root, so examples that write files leave it clean."""
    root = tmp_path_factory.mktemp("readme")
    (root / "tests").symlink_to(REPO / "tests")
    (root / "models").symlink_to(REPO / "models")
    venv = REPO / ".venv"
    (root / ".venv").symlink_to(venv if venv.exists() else Path(sys.prefix))
    return root


def _check_json(example: Example, status: int, body: dict[str, Any]) -> None:
    if "/v2/" in example.script:  # the Open Inference Protocol's own bodies
        if status != 200:
            assert set(body) == {"error"} and isinstance(body["error"], str)
        elif "/infer" in example.script:
            assert body["model_name"] == "cifar10-resnet20" and body["outputs"]
        return
    if status != 200:
        assert set(body) == {"error"}
        assert isinstance(body["error"]["code"], str) and body["error"]["message"]
        return
    script = example.script
    if "/models/cifar10-resnet20" in script:
        assert body["name"] == "cifar10-resnet20"
        assert len(body["labels"]) == 10 and "cat" in body["labels"]
        return
    if "/models" in script:
        models = {m["name"]: m for m in body["models"]}
        assert list(models) == ["cifar10-resnet20", "cifar10-resnet20-int8"]
        assert models["cifar10-resnet20"]["default"] is True  # its config.json says so
        assert models["cifar10-resnet20-int8"]["versions"][0]["precision"] == "int8"
        return
    assert body["model"] == "cifar10-resnet20" and body["version"] == 1
    assert len(body["results"]) == example.images
    if "/predict" in script:
        top_k_match = re.search(r"top_k=(\d+)", script)
        top_k = int(top_k_match.group(1)) if top_k_match else 5
        for result in body["results"]:
            scores = [p["score"] for p in result["predictions"]]
            assert len(scores) == top_k
            assert scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1 + 1e-6
            assert all(isinstance(p["label"], str) for p in result["predictions"])
    else:
        for result in body["results"]:
            vector = np.asarray(result["embedding"])
            assert vector.shape == (body["dim"],)
            if "normalize=true" in script:
                assert np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize("example", EXAMPLES, ids=[e.where for e in EXAMPLES])
def test_doc_example_runs_as_written(
    example: Example, live_server: LiveServer, workdir: Path
) -> None:
    script = example.script.replace("localhost:8000", f"localhost:{live_server.port}")
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", _CURL_WRAPPER + script],
        cwd=workdir,
        capture_output=True,
        timeout=60,
        check=False,
    )
    stderr = result.stderr.decode()
    assert result.returncode == 0, stderr
    responses = re.findall(r"^HTTP (\d{3}) (.*)$", stderr, re.MULTILINE)
    assert len(responses) == 1, stderr
    status, content_type = int(responses[0][0]), responses[0][1]
    assert status == example.expected_status, result.stdout.decode()

    body = (workdir / example.output_file).read_bytes() if example.output_file else result.stdout
    if content_type.startswith("application/json"):
        _check_json(example, status, json.loads(body))
    elif content_type == "application/x-npy":
        array = np.load(io.BytesIO(body), allow_pickle=False)
        assert array.dtype == np.float32 and array.shape[0] == example.images
        # The example shows what its own follow-up command prints.
        assert result.stdout.decode().strip() == str(array.shape)
        assert f"# {array.shape}" in example.script
    elif content_type.startswith("text/plain"):  # Prometheus exposition, through grep
        families = list(text_string_to_metric_families(result.stdout.decode()))
        samples = [sample for family in families for sample in family.samples]
        assert samples and {s.name for s in samples} == {"resnet_serve_requests_total"}
        assert {"route", "status", "model"} <= set(samples[0].labels)
    else:
        pytest.fail(f"unexpected Content-Type {content_type!r}")


def test_the_settings_table_matches_the_settings() -> None:
    text = SETTINGS_DOC.read_text()
    assert splice(text, settings_table()) == text, (
        f"{SETTINGS_DOC.relative_to(REPO)}'s settings table is out of date: "
        "run python tests/deploy/readme_tables.py"
    )
    assert "| `--max-batch-size` | `RESNET_SERVE_MAX_BATCH_SIZE` | `32` |" in text
    assert "](docs/settings.md)" in README.read_text(), "the README links to the table"


def test_tritonclient_example_runs_as_written(live_server: LiveServer, workdir: Path) -> None:
    """The tritonclient snippet prints what its comments say it prints."""
    blocks = [
        block
        for path in doc_files()
        for block in re.findall(
            r"^```python\n(.*?)^```", path.read_text(), re.MULTILINE | re.DOTALL
        )
        if "tritonclient" in block
    ]
    assert len(blocks) == 1
    script = blocks[0].replace("localhost:8000", f"localhost:{live_server.port}")
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=workdir, capture_output=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr.decode()
    # numpy wraps the first print over two lines when its scores are long (exponents).
    *array_lines, embedding_shape, logits_shape = result.stdout.decode().splitlines()
    assert array_lines[0].startswith("[[") and array_lines[-1].endswith("]]")
    # A confident model prints small scores in exponent notation (b'1.2e-05:5:dog').
    classes = re.findall(r"b'([0-9.e+-]+):(\d+):(\w+)'", " ".join(array_lines))
    assert len(classes) == 3 and classes[0][2] == "cat"  # the README's image is a cat
    assert [float(score) for score, _, _ in classes] == sorted(
        (float(score) for score, _, _ in classes), reverse=True
    )
    assert (embedding_shape, logits_shape) == ("(1, 64)", "(8, 10)")
