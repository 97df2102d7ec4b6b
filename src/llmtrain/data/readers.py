"""Local data files -> rows: which files `data.path` names, and one reader per format.

Every reader turns what can go wrong in a file into a DataError (exit 65) that names the file,
the line or row, and the field: bytes that are not UTF-8, invalid JSON, a JSON object where a
list of rows is expected, a field whose values change type between rows, CSV/Parquet parse
errors. Nothing is cached under $HOME: CSV, Parquet and text files go through the datasets
builders with a temporary cache directory that is removed before the rows are returned.
"""

from __future__ import annotations

import csv
import glob
import json
import logging
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa

from llmtrain.errors import ConfigError, DataError

log = logging.getLogger(__name__)

SUFFIX_FORMATS = {
    ".jsonl": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".parquet": "parquet",
    ".txt": "text",
    ".text": "text",
}
FILE_FORMATS = ("json", "jsonl", "csv", "parquet", "text", "squad")
_GLOB_CHARS = "*?["
_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")


def is_saved_dataset(path: Path) -> bool:
    """A directory written by datasets' save_to_disk (a Dataset or a DatasetDict)."""
    return path.is_dir() and any(
        (path / name).is_file() for name in ("state.json", "dataset_dict.json")
    )


def data_files(value: str, resolved: str) -> list[Path] | None:
    """The local files `data.path` names, sorted: one file, every data file directly in a
    directory (hidden files and other suffixes skipped), or the files a glob matches.

    Args:
        value: data.path as configured (for messages); resolved: the path to read.
    Returns: None when `resolved` names nothing local (a hub dataset, or a missing path).
    Raises:
        ConfigError: a glob that matches no file, or a directory without data files (exit 64).
    """
    path = Path(resolved)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(
            p
            for p in path.iterdir()
            if p.is_file() and not p.name.startswith(".") and p.suffix in SUFFIX_FORMATS
        )
        if not files:
            raise ConfigError(
                f"data.path {value!r} is a directory without data files "
                f"({', '.join(SUFFIX_FORMATS)}) and not a save_to_disk directory",
                "point data.path at a data file, a directory or glob of them "
                "(e.g. data/*.jsonl), or a directory written by save_to_disk",
            )
        return files
    if any(c in resolved for c in _GLOB_CHARS):
        matched = sorted(Path(p) for p in glob.glob(resolved) if Path(p).is_file())
        if not matched:
            raise ConfigError(
                f"data.path {value!r} matches no files",
                "check the pattern (it is relative to the directory llmtrain runs in)",
            )
        return matched
    return None


def files_format(value: str, files: Sequence[Path]) -> str:
    """The one format of several files, from their suffixes.

    Raises:
        ConfigError: a suffix that names no format, or files of different formats (exit 64).
    """
    formats: dict[str, list[str]] = {}
    for f in files:
        if f.suffix not in SUFFIX_FORMATS:
            raise ConfigError(
                f"data.path {value!r}: cannot tell the format of {f.name} from the suffix "
                f"{f.suffix!r}",
                "set data.format to one of json, jsonl, csv, parquet, text, squad, disk",
            )
        formats.setdefault(SUFFIX_FORMATS[f.suffix], []).append(f.name)
    if len(formats) > 1:
        listed = "; ".join(f"{fmt}: {', '.join(names)}" for fmt, names in sorted(formats.items()))
        raise ConfigError(
            f"data.path {value!r} mixes file formats ({listed})",
            "give data.path files of one format, or list each format as its own entry of "
            "data.sources",
        )
    return next(iter(formats))


# --- where a row came from ------------------------------------------------------------------


@dataclass(frozen=True)
class Where:
    """A row's place in its file: `NAME line N` (JSONL) or `NAME row N` (1-based)."""

    file: str
    unit: str  # "line" or "row"
    number: int

    def __str__(self) -> str:
        return f"{self.file} {self.unit} {self.number}"


# --- encodings ------------------------------------------------------------------------------


def _not_utf8(path: Path, lineno: int, line: bytes, exc: UnicodeDecodeError) -> DataError:
    if lineno == 1 and line.startswith(_UTF16_BOMS):
        problem = f"{path}: the file is UTF-16, not UTF-8"
        source = "UTF-16"
    else:
        problem = (
            f"{path}: line {lineno} is not UTF-8 (byte 0x{line[exc.start]:02x} at column "
            f"{exc.start + 1})"
        )
        source = "LATIN1"
    return DataError(
        problem,
        f"convert the file to UTF-8, e.g. `iconv -f {source} -t UTF-8 {path.name} > out` "
        "(the -f encoding is a guess: use the one the file was written in)",
    )


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) for every line, decoded as UTF-8; a leading BOM is dropped.

    Raises:
        DataError: a line is not UTF-8 (exit 65), naming the line and the byte.
    """
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise _not_utf8(path, lineno, raw, exc) from None
            yield lineno, text.removeprefix("\ufeff") if lineno == 1 else text


def check_utf8(path: Path) -> None:
    """Raises: DataError naming the first line that is not UTF-8 (exit 65)."""
    for _ in _lines(path):
        pass


# --- JSON and JSONL -------------------------------------------------------------------------


def read_jsonl(path: Path) -> Iterator[tuple[dict[str, Any], Where]]:
    """Each non-blank line as an object, with its line number.

    Raises:
        DataError: a line that is not UTF-8, not valid JSON, or not an object (exit 65).
    """
    for lineno, line in _lines(path):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{path}: line {lineno} is not valid JSON ({exc.msg} at column {exc.colno})",
                "fix or remove that line; each line must be one JSON object",
            ) from None
        if not isinstance(row, dict):
            raise DataError(
                f"{path}: line {lineno} is a JSON {type(row).__name__}, not an object",
                'each line must be an object like {"question": ..., "answer": ...}',
            )
        yield row, Where(path.name, "line", lineno)


def squad_records(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Flatten SQuAD-format JSON (also JSQuAD's layout) into one record per question."""
    records = []
    for article in doc.get("data", []):
        for paragraph in article.get("paragraphs", []):
            for qa in paragraph.get("qas", []):
                answers = qa.get("answers", [])
                records.append(
                    {
                        "id": qa.get("id"),
                        "title": article.get("title", ""),
                        "context": paragraph.get("context", ""),
                        "question": qa.get("question", ""),
                        "answers": {
                            "text": [a.get("text", "") for a in answers],
                            "answer_start": [a.get("answer_start", -1) for a in answers],
                        },
                        "is_impossible": qa.get("is_impossible", not answers),
                    }
                )
    return records


def _is_squad(doc: dict[str, Any]) -> bool:
    articles = doc.get("data")
    return (
        isinstance(articles, list)
        and bool(articles)
        and all(isinstance(a, dict) and "paragraphs" in a for a in articles)
    )


def _row_keys(doc: dict[str, Any]) -> list[str]:
    """Keys of a JSON object whose values are lists of objects: candidates for data.field."""
    return [
        k
        for k, v in doc.items()
        if isinstance(v, list) and v and all(isinstance(r, dict) for r in v)
    ]


def read_json(path: Path, fmt: str, field: str | None) -> list[tuple[dict[str, Any], Where]]:
    """The rows of one JSON document: a list of objects, the list under `field` (data.field)
    of a top-level object, or SQuAD's {"data": [articles]} (format json or squad).

    Raises:
        DataError: not UTF-8, not valid JSON, an object without data.field (naming the keys
            that hold rows), or rows that are not objects (exit 65).
    """
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as exc:
        lineno = raw[: exc.start].count(b"\n") + 1
        line_start = raw.rfind(b"\n", 0, exc.start) + 1
        exc.start -= line_start
        raise _not_utf8(path, lineno, raw[line_start:], exc) from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{path}: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})",
            "fix the file; for one object per line name it .jsonl",
        ) from None
    if isinstance(doc, dict):
        if field is not None:
            if field not in doc:
                raise DataError(
                    f"{path}: data.field {field!r} is not a key of the top-level object "
                    f"(keys: {', '.join(map(str, doc)) or 'none'})",
                    "set data.field to the key that holds the list of rows",
                )
            doc = doc[field]
            if not isinstance(doc, list):
                raise DataError(
                    f"{path}: data.field {field!r} holds a JSON {type(doc).__name__}, not a "
                    "list of rows",
                    "set data.field to the key that holds the list of rows",
                )
        elif fmt == "squad" or _is_squad(doc):
            return [(r, Where(path.name, "row", i)) for i, r in enumerate(squad_records(doc), 1)]
        else:
            keys = _row_keys(doc)
            raise DataError(
                f"{path}: the top level is a JSON object (keys: "
                f"{', '.join(map(str, doc)) or 'none'}), not a list of rows"
                + (f"; rows are under {', '.join(repr(k) for k in keys)}" if keys else ""),
                f"set data.field={keys[0]}, the key that holds the rows (as in HF datasets' "
                "json loader), or make the top level a list of objects"
                if keys
                else "make the top level a list of objects; for one object per line, name "
                "the file .jsonl or set data.format=jsonl",
            )
    if not isinstance(doc, list):
        raise DataError(
            f"{path}: the top level is a JSON {type(doc).__name__}, not a list of rows",
            "make the file a list of objects, or use JSONL with one object per line",
        )
    out = []
    for i, row in enumerate(doc, 1):
        if not isinstance(row, dict):
            inside = f" (under data.field {field!r})" if field is not None else ""
            raise DataError(
                f"{path}: row {i}{inside} is a JSON {type(row).__name__}, not an object",
                'each row must be an object like {"question": ..., "answer": ...}',
            )
        out.append((row, Where(path.name, "row", i)))
    return out


# --- rows -> a table, naming the first value of the wrong type ------------------------------


def _kind(value: Any) -> str:
    """A value's JSON type, in the words a user knows."""
    if isinstance(value, str):
        return "text"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _converts(values: list[Any]) -> bool:
    try:
        pa.array(values)
    except (pa.ArrowException, OverflowError):
        return False
    return True


_INT64 = range(-(2**63), 2**63)


def _scalar_kind(value: Any) -> str | None:
    """bool, int (64-bit), big (a wider int) or float; None for anything else."""
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int" if value in _INT64 else "big"
    if isinstance(value, float):
        return "float"
    return None


def _numbers_as_text(
    column: str, values: list[Any], where: Sequence[Where]
) -> list[Any] | None:
    """A column of JSON numbers that Arrow would change, as their JSON text: Arrow reads ints
    next to floats as floats (`5` rendered `5.0`) and refuses ints beyond 64 bits. None when the
    column is left as it is (one kind of number, or not numbers: text, lists, objects).

    Raises:
        DataError: booleans and numbers in one column (exit 65): Arrow refuses a number after
            a boolean, and reads a boolean after a number as a number (`true` as `1.0`).
    """
    kinds: dict[str, int] = {}
    for i, v in enumerate(values):
        if v is None:
            continue
        kind = _scalar_kind(v)
        if kind is None:
            return None
        kinds.setdefault(kind, i)
    if "bool" in kinds and len(kinds) > 1:
        first = kinds["bool"]
        bad = min(i for k, i in kinds.items() if k != "bool")
        first, bad = min(first, bad), max(first, bad)
        raise DataError(
            f"{where[bad]}: field {column!r} holds {_kind(values[bad])} where earlier rows hold "
            f"{_kind(values[first])} (first at {where[first]})",
            f"give {column!r} one type in every row (text where a template or data.text_field "
            "reads it): fix or remove that row",
        )
    if len(kinds) < 2 and "big" not in kinds:
        return None
    return [None if v is None else json.dumps(v) for v in values]


def _mixed_types(column: str, values: list[Any], where: Sequence[Where]) -> DataError | None:
    """The first row whose value in `column` cannot join the column the earlier rows make."""
    if _converts(values):
        return None
    for i, value in enumerate(values):  # one row whose value is of several types inside
        if not _converts([value]):
            shown = json.dumps(value, ensure_ascii=False, default=str)
            shown = shown if len(shown) <= 80 else shown[:77] + "..."
            return DataError(
                f"{where[i]}: field {column!r} mixes types inside one value ({shown}): e.g. "
                "text in one turn's content and a list or number in another's",
                f"give each part of {column!r} one type (content as text in every turn): "
                "fix or remove that row",
            )
    lo, hi = 1, len(values)  # the shortest failing prefix: values[:hi] fails, values[:lo] not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if _converts(values[:mid]) else (lo, mid)
    bad = hi - 1
    first = next(i for i, v in enumerate(values[:bad]) if v is not None)
    now, before = _kind(values[bad]), _kind(values[first])
    if now == before:  # the difference is inside: name the Arrow types
        now, before = str(pa.array([values[bad]]).type), str(pa.array(values[:bad]).type)
    return DataError(
        f"{where[bad]}: field {column!r} holds {now} where earlier rows hold {before} "
        f"(first at {where[first]})",
        f"give {column!r} one type in every row (text where a template or data.text_field "
        "reads it): fix or remove that row",
    )


def rows_to_dataset(rows: list[dict[str, Any]], where: Sequence[Where]) -> datasets.Dataset:
    """Rows as a Dataset; columns are every key seen (missing values are null). A column of
    numbers that Arrow would change (see _numbers_as_text) holds their JSON text.

    Raises:
        DataError: a field holds values of different types (exit 65), naming the field, the
            first row that differs and both types.
    """
    columns: dict[str, None] = {}
    for row in rows:
        columns.update(dict.fromkeys(row))
    mapping = {k: [r.get(k) for r in rows] for k in columns}
    for k, values in mapping.items():
        if (as_text := _numbers_as_text(k, values, where)) is not None:
            mapping[k] = as_text
    try:
        return datasets.Dataset.from_dict(mapping)
    except (pa.ArrowException, OverflowError) as exc:
        for column, values in mapping.items():
            if (err := _mixed_types(column, values, where)) is not None:
                raise err from None
        files = sorted({w.file for w in where})
        raise DataError(
            f"{', '.join(files)}: the rows do not form a table: {exc}",
            "give each field one type in every row",
        ) from None


# --- CSV, Parquet, plain text ---------------------------------------------------------------


def read_with_builder(path: Path, fmt: str) -> datasets.Dataset:
    """One CSV, Parquet or text file through datasets' builder, held in memory; the builder's
    Arrow cache goes to a temporary directory removed on return (never $HOME).

    Text files split into rows at blank lines (sample_by=paragraph).

    Raises:
        DataError: bytes that are not UTF-8 (naming the line), or the reader's own error
            (exit 65).
    """
    kwargs: dict[str, Any] = {}
    if fmt in ("csv", "text"):
        check_utf8(path)  # the builders' UnicodeDecodeError names no line
        kwargs["encoding"] = "utf-8-sig"
    if fmt == "csv":
        kwargs.update(_csv_as_text(path))
    if fmt == "text":
        kwargs["sample_by"] = "paragraph"
    with tempfile.TemporaryDirectory(prefix="llmtrain-datasets-") as cache:
        try:
            ds = datasets.load_dataset(
                fmt,
                data_files=str(path),
                split="train",
                cache_dir=cache,
                keep_in_memory=True,
                **kwargs,
            )
        # The builders wrap the parser's error (pandas' ParserError names the line) in a
        # DatasetGenerationError; Parquet raises Arrow's own.
        except (datasets.exceptions.DatasetGenerationError, pa.ArrowException, ValueError) as exc:
            cause = exc.__cause__ if exc.__cause__ is not None else exc
            raise DataError(
                f"{path}: not readable as {fmt}: {str(cause).strip()}",
                f"fix the file, or set data.format if it is not {fmt}",
            ) from None
    assert isinstance(ds, datasets.Dataset)
    return ds


def _csv_as_text(path: Path) -> dict[str, Any]:
    """The CSV builder's settings that keep every cell as the text the file holds: pandas
    would read `5` in a column with a blank cell as 5.0, `007` as 7, `3.10` as 3.1, `true` as
    True, and `None`, `NA`, `null` or `nan` as missing values; only a blank cell is missing."""
    with path.open(newline="", encoding="utf-8-sig") as f:
        header = next(csv.reader(f), [])
    if not header or len(set(header)) != len(header):  # pandas' own error names the problem
        return {}
    return {
        "features": datasets.Features({name: datasets.Value("string") for name in header}),
        "keep_default_na": False,
        "na_values": [""],
    }


def concatenate(files: Sequence[Path], parts: Sequence[datasets.Dataset]) -> datasets.Dataset:
    """Per-file datasets as one, after checking they have the same columns and types.

    Raises:
        DataError: a file's columns or a column's type differ from the first file's (exit 65).
    """
    first = parts[0].features
    for f, part in zip(files[1:], parts[1:], strict=True):
        if set(part.features) != set(first):
            raise DataError(
                f"{f.name} has columns {', '.join(part.features)} but {files[0].name} has "
                f"{', '.join(first)}",
                "give every file of data.path the same columns, or list them as data.sources",
            )
        for column, feature in part.features.items():
            if feature != first[column]:
                raise DataError(
                    f"column {column!r} is {_feature_name(feature)} in {f.name} but "
                    f"{_feature_name(first[column])} in {files[0].name}",
                    f"give {column!r} one type in every file",
                )
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(list(parts))


def _feature_name(feature: Any) -> str:
    # datasets >= 4 reads text as Arrow large_string (64-bit offsets): to the user, a string.
    name = str(getattr(feature, "dtype", feature))
    return {"large_string": "string"}.get(name, name)


def read_files(value: str, files: Sequence[Path], fmt: str, field: str | None) -> datasets.Dataset:
    """Every file, in order, as one Dataset; with several files, each one's row count is
    logged.

    Raises:
        DataError: see read_jsonl, read_json, rows_to_dataset, read_with_builder and
            concatenate (exit 65).
    """
    counts: list[int] = []
    if fmt in ("jsonl", "json", "squad"):
        rows: list[dict[str, Any]] = []
        where: list[Where] = []
        for f in files:
            read = list(read_jsonl(f)) if fmt == "jsonl" else read_json(f, fmt, field)
            rows += [r for r, _ in read]
            where += [w for _, w in read]
            counts.append(len(read))
        ds = rows_to_dataset(rows, where)
    else:
        parts = [read_with_builder(f, fmt) for f in files]
        counts = [len(p) for p in parts]
        ds = concatenate(files, parts)
    if len(files) > 1:
        log.info(
            "data.path %s: %d %s files, read in this order: %s",
            value,
            len(files),
            fmt,
            ", ".join(f"{f.name} ({n} rows)" for f, n in zip(files, counts, strict=True)),
        )
    return ds


def locate(files: Sequence[Path], fmt: str, index: int) -> str | None:
    """Where the `index`-th row (0-based, over all files in order) came from, for JSONL
    files (`NAME line N`), or None for other formats."""
    if fmt != "jsonl":
        return None
    seen = 0
    for f in files:
        with f.open("rb") as fh:  # lines as read_jsonl counts them
            for lineno, line in enumerate(fh, 1):
                if line.strip():
                    if seen == index:
                        return f"{f.name} line {lineno}"
                    seen += 1
    return None
