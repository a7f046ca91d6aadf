"""Kubernetes resource quantities: `256Mi`, `1G`, `500m`, `0.5`, `1e3`.

A quantity is a decimal number with an optional suffix: binary (`Ki Mi Gi Ti Pi Ei`,
powers of 1024), decimal SI (`k M G T P E`, powers of 1000), milli (`m`, 1/1000) or an
exponent (`e3`). Bytes must come out whole (`1.5Ki` is 1536 bytes; `0.5` bytes is an
error); CPU is counted in millicores (`500m`, `0.5` and `1/2` of a core are all 500).
All arithmetic is exact (`Decimal`), so `0.1` CPU is 100 millicores, not 99.
"""

from __future__ import annotations

import re
from decimal import Context, Decimal, Inexact, InvalidOperation, localcontext

_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_DECIMAL = {"k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18}
_PATTERN = re.compile(
    r"^(?P<number>[+]?(?:\d+(?:\.\d*)?|\.\d+))"
    r"(?P<suffix>Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E|m|[eE][+-]?\d{1,3})?$",
    # ASCII: `\d` would also admit other scripts' digits, which the JSON Schema rejects.
    re.ASCII,
)
# Larger than any limit the kernel accepts (2**63 - 1), so anything past it is a typo.
MAX_QUANTITY = 2**63 - 1
MEMORY_EXAMPLES = "e.g. 256Mi, 1Gi, 500M or a number of bytes"
CPU_EXAMPLES = "e.g. 500m, 0.5 or 2"
# Arithmetic that would have to round raises Inexact instead: with the default 28 digits,
# `1.0000000000000000000000000001Ki` would silently become a whole 1024 bytes.
_EXACT = Context(prec=60, traps=[Inexact, InvalidOperation])


class QuantityError(ValueError):
    """The text is not a quantity, or not a valid one for this resource."""


def parse_quantity(value: str | int | float) -> Decimal:
    """The exact value of a quantity, as a Decimal; raises QuantityError."""
    if isinstance(value, bool):
        raise QuantityError(f"expected a quantity, got {value!r}")
    if isinstance(value, int):
        number = Decimal(value)
    elif isinstance(value, float):
        # YAML floats (cpu: 0.5) go through their shortest repr, so 0.1 stays 0.1.
        number = Decimal(repr(value))
    elif isinstance(value, str):
        try:
            with localcontext(_EXACT):
                number = _parse_text(value.strip())
        except Inexact:
            raise QuantityError(f"{value!r} has more digits than a quantity can hold") from None
    else:
        raise QuantityError(f"expected a quantity, got {type(value).__name__}")
    if not number.is_finite() or number < 0:
        raise QuantityError(f"{value!r} is not a non-negative quantity")
    if number > MAX_QUANTITY:
        raise QuantityError(f"{value!r} is too large")
    return number


def _parse_text(text: str) -> Decimal:
    match = _PATTERN.match(text)
    if match is None:
        raise QuantityError(f"{text!r} is not a quantity")
    try:
        number = Decimal(match["number"])
    except InvalidOperation as exc:  # pragma: no cover - the regex admits only decimals
        raise QuantityError(f"{text!r} is not a quantity") from exc
    suffix = match["suffix"]
    if suffix is None:
        return number
    if suffix in _BINARY:
        return number * _BINARY[suffix]
    if suffix in _DECIMAL:
        return number * _DECIMAL[suffix]
    if suffix == "m":
        return number / 1000
    exponent = int(suffix[1:])
    if exponent > 30:
        raise QuantityError(f"{text!r} is too large")
    return number.scaleb(exponent)


def parse_bytes(value: str | int | float, *, what: str = "memory") -> int:
    """A byte count (memory, tmpfs size, I/O rate); must be a whole number of bytes >= 1."""
    try:
        number = parse_quantity(value)
    except QuantityError as exc:
        raise QuantityError(f"invalid {what} quantity: {exc} ({MEMORY_EXAMPLES})") from None
    if number != number.to_integral_value():
        raise QuantityError(f"invalid {what} quantity {value!r}: not a whole number of bytes")
    if number < 1:
        raise QuantityError(f"invalid {what} quantity {value!r}: must be at least 1 byte")
    return int(number)


def parse_cpu_millis(value: str | int | float) -> int:
    """CPU in millicores (`500m`, `0.5` -> 500); must be a whole number of millicores >= 1."""
    try:
        number = parse_quantity(value)
    except QuantityError as exc:
        raise QuantityError(f"invalid cpu quantity: {exc} ({CPU_EXAMPLES})") from None
    try:
        with localcontext(_EXACT):
            millis = number * 1000
    except Inexact:  # digits far below 1m would have to be rounded away
        raise QuantityError(f"invalid cpu quantity {value!r}: finer than 1m") from None
    if millis != millis.to_integral_value():
        raise QuantityError(f"invalid cpu quantity {value!r}: finer than 1m")
    if millis < 1:
        raise QuantityError(f"invalid cpu quantity {value!r}: must be at least 1m")
    if millis > MAX_QUANTITY:
        raise QuantityError(f"invalid cpu quantity {value!r}: too large ({CPU_EXAMPLES})")
    return int(millis)


def format_bytes(count: int) -> str:
    """The shortest exact binary rendering: 268435456 -> '256Mi', 1000 -> '1000'."""
    for suffix, factor in reversed(_BINARY.items()):
        if count >= factor and count % factor == 0:
            return f"{count // factor}{suffix}"
    return str(count)


def format_cpu(millis: int) -> str:
    """500 -> '500m', 2000 -> '2'."""
    return str(millis // 1000) if millis % 1000 == 0 else f"{millis}m"
