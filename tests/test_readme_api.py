"""The README's "Python API" example runs exactly as printed, on the Digits build tests share."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def api_code_blocks() -> list[str]:
    """The ```python blocks of the README's "## Python API" section, in order."""
    text = README.read_text()
    start = text.index("\n## Python API\n")
    end = text.index("\n## ", start + 1)
    return re.findall(r"^```python\n(.*?)^```$", text[start:end], flags=re.S | re.M)


def test_the_section_has_the_example_and_the_custom_encoder():
    blocks = api_code_blocks()
    assert len(blocks) == 2
    assert "model.fit(" in blocks[0] and "encoders={" in blocks[1]


@pytest.mark.slow
def test_the_readme_api_example_runs_as_printed(built, tmp_path, monkeypatch, capsys):
    (tmp_path / "data").mkdir()
    os.symlink(built.manifest.directory, tmp_path / "data" / "digits")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "readme_example"}
    for i, block in enumerate(api_code_blocks()):
        exec(compile(block, f"README.md (Python API, block {i + 1})", "exec"), namespace)
    printed = capsys.readouterr().out
    accuracy = namespace["metrics"]["latent_accuracy"]
    assert set(accuracy) == {"digit", "street", "text", "digit+street", "digit+text", "street+text",
                             "digit+street+text"}
    assert all(0.0 <= a <= 1.0 for a in accuracy.values()) and str(accuracy["digit"]) in printed
    assert type(namespace["model"].encoders[0]).__name__ == "DigitEncoder"
