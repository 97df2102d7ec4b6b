"""Finetune's samples, before and after: the base model's answers and the trained model's on
the same held-out prompts, scored by exact match against the references, printed as a table
and saved as samples.json in the output directory."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROWS_SHOWN = 20  # the table's length on the terminal; samples.json holds every row
WIDTH = 34  # characters of a prompt shown, its end (where the question is)


def exact_match(output: str, reference: str) -> bool:
    """Equal after stripping surrounding whitespace (a response template's leading space)."""
    return output.strip() == reference.strip()


@dataclass
class Comparison:
    """One row per prompt: lists of equal length, answers as generated (prompt not repeated)."""

    prompts: list[str]
    references: list[str]
    before: list[str]
    after: list[str]
    held_out: bool  # rows not trained on (data.eval_fraction), else training rows

    def totals(self) -> dict[str, Any]:
        """rows, and exact matches before and after training: counts and fractions in [0, 1]."""
        n = len(self.prompts)
        before = sum(map(exact_match, self.before, self.references))
        after = sum(map(exact_match, self.after, self.references))
        return {
            "rows": n,
            "held_out": self.held_out,
            "exact_match_before": before,
            "exact_match_after": after,
            "exact_match_before_fraction": before / n if n else 0.0,
            "exact_match_after_fraction": after / n if n else 0.0,
        }

    def save(self, path: Path) -> None:
        rows = [
            {"prompt": p, "reference": r, "before": b, "after": a}
            for p, r, b, a in zip(self.prompts, self.references, self.before, self.after,
                                  strict=True)
        ]
        path.write_text(json.dumps({**self.totals(), "samples": rows}, indent=1) + "\n")

    def table(self) -> str:
        """The first ROWS_SHOWN rows (prompt end, reference, before, after) and the totals."""
        def cell(text: str, width: int) -> str:
            text = text.strip().replace("\n", "\\n")
            return (text if len(text) <= width else "…" + text[-width + 1 :]).ljust(width)

        lines = [f"{cell('prompt', WIDTH)}  {cell('reference', 10)}  {cell('before', 16)}  after"]
        shown = list(zip(self.prompts, self.references, self.before, self.after, strict=True))
        for p, r, b, a in shown[:ROWS_SHOWN]:
            lines.append(f"{cell(p, WIDTH)}  {cell(r, 10)}  {cell(b, 16)}  {cell(a, 16)}")
        if len(shown) > ROWS_SHOWN:
            lines.append(f"... {len(shown) - ROWS_SHOWN} more rows in samples.json")
        t = self.totals()
        lines.append(
            f"exact match on {t['rows']} {'held-out' if self.held_out else 'training'} rows: "
            f"before training "
            f"{t['exact_match_before']}/{t['rows']} ({t['exact_match_before_fraction']:.0%}), "
            f"after {t['exact_match_after']}/{t['rows']} ({t['exact_match_after_fraction']:.0%})"
        )
        return "\n".join(lines)
