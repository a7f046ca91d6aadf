"""`reconciler schema`: a JSON Schema that editors and CI use to check manifests before the
reconciler sees them. It must accept what the reconciler accepts and catch typos."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import jsonschema
import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from reconciler.manifests.quantities import QuantityError, parse_quantity
from reconciler.manifests.schema import manifest_schema
from tests.unit.factories import CONTRACT_EXAMPLE as EXAMPLE


def example_documents() -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(EXAMPLE) if doc]


def walk(node: Any) -> Iterator[dict[str, Any]]:
    """Every object in a JSON document, depth first."""
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from walk(value)
    elif isinstance(node, list):
        for item in node:
            yield from walk(item)


def resolve(schema: dict[str, Any], ref: str) -> dict[str, Any]:
    assert ref.startswith("#/$defs/"), ref
    found: dict[str, Any] = schema["$defs"][ref.removeprefix("#/$defs/")]
    return found


def test_schema_is_plain_json_with_both_kinds() -> None:
    schema = manifest_schema()
    assert json.loads(json.dumps(schema)) == schema
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert [resolve(schema, v["$ref"])["title"] for v in schema["oneOf"]] == [
        "Network",
        "Environment",
    ]


def test_every_reference_resolves() -> None:
    schema = manifest_schema()
    refs = [node["$ref"] for node in walk(schema) if "$ref" in node]
    assert refs
    for ref in refs:
        resolve(schema, ref)


def test_every_object_forbids_unknown_fields() -> None:
    """What makes a typo fail in an editor, as it fails in the reconciler."""
    schema = manifest_schema()
    for name, definition in schema["$defs"].items():
        if definition.get("type") == "object" and "properties" in definition:
            assert definition.get("additionalProperties") is False, name


def test_field_names_are_the_yaml_spellings() -> None:
    defs = manifest_schema()["$defs"]
    assert {"readBps", "writeBps", "readIops", "writeIops", "device"} <= set(
        defs["IoDevice"]["properties"]
    )
    assert {"restartPolicy", "workingDir"} <= set(defs["Process"]["properties"])
    assert "from" in defs["IngressRule"]["properties"]
    assert "apiVersion" in defs["Environment"]["properties"]
    text = json.dumps(defs)
    assert "read_bps" not in text and "from_" not in text


def quantity_pattern() -> re.Pattern[str]:
    memory = manifest_schema()["$defs"]["Resources"]["properties"]["memory"]
    patterns = [n["pattern"] for n in walk(memory) if "pattern" in n]
    assert len(patterns) == 1
    return re.compile(patterns[0])


@pytest.mark.parametrize("text", ["256Mi", "1Gi", "500M", "500m", "0.5", "1e3", "1.5Ki", "2"])
def test_quantity_pattern_accepts_quantities(text: str) -> None:
    assert quantity_pattern().search(text)


@pytest.mark.parametrize("text", ["256MB", "-1", "abc", "1 Gi", ""])
def test_quantity_pattern_rejects_typos(text: str) -> None:
    assert not quantity_pattern().search(text)


@given(st.text(alphabet="0123456789.+-eEkKMGTPimn", max_size=10))
def test_schema_never_rejects_a_quantity_the_reconciler_accepts(text: str) -> None:
    try:
        parse_quantity(text)
    except QuantityError:
        return
    assert quantity_pattern().search(text), text


# --------------------------------------------------------------------------- jsonschema


@pytest.fixture
def validator() -> Any:
    schema = manifest_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def test_contract_example_validates(validator: Any) -> None:
    for document in example_documents():
        assert list(validator.iter_errors(document)) == [], document["metadata"]


@pytest.mark.parametrize(
    ("path", "typo"),
    [
        (("spec",), "hostnme"),
        (("spec", "resources"), "memroy"),
        (("spec", "processes", 0), "restartPolcy"),
        (("metadata",), "label"),
        ((), "Kind"),
    ],
)
def test_typo_fails_the_schema(validator: Any, path: tuple[str | int, ...], typo: str) -> None:
    document = example_documents()[1]
    node: Any = document
    for part in path:
        node = node[part]
    node[typo] = "x"
    assert list(validator.iter_errors(document))


def test_wrong_kind_fails_the_schema(validator: Any) -> None:
    document = example_documents()[0]
    document["kind"] = "Pod"
    assert list(validator.iter_errors(document))
