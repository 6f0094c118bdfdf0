"""docs/serving.md's curl examples run against the test server: every ```bash block marked
``<!-- readme-test: tests/serve/test_docs.py -->`` runs with bash (``set -e``), its ``127.0.0.1:8000`` pointed
at the server's port, ``$KEY`` its key and ``$MEDIA`` its media root; each must exit 0 and print what its
endpoint answers."""

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
from serve_helpers import API_KEY

pytestmark = pytest.mark.slow  # starts a server

DOC = Path(__file__).resolve().parents[2] / "docs" / "serving.md"
MARK = "<!-- readme-test: tests/serve/test_docs.py -->"


def doc_blocks() -> list[str]:
    lines, blocks = DOC.read_text().splitlines(), []
    for i, line in enumerate(lines):
        if line.strip() == MARK:
            assert lines[i + 1].strip() == "```bash", f"docs/serving.md line {i + 2}: a bash block must follow"
            end = lines.index("```", i + 2)
            blocks.append("\n".join(lines[i + 2:end]))
    return blocks


def test_every_bash_block_is_run_or_marked_illustrative():
    lines = DOC.read_text().splitlines()
    for i, line in enumerate(lines):
        if line.strip() == "```bash":
            assert re.match(r"<!-- (readme-test: tests/serve/test_docs.py|illustrative: .+) -->", lines[i - 1]), i + 1
    assert len(doc_blocks()) == 5


@pytest.mark.parametrize("index", range(5))
def test_the_doc_examples_run(running, media_root, index):
    block = doc_blocks()[index].replace("127.0.0.1:8000", f"127.0.0.1:{running.port}")
    env = {**os.environ, "KEY": API_KEY, "MEDIA": str(media_root)}
    out = subprocess.run(["bash", "-ec", block], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    if "/v1/emotion" in block:
        answers, at, decoder = [], 0, json.JSONDecoder()  # curl prints the two answers without a newline
        while at < len(text.strip()):
            answer, at = decoder.raw_decode(text, at)
            answers.append(answer)
        assert [list(a["scores"]) for a in answers][1] == ["calm", "joyful", "upset"] and "description" in answers[0]
    elif '"stream": true' in block:
        assert text.rstrip().endswith("data: [DONE]")
    elif "/chat/completions" in block:
        assert json.loads(text)["usage"]["completion_tokens"] > 0
    elif "/metrics" in block:
        assert text.startswith("emoqwen_generated_tokens_total")
    else:
        assert '{"status":"ok"}' in text and '"id":"tiny"' in text
