"""Reading datasets into rows: formats, files, templates checked against the columns."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import datasets

from llmtrain.config import DataSection
from llmtrain.data import chat, readers
from llmtrain.data.readers import squad_records
from llmtrain.data.templates import (
    TemplateError,
    fields,
    render,
)
from llmtrain.errors import ConfigError, DataError

__all__ = ["load_rows", "squad_records"]


def detect_format(cfg: DataSection) -> str:
    """data.format, or for `auto`: `disk` for a save_to_disk directory, the format of the
    files data.path names (one file, a directory or a glob), else `hub`.

    Raises:
        ConfigError: a suffix that names no format, files of several formats, a directory
            without data files, a glob matching nothing (exit 64).
    """
    if cfg.format != "auto":
        return cfg.format
    path = Path(cfg.resolved_path())
    if readers.is_saved_dataset(path):
        return "disk"
    files = readers.data_files(cfg.path or "", str(path))
    if files is None:  # nothing local: a missing file (said by check_exists) or a hub name
        return readers.SUFFIX_FORMATS.get(path.suffix, "hub")
    return readers.files_format(cfg.path or "", files)


def source_files(cfg: DataSection, fmt: str) -> list[Path]:
    """The local files of a file format (json, jsonl, csv, parquet, text, squad), sorted.

    Raises:
        ConfigError: data.path names no file (exit 64); see readers.data_files.
    """
    files = readers.data_files(cfg.path or "", cfg.resolved_path())
    if files is None:
        raise ConfigError(
            f"data.path {cfg.path!r} does not exist",
            "point data.path at a JSON/JSONL/CSV/Parquet/text file, a directory or glob of "
            "them, a save_to_disk directory, or a hub dataset name (with data.format=hub)",
        )
    return files


def check_exists(cfg: DataSection, fmt: str) -> None:
    """Raises: ConfigError when data.path names nothing to read for `fmt` (exit 64)."""
    if fmt in readers.FILE_FORMATS:
        source_files(cfg, fmt)
    elif fmt == "disk" and not Path(cfg.resolved_path()).is_dir():
        raise ConfigError(
            f"data.path {cfg.path!r} is not a directory (data.format=disk)",
            "point data.path at a directory written by save_to_disk",
        )
    if cfg.field is not None and fmt != "json":
        raise ConfigError(
            f"data.field {cfg.field!r} is set but the data is {fmt}, not JSON",
            "drop data.field: it names the key of a JSON file's top-level object that holds "
            "the rows",
        )


def load_rows(cfg: DataSection) -> datasets.Dataset:
    """The configured split as a datasets.Dataset, before tokenization.

    Raises:
        ConfigError: data.path names nothing readable, mixes formats (exit 64).
        DataError: a file is not UTF-8 or not parseable, a field's values change type between
            rows, JSON rows are not where data.field says, or no rows (exit 65).
    """
    fmt = detect_format(cfg)
    check_exists(cfg, fmt)
    if fmt in readers.FILE_FORMATS:
        ds = readers.read_files(cfg.path or "", source_files(cfg, fmt), fmt, cfg.field)
    elif fmt == "disk":
        loaded = datasets.load_from_disk(cfg.resolved_path())
        if isinstance(loaded, datasets.DatasetDict):
            if cfg.split not in loaded:
                raise ConfigError(
                    f"data.split {cfg.split!r} is not in {cfg.path!r} (has: {', '.join(loaded)})",
                    "set data.split to one of those",
                )
            loaded = loaded[cfg.split]
        ds = loaded
    else:
        try:
            ds = datasets.load_dataset(cfg.path, cfg.name, split=cfg.split)
        except (FileNotFoundError, ConnectionError, ValueError) as exc:
            raise ConfigError(
                f"hub dataset {cfg.path!r} could not be loaded: {exc}",
                "check the name, or cache it under HF_HOME while online, or use a local file",
            ) from None
    if cfg.limit is not None:
        ds = ds.select(range(min(cfg.limit, len(ds))))
    if len(ds) == 0:
        raise DataError(f"data.path {cfg.path!r} holds no rows", "point it at a non-empty dataset")
    return ds


# Set by prepared.prepare before the held-out split shuffles rows, so errors name the row
# (and the JSONL line) of the source file, not a position in a split.
SOURCE_ROW = "__llmtrain_source_row"


def row_location(cfg: DataSection, row: dict[str, Any], fallback: int) -> str:
    """Where a row came from: `NAME.jsonl line N` for JSONL files, else `row N` (1-based)."""
    index = row.get(SOURCE_ROW, fallback)
    fmt = cfg.format if cfg.format != "auto" else None
    path = Path(cfg.resolved_path())
    if fmt in (None, "jsonl") and not readers.is_saved_dataset(path):
        files = readers.data_files(cfg.path or "", str(path))
        if files and (fmt or readers.SUFFIX_FORMATS.get(files[0].suffix)) == "jsonl":
            found = readers.locate(files, "jsonl", index)
            if found is not None:
                return found
    return f"row {index + 1}"


def check_templates(cfg: DataSection, ds: datasets.Dataset) -> None:
    """Every field the templates use exists in the data, and the first rows render.

    Raises:
        ConfigError: data.text_field is not a column, a template uses a field the data lacks, or a
            template is malformed (exit 64).
        DataError: one of the first rows does not render (exit 65)."""
    if cfg.shape == "chat":
        chat.messages_field(cfg, ds.column_names)
        return
    if cfg.shape == "text":
        if cfg.text_field not in ds.column_names:
            raise ConfigError(
                f"data.text_field {cfg.text_field!r} is not a column "
                f"(columns: {', '.join(ds.column_names)})",
                "set data.text_field to the column that holds the text",
            )
        return
    assert cfg.prompt_template is not None and cfg.response_template is not None
    for key, template in (
        ("data.prompt_template", cfg.prompt_template),
        ("data.response_template", cfg.response_template),
    ):
        try:
            missing = [f for f in fields(template) if f not in ds.column_names]
        except TemplateError as exc:
            raise ConfigError(f"{key}: {exc}", "use {field} or {field[key]} placeholders") from None
        if missing:
            raise ConfigError(
                f"{key} uses {', '.join('{' + m + '}' for m in missing)}, which the data lacks "
                f"(columns: {', '.join(ds.column_names)})",
                f"change {key} to use those columns",
            )
        for i in range(min(3, len(ds))):
            try:
                render(template, ds[i])
            except TemplateError as exc:
                raise DataError(
                    f"{row_location(cfg, ds[i], i)}: {key}: {exc}", f"fix {key} or the data"
                ) from None
