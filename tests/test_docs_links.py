"""The README and the docs link only to files the repository has: a clone must not send readers to
paths outside it (e.g. the old `../shared/SPEC.md`) or to files that do not exist."""

from __future__ import annotations

import glob
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# [text](target) and ![alt](target); src="..." and href="..." of inline HTML.
_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)|(?:src|href)=\"([^\"]+)\"")
# Any path written with a leading ../ (links, code spans, prose).
_PARENT = re.compile(r"(?<![\w./-])((?:\.\./)+[\w.\-/]*)")


def documents() -> list[str]:
    """README.md, bench/README.md and docs/*.md, relative to the repository root."""
    found = ["README.md", os.path.join("bench", "README.md"),
             *sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))]
    return [p for p in found if os.path.exists(os.path.join(ROOT, p))]


def _inside(path: str, root: str) -> bool:
    return os.path.commonpath([os.path.realpath(path), os.path.realpath(root)]) == os.path.realpath(root)


def bad_references(text: str, document: str, root: str = ROOT) -> list[str]:
    """What `text` (the file `document`, relative to `root`) refers to that a clone lacks: links
    to a path outside the repository or to a repository path that does not exist, and any
    ../ path that leaves the repository."""
    base = os.path.dirname(os.path.join(root, document))
    problems = []
    for match in _LINK.finditer(text):
        target = match.group(1) or match.group(2)
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE) or target.startswith("#"):
            continue  # a URL (https:, mailto:, data:) or an anchor in the same page
        path = os.path.normpath(os.path.join(base, target.split("#", 1)[0]))
        if not _inside(path, root):
            problems.append(f"{document}: link {target!r} leaves the repository")
        elif not os.path.exists(path):
            problems.append(f"{document}: link {target!r} names no file of the repository")
    for match in _PARENT.finditer(text):
        if not _inside(os.path.join(base, match.group(1)), root):
            problems.append(f"{document}: {match.group(1)!r} points outside the repository")
    return problems


def test_the_checker_finds_outside_and_missing_paths(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "here.md").write_text("x")
    text = ("See [spec](../shared/SPEC.md), `../shared/paper/`, ![pic](docs/missing.png), "
            '<img src="docs/gone.png">, [ok](docs/here.md#part), [web](https://example.org), [top](#top).')
    problems = bad_references(text, "README.md", str(tmp_path))
    assert len(problems) == 5, problems
    assert sum("leaves the repository" in p for p in problems) == 1
    assert sum("points outside" in p for p in problems) == 2  # the link's path and the code span
    assert sum("names no file" in p for p in problems) == 2
    # From bench/README.md, ../README.md is the repository's own README.
    (tmp_path / "bench").mkdir()
    (tmp_path / "README.md").write_text("x")
    assert bad_references("[up](../README.md)", "bench/README.md", str(tmp_path)) == []


@pytest.mark.parametrize("document", documents())
def test_docs_refer_only_to_files_in_the_repository(document):
    with open(os.path.join(ROOT, document), encoding="utf-8") as f:
        assert bad_references(f.read(), document) == []


def test_the_docs_the_readme_promises_exist():
    assert {"README.md", os.path.join("bench", "README.md"), os.path.join("docs", "manifest.md"),
            os.path.join("docs", "metrics.md")} <= set(documents())
    for name in ("LICENSE", "CITATION.cff"):
        assert os.path.exists(os.path.join(ROOT, name)), name
    with open(os.path.join(ROOT, "LICENSE"), encoding="utf-8") as f:
        assert "Apache License" in f.read(300)
