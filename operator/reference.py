"""The MergeSearch field reference, generated from the schema (the README holds it; a test keeps it current).

`mergesearch reference` prints the table; `make docs` writes it between the README's markers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .k8s.crd import spec_schema

START, END = "<!-- reference:start -->", "<!-- reference:end -->"
_RULES = {
    "minimum": ">= {}",
    "maximum": "<= {}",
    "minItems": "at least {} items",
    "maxItems": "at most {} items",
    "minLength": "at least {} characters",
    "maxLength": "at most {} characters",
    "pattern": "matches `{}`",
}


def _type(node: dict[str, Any]) -> str:
    if node.get("x-kubernetes-int-or-string"):
        return "int or string"
    if "enum" in node:
        return " \\| ".join(f"`{v}`" for v in node["enum"])
    kind = node.get("type", "object")
    if kind == "array":
        return f"list of {_type(node.get('items', {}))}"
    return kind


def _rules(node: dict[str, Any]) -> str:
    rules = []
    for key, template in _RULES.items():
        if key in node:
            bound = node[key]
            if key == "minimum" and node.get("exclusiveMinimum"):
                template = "> {}"
            if key == "maximum" and node.get("exclusiveMaximum"):
                template = "< {}"
            rules.append(template.format(bound))
    return ", ".join(rules)


def _rows(node: dict[str, Any], path: str, required: bool) -> list[str]:
    rows = []
    properties = node.get("properties")
    description = node.get("description", "").replace("|", "\\|").replace("\n", " ")
    default = f"`{json.dumps(node['default'])}`" if "default" in node else ("required" if required else "")
    if path:
        rows.append(
            f"| `{path}` | {_type(node) if not properties else 'object'} | {default} | {_rules(node)} | {description} |"
        )
    for name, child in (properties or {}).items():
        rows.extend(_rows(child, f"{path}.{name}" if path else name, name in node.get("required", [])))
    items = node.get("items")
    if items and items.get("properties"):
        rows.extend(_rows({**items, "description": ""}, f"{path}[]", False)[1:])
    return rows


def reference_markdown() -> str:
    header = "| field (under `spec`) | type | default | validation | meaning |\n| --- | --- | --- | --- | --- |"
    return header + "\n" + "\n".join(_rows(spec_schema(), "", True))


def update_readme(path: Path) -> bool:
    """Rewrite the reference between the markers; True if the file changed."""
    text = path.read_text()
    before, rest = text.split(START, 1)
    _, after = rest.split(END, 1)
    new = f"{before}{START}\n{reference_markdown()}\n{END}{after}"
    if new != text:
        path.write_text(new)
    return new != text
