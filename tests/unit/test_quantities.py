"""Kubernetes quantities: what users may write for memory, cpu and sizes, and what they get."""

from __future__ import annotations

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from reconciler.manifests.quantities import (
    MAX_QUANTITY,
    QuantityError,
    format_bytes,
    format_cpu,
    parse_bytes,
    parse_cpu_millis,
)

BINARY = {"": 1, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("256Mi", 256 * 2**20),
        ("1Gi", 2**30),
        ("500M", 500_000_000),
        ("1k", 1000),
        ("1e3", 1000),
        ("1E3", 1000),
        ("1.5Ki", 1536),
        ("5.", 5),
        (" 64Mi ", 64 * 2**20),
        (1024, 1024),
        (1.0, 1),
        (1e3, 1000),
        (str(MAX_QUANTITY), MAX_QUANTITY),
    ],
)
def test_bytes_accepted(text: str | int | float, expected: int) -> None:
    assert parse_bytes(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("500m", 500),
        ("1m", 1),
        ("2", 2000),
        (2, 2000),
        ("0.5", 500),
        (0.5, 500),
        (0.1, 100),  # a YAML float: exact, not 99
        (0.001, 1),
        ("1.5", 1500),
        ("1e-3", 1),
    ],
)
def test_cpu_accepted(text: str | int | float, expected: int) -> None:
    assert parse_cpu_millis(text) == expected


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("256MB", "'256MB' is not a quantity"),
        ("-1", "'-1' is not a quantity"),
        (-1, "not a non-negative quantity"),
        ("abc", "'abc' is not a quantity"),
        ("", "'' is not a quantity"),
        ("0.5", "not a whole number of bytes"),
        (0.5, "not a whole number of bytes"),
        ("500m", "not a whole number of bytes"),
        ("0", "must be at least 1 byte"),
        (True, "expected a quantity, got True"),
        (float("inf"), "not a non-negative quantity"),
        (float("nan"), "not a non-negative quantity"),
        ("1e30", "too large"),
        ("1e999", "too large"),
        (str(MAX_QUANTITY + 1), "too large"),
        (10**40, "too large"),
        ("٣Mi", "not a quantity"),  # a non-ASCII digit: the JSON Schema rejects it too
        # Exact: 28-digit Decimal rounding must not turn this into a whole 1024.
        ("1.0000000000000000000000000001Ki", "not a whole number of bytes"),
    ],
)
def test_bytes_rejected(value: object, fragment: str) -> None:
    with pytest.raises(QuantityError) as info:
        parse_bytes(value)  # type: ignore[arg-type]
    message = str(info.value)
    assert message.startswith("invalid memory quantity"), message
    assert fragment in message


def test_bytes_error_names_the_resource_and_shows_examples() -> None:
    with pytest.raises(QuantityError, match=r"invalid tmpfs size quantity: .*e\.g\. 256Mi"):
        parse_bytes("lots", what="tmpfs size")


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("0", "must be at least 1m"),
        (0, "must be at least 1m"),
        ("0.0001", "finer than 1m"),
        ("1.5m", "finer than 1m"),
        ("0.50000000000000000000000000000000001", "finer than 1m"),
        ("abc", "'abc' is not a quantity (e.g. 500m, 0.5 or 2)"),
        ("-500m", "not a quantity"),
        (False, "expected a quantity"),
        ("1e18", "too large"),  # 10**21 millicores: past any cgroup quota
        (None, "expected a quantity, got NoneType"),
    ],
)
def test_cpu_rejected(value: object, fragment: str) -> None:
    with pytest.raises(QuantityError) as info:
        parse_cpu_millis(value)  # type: ignore[arg-type]
    message = str(info.value)
    assert message.startswith("invalid cpu quantity"), message
    assert fragment in message


@pytest.mark.parametrize(
    ("count", "text"),
    [(268435456, "256Mi"), (1000, "1000"), (1536, "1536"), (2**30, "1Gi"), (1, "1"), (0, "0")],
)
def test_format_bytes(count: int, text: str) -> None:
    assert format_bytes(count) == text


@pytest.mark.parametrize(("millis", "text"), [(500, "500m"), (2000, "2"), (1500, "1500m")])
def test_format_cpu(millis: int, text: str) -> None:
    assert format_cpu(millis) == text


# --------------------------------------------------------------------------- properties

inputs = st.one_of(
    st.text(),
    st.text(alphabet="0123456789.+-eEkKMGTPimi ", max_size=12),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.none(),
)


@given(inputs)
def test_any_input_parses_or_raises_quantity_error(value: object) -> None:
    for parse in (parse_bytes, parse_cpu_millis):
        try:
            result = parse(value)  # type: ignore[arg-type]
        except QuantityError as exc:
            assert str(exc).startswith("invalid ")
            assert "\n" not in str(exc)
        else:
            assert isinstance(result, int)
            assert 1 <= result <= MAX_QUANTITY


@given(st.integers(min_value=1, max_value=2**40), st.sampled_from(sorted(BINARY)))
def test_binary_suffix_round_trip(n: int, suffix: str) -> None:
    count = n * BINARY[suffix]
    assume(count <= MAX_QUANTITY)
    assert parse_bytes(f"{n}{suffix}") == count
    assert parse_bytes(format_bytes(count)) == count


@given(st.integers(min_value=1, max_value=MAX_QUANTITY))
def test_format_bytes_round_trip(count: int) -> None:
    assert parse_bytes(format_bytes(count)) == count


@given(st.integers(min_value=1, max_value=10**9))
def test_cpu_millis_round_trip(millis: int) -> None:
    assert parse_cpu_millis(format_cpu(millis)) == millis
    assert parse_cpu_millis(f"{millis}m") == millis
