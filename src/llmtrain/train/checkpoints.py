"""Checkpoints that are complete or ignored, retention by step number, and resume selection.

A checkpoint directory counts only once it holds the completion marker, written after every
rank finished writing and its files reached the disk: a job killed mid-write leaves a directory
without the marker, which resume skips. Retention orders by the step in the name, never by
mtime (transformers 4.37.2 rotates by mtime and can delete the newest on network file systems).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

from llmtrain.errors import ConfigError

log = logging.getLogger(__name__)
MARKER = "llmtrain-complete.json"
LATEST = "latest"
BEST = "best"  # names the complete checkpoint with the lowest eval loss
_NAME = re.compile(r"^checkpoint-(\d+)$")


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, text: str) -> None:
    """Write to a temporary name, flush to disk, rename, and flush the directory entry."""
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
    _fsync_file(path.parent)


def flush_tree(path: Path) -> None:
    """fsync every file under path (this node's page cache) and the directories themselves."""
    for root, _, files in os.walk(path):
        for name in files:
            _fsync_file(Path(root) / name)
        _fsync_file(Path(root))


def all_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    found = []
    if output_dir.is_dir():
        for child in output_dir.iterdir():
            m = _NAME.match(child.name)
            if m and child.is_dir():
                found.append((int(m.group(1)), child))
    return sorted(found)


def is_complete(ckpt: Path) -> bool:
    return (ckpt / MARKER).is_file()


def read_marker(ckpt: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((ckpt / MARKER).read_text())
    return loaded


def mark_complete(ckpt: Path, facts: dict[str, Any]) -> None:
    """Called once, by global rank 0, after all ranks wrote and flushed `ckpt`."""
    atomic_write(ckpt / MARKER, json.dumps(facts, indent=2, sort_keys=True) + "\n")
    atomic_write(ckpt.parent / LATEST, ckpt.name + "\n")


def latest_complete(output_dir: Path) -> Path | None:
    newest = None
    for step, ckpt in reversed(all_checkpoints(output_dir)):
        if is_complete(ckpt):
            newest = ckpt
            break
        log.warning("checkpoint %s (step %d) is incomplete: skipped", ckpt, step)
    return newest


def best_complete(output_dir: Path) -> tuple[Path, float] | None:
    """The complete checkpoint with the lowest eval loss recorded in its marker, and that loss;
    the earlier one on a tie. None when no checkpoint was evaluated."""
    scored = []
    for _, ckpt in all_checkpoints(output_dir):
        if is_complete(ckpt) and (loss := read_marker(ckpt).get("eval_loss")) is not None:
            scored.append((float(loss), ckpt))
    if not scored:
        return None
    loss, ckpt = min(scored, key=lambda x: x[0])
    return ckpt, loss


def record_best(output_dir: Path) -> tuple[Path, float] | None:
    """Point `best` at best_complete(), so users and `keep_best` retention find it."""
    best = best_complete(output_dir)
    if best is not None:
        atomic_write(output_dir / BEST, best[0].name + "\n")
    return best


def retain(output_dir: Path, keep: int, *, keep_best: bool = False) -> list[Path]:
    """Delete all but the newest `keep` complete checkpoints (by step), and incomplete ones
    older than the newest complete. Never deletes the newest complete checkpoint; with
    `keep_best`, never the one with the lowest eval loss either."""
    keep = max(keep, 2)
    ckpts = all_checkpoints(output_dir)
    complete = [c for _, c in ckpts if is_complete(c)]
    if not complete:
        return []
    newest_step = int(_NAME.match(complete[-1].name).group(1))  # type: ignore[union-attr]
    best = best_complete(output_dir) if keep_best else None
    doomed = [c for c in complete[:-keep] if best is None or c != best[0]]
    doomed += [c for s, c in ckpts if not is_complete(c) and s < newest_step]
    for ckpt in doomed:
        shutil.rmtree(ckpt, ignore_errors=True)
    return doomed


def discard_incomplete_after(output_dir: Path, ckpt: Path | None) -> None:
    """Before resuming, remove partial checkpoints a killed run left past the resume point."""
    start = int(_NAME.match(ckpt.name).group(1)) if ckpt else -1  # type: ignore[union-attr]
    for step, path in all_checkpoints(output_dir):
        if step > start and not is_complete(path):
            shutil.rmtree(path, ignore_errors=True)


TOPOLOGY_KEYS = (
    "world_size",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "seed",
    "data_fingerprint",
    "param_dtype",  # the optimizer state holds master weights with bfloat16 only
)


def check_topology(ckpt: Path, now: dict[str, Any], allow_change: bool) -> None:
    """Compare the run now with the one that saved `ckpt` (TOPOLOGY_KEYS); a change is logged when
    `allow_change`.

    Raises:
        ConfigError: a key of TOPOLOGY_KEYS changed and `allow_change` is false: the resume would
            not be exact (exit 64)."""
    saved = read_marker(ckpt)
    changed = [
        f"{k}: {saved.get(k)} -> {now.get(k)}"
        for k in TOPOLOGY_KEYS
        if k in saved and saved.get(k) != now.get(k)
    ]
    if changed and not allow_change:
        raise ConfigError(
            f"cannot resume exactly from {ckpt}: the run changed since it was saved",
            "restore the old settings, start a new output.dir, set output.resume=never, or "
            "accept an inexact resume with distributed.allow_topology_change=true",
            problems=changed,
        )
    if changed:
        log.warning("resuming with changes (allowed): %s", "; ".join(changed))


def resume_point(output_dir: Path, resume: str) -> Path | None:
    """The checkpoint to resume from: None for never, the newest complete one for auto (None when
    there is none), else the path given.

    Raises:
        ConfigError: output.resume is a path but not a complete llmtrain checkpoint (exit 64)."""
    if resume == "never":
        return None
    if resume != "auto":
        path = Path(resume)
        if not path.is_dir() or not is_complete(path):
            raise ConfigError(
                f"output.resume {resume!r} is not a complete llmtrain checkpoint",
                "use output.resume=auto, never, or the path of a checkpoint-N directory that "
                f"holds {MARKER}",
            )
        return path
    return latest_complete(output_dir)
