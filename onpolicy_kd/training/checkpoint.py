"""Checkpoints: written atomically, the last K kept, resumed exactly; the final export of the student.

A checkpoint is `<output_dir>/checkpoints/checkpoint-<step>`: accelerate's `save_state` (model,
optimizer, LR scheduler, every process's RNG states; DeepSpeed shards per rank) plus `trainer_state.json`
(step, data position, counters, the metric history needed by the model card). Every rank writes into
`.tmp-checkpoint-<step>`; once all are done the main process renames it into place. A rename is atomic,
so a run killed at any moment leaves complete checkpoints and at most one `.tmp-*` folder, which
resuming ignores and the next save removes. `resume_from: latest` takes the highest complete step.
A write that fails (a full disk) removes its temporary folder and names the last complete checkpoint.

The output folder belongs to one run at a time: `claim_output_dir` locks it for the run's whole life
(training/folder_lock.py) and refuses a folder that holds another run's files.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Iterator

import yaml
from accelerate import Accelerator
from safetensors.torch import save_file

from onpolicy_kd.console import console, is_main_process
from onpolicy_kd.errors import UserError
from onpolicy_kd.hub import expand_path, looks_like_local_path
from onpolicy_kd.objectives.hidden import STITCHING, STITCHING_FILE, split_stitching, stitching_file
from onpolicy_kd.models.loading import is_lora
from onpolicy_kd.models.bitnet import bitnet_layers, export_state_dict as bitnet_export, write_export_file as write_bitnet_file
from onpolicy_kd.models.module_lm import MODULE_FILE, ModuleLM, export_file as module_export_file
from onpolicy_kd.recipe import Recipe, cache_root
from onpolicy_kd.recipe.schema import hidden_stitches
from onpolicy_kd.training.folder_lock import holder_text, in_use, lock_holder, take_lock
from onpolicy_kd.training.publish import check_can_push

STATE_FILE = "trainer_state.json"
RECIPE_FILE = "recipe.yaml"  # the resolved recipe the checkpoint was trained with

# recipe keys a resumed run cannot change: the weights, the optimizer state or the prompt order would not fit
# (a prefix stands for its whole section); every other change is applied on resume and listed
FIXED_ON_RESUME = ("teacher", "student", "optim.name", "hidden.layers", "train.seed", "train.mixed_precision",
                   "train.trainable", "data.path", "data.name", "data.split", "data.format", "data.columns", "data.template",
                   "data.chat_template", "data.system_prompt", "data.truncate_field", "data.max_prompt_tokens",
                   "data.text_prompt_tokens", "data.max_samples")
NOT_COMPARED = ("train.resume_from", "train.overwrite", "train.output_dir", "stages")
PATTERN = re.compile(r"^checkpoint-(\d+)$")


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if PATTERN.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=checkpoint_step)


def checkpoint_step(path: Path) -> int:
    return int(PATTERN.match(path.name).group(1))  # type: ignore[union-attr]


# what a run writes into its output folder (TensorBoard files go to `onpolicy_kd/`, the tracker's project name)
RUN_ITEMS = ("metrics.jsonl", "checkpoints", "final", "stages", "plots", "eval", "onpolicy_kd", ".tmp-final")


@contextlib.contextmanager
def claim_output_dir(output_dir: str | Path, resume_from: str | None, overwrite: bool) -> Iterator[None]:
    """The output folder is this run's until the `with` block ends. The main process locks it (training/folder_lock.py:
    a second run is refused with the first one's pid; the lock a killed run left is taken over and named), and a new
    run does not take over a folder holding another run's files: it stops here, before anything loads, unless it
    resumes that run (`train.resume_from`) or `train.overwrite` clears the run's files first (other files in the
    folder are left alone)."""
    folder = Path(output_dir)
    lock = None
    # before the accelerator exists (the launcher's RANK says which process this is): the other ranks write nothing
    # into the folder before the first checkpoint, a collective that waits for this one
    if is_main_process():
        check_folder(folder)  # a file in the way or a read-only place, said before anything is created
        lock, left = take_lock(folder)
        if left:
            console.print(f"[yellow]warning:[/] train.output_dir={folder}: the lock left by {holder_text(left)}, no "
                          f"longer running, was taken over")
    try:
        refuse_another_run(folder, resume_from, overwrite, delete=is_main_process())
        yield
    finally:
        if lock is not None:
            lock.release()


def check_output_dir(output_dir: str | Path, resume_from: str | None, overwrite: bool) -> None:
    """What claiming the folder would refuse, found without claiming it (--dry-run): a run using it now, a file in the
    way or a read-only place, another run's files."""
    folder = Path(output_dir)
    holder = lock_holder(folder)
    if holder is not None:
        raise in_use(folder, holder)
    check_folder(folder)
    refuse_another_run(folder, resume_from, overwrite, delete=False)


def refuse_another_run(folder: Path, resume_from: str | None, overwrite: bool, delete: bool) -> None:
    """Another run's files in the folder: an error, unless this run resumes it or overwrites (`delete`: remove them)."""
    found = [name for name in RUN_ITEMS if (folder / name).exists()]
    if resume_from is not None or not found:
        return
    if not overwrite:
        checkpoints = list_checkpoints(folder)
        latest = f"; its latest checkpoint is {checkpoints[-1].name}" if checkpoints else ""
        raise UserError(f"train.output_dir={folder} already holds a run ({', '.join(found)}){latest}. Continue it "
                        f"with train.resume_from=latest, start over with train.overwrite=true (deletes those files "
                        f"first), or choose another train.output_dir")
    for name in found if delete else ():
        path = folder / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def check_apart_from_models(output_dir: str | Path, sources: dict[str, str | None]) -> None:
    """The output folder is neither a model's own folder (`sources`: recipe key -> the model it loads) nor inside the
    model cache: a run's checkpoints, final/ and metrics.jsonl would land among the model's files (and
    train.overwrite would delete a folder named final/ there)."""
    folder = Path(expand_path(str(output_dir))).resolve()
    models = (cache_root() / "models").resolve()
    if folder == models or models in folder.parents:
        raise UserError(f"train.output_dir={output_dir} is inside the model cache {models}: a run's files would land "
                        f"among the models'; choose a folder outside it, e.g. outputs/<name>")
    for key, source in sources.items():
        path = Path(expand_path(source)).resolve() if source and looks_like_local_path(source) else None
        if path is not None and path.is_dir() and (folder == path or path in folder.parents):
            raise UserError(f"train.output_dir={output_dir} is the folder of the model {key} loads ({path}) or inside "
                            f"it: a run's files would land among the model's; choose another train.output_dir")


@contextlib.contextmanager
def claim_run(recipe: Recipe) -> Iterator[None]:
    """Before anything loads: the output folder is not a model's, it is this run's until the `with` block ends (a
    lock), and with train.push_to_hub the Hub can take the result."""
    check_apart_from_models(recipe.train.output_dir, model_sources(recipe))
    with claim_output_dir(recipe.train.output_dir, recipe.train.resume_from, recipe.train.overwrite):
        if recipe.train.push_to_hub:
            check_can_push(recipe.train.hub_model_id, recipe.train.output_dir)
        yield


def model_sources(recipe: Recipe) -> dict[str, str | None]:
    """The folders the models load from, which a run must not write into."""
    return {"teacher.name_or_path": recipe.teacher.name_or_path, "student.name_or_path": recipe.student.name_or_path}


def resume_plan(recipe: Recipe, say_nothing_found: bool = True,
                check_processes: bool = True) -> tuple[Path | None, list[tuple[str, object, object]]]:
    """The checkpoint train.resume_from names (None: the run starts from scratch) and the recipe keys changed since
    it was written, checked before anything loads. `latest` that finds nothing starts a new run and says so
    (`say_nothing_found`; a stage of a staged run that has not started yet has nothing to say)."""
    path = resolve_resume(recipe.train.resume_from, recipe.train.output_dir)
    if path is None and recipe.train.resume_from == "latest" and say_nothing_found and is_main_process():
        console.print(f"[yellow]warning:[/] {nothing_to_resume(recipe.train.output_dir)}")
    return path, resume_changes(path, recipe, check_processes=check_processes) if path else []


def checkpoint_bytes(student) -> int:
    """About what a checkpoint and the export take: the weights, two optimizer moments, the exported copy."""
    return 4 * sum(p.numel() * p.element_size() for p in student.parameters())


def check_folder(folder: Path) -> Path:
    """The output folder can be created and written (nothing is created); returns its nearest existing folder."""
    existing = next(p for p in (folder.absolute(), *folder.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise UserError(f"train.output_dir={folder}: {existing} is a file; choose another train.output_dir")
    try:
        probe = existing / f".write-test-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as err:
        raise UserError(f"train.output_dir={folder} cannot be written ({existing}: {err.strerror or err}); choose a "
                        f"folder you can write to") from None
    return existing


def check_writable(output_dir: str | Path, needed_bytes: int) -> None:
    """Before training: the output folder can be created and written, and has room for a checkpoint
    (`needed_bytes`, the student's weights and optimizer state, once more for the exported model)."""
    folder = Path(output_dir)
    free = shutil.disk_usage(check_folder(folder)).free
    if free < needed_bytes:
        raise UserError(f"train.output_dir={folder}: {free / 2**30:.2f} GiB free, a checkpoint and the exported "
                        f"student need about {needed_bytes / 2**30:.2f} GiB; free space or choose another folder")


def save_checkpoint(accelerator: Accelerator, output_dir: str | Path, step: int, state: dict[str, Any], keep: int,
                    recipe_yaml: str, rank_files: dict[str, str] | None = None) -> Path:
    """Save the run's state atomically (written to a temporary folder, renamed into place). `rank_files`: files
    every process writes for itself (name -> text; e.g. its replay buffer)."""
    root = checkpoints_dir(output_dir)
    final = root / f"checkpoint-{step:07d}"
    tmp = root / f".tmp-checkpoint-{step:07d}"
    if accelerator.is_main_process:
        for stale in root.glob(".tmp-checkpoint-*"):
            shutil.rmtree(stale, ignore_errors=True)  # left by a run killed while saving
        tmp.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp))
        if rank_files:
            for name, text in rank_files.items():
                (tmp / name).write_text(text)
            accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            (tmp / STATE_FILE).write_text(json.dumps({**state, "num_processes": accelerator.num_processes}, indent=1))
            (tmp / RECIPE_FILE).write_text(recipe_yaml)
            _fsync_tree(tmp)
    except (OSError, RuntimeError) as err:  # a full disk shows as either (torch: "basic_ios::clear: iostream error")
        shutil.rmtree(tmp, ignore_errors=True)
        good = list_checkpoints(output_dir)
        raise UserError(f"writing checkpoint {final} failed ({type(err).__name__}: {err}); nothing half-written was "
                        f"left. The last complete checkpoint is {good[-1] if good else 'none'}: free disk space (or "
                        f"choose another train.output_dir) and resume with train.resume_from=latest") from None
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        # rotation removes only this run's older checkpoints: ones with a later step (a run resumed from an
        # earlier checkpoint left them) are kept
        older = [p for p in list_checkpoints(output_dir) if checkpoint_step(p) < step]
        for old in older[: max(0, len(older) - (keep - 1))]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def _leaves(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        out |= _leaves(value, f"{name}.") if isinstance(value, dict) else {name: value}
    return out


def world_size() -> int:
    """The number of processes, before the accelerator exists (what `accelerate launch` / torchrun set)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def resume_changes(checkpoint: Path, recipe, check_processes: bool = True) -> list[tuple[str, Any, Any]]:
    """(key, checkpoint's value, this run's value) for every recipe key the resumed run changes. A change the
    checkpoint cannot take is an error naming the keys, raised before any model loads. A path that names the same
    file or folder as before (another spelling, a symlink, another $ONPOLICY_KD_CACHE_DIR pointing at the same
    cache) is not a change. `check_processes`: compare the number of processes too (--dry-run outside a launcher
    cannot know it)."""
    processes, world = json.loads((checkpoint / STATE_FILE).read_text()).get("num_processes"), world_size()
    if check_processes and processes is not None and processes != world:
        raise UserError(f"checkpoint {checkpoint} was written by {processes} processes, this run has {world}: resume "
                        f"with the same number of processes (DeepSpeed and RNG states are per rank)")
    saved_file = checkpoint / RECIPE_FILE
    if not saved_file.is_file():  # written before checkpoints kept their recipe: nothing to compare
        return []
    saved = _leaves(yaml.safe_load(saved_file.read_text()))
    current = _leaves(recipe.model_dump(mode="json"))
    changes = [(key, saved.get(key), value) for key, value in current.items() if saved.get(key) != value
               and not key.startswith(NOT_COMPARED) and not _same_file(saved.get(key), value)]
    stitching_changed = hidden_stitches(saved.get("hidden.weight"), saved.get("hidden.loss")) != recipe.hidden.stitched
    fixed = [c for c in changes if c[0] in ("hidden.weight", "hidden.loss") and stitching_changed][:1]
    fixed += [c for c in changes if any(c[0] == key or c[0].startswith(key + ".") for key in FIXED_ON_RESUME)]
    if fixed:
        listed = "; ".join(f"{key}: {old!r} in the checkpoint, {new!r} now" for key, old, new in fixed)
        raise UserError(f"cannot resume {checkpoint} with these changes: {listed}. They change the model, the "
                        f"optimizer state or the prompt order the checkpoint holds: put them back, or start a new "
                        f"run (another train.output_dir, or train.overwrite=true)")
    return changes


def _same_file(old: Any, new: Any) -> bool:
    """Two path strings that name one existing file or folder."""
    if not all(isinstance(path, str) and looks_like_local_path(path) for path in (old, new)):
        return False
    try:
        return os.path.samefile(expand_path(old), expand_path(new))
    except OSError:  # either is missing: the strings are all there is to compare
        return False


def nothing_to_resume(output_dir: str | Path) -> str:
    """What `resume_from: latest` says when it finds no checkpoint. A new run starts (the first launch of a job that
    is launched again with the same command after a preemption), said at start-up, where a misspelt folder shows."""
    return (f"train.resume_from=latest found no checkpoint in {checkpoints_dir(output_dir)}: starting a new run (to "
            f"continue a run, point train.output_dir at its folder)")


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
    """The trainer state; the accelerator's objects restored. `resume_changes` has already checked the number of
    processes and the recipe, before any model loaded."""
    state = json.loads((path / STATE_FILE).read_text())
    accelerator.load_state(str(path))
    return state


def export_final(accelerator: Accelerator, student, tokenizer, output_dir: str | Path, recipe_yaml: str,
                 card: str, keep_adapters: bool = False) -> Path:
    """`<output_dir>/final`: the student (`save_pretrained`), its tokenizer, the resolved recipe, a model card.

    Hidden-state stitching projections are not part of the student: they go to `stitching.safetensors`
    (their layer pairs in its metadata), so `final/` loads as a plain transformers model. A LoRA student's
    adapters are merged into its weights (on every rank: the run's student is the merged model from here on),
    and with `keep_adapters` also saved alone, in peft's format, to `final/adapter/`. A BitNet student's Linear
    weights are written ternary, with `bitnet.json` (onpolicy_kd/models/bitnet.py). A plain torch module's weights
    go with `onpolicy_kd_module.json`, naming the Python file that rebuilds it (onpolicy_kd/models/module_lm.py).
    """
    final = Path(output_dir) / "final"
    tmp = Path(output_dir) / ".tmp-final"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    model = accelerator.unwrap_model(student)
    if is_lora(model):
        if keep_adapters and accelerator.is_main_process:
            model.save_pretrained(tmp / "adapter")  # the adapters and their config only
        model = model.merge_and_unload()
        state_dict = model.state_dict()  # LoRA runs without ZeRO-3: every rank holds the whole model
    else:
        state_dict = accelerator.get_state_dict(student)  # collective: every rank calls it (ZeRO-3 gathers)
    if accelerator.is_main_process:
        try:
            _write_final(tmp, model, state_dict, tokenizer, recipe_yaml, card)
        except OSError as err:  # a full disk: the checkpoint just written holds the student
            shutil.rmtree(tmp, ignore_errors=True)
            good = list_checkpoints(output_dir)
            raise UserError(f"writing the exported student to {final} failed ({type(err).__name__}: {err}); nothing "
                            f"half-written was left. The last complete checkpoint is {good[-1] if good else 'none'}: "
                            f"free disk space (or choose another train.output_dir) and resume with "
                            f"train.resume_from=latest, which exports it again") from None
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    accelerator.wait_for_everyone()
    return final


def _write_final(tmp: Path, model, state_dict: dict, tokenizer, recipe_yaml: str, card: str) -> None:
    # a copy: recent transformers empties the dict it is given
    own, stitching = split_stitching(dict(state_dict))
    bitnet = None
    if bitnet_layers(model):  # ternary weights as they compute, and the file that says so
        own, bitnet = bitnet_export(model, own)
    model.save_pretrained(tmp, state_dict=own, safe_serialization=True)
    if bitnet:
        write_bitnet_file(tmp, bitnet)
    if isinstance(model, ModuleLM):  # not a transformers model: say which Python file rebuilds it
        (tmp / MODULE_FILE).write_text(json.dumps(module_export_file(model), indent=1))
    if stitching:  # from the gathered state dict (a ZeRO-3 module holds only its shard)
        pairs = getattr(model, STITCHING).pairs
        weights = {tuple(pair): stitching[f"projections.{i}.weight"] for i, pair in enumerate(pairs)}
        tensors, metadata = stitching_file(weights)
        save_file(tensors, str(tmp / STITCHING_FILE), metadata=metadata)
    tokenizer.save_pretrained(tmp)
    (tmp / "recipe.yaml").write_text(recipe_yaml)
    (tmp / "README.md").write_text(card)


def model_card(recipe, recipe_path: str, before: dict[str, float], after: dict[str, float], steps: int,
               train_seconds: float) -> str:
    rows = "\n".join(
        f"| `{key}` | {before.get(key, float('nan')):.4f} | {after[key]:.4f} |" for key in sorted(after)
    )
    data = recipe.data
    held_out = (f"`{data.eval_path}` ({data.held_out_split})" if data.eval_path
                else data.eval_split or f"{data.eval_size} rows")
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
- data: `{recipe.data.path}` ({recipe.data.split}); held out: {held_out}
- {steps} optimizer steps, batch {recipe.train.batch_size} x accumulation {recipe.train.grad_accum}, lr {recipe.optim.lr},
  {train_seconds:.0f} s of training

## Held-out metrics, before and after

| metric | before | after |
|---|---|---|
{rows}

`eval/reverse_kl` is the mean per-token KL(student || teacher), in nats, over the full vocabulary, on the student's
own sampled completions of the held-out prompts (same seeds before and after); `eval/greedy/...` and
`eval/sampled/...` judge the student's greedy and sampled text, `eval/teacher/...` the teacher's own answers.
"""
