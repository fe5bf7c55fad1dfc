"""The report's markdown as one self-contained HTML page: the subset of markdown the report writes,
with every image embedded as a base64 data URI (so the page is a single file with no links to
break)."""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

_IMAGE = re.compile(r"^!\[(?P<alt>[^\]]*)\]\((?P<src>[^)]+)\)$")
_RULE = re.compile(r"^\|[-:| ]+\|$")
_STYLE = """
body { font-family: sans-serif; max-width: 1400px; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #bbb; padding: 0.3em 0.7em; text-align: right; }
th:nth-child(-n+2), td:nth-child(-n+2) { text-align: left; }
figure { margin: 1em 0; }
figure img { max-width: 100%; image-rendering: pixelated; }
figcaption, .note { color: #666; font-size: 0.9em; }
pre { background: #f5f5f5; padding: 0.5em; overflow-x: auto; }
"""


def inline(text: str) -> str:
    """Escaped ``text`` with ``**bold**`` and `` `code` `` as HTML."""
    out = html.escape(text, quote=False)
    out = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", out)
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", out)


def _table(lines: list[str]) -> str:
    rows = [
        [c.strip() for c in line.strip().strip("|").split("|")] for line in lines if not _RULE.match(line)
    ]
    head = "".join(f"<th>{inline(c)}</th>" for c in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{inline(c)}</td>" for c in row) + "</tr>\n" for row in rows[1:])
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}</tbody>\n</table>"


def _figure(alt: str, src: str, root: Path) -> str:
    data = base64.b64encode((root / src).read_bytes()).decode("ascii")
    return (
        f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'
        f"<figcaption>{inline(alt)}</figcaption></figure>"
    )


def _blocks(markdown: str) -> list[list[str]]:
    """The lines grouped into blocks: a table's or a list's lines together, every other line (a
    paragraph line, heading, image or note) alone; blank lines end blocks."""
    blocks: list[list[str]] = []
    previous: str | None = None  # the group of the previous line: "|" (table), "- " (list) or None
    for line in markdown.splitlines():
        group = next((g for g in ("|", "- ") if line.startswith(g)), None)
        if group is not None and group == previous:
            blocks[-1].append(line)
        elif line.strip():
            blocks.append([line])
        previous = group
    return blocks


def _block(lines: list[str], root: Path) -> str:
    first = lines[0]
    if first.startswith("|"):
        return _table(lines)
    if first.startswith("- "):
        return "<ul>\n" + "".join(f"<li>{inline(line[2:])}</li>\n" for line in lines) + "</ul>"
    if heading := re.match(r"^(#{1,4}) (.*)$", first):
        level = len(heading[1])
        return f"<h{level}>{inline(heading[2])}</h{level}>"
    if image := _IMAGE.match(first):
        return _figure(image["alt"], image["src"], root)
    if first.startswith("> "):
        return f'<p class="note">{inline(first[2:])}</p>'
    return f"<p>{inline(first)}</p>"


def page(markdown: str, root: Path, title: str) -> str:
    """The HTML page of ``markdown`` (headings, pipe tables, ``- `` lists, ``> `` notes, images
    alone on a line, one paragraph per other line); image paths are read relative to ``root``."""
    body = "\n".join(_block(lines, root) for lines in _blocks(markdown))
    head = f'<meta charset="utf-8">\n<title>{html.escape(title)}</title>\n<style>{_STYLE}</style>'
    return f'<!DOCTYPE html>\n<html lang="en">\n<head>\n{head}\n</head>\n<body>\n{body}\n</body>\n</html>\n'
