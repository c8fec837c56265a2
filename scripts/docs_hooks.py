"""MkDocs hook: the guide pages are the README's sections, so that the two never diverge.

A page whose source is ``<!-- readme: TITLE -->`` gets the README's section TITLE (from its
heading to the next heading of the same or a higher level), with its links rewritten to
point from the page into ``docs/``.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path
from typing import Any

README = Path(__file__).parents[1] / "README.md"
MARKER = re.compile(r"<!-- readme: (.+?) -->")


def _section(text: str, title: str) -> str:
    lines = text.splitlines()
    if title == "(introduction)":
        end = next(i for i, line in enumerate(lines) if line.startswith("## "))
        return "\n".join(lines[:end])
    for start, line in enumerate(lines):
        hashes, _, heading = line.partition(" ")
        if set(hashes) == {"#"} and heading.strip() == title:
            level = len(hashes)
            end = next(
                (
                    i
                    for i in range(start + 1, len(lines))
                    if re.match(rf"^#{{1,{level}}} ", lines[i])
                ),
                len(lines),
            )
            return "\n".join(["# " + heading, *lines[start + 1 : end]])
    raise ValueError(f"README.md has no section {title!r}")


def on_page_read_source(page: Any, config: Any) -> str | None:
    source = Path(page.file.abs_src_path).read_text()
    match = MARKER.fullmatch(source.strip())
    if match is None:
        return None
    text = _section(README.read_text(), match.group(1))
    up = posixpath.relpath(".", posixpath.dirname(page.file.src_uri) or ".")
    return re.sub(r"\]\(docs/", f"]({up}/" if up != "." else "](", text)
