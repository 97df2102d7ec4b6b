"""Prepared (tokenized) data on disk: made once, by one process, and read by every rank.

Tokenizing inside a distributed job runs into collective timeouts, so data is prepared ahead
(`llmtrain prepare`), or, when finetune finds none, by global rank 0 while the other ranks wait
for the directory to appear: a file-system wait, not a collective that could time out.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import datasets

from llmtrain.config import PREFERENCE_METHODS, RunConfig
from llmtrain.data import chat, mixture, preference
from llmtrain.data.rows import detect_format, source_files
from llmtrain.data.tokenize import TokenizeStats, check_rows, tokenize
from llmtrain.errors import DataError

log = logging.getLogger(__name__)
INFO = "prepared.json"
EVAL_ROWS = "eval_rows"  # eval_rows/<source index>/: held-out rows, untokenized
FORMAT_VERSION = 3  # 2: whole-text tokenization, one BOS/EOS policy; 3: data.sources


def _hash_path(h: Any, path: Path) -> None:
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)


def fingerprint(cfg: RunConfig, tokenizer: Any) -> str:
    """Changes when the data, its settings or the tokenizer change."""
    h = hashlib.sha256()
    data = cfg.data.model_dump(mode="json", exclude={"prepared_dir"})
    # The seed draws the held-out split and each source's sample (mixture.split_sources).
    h.update(
        json.dumps(
            {"v": FORMAT_VERSION, "data": data, "seed": cfg.training.seed}, sort_keys=True
        ).encode()
    )
    if cfg.method.name in PREFERENCE_METHODS:
        h.update(b"preference pairs")  # the same rows prepare to other columns
    for section in cfg.data.for_sources():
        fmt = detect_format(section)
        if fmt == "hub":
            h.update(f"hub:{section.path}:{section.name}:{section.split}".encode())
        elif fmt == "disk":
            _hash_path(h, Path(section.resolved_path()))
        else:
            for f in source_files(section, fmt):  # a directory or glob: every file, in order
                _hash_path(h, f)
    vocab = tokenizer.get_vocab()
    h.update(json.dumps(sorted(vocab.items()), ensure_ascii=False).encode())
    h.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    if any(section.shape == "chat" for section in cfg.data.for_sources()):
        h.update(chat.resolve_template(tokenizer, cfg.data).encode())
    return h.hexdigest()[:16]


def read_info(prepared: Path) -> dict[str, Any] | None:
    try:
        info: dict[str, Any] = json.loads((prepared / INFO).read_text())
    except (OSError, ValueError):
        return None
    return info


def prepare(cfg: RunConfig, tokenizer: Any, fp: str | None = None) -> dict[str, Any]:
    """Tokenize and save atomically: a temporary directory renamed into place.

    Raises:
        DataError: the rows or their tokenization are bad (rows.load_rows, tokenize.tokenize), or
            data.eval_fraction leaves no evaluation sample, or held-out rows are bad (exit 65).
        ConfigError: data.path or the templates do not fit the data (rows.load_rows,
            rows.check_templates; exit 64)."""
    target = cfg.prepared_dir()
    fp = fp or fingerprint(cfg, tokenizer)
    train_parts, eval_parts, per_source = [], [], []
    pairs = cfg.method.name in PREFERENCE_METHODS
    tokenize_rows = preference.tokenize_pairs if pairs else tokenize
    for src in mixture.split_sources(cfg.data, cfg.training.seed):
        tokenized, stats = tokenize_rows(src.train, tokenizer, src.section)
        log.info("data, %s: %s", src.label, stats.summary())
        entry: dict[str, Any] = {"path": src.section.path, "train": asdict(stats)}
        if cfg.data.eval_fraction > 0 and not mixture.splits_rows(src.section):
            # Plain text: hold out tokenized samples (blocks), as one document may be one row.
            n = len(tokenized)
            if n < 2 or int(n * cfg.data.eval_fraction) < 1:
                raise DataError(
                    f"data.eval_fraction={cfg.data.eval_fraction} of the {n} tokenized samples "
                    f"of {src.label} leaves no evaluation sample",
                    "set data.eval_fraction=0, or give more text",
                )
            parts = tokenized.train_test_split(
                test_size=cfg.data.eval_fraction, seed=cfg.training.seed
            )
            tokenized = parts["train"]
            eval_parts.append(parts["test"])
        train_parts.append(tokenized)
        if src.held_out is not None:
            try:
                held_out, eval_stats = tokenize_rows(src.held_out, tokenizer, src.section)
            except DataError as exc:
                raise DataError(
                    f"held-out rows of {src.label} (data.eval_fraction): {exc.problem}", exc.fix
                ) from None
            log.info("held-out data, %s: %s", src.label, eval_stats.summary())
            eval_parts.append(held_out)
            entry["eval"] = asdict(eval_stats)
        per_source.append((src, entry))
    splits = {"train": datasets.concatenate_datasets(train_parts)}
    if eval_parts:
        splits["eval"] = datasets.concatenate_datasets(eval_parts)
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, split in splits.items():
        split.save_to_disk(str(tmp / name))
    for src, _ in per_source:
        if src.held_out is not None:
            # Kept as rows, so finetune's samples and `generate` answer exactly these: not the
            # rows data.special_tokens_in_text=drop or an empty response left out.
            check = preference.check_pair_rows if pairs else check_rows
            kept, _ = check(src.held_out, tokenizer, src.section)
            src.held_out.select(kept).save_to_disk(str(tmp / EVAL_ROWS / str(src.index)))
    info = {
        "fingerprint": fp,
        "stats": _total([entry["train"] for _, entry in per_source]),
        "sources": [entry for _, entry in per_source],
        "splits": sorted(splits),
    }
    (tmp / INFO).write_text(json.dumps(info, indent=2) + "\n")
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)
    return info


def _total(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Counts of several sources' TokenizeStats added up."""
    total: dict[str, Any] = {}
    for part in parts:
        for key, value in part.items():
            if isinstance(value, dict):
                merged = total.setdefault(key, {})
                for k, v in value.items():
                    merged[k] = merged.get(k, 0) + v
            else:
                total[key] = total.get(key, 0) + value
    return total


def held_out_rows(prepared: Path, source: int) -> datasets.Dataset | None:
    """The held-out rows of one source as prepared, or None."""
    path = prepared / EVAL_ROWS / str(source)
    return datasets.load_from_disk(str(path)) if path.is_dir() else None


def train_stats(prepared: Path) -> TokenizeStats:
    """What tokenizing kept and dropped of the train split, all sources added up.

    Raises:
        DataError: `prepared` holds no prepared data (exit 65)."""
    info = read_info(prepared)
    if info is None:
        raise DataError(f"{prepared} holds no prepared data", "run `llmtrain prepare CONFIG`")
    return TokenizeStats(**info["stats"])


def load(prepared: Path) -> dict[str, datasets.Dataset]:
    """The prepared splits saved in `prepared`, by split name.

    Raises:
        DataError: `prepared` holds no prepared data (exit 65)."""
    info = read_info(prepared)
    if info is None:
        raise DataError(f"{prepared} holds no prepared data", "run `llmtrain prepare CONFIG`")
    return {name: datasets.load_from_disk(str(prepared / name)) for name in info["splits"]}


def ensure(
    cfg: RunConfig, tokenizer: Any, *, is_main: bool, timeout_s: float
) -> tuple[dict[str, datasets.Dataset], str]:
    """The prepared splits for this config, preparing them on the main process if needed.

    Raises:
        DataError: another rank prepares and the data does not appear within `timeout_s` seconds, or
            preparing fails as `prepare` does (exit 65).
        ConfigError: the rows cannot be read as configured (rows.load_rows, exit 64)."""
    target = cfg.prepared_dir()
    fp = fingerprint(cfg, tokenizer)
    info = read_info(target)
    if info is not None and info["fingerprint"] != fp:
        log.info("prepared data in %s is for other data or settings: preparing again", target)
    if (info is None or info["fingerprint"] != fp) and is_main:
        prepare(cfg, tokenizer, fp)
    deadline = time.monotonic() + timeout_s
    while (info := read_info(target)) is None or info["fingerprint"] != fp:
        if time.monotonic() > deadline:
            raise DataError(
                f"prepared data for this config did not appear in {target} within {timeout_s:.0f}s",
                "run `llmtrain prepare CONFIG` before the job, on a shared file system",
            )
        time.sleep(1.0)
    return load(target), fp
