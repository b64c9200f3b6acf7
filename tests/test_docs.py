"""The documentation is tested as code (as sqlite-utils does): every ``finetune COMMAND --option``
that README.md and docs/*.md name exists in that command's ``--help``, and every ```python block
runs, as a script in a fresh folder beside the sample data.

A python block that cannot run offline is skipped by a marker on the line before it, which must
say why: ``<!-- docs-test: skip (downloads timm weights from the hub) -->``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest
from click.testing import CliRunner

from finetune.cli.commands import cli

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# What a page's python blocks may read, by the relative paths a reader in the repository uses.
SHARED = ("sample_data", "recipes")

_FENCE = re.compile(r"^```\s*(\w*)\s*$")
_SKIP = re.compile(r"<!--\s*docs-test:\s*skip\s*\((?P<why>[^)]+)\)\s*-->")
_INLINE = re.compile(r"`([^`]+)`")  # inline code; it may run on to the next line
# `finetune COMMAND`, also inside `python -m finetune fit` or `torchrun ... -m finetune fit`;
# not finetune.fit, finetune/config.py or finetune-top.
_COMMAND = re.compile(r"(?<![\w./-])finetune[ \t]+([a-z][a-z0-9-]*)")
_OPTION = re.compile(r"^(--?[A-Za-z][\w-]*)")
# Where a command line ends: a pipe, a redirection, another command, a comment.
_END = re.compile(r"^(\||\|\||&&|;|#|\d?>>?|\d?>&\d|<)")
# A path in the repository (benchmarks/data/ is written by the benchmarks, not shipped).
_REPO_PATH = re.compile(r"(?<![\w/.-])((?:finetune|benchmarks|recipes|tests)/(?!data/)[\w/.-]*\w)")


@dataclass(frozen=True)
class Block:
    """A fenced code block: its language, first line (1-based, in its file) and text."""

    language: str
    line: int
    text: str
    skip: str | None  # the reason of a docs-test skip marker on the line before, if any


def blocks(text: str) -> list[Block]:
    """The fenced code blocks of a markdown text, in order."""
    found, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        fence = _FENCE.match(lines[i])
        if not fence:
            i += 1
            continue
        start, i = i + 1, i + 1
        while i < len(lines) and not lines[i].startswith("```"):
            i += 1
        marker = _SKIP.search(lines[start - 2]) if start >= 2 else None
        why = marker.group("why") if marker else None
        found.append(Block(fence.group(1), start + 1, "\n".join(lines[start:i]), why))
        i += 1
    return found


def prose(text: str) -> str:
    """The text outside the fenced code blocks (lines inside them blanked, so numbers hold)."""
    kept, inside = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            inside = not inside
            kept.append("")
        else:
            kept.append("" if inside else line)
    return "\n".join(kept)


@cache
def help_options(command: str) -> frozenset[str]:
    """Every option that ``finetune COMMAND --help`` lists (``-o``, ``--out``, ``--no-hflip``)."""
    result = CliRunner().invoke(cli, [command, "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    # The option lists start at the first heading ("Options:", or a group's), after the usage
    # line and the description (whose text may also start with an option).
    headings = re.search(r"^(?!Usage:)\S[^\n]*:$", result.output, flags=re.MULTILINE)
    assert headings, result.output
    listed = result.output[headings.start() :]
    specs = re.findall(r"^ +(-\S.*?)(?:\s{2,}|$)", listed, flags=re.MULTILINE)
    return frozenset(re.findall(r"(?<![\w-])--?[A-Za-z][\w-]*", " ".join(specs)))


def all_options() -> frozenset[str]:
    return frozenset().union(*(help_options(name) for name in cli.commands))


def command_options(line: str) -> list[tuple[str, str]]:
    """(command, option) for each option typed after ``finetune COMMAND`` on a command line."""
    found = []
    for match in _COMMAND.finditer(line):
        command = match.group(1)
        if command not in cli.commands:
            found.append((command, ""))  # an unknown command: reported as such
            continue
        for token in line[match.end() :].split():
            if _END.match(token) or token == "finetune":
                break
            option = _OPTION.match(token.split("=", 1)[0])
            if option:
                found.append((command, option.group(1)))
    return found


def wrong_options(path: Path) -> list[str]:
    """Every option a markdown page names that its command does not have, as ``file:line:``."""
    text = path.read_text()
    errors: list[str] = []

    def check(line_number: int, line: str, bare: bool) -> None:
        named = command_options(line)
        for command, option in named:
            if not option:
                errors.append(f"{path.name}:{line_number}: no command `finetune {command}`")
            elif option not in help_options(command):
                errors.append(
                    f"{path.name}:{line_number}: `finetune {command}` has no option {option}"
                )
        # An option in inline code with no command (`--cache-frozen`): some command must have it.
        # Another program's options are written with the program (`torchrun --nnodes`).
        if bare and not named:
            first = _OPTION.match(line)
            if first and first.group(1) not in all_options():
                errors.append(f"{path.name}:{line_number}: no command has option {first.group(1)}")

    for block in blocks(text):
        if block.language == "python":
            continue  # Python, not command lines: test_python_blocks_run runs them
        pending: list[str] = []  # a command continued over lines ending in \ is checked as one
        for offset, line in enumerate(block.text.splitlines()):
            pending.append(line.removesuffix("\\"))
            if not line.endswith("\\"):
                check(block.line + offset - len(pending) + 1, " ".join(pending), bare=False)
                pending = []
    outside = prose(text)
    for match in _INLINE.finditer(outside):
        code, number = " ".join(match.group(1).split()), outside.count("\n", 0, match.start()) + 1
        for part in re.split(r"[|/]", code) if code.startswith("-") else [code]:
            check(number, part.strip(), bare=True)
    return errors


def test_the_pages_exist_and_link_to_each_other() -> None:
    readme = (ROOT / "README.md").read_text()
    for page in PAGES[1:]:
        assert f"docs/{page.name}" in readme, f"README.md does not link to docs/{page.name}"
    for page in PAGES:
        text = page.read_text()
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", text):
            assert (page.parent / target).exists(), f"{page.name}: broken link {target}"
        for image in re.findall(r'<img src="([^"]+)"', text):
            assert (page.parent / image).is_file(), f"{page.name}: no image {image}"
        # Module, benchmark and recipe paths outlive reorganisations only if checked.
        for path in re.findall(_REPO_PATH, text):
            assert (ROOT / path).exists(), f"{page.name}: no file {path}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_option_named_exists_in_its_commands_help(page: Path) -> None:
    assert wrong_options(page) == []


def test_a_wrong_option_is_caught(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "Train with `finetune fit DATA --strategy linear --epoch 3`.\n\n"
        "```\n$ finetune predict RUN photos --top-k 3 \\\n    --formt csv | sort\n```\n\n"
        "Inline: `--cache-frozn`, and `finetune fitt DATA`.\n"
    )
    assert wrong_options(page) == [
        "page.md:4: `finetune predict` has no option --formt",
        "page.md:1: `finetune fit` has no option --epoch",
        "page.md:8: no command has option --cache-frozn",
        "page.md:8: no command `finetune fitt`",
    ]
    page.write_text("`finetune fit DATA --epochs 3 | tee log` and `torchrun --nnodes 2`\n")
    assert wrong_options(page) == []


def test_a_skip_marker_needs_a_reason() -> None:
    text = "<!-- docs-test: skip (needs the hub) -->\n```python\nimport timm\n```\n"
    text += "```python\n1\n```\n"
    assert [(b.language, b.line, b.skip) for b in blocks(text)] == [
        ("python", 3, "needs the hub"),
        ("python", 6, None),
    ]
    assert blocks("<!-- docs-test: skip -->\n```python\n1\n```")[0].skip is None


def script(page: Path) -> str:
    """A page's python blocks as one script, each block on the lines it has in the page (so a
    traceback's line numbers are the page's), blocks marked skip left out."""
    lines = [""] * len(page.read_text().splitlines())
    for block in blocks(page.read_text()):
        if block.language == "python" and block.skip is None:
            for offset, line in enumerate(block.text.splitlines()):
                lines[block.line - 1 + offset] = line
    return "\n".join(lines) + "\n"


PYTHON_PAGES = [p for p in PAGES if any(b.language == "python" for b in blocks(p.read_text()))]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache for every page: the features a page computes, the next one reuses."""
    return tmp_path_factory.mktemp("cache")


@pytest.mark.parametrize("page", PYTHON_PAGES, ids=lambda p: p.name)
def test_python_blocks_run(page: Path, tmp_path: Path, cache_dir: Path) -> None:
    """A page's blocks run in order, as a reader runs them in the repository's root: later blocks
    may use what earlier ones made. Not exec'd here: a script in a subprocess."""
    for name in SHARED:
        (tmp_path / name).symlink_to(ROOT / name)
    path = tmp_path / f"{page.name}.py"  # a traceback names the page and its line
    path.write_text(script(page))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "FINETUNE_CACHE_DIR": str(cache_dir)}
    result = subprocess.run(
        [sys.executable, path.name], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-4000:]
