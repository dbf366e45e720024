"""Checkpoints: written atomically, the last K kept, resumed exactly; the final export of the student.

A checkpoint is `<output_dir>/checkpoints/checkpoint-<step>`: accelerate's `save_state` (model,
optimizer, LR scheduler, every process's RNG states; DeepSpeed shards per rank) plus `trainer_state.json`
(step, data position, counters, the metric history needed by the model card). Every rank writes into
`.tmp-checkpoint-<step>`; once all are done the main process renames it into place. A rename is atomic,
so a run killed at any moment leaves complete checkpoints and at most one `.tmp-*` folder, which
resuming ignores and the next save removes. `resume_from: latest` takes the highest complete step.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from safetensors.torch import save_file

from onpolicy_kd.errors import UserError
from onpolicy_kd.objectives.hidden import STITCHING, split_stitching

STATE_FILE = "trainer_state.json"
PATTERN = re.compile(r"^checkpoint-(\d+)$")


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if PATTERN.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(PATTERN.match(p.name).group(1)))  # type: ignore[union-attr]


def save_checkpoint(accelerator: Accelerator, output_dir: str | Path, step: int, state: dict[str, Any], keep: int) -> Path:
    root = checkpoints_dir(output_dir)
    final = root / f"checkpoint-{step:07d}"
    tmp = root / f".tmp-checkpoint-{step:07d}"
    if accelerator.is_main_process:
        for stale in root.glob(".tmp-checkpoint-*"):
            shutil.rmtree(stale, ignore_errors=True)  # left by a run killed while saving
        tmp.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps({**state, "num_processes": accelerator.num_processes}, indent=1))
        _fsync_tree(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def resolve_resume(resume_from: str | None, output_dir: str | Path) -> Path | None:
    if resume_from is None:
        return None
    if resume_from == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None  # nothing yet: start from scratch
    path = Path(resume_from).expanduser()
    if not (path / STATE_FILE).is_file():
        raise UserError(f"train.resume_from={resume_from}: not a complete checkpoint (no {STATE_FILE}); "
                        f"use 'latest' or a folder under {checkpoints_dir(output_dir)}")
    return path


def load_checkpoint(accelerator: Accelerator, path: Path) -> dict[str, Any]:
    state = json.loads((path / STATE_FILE).read_text())
    if state.get("num_processes", accelerator.num_processes) != accelerator.num_processes:
        raise UserError(
            f"checkpoint {path} was written by {state['num_processes']} processes, this run has "
            f"{accelerator.num_processes}: resume with the same number of processes (DeepSpeed and RNG states are per rank)"
        )
    accelerator.load_state(str(path))
    return state


def export_final(accelerator: Accelerator, student, tokenizer, output_dir: str | Path, recipe_yaml: str,
                 card: str) -> Path:
    """`<output_dir>/final`: the student (`save_pretrained`), its tokenizer, the resolved recipe, a model card.

    Hidden-state stitching projections are not part of the student: they go to `stitching.safetensors`
    (their layer pairs in its metadata), so `final/` loads as a plain transformers model.
    """
    final = Path(output_dir) / "final"
    tmp = Path(output_dir) / ".tmp-final"
    state_dict = accelerator.get_state_dict(student)  # collective: every rank calls it (ZeRO-3 gathers)
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        model = accelerator.unwrap_model(student)
        # a copy: recent transformers empties the dict it is given
        own, stitching = split_stitching(dict(state_dict))
        model.save_pretrained(tmp, state_dict=own, safe_serialization=True)
        if stitching:
            pairs = getattr(model, STITCHING).pairs
            save_file({k: v.contiguous() for k, v in stitching.items()}, str(tmp / "stitching.safetensors"),
                      metadata={"pairs": json.dumps(pairs)})
        tokenizer.save_pretrained(tmp)
        (tmp / "recipe.yaml").write_text(recipe_yaml)
        (tmp / "README.md").write_text(card)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    accelerator.wait_for_everyone()
    return final


def model_card(recipe, recipe_path: str, before: dict[str, float], after: dict[str, float], steps: int,
               train_seconds: float) -> str:
    rows = "\n".join(
        f"| `{key}` | {before.get(key, float('nan')):.4f} | {after[key]:.4f} |" for key in sorted(after)
    )
    return f"""---
library_name: transformers
tags: [distillation, onpolicy-kd]
---
# Distilled student ({recipe.objective.mode})

Trained with [onpolicy-kd](https://pypi.org/project/onpolicy-kd/) from the recipe `{recipe_path}` (resolved copy:
`recipe.yaml`).

- method: `{recipe.objective.mode}`, divergence `{recipe.objective.divergence}` (beta {recipe.objective.beta}),
  rollout alpha {recipe.rollout.alpha}, {recipe.rollout.max_new_tokens} new tokens, temperature {recipe.rollout.temperature}
- teacher: `{recipe.teacher.name_or_path}`
- student: `{recipe.student.name_or_path or recipe.student.init}` (init: {recipe.student.init})
- data: `{recipe.data.path}` ({recipe.data.split}; held out: {recipe.data.eval_split or recipe.data.eval_size})
- {steps} optimizer steps, batch {recipe.train.batch_size} x accumulation {recipe.train.grad_accum}, lr {recipe.optim.lr},
  {train_seconds:.0f} s of training

## Held-out metrics, before and after

| metric | before | after |
|---|---|---|
{rows}

`eval/reverse_kl` is the mean per-token KL(student || teacher), in nats, over the full vocabulary, on the student's
own sampled completions of the held-out prompts (same seed before and after).
"""
