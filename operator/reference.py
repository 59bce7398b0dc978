"""The MergeSearch field reference, generated from the schema (docs/reference.md holds it; a test keeps it current).

`mergesearch reference` prints the table; `make docs` (`mergesearch reference --update docs/reference.md`)
writes it between that page's markers.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import UnionType
from typing import Any, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic.alias_generators import to_camel

from .k8s.crd import spec_schema
from .spec import MergeSearchSpec

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


def _factory_defaults(model: type[BaseModel], path: str = "") -> dict[str, Any]:
    """Dotted path -> default of every list or map field whose default is made by a factory: the schema
    leaves those out (the CRD must not default them), yet a reader wants to see them."""
    defaults: dict[str, Any] = {}
    for name, info in model.model_fields.items():
        field_path = f"{path}.{to_camel(name)}" if path else to_camel(name)
        annotation = info.annotation
        members = get_args(annotation) if get_origin(annotation) in (Union, UnionType) else (annotation,)
        submodels = [m for m in members if isinstance(m, type) and issubclass(m, BaseModel)]
        for submodel in submodels:
            defaults.update(_factory_defaults(submodel, field_path))
        if submodels or info.is_required():
            continue
        if info.default_factory is not None:
            defaults[field_path] = info.default_factory()  # type: ignore[call-arg]
        elif info.default is not None:  # shown where the CRD has none: a search space type's own defaults
            defaults[field_path] = info.default
    return defaults


def _rows(node: dict[str, Any], path: str, required: bool, factory_defaults: dict[str, Any]) -> list[str]:
    rows = []
    properties = node.get("properties")
    description = node.get("description", "").replace("|", "\\|").replace("\n", " ")
    value = node.get("default", factory_defaults.get(path))
    default = f"`{json.dumps(value)}`" if value is not None else ("required" if required else "")
    if path:
        rows.append(
            f"| `{path}` | {_type(node) if not properties else 'object'} | {default} | {_rules(node)} | {description} |"
        )
    for name, child in (properties or {}).items():
        child_path = f"{path}.{name}" if path else name
        rows.extend(_rows(child, child_path, name in node.get("required", []), factory_defaults))
    items = node.get("items")
    if items and items.get("properties"):
        rows.extend(_rows({**items, "description": ""}, f"{path}[]", False, factory_defaults)[1:])
    return rows


def reference_markdown() -> str:
    header = "| field (under `spec`) | type | default | validation | meaning |\n| --- | --- | --- | --- | --- |"
    return header + "\n" + "\n".join(_rows(spec_schema(), "", True, _factory_defaults(MergeSearchSpec)))


def update_readme(path: Path) -> bool:
    """Rewrite the reference between the markers of the Markdown file at `path` (docs/reference.md); True if
    the file changed."""
    text = path.read_text()
    before, rest = text.split(START, 1)
    _, after = rest.split(END, 1)
    new = f"{before}{START}\n{reference_markdown()}\n{END}{after}"
    if new != text:
        path.write_text(new)
    return new != text
