"""Text that came from elsewhere, made safe for the place it is written to.

A model's input and output names, its metadata, file and folder names, dataset specs read from a config and strings
read back from a results folder are chosen by whoever made the file. Written raw they can forge a line (a newline,
then ``::error::`` or ``##[error]``, which GitHub Actions runs as a workflow command), move the cursor or recolour a
terminal (escape sequences), reorder what a reader sees (bidirectional overrides), inject HTML into a step summary
(Markdown passes raw HTML through), break out of a code span or a table cell, or make a JUnit file that no XML
parser reads (control characters are not allowed in XML 1.0). Each output format has one function here, and every
writer of that format calls it on every string it did not write itself.
"""

from __future__ import annotations

import html
import re
import unicodedata

MAX_FIELD = 300  # characters of one foreign string kept in a log line; the rest is cut and said so


def _escaped(ch: str) -> str:
    o = ord(ch)
    return f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}" if o < 0x10000 else f"\\U{o:08x}"


def _unsafe(ch: str) -> bool:
    # Cc: C0/C1 controls (ESC, CR, LF, NEL, ...); Cf: format characters (bidirectional overrides, zero-width joiners,
    # the byte-order mark); Zl/Zp: the line and paragraph separators some viewers break lines at; Cs: lone
    # surrogates (from file names that are not UTF-8), which no encoder writes.
    return unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn")


_ASCII_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def printable(text: object, *, limit: int | None = None) -> str:
    """``text`` as one printable line: every control, format or separator character as a visible ``\\xNN`` /
    ``\\uNNNN`` escape, and a line that would start with a CI runner's command prefix (``::`` or ``##[``) defused.
    ``limit``: keep at most this many characters, saying how many were cut."""
    s = str(text)
    if not s.isascii() or _ASCII_CONTROL.search(s):
        s = "".join(_escaped(ch) if _unsafe(ch) else ch for ch in s)
    if limit is not None and len(s) > limit:
        s = f"{s[:limit]}… ({len(s) - limit:,} more characters)"
    stripped = s.lstrip()
    if stripped.startswith(("::", "##[")):
        cut = len(s) - len(stripped)
        s = s[:cut] + _escaped(stripped[0]) + stripped[1:]
    return s


def field(text: object) -> str:
    """A foreign string quoted inside one of pyrobust's own messages: printable, and at most ``MAX_FIELD`` long."""
    return printable(text, limit=MAX_FIELD)


_MD_SPECIAL = re.compile(r"([\\`*_\[\]<>&|~])")
_MD_CELL = re.compile(r"([\\`<>&|])")


def md_text(text: object) -> str:
    """A foreign string as plain Markdown text (CommonMark/GFM) inside one of pyrobust's own lines: printable, and
    every character that could open a code span, emphasis, a link, a table cell, an HTML tag or an entity
    backslash-escaped, so it shows as written and never becomes markup or raw HTML."""
    return _MD_SPECIAL.sub(r"\\\1", printable(text))


def md_code(text: object, *, table: bool = False) -> str:
    """A foreign string as a Markdown code span: fenced with one backtick more than its longest run of backticks
    (so it cannot close the span early), padded when it starts or ends with one; nothing inside a code span is
    markup or HTML. ``table``: the span sits in a GFM table cell, where ``|`` must be escaped even inside code."""
    s = printable(text)
    if table:
        s = s.replace("|", "\\|")
    runs = [len(m) for m in re.findall(r"`+", s)]
    fence = "`" * (max(runs, default=0) + 1)
    pad = " " if s.startswith("`") or s.endswith("`") or (s.startswith(" ") and s.endswith(" ") and s.strip()) \
        else ""
    return f"{fence}{pad}{s}{pad}{fence}"


def md_prose(text: object) -> str:
    """A line of pyrobust's own Markdown (its **bold** kept) that may quote foreign strings: printable, and
    ``&``, ``<`` and ``>`` as entities, so that nothing in it can be raw HTML."""
    return printable(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def md_cell(text: object) -> str:
    """A foreign string in a GFM table cell: printable, with what could end the cell (``|``), open a code span,
    raw HTML or an entity, or make a link (``](``) escaped; numbers, intervals and names stay as written."""
    return _MD_CELL.sub(r"\\\1", printable(text)).replace("](", "]\\(")


def figure_text(text: object) -> str:
    """A foreign string drawn by matplotlib: printable, with every ``$`` escaped, so that no pair of dollar signs
    is parsed as mathtext (an unknown ``\\command`` there stops the figure from being drawn at all)."""
    return printable(text).replace("$", r"\$")


def html_text(text: object) -> str:
    """A foreign string as HTML text or an attribute value (quoted): printable and entity-escaped."""
    return html.escape(printable(text), quote=True)


def xml_text(text: object) -> str:
    """A foreign string for an XML 1.0 document (JUnit): printable, so no character XML forbids remains;
    ElementTree escapes ``<``, ``&`` and quotes itself."""
    return printable(text)
