"""Validation of ``generate.params`` against a model's specs (PROTOCOL.md §5)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from .errors import InvalidField
from .messages import ParamSpec, ParamValue

__all__ = ["resolve_params"]


def resolve_params(
    specs: Sequence[ParamSpec],
    given: Mapping[str, ParamValue],
    *,
    request_id: str | None = None,
) -> dict[str, ParamValue]:
    """Check ``given`` against ``specs`` and fill in defaults.

    Args:
        specs: The model's parameter specs.
        given: The parameters of a ``generate`` message.
        request_id: Attached to the error, if any.

    Returns:
        Every spec'd parameter, with ints promoted to floats where a float is
        expected.

    Raises:
        InvalidField: An unknown parameter, a wrong type or an out-of-range value;
            ``field`` is ``params.<name>``.
    """
    by_name = {spec.name: spec for spec in specs}
    for name in given:
        if name not in by_name:
            known = ", ".join(sorted(by_name)) or "none"
            raise InvalidField(
                f"unknown parameter {name[:64]!r} (this model takes: {known})",
                field=f"params.{name[:64]}",
                id=request_id,
            )
    out: dict[str, ParamValue] = {}
    for spec in specs:
        value = given.get(spec.name)
        out[spec.name] = spec.default if value is None else _check(spec, value, request_id)
    return out


def _check(spec: ParamSpec, value: ParamValue, request_id: str | None) -> ParamValue:
    field = f"params.{spec.name}"

    def fail(problem: str) -> InvalidField:
        return InvalidField(f"{field} {problem}", field=field, id=request_id)

    if spec.kind == "bool":
        if not isinstance(value, bool):
            raise fail("must be a boolean")
        return value
    if spec.kind == "str":
        if not isinstance(value, str):
            raise fail("must be a string")
        if spec.choices is not None and value not in spec.choices:
            raise fail(f"must be one of {', '.join(spec.choices)}")
        return value
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise fail("must be a number")
    if spec.kind == "int":
        if isinstance(value, float):
            if not value.is_integer():
                raise fail("must be an integer")
            value = int(value)
    else:
        value = float(value)
    if spec.min is not None and value < spec.min:
        raise fail(f"must be >= {_fmt(spec.min)}")
    if spec.max is not None and value > spec.max:
        raise fail(f"must be <= {_fmt(spec.max)}")
    return value


def _fmt(number: float) -> str:
    return str(int(number)) if float(number).is_integer() else str(number)
