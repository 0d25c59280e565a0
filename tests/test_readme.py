"""The README's code is the code the test suite runs, not a copy that drifts."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _block(language: str) -> list[str]:
    readme = (ROOT / "README.md").read_text()
    match = re.search(rf"```{language}\n(.*?)```", readme, re.S)
    assert match, f"README.md has no {language} block"
    return [_code(line) for line in match.group(1).splitlines() if _code(line)]


def _blocks(language: str) -> list[list[str]]:
    """Every fenced block of this language in README.md, as code lines."""
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(rf"```{language}\n(.*?)```", readme, re.S)
    assert blocks, f"README.md has no {language} block"
    return [[_code(line) for line in block.splitlines() if _code(line)] for block in blocks]


def _code(line: str) -> str:
    """A line without indentation and trailing comment: what must match."""
    return re.sub(r"\s*//.*$", "", line).strip()


def _appears_in_order(lines: list[str], source: Path) -> None:
    code = [_code(line) for line in source.read_text().splitlines()]
    position = 0
    for line in lines:
        try:
            position = code.index(line, position) + 1
        except ValueError:
            raise AssertionError(
                f"README line {line!r} is not in {source.name} (in order)"
            ) from None


def test_readme_go_snippet_is_the_tested_example() -> None:
    _appears_in_order(_block("go"), ROOT / "clients/go/connmeta/example_test.go")


def test_readme_go_snippets_are_tested_examples() -> None:
    """Every Go block (client, informer, watch, router) is code of a tested Example."""
    blocks = _blocks("go")
    assert len(blocks) >= 4, "README.md lost a Go snippet"
    for block in blocks:
        _appears_in_order(block, ROOT / "clients/go/connmeta/example_test.go")


def test_readme_rust_snippet_is_the_tested_example() -> None:
    _appears_in_order(_block("rust"), ROOT / "clients/rust/examples/get_connection.rs")


def test_readme_blocks_marked_tested_are_the_tested_code() -> None:
    """A block right after `<!-- tested: PATH -->` is code of PATH (line for line, in
    order), which the test suite runs."""
    readme = (ROOT / "README.md").read_text()
    marked = re.findall(r"<!-- tested: (\S+) -->\n```\w+\n(.*?)```", readme, re.S)
    assert marked, "README.md has no block marked <!-- tested: PATH -->"
    for path, block in marked:
        lines = [_code(line) for line in block.splitlines() if _code(line)]
        _appears_in_order(lines, ROOT / path)
