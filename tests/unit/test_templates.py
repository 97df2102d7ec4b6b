import pytest

from llmtrain.data.templates import TemplateError, fields, render


def test_flat_and_nested_fields() -> None:
    row = {"question": "Who?", "answers": {"text": ["Ada", "Bob"]}, "meta": {"op": "plus"}}
    text = render("Q: {question} A: {answers[text][0]} ({meta[op]})", row)
    assert text == "Q: Who? A: Ada (plus)"
    assert fields("{question} {answers[text][0]}") == ["question", "answers"]


def test_missing_field_names_the_field_and_the_row_fields() -> None:
    with pytest.raises(TemplateError) as info:
        render("{question} {context}", {"question": "q", "answer": "a"})
    assert "'context'" in str(info.value) and "question, answer" in str(info.value)


@pytest.mark.parametrize("template", ["{}", "{0}", "{x.__class__}", "{unclosed"])
def test_positional_attribute_and_malformed_templates_are_refused(template: str) -> None:
    with pytest.raises(TemplateError):
        render(template, {"x": 1})


def test_bad_nested_index_is_a_template_error() -> None:
    with pytest.raises(TemplateError):
        render("{a[text][3]}", {"a": {"text": ["only one"]}})


def test_booleans_render_as_json_writes_them() -> None:
    """A JSON `true` was trained as Python's `True` (found by a reviewer), nested ones too."""
    row = {"a": True, "meta": {"ok": False}, "n": 5}
    assert render("{a} {meta[ok]} {n}", row) == "true false 5"
