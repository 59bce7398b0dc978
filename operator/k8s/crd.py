"""The MergeSearch CustomResourceDefinition, generated from the same schema the manifest parser uses.

Kubernetes wants a structural OpenAPI v3.0 schema: no `$ref`, `nullable` instead of a union with null,
one object schema where pydantic has a tagged union (the search space's LFS | DIS: both field sets,
`type` an enum; the parser enforces which fields go with which type, and fills in a variant's defaults,
which the API server would give every variant), `x-kubernetes-preserve-unknown-
fields` for free-form maps, boolean `exclusiveMinimum`. `manifests/crd/` holds the output of
`mergesearch crd`; a test fails when the file and the schema drift apart.
"""

from __future__ import annotations

from typing import Any

import yaml

from ..spec import API_GROUP, API_VERSION, KIND, MergeSearchSpec

PLURAL = "mergesearches"
SINGULAR = "mergesearch"
SHORT_NAMES = ["ms"]
CRD_NAME = f"{PLURAL}.{API_GROUP}"

PRINTER_COLUMNS = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Running", "type": "integer", "jsonPath": ".status.trials.running"},
    {"name": "Completed", "type": "integer", "jsonPath": ".status.trials.completed"},
    {"name": "Pruned", "type": "integer", "jsonPath": ".status.trials.pruned"},
    {"name": "Failed", "type": "integer", "jsonPath": ".status.trials.failed"},
    {"name": "Best", "type": "number", "jsonPath": ".status.best.value"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]
_DROPPED = {"title", "additionalProperties", "discriminator", "$defs"}


def _structural(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    if "$ref" in node:
        return _structural(
            {**defs[node["$ref"].split("/")[-1]], **{k: v for k, v in node.items() if k != "$ref"}}, defs
        )
    variants = node.get("anyOf") or node.get("oneOf")
    if variants:
        rest = {k: v for k, v in node.items() if k not in ("anyOf", "oneOf")}
        nullable = any(v.get("type") == "null" for v in variants)
        kept = [_structural(v, defs) for v in variants if v.get("type") != "null"]
        if sorted(v.get("type", "") for v in kept) == ["integer", "string"]:  # a Kubernetes quantity
            merged = {"x-kubernetes-int-or-string": True, **_structural(rest, defs)}
        elif len(kept) == 1:
            merged = {**kept[0], **_structural(rest, defs)}
        else:  # a tagged union of objects: one schema with every variant's fields
            merged = {"type": "object", "properties": {}, "required": []}
            for variant in kept:
                for name, prop in variant.get("properties", {}).items():
                    if name in merged["properties"] and "enum" in prop:
                        merged["properties"][name]["enum"] += prop["enum"]
                    else:
                        merged["properties"].setdefault(name, prop)
            merged["required"] = sorted(set.intersection(*(set(v.get("required", [])) for v in kept)))
            # The API server would fill a variant's default into every variant, which the parser then refuses
            # (an LFS space given DIS's scaleRange): the parser's own defaults apply instead.
            shared = set.intersection(*(set(v.get("properties", {})) for v in kept))
            for name, prop in merged["properties"].items():
                if name not in shared:
                    merged["properties"][name] = {k: v for k, v in prop.items() if k != "default"}
            merged.update(_structural(rest, defs))
        if nullable:
            merged["nullable"] = True
            if merged.get("default", 0) is None:
                del merged["default"]
        return merged
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROPPED:
            continue
        if key == "const":
            out["enum"] = [value]
        elif key == "properties":
            out["properties"] = {name: _structural(prop, defs) for name, prop in value.items()}
        elif key == "items":
            out["items"] = _structural(value, defs)
        elif key == "prefixItems":
            out["items"] = _structural(value[0], defs)
        elif key == "exclusiveMinimum":
            out["minimum"], out["exclusiveMinimum"] = value, True
        elif key == "exclusiveMaximum":
            out["maximum"], out["exclusiveMaximum"] = value, True
        else:
            out[key] = value
    extra = node.get("additionalProperties")
    if node.get("type") == "object" and "properties" not in node:
        if isinstance(extra, dict) and extra:
            out["additionalProperties"] = _structural(extra, defs)
        else:
            out["x-kubernetes-preserve-unknown-fields"] = True
    if out.get("type") == "object" and "required" in out and not out["required"]:
        del out["required"]
    if "default" in out and out["default"] is None:
        del out["default"]
    return out


def spec_schema() -> dict[str, Any]:
    schema = MergeSearchSpec.model_json_schema(by_alias=True, mode="validation")
    return _structural(schema, schema.get("$defs", {}))


def custom_resource_definition() -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": CRD_NAME},
        "spec": {
            "group": API_GROUP,
            "names": {"kind": KIND, "plural": PLURAL, "singular": SINGULAR, "shortNames": SHORT_NAMES},
            "scope": "Namespaced",
            "versions": [
                {
                    "name": API_VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": "A search for the best merge of fine-tuned models (MergeSearch).",
                            "required": ["spec"],
                            "properties": {
                                "spec": spec_schema(),
                                "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
                            },
                        }
                    },
                }
            ],
        },
    }


def crd_yaml() -> str:
    header = "# Generated by `mergesearch crd` from operator/spec.py; do not edit.\n"
    return header + yaml.safe_dump(custom_resource_definition(), sort_keys=False, width=1000)
