"""distributed.timeout_minutes reaches the process group of a 2-rank CPU (gloo) world that
torchrun starts, on either stack: a dead rank must fail the job after the configured time, not
after torch's default 30 minutes. transformers 5.x starts a use_cpu world's group without
TrainingArguments.ddp_timeout, so the setting reached the Trainer's arguments but not the group;
4.37.2 does the same when training.args sets use_cpu.

No model, no training: each rank builds the run's TrainingArguments, which starts the group.
This file is also the probe that torchrun runs on each rank.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

RANKS = 2
# Neither the package's default (10) nor torch's (30), so that either one reaching the group
# instead fails the test.
MINUTES = 7


def probe(out: Path) -> None:
    """One rank: the run's ddp_timeout and its gloo group's timeout, in out/rank<r>.json; the
    test's extra overrides come in out/overrides.json."""
    import torch
    import torch.distributed as dist

    from llmtrain.config import load_config
    from llmtrain.plan import World
    from llmtrain.train.run import plan_run, training_arguments

    repo = Path(__file__).resolve().parents[2]
    world = World.from_env()
    cfg = load_config(
        repo / "configs" / "full.yaml",
        [
            f"output.dir={out}",
            "training.report_to=[none]",
            "distributed.strategy=ddp",
            f"distributed.timeout_minutes={MINUTES}",
            *json.loads((out / "overrides.json").read_text()),
        ],
    )
    args = training_arguments(cfg, world, plan_run(cfg, world), out, False, None)
    # torch keeps a group's timeout in its backend's options; no public getter reads it.
    gloo = dist.distributed_c10d._get_default_group()._get_backend(torch.device("cpu"))
    report = {
        "ddp_timeout": args.ddp_timeout,
        "group_timeout_s": gloo.options._timeout.total_seconds(),
        "world_size": dist.get_world_size(),
    }
    (out / f"rank{world.rank}.json").write_text(json.dumps(report))


@pytest.mark.parametrize(
    "overrides", [[], ["training.args={use_cpu: true}"]], ids=["default", "use_cpu"]
)
def test_the_process_group_gets_the_configured_timeout(
    tmp_path: Path, overrides: list[str]
) -> None:
    from tests.strategies.test_cpu_strategies import torchrun

    (tmp_path / "overrides.json").write_text(json.dumps(overrides))
    torchrun(__file__, tmp_path, RANKS)
    for rank in range(RANKS):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert report == {
            "ddp_timeout": MINUTES * 60,
            "group_timeout_s": MINUTES * 60,
            "world_size": RANKS,
        }, rank


if __name__ == "__main__":
    probe(Path(sys.argv[1]))
