"""Loading manifest files: discovery, multi-document YAML/JSON, and `file:line` errors that
point at the offending key, with broken files never hiding (or unprotecting) good ones."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reconciler.manifests.loader import LoadResult, compose, discover, load_paths, load_text
from reconciler.manifests.models import EnvironmentSpec
from tests.gates import unavailable
from tests.unit.factories import CONTRACT_EXAMPLE, dump, env_doc, line_of, load_one, network_doc

ERROR_LINE = re.compile(r"^(?P<file>[^:\n]+):(?P<line>[1-9][0-9]*): \S[^\n]*$")

GOOD = dump(network_doc("devnet"), env_doc("web", network="devnet"))


def write(root: Path, relative: str, text: str) -> Path:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def names(result: LoadResult) -> list[tuple[str, str]]:
    return [m.key for m in result.manifests]


# --------------------------------------------------------------------------- discovery


def test_discovery_is_recursive_and_skips_hidden_and_backup_files(tmp_path: Path) -> None:
    for relative in (
        "a.yaml",
        "sub/b.yml",
        "sub/deeper/c.json",
        ".hidden.yaml",
        ".git/config.yaml",
        ".cache/x/y.yaml",
        "sub/.#b.yml",
        "sub/b.yml~",
        "sub/.b.yml.swp",
        "c.yaml.swp",
        "notes.txt",
        "README.md",
        "yaml",
    ):
        write(tmp_path, relative, "{}")
    found = [str(p.relative_to(tmp_path)) for p in discover(tmp_path)]
    assert found == ["a.yaml", "sub/b.yml", "sub/deeper/c.json"]


def test_load_paths_reads_every_kind_of_file_relative_to_the_directory(tmp_path: Path) -> None:
    write(tmp_path, "net.yaml", dump(network_doc("devnet")))
    write(tmp_path, "envs/web.yml", dump(env_doc("web", network="devnet")))
    write(tmp_path, "envs/db.json", json.dumps(env_doc("db", network="devnet"), indent=2))
    write(tmp_path, "envs/.#web.yml", "garbage: [")
    result = load_paths([tmp_path])
    assert result.errors == []
    assert sorted(result.files) == ["envs/db.json", "envs/web.yml", "net.yaml"]
    assert sorted(names(result)) == [
        ("Environment", "db"),
        ("Environment", "web"),
        ("Network", "devnet"),
    ]


def test_load_paths_accepts_a_single_file(tmp_path: Path) -> None:
    path = write(tmp_path, "one.yaml", dump(network_doc("devnet")))
    result = load_paths([path])
    assert result.files == ["one.yaml"]
    assert names(result) == [("Network", "devnet")]


def test_unreadable_file_is_an_error_at_line_1(tmp_path: Path) -> None:
    (tmp_path / "bin.yaml").write_bytes(b"kind: \xff\xfe\n")
    result = load_paths([tmp_path])
    assert len(result.errors) == 1
    assert result.errors[0].startswith("bin.yaml:1: cannot read file")
    assert result.failed_files == {"bin.yaml"}


def test_json_errors_have_lines_too(tmp_path: Path) -> None:
    doc = env_doc("web", resources={"memory": "lots"})
    text = json.dumps(doc, indent=2)
    write(tmp_path, "web.json", text)
    result = load_paths([tmp_path])
    assert len(result.errors) == 1
    error = result.errors[0]
    assert error.startswith(f"web.json:{line_of(text, 'memory')}: Environment/web: ")
    assert "spec.resources.memory" in error


# --------------------------------------------------------------------------- documents


def test_multi_document_file_with_empty_documents() -> None:
    text = "---\n" + dump(network_doc("devnet")) + "---\n---\n# only a comment\n---\n"
    text += dump(env_doc("web"))
    result = load_one(text)
    assert result.errors == []
    assert names(result) == [("Network", "devnet"), ("Environment", "web")]
    assert [m.line for m in result.manifests] == [2, line_of(text, "kind: Environment") - 1]


def test_empty_file_declares_nothing() -> None:
    result = load_one("")
    assert (result.errors, result.manifests) == ([], [])


@pytest.mark.parametrize(
    ("text", "line", "fragments"),
    [
        (
            "apiVersion: reconciler/v1\nkind: Network\nmetadata: {name: x\nspec: {}\n",
            4,
            ["invalid YAML"],
        ),
        ("a: 1\n\tb: 2\n", 2, ["invalid YAML", "'\\t'"]),
        (
            "apiVersion: reconciler/v1\nkind: Pod\nmetadata: {name: x}\n",
            2,
            [
                "unknown kind 'Pod'",
                "Environment, Network",
            ],
        ),
        (
            "apiVersion: reconciler/v2\nkind: Network\nmetadata: {name: x}\n",
            1,
            ["Network/x: apiVersion must be 'reconciler/v1', got 'reconciler/v2'"],
        ),
        ("kind: Network\nmetadata: {name: x}\n", 1, ["apiVersion must be 'reconciler/v1'"]),
        ("- apiVersion: reconciler/v1\n- kind: Network\n", 1, ["a manifest must be a mapping"]),
        ("just a string\n", 1, ["a manifest must be a mapping"]),
        (
            "apiVersion: reconciler/v1\nkind: Network\nmetadata: {name: x}\n"
            "spec: {subnet: 10.0.0.0/24}\nkind: Environment\n",
            5,
            ["duplicate key 'kind'"],
        ),
        ("a: &a [*a]\n", 1, ["nested more than", "recursive alias"]),
        ("a: !!python/object:os.system x\n", 1, ["invalid value", "constructor"]),
        ("a: 1\nb: !!int x\n", 2, ["invalid value 'x' for !!int"]),
        ("a: 1\nb: 2020-13-45\n", 2, ["invalid value '2020-13-45' for !!timestamp"]),
        ("a: !!bool maybe\n", 1, ["invalid value 'maybe' for !!bool"]),
        ("<<: {a: 1}\n", 1, ["merge keys"]),
        ("? [a, b]\n: 1\n", 1, ["mapping keys must be plain strings"]),
        ("a: *nothing\n", 1, ["invalid YAML", "undefined alias"]),
        ("a: b\x00\n", 1, ["invalid YAML"]),
        # chr() of an escape beyond U+10FFFF: PyYAML raises OverflowError, not YAMLError.
        ('a: 1\nb: "\\Uffffffff"\n', 2, ["invalid YAML", "escape"]),
        ('# !\na: 1\nb: "\\Uffffffff"\n', 1, ["invalid YAML"]),
        ('a: "\\U7fffffff"\n', 1, ["invalid YAML"]),
    ],
)
def test_document_errors(text: str, line: int, fragments: list[str]) -> None:
    result = load_one(text)
    assert result.manifests == []
    assert len(result.errors) == 1, result.errors
    error = result.errors[0]
    assert error.startswith(f"m.yaml:{line}: "), error
    assert "\n" not in error
    for fragment in fragments:
        assert fragment in error, error
    assert result.failed_files == {"m.yaml"}


ENV = """\
apiVersion: reconciler/v1
kind: Environment
metadata:
  name: {name}
spec:
  resources:
    memory: {memory}
  processes:
    - name: one
      command: [sleep, "1"]
    - name: two
      command: [sleep, "2"]
      restartPolicy: {policy}
  policy:
    ingress:
      - from: {{cidr: 10.0.0.0/24}}
        {extra}: 1
"""


@pytest.mark.parametrize(
    ("fields", "needle", "fragment"),
    [
        ({"name": "Web_1"}, "name: Web_1", "metadata.name: 'Web_1' is not a DNS-1123 label"),
        ({"memory": "lots"}, "memory:", "spec.resources.memory: invalid memory quantity"),
        (
            {"policy": "Sometimes"},
            "restartPolicy",
            "spec.processes[1].restartPolicy: Input should be 'Always', 'OnFailure' or 'Never'",
        ),
        ({"extra": "prots"}, "prots", "spec.policy.ingress[0].prots: unknown field"),
    ],
)
def test_validation_errors_point_at_the_offending_key(
    fields: dict[str, str], needle: str, fragment: str
) -> None:
    values = {"name": "web", "memory": "64Mi", "policy": "Never", "extra": "ports"} | fields
    text = ENV.format(**values)
    if "extra" not in fields:
        text = text.replace("        ports: 1\n", "")
    result = load_one(text, file="envs/web.yaml")
    assert len(result.errors) == 1, result.errors
    error = result.errors[0]
    assert error.startswith(
        f"envs/web.yaml:{line_of(text, needle)}: Environment/{values['name']}: "
    )
    assert fragment in error
    assert result.failed_keys == {("Environment", values["name"])}
    assert result.failed_files == {"envs/web.yaml"}


def test_every_error_of_a_document_is_reported() -> None:
    text = ENV.format(name="web", memory="lots", policy="Sometimes", extra="prots")
    errors = load_one(text).errors
    assert [e.split(":")[1] for e in errors] == [
        str(line_of(text, "memory:")),
        str(line_of(text, "restartPolicy")),
        str(line_of(text, "prots")),
    ]


def test_located_manifest_knows_the_line_of_each_field() -> None:
    text = ENV.format(name="web", memory="64Mi", policy="Never", extra="ports").replace(
        "        ports: 1\n", ""
    )
    located = load_one(text, file="w.yaml").manifests[0]
    assert located.where() == "w.yaml:1"
    assert located.where(("spec", "resources", "memory")) == f"w.yaml:{line_of(text, 'memory')}"
    assert located.line_of(("spec", "processes", 1, "restartPolicy")) == line_of(
        text, "restartPolicy"
    )
    # A path that is not in the file falls back to its nearest written ancestor.
    assert located.line_of(("spec", "resources", "cpu")) == line_of(text, "resources:")


def test_a_broken_file_does_not_stop_the_others(tmp_path: Path) -> None:
    write(tmp_path, "a-good.yaml", GOOD)
    write(
        tmp_path,
        "b-bad.yaml",
        dump(env_doc("api", resources={"memory": "lots"}), env_doc("ok-in-bad-file")),
    )
    write(tmp_path, "c-syntax.yaml", "kind: [\n")
    write(tmp_path, "d-good.yaml", dump(env_doc("db")))
    result = load_paths([tmp_path])
    assert names(result) == [
        ("Network", "devnet"),
        ("Environment", "web"),
        ("Environment", "ok-in-bad-file"),
        ("Environment", "db"),
    ]
    assert len(result.errors) == 2
    assert result.errors[0].startswith("b-bad.yaml:")
    assert result.errors[1].startswith("c-syntax.yaml:")
    assert result.failed_files == {"b-bad.yaml", "c-syntax.yaml"}
    assert result.failed_keys == {("Environment", "api")}
    assert not result.ok


def test_billion_laughs_is_rejected_quickly() -> None:
    lines = ["a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for prev, name in zip("abcdefgh", "bcdefghi", strict=True):
        lines.append(f"{name}: &{name} [" + ", ".join([f"*{prev}"] * 10) + "]")
    text = "\n".join(lines) + "\n"
    start = time.monotonic()
    result = load_one(text)
    assert time.monotonic() - start < 5
    assert len(result.errors) == 1
    assert re.match(r"^m\.yaml:\d+: document has more than \d+ values$", result.errors[0])


# --------------------------------------------------------------------------- properties


def check_errors(text: str) -> None:
    result = LoadResult()
    load_text(text, display="m.yaml", into=result)  # must never raise
    # YAML breaks lines at \r, \x85, \u2028, \u2029 too, as str.splitlines does.
    last_line = len(text.splitlines()) + 2
    for error in result.errors:
        match = ERROR_LINE.match(error)
        assert match is not None, error
        assert match["file"] == "m.yaml"
        assert int(match["line"]) <= last_line, (error, text)


@settings(suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.text())
def test_arbitrary_text_never_raises(text: str) -> None:
    check_errors(text)


yamlish = st.text(alphabet="abk:-[]{}&*!|>'\"#\n ,?%@`~.0123456789", max_size=60)


@settings(suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(yamlish)
def test_arbitrary_yaml_punctuation_never_raises(text: str) -> None:
    check_errors(text)


scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False),
    st.text(max_size=12),
    st.sampled_from(["256Mi", "500m", "10.213.0.0/24", "10.213.0.7", "devnet", "net", "tcp"]),
)
keys = st.one_of(
    st.sampled_from(
        [
            "metadata",
            "name",
            "spec",
            "subnet",
            "gateway",
            "network",
            "address",
            "resources",
            "memory",
            "cpu",
            "processes",
            "command",
            "probes",
            "tcp",
            "port",
            "mounts",
            "type",
            "target",
            "policy",
            "ingress",
            "from",
            "namespaces",
        ]
    ),
    st.text(max_size=8),
)
values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(keys, children, max_size=4),
    max_leaves=20,
)
documents = st.fixed_dictionaries(
    {
        "apiVersion": st.sampled_from(["reconciler/v1", "v1"]),
        "kind": st.sampled_from(["Network", "Environment", "Pod"]),
        "metadata": st.fixed_dictionaries({"name": st.sampled_from(["web", "Web", ""])}),
        "spec": values,
    }
)


@settings(suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.lists(st.one_of(documents, values), min_size=1, max_size=3), st.booleans())
def test_arbitrary_yaml_structures_never_raise(docs: list[object], flow: bool) -> None:
    text = yaml.safe_dump_all(docs, default_flow_style=flow)
    check_errors(text)


# --------------------------------------------------------------------------- two parsers


def node_shape(node: yaml.Node, seen: frozenset[int] = frozenset()) -> object:
    """Everything the loader reads from a node: tag, value, line; cycles cut."""
    if id(node) in seen:
        return "<cycle>"
    if isinstance(node, yaml.ScalarNode):
        return (node.tag, node.value, node.start_mark.line)
    inner = seen | {id(node)}
    if isinstance(node, yaml.SequenceNode):
        return (node.tag, node.start_mark.line, [node_shape(n, inner) for n in node.value])
    pairs = [(node_shape(k, inner), node_shape(v, inner)) for k, v in node.value]
    return (node.tag, node.start_mark.line, pairs)


def document_shape(node: yaml.Node) -> object:
    if isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null":
        return "<empty document: skipped>"  # as load_text does (libyaml marks it elsewhere)
    return node_shape(node)


def composed(text: str, *, fast: bool) -> object:
    try:
        return [document_shape(node) for node in compose(text, fast=fast)]
    except yaml.YAMLError as exc:
        return ("located", type(exc).__name__, str(exc))
    except (ValueError, OverflowError, RecursionError) as exc:
        return ("unlocated", type(exc).__name__, str(exc))


def assert_same_as_reference(text: str) -> None:
    fast, reference = composed(text, fast=True), composed(text, fast=False)
    if isinstance(reference, tuple) and reference[0] == "unlocated":
        # The reference parser broke down without a position ("\U7fffffff"): the error
        # libyaml located is reported instead, by design (see `compose`).
        assert fast == reference or (isinstance(fast, tuple) and fast[0] == "located"), text
        return
    assert fast == reference, repr(text)


# The characters on which libyaml and PyYAML's pure parser disagree, and YAML's structure.
tricky = st.text(
    alphabet="abk:-[]{}&*!|>'\"#\n\r\t ,?%@`~.0123456789\\+\x85\u2028\u2029\ufeffé",
    max_size=60,
)


@settings(suppress_health_check=[HealthCheck.too_slow], deadline=None, max_examples=500)
@given(st.one_of(tricky, st.text(max_size=40), tricky.map(lambda t: "\ufeff" + t)))
def test_libyaml_path_composes_exactly_what_the_reference_parser_does(text: str) -> None:
    assert_same_as_reference(text)


@settings(suppress_health_check=[HealthCheck.too_slow], deadline=None, max_examples=200)
@given(values, st.sampled_from([None, True, False]), st.sampled_from([None, '"', "'", "|"]))
def test_libyaml_path_agrees_on_dumped_structures(
    doc: object, flow: bool | None, style: str | None
) -> None:
    text = yaml.safe_dump(doc, default_flow_style=flow, default_style=style, allow_unicode=True)
    assert_same_as_reference(text)


def test_an_escape_beyond_unicode_is_located_by_libyaml() -> None:
    if not hasattr(yaml, "CSafeLoader"):
        unavailable("PyYAML was built without libyaml (yaml.CSafeLoader)")
    text = 'a: 1\nb: "\\U7fffffff"\n'
    with pytest.raises(ValueError):  # the reference parser: chr() out of range, no mark
        compose(text, fast=False)
    assert_same_as_reference(text)
    (error,) = load_one(text).errors
    assert error.startswith("m.yaml:2: invalid YAML: ")


def test_ordinary_manifests_are_composed_by_libyaml(monkeypatch: pytest.MonkeyPatch) -> None:
    if not hasattr(yaml, "CSafeLoader"):
        unavailable("PyYAML was built without libyaml (yaml.CSafeLoader)")

    class Refused(yaml.SafeLoader):
        def __init__(self, stream: str) -> None:
            raise AssertionError("the pure-Python parser was used")

    bundled = sorted((Path(__file__).parents[2] / "manifests").glob("*.yaml"))
    texts = [CONTRACT_EXAMPLE, GOOD, json.dumps(env_doc("web"), indent=2)]
    texts += [p.read_text() for p in bundled]
    monkeypatch.setattr(yaml, "SafeLoader", Refused)
    for text in texts:
        result = load_one(text)
        assert result.errors == [] and result.manifests, text


# --------------------------------------------------------------------------- parse cache


def test_a_file_is_parsed_again_only_when_its_text_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from reconciler.manifests import loader

    parsed: list[str] = []
    real = loader.load_text

    def counting(text: str, *, display: str, into: LoadResult) -> None:
        parsed.append(display)
        real(text, display=display, into=into)

    monkeypatch.setattr(loader, "load_text", counting)
    monkeypatch.setattr(loader, "_PARSED", {})
    write(tmp_path, "env.yaml", dump(env_doc("web", resources={"memory": "64Mi"})))

    first = load_paths([tmp_path])
    second = load_paths([tmp_path])
    assert parsed == ["env.yaml"]  # the second load reused the first parse
    assert names(first) == names(second) == [("Environment", "web")]

    write(tmp_path, "env.yaml", dump(env_doc("web", resources={"memory": "128Mi"})))
    third = load_paths([tmp_path])
    assert parsed == ["env.yaml", "env.yaml"]
    (located,) = third.manifests
    spec = located.manifest.spec
    assert isinstance(spec, EnvironmentSpec) and spec.resources.memory == 128 * 1024 * 1024


def test_identical_text_in_two_files_reports_each_file(tmp_path: Path) -> None:
    broken = "apiVersion: reconciler/v1\nkind: Environment\nmetadata: {name: x}\nspec: {nope: 1}\n"
    write(tmp_path, "a.yaml", broken)
    write(tmp_path, "b.yaml", broken)
    for _ in range(2):  # the second time from the cache
        result = load_paths([tmp_path])
        assert [e.split(":")[0] for e in result.errors] == ["a.yaml", "b.yaml"]
        assert result.failed_files == {"a.yaml", "b.yaml"}
