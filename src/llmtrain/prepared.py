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

from llmtrain import chat
from llmtrain.config import RunConfig
from llmtrain.data import SOURCE_ROW, detect_format, load_rows, tokenize
from llmtrain.errors import DataError

log = logging.getLogger(__name__)
INFO = "prepared.json"
FORMAT_VERSION = 2  # 2: whole-text tokenization, one BOS/EOS policy


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
    h.update(json.dumps({"v": FORMAT_VERSION, "data": data}, sort_keys=True).encode())
    if detect_format(cfg.data) == "hub":
        h.update(f"hub:{cfg.data.path}:{cfg.data.name}:{cfg.data.split}".encode())
    else:
        _hash_path(h, Path(cfg.data.resolved_path()))
    vocab = tokenizer.get_vocab()
    h.update(json.dumps(sorted(vocab.items()), ensure_ascii=False).encode())
    h.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    if cfg.data.shape == "chat":
        h.update(chat.resolve_template(tokenizer, cfg.data).encode())
    return h.hexdigest()[:16]


def read_info(prepared: Path) -> dict[str, Any] | None:
    try:
        info: dict[str, Any] = json.loads((prepared / INFO).read_text())
    except (OSError, ValueError):
        return None
    return info


def check_eval_split(cfg: RunConfig, n_rows: int) -> None:
    """data.eval_fraction of `n_rows` holds out at least one row and keeps one for training.

    Raises:
        DataError: it would not (exit 65).
    """
    if cfg.data.eval_fraction > 0 and (n_rows < 2 or int(n_rows * cfg.data.eval_fraction) < 1):
        raise DataError(
            f"data.eval_fraction={cfg.data.eval_fraction} of {n_rows} rows leaves no "
            "evaluation row",
            "set data.eval_fraction=0, or give more rows (plain text splits into rows "
            "at blank lines)",
        )


def prepare(cfg: RunConfig, tokenizer: Any, fp: str | None = None) -> dict[str, Any]:
    """Tokenize and save atomically: a temporary directory renamed into place."""
    target = cfg.prepared_dir()
    fp = fp or fingerprint(cfg, tokenizer)
    rows = load_rows(cfg.data)
    rows = rows.add_column(SOURCE_ROW, list(range(len(rows))))
    eval_rows = None
    if cfg.data.eval_fraction > 0:
        # Rows are split before tokenizing, so the held-out rows are known as rows: finetune's
        # samples and `generate` answer exactly those, never training rows.
        check_eval_split(cfg, len(rows))
        parts = rows.train_test_split(test_size=cfg.data.eval_fraction, seed=cfg.training.seed)
        train_rows, eval_rows = parts["train"], parts["test"]
        tokenized, stats = tokenize(train_rows, tokenizer, cfg.data)
        try:
            held_out, eval_stats = tokenize(eval_rows, tokenizer, cfg.data)
        except DataError as exc:
            raise DataError(f"held-out rows (data.eval_fraction): {exc.problem}", exc.fix) from None
        log.info("eval data: %s", eval_stats.summary())
        splits = {"train": tokenized, "eval": held_out}
    else:
        tokenized, stats = tokenize(rows, tokenizer, cfg.data)
        splits = {"train": tokenized}
    log.info("data: %s", stats.summary())
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, split in splits.items():
        split.save_to_disk(str(tmp / name))
    if eval_rows is not None:
        eval_rows.save_to_disk(str(tmp / "eval_rows"))
    info = {"fingerprint": fp, "stats": asdict(stats), "splits": sorted(splits)}
    (tmp / INFO).write_text(json.dumps(info, indent=2) + "\n")
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)
    return info


def load(prepared: Path) -> dict[str, datasets.Dataset]:
    info = read_info(prepared)
    if info is None:
        raise DataError(f"{prepared} holds no prepared data", "run `llmtrain prepare CONFIG`")
    return {name: datasets.load_from_disk(str(prepared / name)) for name in info["splits"]}


def ensure(
    cfg: RunConfig, tokenizer: Any, *, is_main: bool, timeout_s: float
) -> tuple[dict[str, datasets.Dataset], str]:
    """The prepared splits for this config, preparing them on the main process if needed."""
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
