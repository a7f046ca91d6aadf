"""JSON Schema of the manifest kinds, for editors (yaml-language-server) and CI checks."""

from __future__ import annotations

from typing import Any

from reconciler.manifests.models import Environment, Network


def manifest_schema() -> dict[str, Any]:
    """One schema accepting either kind, discriminated by `kind`."""
    definitions: dict[str, Any] = {}
    variants = []
    for model in (Network, Environment):
        schema = model.model_json_schema(by_alias=True, ref_template="#/$defs/{model}")
        definitions.update(schema.pop("$defs", {}))
        definitions[model.__name__] = schema
        variants.append({"$ref": f"#/$defs/{model.__name__}"})
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://reconciler.dev/schemas/reconciler-v1.json",
        "title": "reconciler/v1 manifest",
        "oneOf": variants,
        "$defs": definitions,
    }
