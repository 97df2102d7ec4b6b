"""Prompt templates with `{field}` placeholders, nested ones like `{answer[text]}` or `{a[b][0]}`.

str.format's own field grammar is used, minus attribute access, which would let a template
reach into Python objects.
"""

from __future__ import annotations

import string
from collections.abc import Mapping
from typing import Any

_FORMATTER = string.Formatter()


class TemplateError(ValueError):
    """A template is malformed or names a field the row does not have."""


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


def render(template: str, row: Mapping[str, Any]) -> str:
    fields(template)
    try:
        return template.format_map(row)
    except KeyError as exc:
        raise TemplateError(
            f"field {exc.args[0]!r} is not in the row (row has: {', '.join(map(str, row))})"
        ) from None
    except (IndexError, TypeError) as exc:
        raise TemplateError(f"template {template!r} does not fit the row: {exc}") from None
