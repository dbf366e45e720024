"""Launched by tests/test_distributed_train.py under `accelerate launch`: a run whose loss is NaN at its second
step on the last rank only. Each rank writes, after every optimizer step, a digest of everything that step could
have changed on it: the student's weights (ZeRO-3: this rank's partition), the optimizer's master weights and
state (Adam moments and step counts), and the learning rate.

    python tests/helpers/nan_step.py OUT_DIR RECIPE [overrides]
"""

import hashlib
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))
import onpolicy_kd.training.loop as loop  # noqa: E402
import onpolicy_kd.training.phases as phases  # noqa: E402
from onpolicy_kd.train import main  # noqa: E402

out_dir = Path(sys.argv[1])
rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
steps_done = 0
records = []


def poisoned_step_loss(*args, **kwargs):
    loss, metrics = real_step_loss(*args, **kwargs)
    if steps_done == 1 and rank == world - 1:  # the second step, on one rank
        loss = loss * float("inf")
    return loss, metrics


def digest(run) -> str:
    h = hashlib.sha256()
    tensors = [getattr(p, "ds_tensor", p) for p in run.student.parameters()]  # ZeRO-3 keeps this rank's share there
    base = run.optimizer
    while hasattr(base, "optimizer"):  # accelerate's wrapper -> DeepSpeed's ZeRO optimizer -> the torch optimizer
        base = base.optimizer
    for group in base.param_groups:
        tensors += list(group["params"])  # the master weights the optimizer updates
    for state in base.state.values():
        tensors += [v for v in state.values() if torch.is_tensor(v)]
    for t in tensors:
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def recorded_optimizer_step(run, bad, metrics):
    global steps_done
    skipped = real_optimizer_step(run, bad, metrics)
    records.append({"step": steps_done + 1, "skipped": skipped, "digest": digest(run),
                    "lr": float(run.scheduler.get_last_lr()[0])})
    steps_done += 1
    out_dir.mkdir(parents=True, exist_ok=True)  # written after every step: a multi-process run ends with os._exit
    (out_dir / f"rank{rank}.json").write_text(json.dumps(records))
    return skipped


real_step_loss, phases.step_loss = phases.step_loss, poisoned_step_loss
real_optimizer_step, loop.optimizer_step = loop.optimizer_step, recorded_optimizer_step
sys.exit(main(sys.argv[2:]))
