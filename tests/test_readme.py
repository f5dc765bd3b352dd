"""Every example block of the README runs as written, in order, in a fresh folder that holds what a newcomer has
(the bundled assets, the study's models, the datasets as ``pyrobust data fetch`` leaves them), so no example can
rot unnoticed. A block preceded by ``<!-- readme-test: skip (REASON) -->`` is not run and must say why;
``<!-- readme-test: file NAME -->`` writes the block to NAME for the blocks after it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
# The blocks build on each other (an evaluation, then its replay): with pytest-xdist this file must run on one
# worker, in order, which ``--dist loadfile`` does (the README's test command). (``loadgroup`` with an xdist_group
# mark does not hold them together under pytest 9.2 and xdist 3.8: measured, the group's tests spread.)
MARKER = re.compile(r"<!-- readme-test: (skip \((?P<why>.+)\)|file (?P<file>\S+)) -->")


@dataclass
class Block:
    line: int
    lang: str
    code: str
    skip: str | None = None
    file: str | None = None


def readme_blocks() -> list[Block]:
    lines = README.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = re.match(r"^```(\w+)\s*$", lines[i])
        if not m:
            i += 1
            continue
        start, lang = i, m.group(1)
        j = i + 1
        while not lines[j].startswith("```"):
            j += 1
        block = Block(start + 1, lang, "\n".join(lines[i + 1:j]) + "\n")
        marker = MARKER.match(lines[start - 1]) if start else None
        if marker:
            block.skip, block.file = marker.group("why"), marker.group("file")
        blocks.append(block)
        i = j + 1
    return blocks


BLOCKS = readme_blocks()
RUNNABLE = [b for b in BLOCKS if b.lang in ("bash", "python") and b.skip is None]


def test_the_examples_are_found_and_every_skip_says_why():
    assert len(RUNNABLE) >= 11 and any(b.lang == "python" for b in RUNNABLE)
    skipped = [b for b in BLOCKS if b.skip is not None]
    assert skipped and all(len(b.skip.strip()) > 10 for b in skipped)
    assert any(b.file == "gate.toml" for b in BLOCKS)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, shared_data):
    ws = tmp_path_factory.mktemp("readme")
    # The checkout's files the examples name, as they are in a checkout (links: no example writes into them).
    for name in ("pyrobust", "perturbcore", "docs"):
        (ws / name).symlink_to(ROOT / name, target_is_directory=True)
    for b in BLOCKS:
        if b.file:
            (ws / b.file).write_text(b.code)
    env = {k: v for k, v in os.environ.items() if k not in ("GITHUB_STEP_SUMMARY",)}
    env["PYROBUST_DATA"] = str(shared_data)  # where `pyrobust data fetch` would have put the files
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return ws, env


@pytest.mark.slow
@pytest.mark.parametrize("block", RUNNABLE, ids=[f"line{b.line}" for b in RUNNABLE])
def test_readme_block_runs_as_written(block, workspace):
    ws, env = workspace
    cmd = ["bash", "-euo", "pipefail", "-c", block.code] if block.lang == "bash" else [sys.executable, "-c",
                                                                                       block.code]
    r = subprocess.run(cmd, cwd=ws, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"README line {block.line} failed ({r.returncode}):\n{block.code}\n{r.stdout}\n{r.stderr}"


def test_the_families_table_is_generated_and_current():
    """The README's table of noise families is `pyrobust families --markdown`'s output, so it lists every family
    with its parameters as the code declares them."""
    from perturbcore.families import FAMILIES, markdown_table

    text = README.read_text()
    start = text.index("<!-- families table:")
    table = text[text.index("\n", start) + 1: text.index("<!-- end of families table -->")]
    assert table == markdown_table()
    for name in FAMILIES:
        assert f"| `{name}` |" in table
