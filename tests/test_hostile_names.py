"""Names chosen by whoever made a model, a file or a results folder reach the log, stdout, the Markdown step
summary, JUnit and the reports: none may forge a CI workflow command or a line, emit a terminal escape, inject raw
HTML into a step summary, or make a JUnit file an XML parser refuses."""

from __future__ import annotations

import json
import os
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import onnx
import pytest
from markdown_it import MarkdownIt

from pyrobust.cli import main
from pyrobust.escape import md_code, md_text, printable, xml_text

pytestmark = pytest.mark.slow  # subprocesses, clusters, exports or long runs: not in the fast tier

HOSTILE = "x\n::error file=a::forged\r\x1b[2J\x1b]8;;http://evil\x07<img src=x onerror=alert(1)>`|**b**\u202eevil\x85"
FILE_NAME = "m\n::error::file<b>`name|.onnx"


def _bad_line(line: str) -> bool:
    s = line.lstrip()
    return s.startswith(("::", "##[")) or "\x1b" in line or "\r" in line or "\u202e" in line or "\x85" in line


def _rendered(markdown: str) -> str:
    return MarkdownIt("commonmark", {"html": True}).enable("table").render(markdown)


def _assert_clean_markdown(markdown: str) -> None:
    html = _rendered(markdown)
    assert "<img src=x" not in html and '<img src="x"' not in html and "<b>" not in html  # the names stay text
    assert not any(_bad_line(line) for line in markdown.splitlines())


@pytest.fixture(scope="module")
def hostile_model(tmp_path_factory, bundled_model) -> Path:
    """The bundled CNN with its input and output renamed to a hostile string, saved under a hostile file name."""
    proto = onnx.load(str(bundled_model))
    g = proto.graph
    renames = {g.input[0].name: HOSTILE + "in", g.output[0].name: HOSTILE + "out"}
    for vi in (*g.input, *g.output):
        vi.name = renames.get(vi.name, vi.name)
    for node in g.node:
        node.input[:] = [renames.get(n, n) for n in node.input]
        node.output[:] = [renames.get(n, n) for n in node.output]
    meta = proto.metadata_props.add()
    meta.key, meta.value = HOSTILE, HOSTILE
    folder = tmp_path_factory.mktemp("hostile")
    path = folder / FILE_NAME
    onnx.save(proto, str(path))
    return path


@pytest.mark.parametrize("text", [HOSTILE, FILE_NAME, "::warning::x", "  ##[error]x", "a\u2028b", "\udcff"])
def test_each_escape_leaves_no_control_character(text):
    for out in (printable(text), md_text(text), md_code(text), xml_text(text)):
        assert out.isprintable() and not _bad_line(out)
    ET.fromstring(f"<a b='{xml_text(text).replace('<', '&lt;').replace('&', '&amp;')}'/>".encode())


def test_a_code_span_cannot_be_closed_from_inside():
    html = _rendered(f"a {md_code('``<b>x</b>``')} b")
    assert "<b>" not in html and html.count("<code>") == 1


def test_evaluate_and_gate_outputs_are_escaped(hostile_model, tmp_path, capsys, monkeypatch):
    summary = tmp_path / "step-summary.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    out = tmp_path / "run"
    code = main(["evaluate", str(hostile_model), "--dataset", "sample", "--limit", "20", "--max-steps", "3",
                 "--out", str(out), "--no-report"])
    ev = capsys.readouterr()
    assert code == 0, ev.err
    code = main(["gate", str(hostile_model), "--dataset", "sample", "--max-steps", "3",
                 "--limit", "20", "--min-robust", "99%", "--baseline", str(out), "--baseline-model", str(hostile_model),
                 "--max-robust-drop", "5%",
                 "--junit", str(tmp_path / "gate.xml"), "--summary", str(tmp_path / "gate.md"),
                 "--out", str(tmp_path / "gate")])
    gt = capsys.readouterr()
    assert code in (0, 1), gt.err
    # a model that names a missing --output lists its outputs in the error line
    code = main(["evaluate", str(hostile_model), "--dataset", "sample", "--limit", "2", "--output", "nope",
                 "--out", str(tmp_path / "nope")])
    bad = capsys.readouterr()
    assert code == 3 and "\\x1b" in bad.err and "\\x0a::error" in bad.err
    for stream in (ev.out, ev.err, gt.out, gt.err, bad.out, bad.err):
        assert not any(_bad_line(line) for line in stream.splitlines()), stream
    for md in (summary.read_text(), (tmp_path / "gate.md").read_text()):
        assert "::error::file" in md  # the name is there, shown as text, not as a command
        _assert_clean_markdown(md)
    root = ET.parse(tmp_path / "gate.xml").getroot()  # parses: no character XML forbids
    assert root.find("testsuite") is not None
    record = json.loads((tmp_path / "gate" / "gate.json").read_text())
    assert record["candidate"]["input"] == HOSTILE + "in"  # JSON keeps the exact name, escaped by the encoder


def test_compare_and_agreement_escape_names_from_results_folders(hostile_model, tmp_path, capsys):
    runs = []
    for seed in (0, 1):
        run = tmp_path / f"run{seed}"
        assert main(["evaluate", str(hostile_model), "--dataset", "sample", "--limit", "20", "--max-steps", "3",
                     "--seed", str(seed), "--out", str(run), "--no-report"]) == 0
        runs.append(run)
    capsys.readouterr()
    assert main(["compare", str(runs[0]), str(runs[0]), "--out", str(tmp_path / "cmp")]) == 0
    shutil.copytree(runs[0], tmp_path / "again")
    assert main(["agreement", str(runs[0]), str(tmp_path / "again"), "--names", "a<b>`|x\x1b[2J,\n::error::y",
                 "--out", str(tmp_path / "agr")]) == 0
    res = capsys.readouterr()
    for stream in (res.out, res.err):
        assert not any(_bad_line(line) for line in stream.splitlines()), stream
    for md in ((tmp_path / "cmp" / "compare.md").read_text(), (tmp_path / "agr" / "agreement.md").read_text()):
        _assert_clean_markdown(md)
    assert os.path.basename(FILE_NAME) in json.loads((runs[0] / "summary.json").read_text())["model"]["path"]


def test_a_name_that_reads_as_mathtext_still_draws_the_figures(bundled_model, tmp_path, capsys):
    path = tmp_path / "a$\\foo{$.onnx"
    shutil.copy(bundled_model, path)
    code = main(["evaluate", str(path), "--dataset", "sample", "--limit", "10", "--max-steps", "2",
                 "--out", str(tmp_path / "run")])
    assert code == 0, capsys.readouterr().err
    assert {p.name for p in (tmp_path / "run").glob("*.png")} == {"survival.png", "per_class.png", "examples.png",
                                                                  "failure.png", "failure_probability.png"}


def test_file_names_that_are_not_utf8_are_shown_escaped(bundled_model, tmp_path):
    import subprocess
    import sys

    base = os.fsencode(tmp_path)
    model, out = base + b"/m\xff.onnx", base + b"/out\xfe"
    shutil.copy(bundled_model, model)
    for args in ([b"evaluate", model, b"--dataset", b"sample", b"--limit", b"20", b"--max-steps", b"2", b"--out", out],
                 [b"gate", model, b"--dataset", b"sample", b"--limit", b"20", b"--max-steps", b"2", b"--min-robust",
                  b"10%", b"--out", out + b"g", b"--summary", out + b".md", b"--junit", out + b".xml"],
                 [b"compare", out, out, b"--out", out + b"c"]):
        r = subprocess.run([os.fsencode(sys.executable), b"-m", b"pyrobust", *args], capture_output=True)
        assert r.returncode == 0, r.stderr
        r.stdout.decode("utf-8")  # what pyrobust prints is valid UTF-8: the odd bytes are shown as escapes
        r.stderr.decode("utf-8")
    assert "\\udcff" in (tmp_path / "out\udcfe.md").read_text()
    ET.parse(os.fsdecode(out + b".xml"))


def test_the_study_report_keeps_foreign_names_as_text(tmp_path):
    from html.parser import HTMLParser

    from pyrobust.study.report import to_html, to_markdown

    blocks = [("h", 2, "study of " + HOSTILE), ("p", HOSTILE), ("table", ["dataset", "value"], [[HOSTILE, "1.00 %"]])]

    class Tags(HTMLParser):
        def __init__(self):
            super().__init__()
            self.tags: list[str] = []

        def handle_starttag(self, tag, attrs):
            self.tags.append(tag)

    parser = Tags()
    page = to_html(blocks, tmp_path)
    parser.feed(page)
    assert set(parser.tags) <= {"html", "head", "meta", "title", "style", "body", "h2", "p", "table", "tr", "th", "td"}
    assert "\x1b" not in page and "\u202e" not in page
    md = to_markdown(blocks)
    html = _rendered(md)
    assert "<img src=x" not in html and '<img src="x"' not in html
    assert html.count("<td>") == 2  # the name's | did not open a cell
