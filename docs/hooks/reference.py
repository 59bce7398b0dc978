"""mkdocs hook: the build warns (and so fails with --strict) when docs/reference.md is not what the schema
generates now; `make docs` rewrites it."""

from __future__ import annotations

from typing import Any

from mkdocs.plugins import get_plugin_logger

from mergesearch_operator.reference import END, START, reference_markdown

log = get_plugin_logger(__name__)


def on_page_markdown(markdown: str, page: Any, **_: Any) -> str:
    if page.file.src_uri == "reference.md":
        if START not in markdown or END not in markdown:
            log.warning(f"reference.md lacks its markers {START} / {END}")
        elif markdown.split(START, 1)[1].split(END, 1)[0].strip() != reference_markdown():
            log.warning("reference.md is stale: the schema has changed since it was generated; run `make docs`")
    return markdown
