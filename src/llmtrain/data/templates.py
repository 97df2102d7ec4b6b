"""Prompt templates with `{field}` placeholders, nested ones like `{answer[text]}` or `{a[b][0]}`.

str.format's own field grammar is used, minus attribute access, which would let a template
reach into Python objects. A missing value (JSON null, a blank CSV cell, which pandas reads as
NaN) renders as the empty string, never as the word "None" or "nan"; a list or an object where
text is expected is an error, never its Python repr.
"""

from __future__ import annotations

import math
import string
from collections.abc import Iterator, Mapping
from typing import Any


class TemplateError(ValueError):
    """A template is malformed, names a field the row does not have, or a field is not text."""


def is_missing(value: Any) -> bool:
    """True for the values a data file uses to say "no value": None and float NaN."""
    return value is None or (isinstance(value, float) and math.isnan(value))


_FORMATTER = string.Formatter()


def fields(template: str) -> list[str]:
    """The top-level field names a template uses, in order."""
    names: list[str] = []
    try:
        parsed = list(_FORMATTER.parse(template))
    except ValueError as exc:
        raise TemplateError(f"template {template!r} is malformed: {exc}") from None
    for _, field, _, _ in parsed:
        if field is None:
            continue
        if field == "" or field.isdigit():
            raise TemplateError(f"template {template!r} needs named fields like {{question}}")
        if "." in field.split("[", 1)[0]:
            raise TemplateError(f"template {template!r}: attribute access ({field}) is not allowed")
        names.append(field.split("[", 1)[0])
    return names


def placeholders(template: str) -> list[str]:
    """The full placeholders a template uses (`answers[text][0]`), in order."""
    fields(template)
    return [f for _, f, _, _ in _FORMATTER.parse(template) if f is not None]


def _value(field: str, row: Mapping[str, Any]) -> Any:
    """The value a placeholder names; None where the path runs through a missing value."""
    try:
        return _FORMATTER.get_field(field, (), row)[0]
    except KeyError as exc:
        raise TemplateError(
            f"field {exc.args[0]!r} is not in the row (row has: {', '.join(map(str, row))})"
        ) from None
    except TypeError as exc:
        if "NoneType" in str(exc):  # {answers[text][0]} on a null `answers`
            return None
        raise TemplateError(f"placeholder {{{field}}} does not fit the row: {exc}") from None
    except (IndexError, ValueError) as exc:
        raise TemplateError(f"placeholder {{{field}}} does not fit the row: {exc}") from None


def render(template: str, row: Mapping[str, Any]) -> str:
    """The template filled from one row; a missing value renders as "".

    Raises:
        TemplateError: the template is malformed, names a field the row lacks, indexes a value
            that has no such key or position, or a value is a list or an object (not text).
    """
    fields(template)
    out: list[str] = []
    for literal, field, spec, conversion in _FORMATTER.parse(template):
        out.append(literal)
        if field is None:
            continue
        value = _value(field, row)
        if is_missing(value):
            continue
        if isinstance(value, (list, tuple, dict)):
            shown = repr(value)
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            raise TemplateError(
                f"placeholder {{{field}}} holds a {type(value).__name__} ({shown}), not text"
            )
        if isinstance(value, bool):  # as the JSON file writes it, not Python's True
            value = "true" if value else "false"
        if conversion:
            value = _FORMATTER.convert_field(value, conversion)
        out.append(_FORMATTER.format_field(value, spec or ""))
    return "".join(out)


def _resolved(template: str, row: Mapping[str, Any]) -> Iterator[tuple[str, Any]]:
    """(placeholder, value) for each placeholder of `template` the row resolves."""
    for name in placeholders(template):
        try:
            yield name, _value(name, row)
        except TemplateError:
            continue


def field_values(template: str, row: Mapping[str, Any]) -> list[tuple[str, str]]:
    """("{placeholder}", its text) for each placeholder of `template` that the row fills with
    text (data.special_tokens_in_text checks these, the data's own characters); placeholders
    that render nothing or no text (numbers) are left out."""
    return [(f"{{{name}}}", v) for name, v in _resolved(template, row) if isinstance(v, str)]


def blank_fields(template: str, row: Mapping[str, Any]) -> list[str]:
    """The placeholders of `template` whose value in `row` is missing or only white space."""
    return [
        name
        for name, v in _resolved(template, row)
        if is_missing(v) or (isinstance(v, str) and not v.strip())
    ]
