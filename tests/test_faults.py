"""What the tool survives: each test reproduces a fault a user hit (the command shrunk to the tiny models) and
checks that nothing is lost and the message says what, where and how to fix it. README "When things go wrong"
lists these guarantees."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch

from onpolicy_kd.errors import UserError
from onpolicy_kd.recipe import load_recipe, recipe_to_yaml
from onpolicy_kd.train import main

from test_stages import staged
from test_train import _subprocess, _wait_for, metrics_of, recipe_for


def steps_logged(out: Path) -> list[int]:
    return [r["step"] for r in metrics_of(out) if "train/loss" in r]


def race(start, procs: list, timeout: float) -> tuple:
    """Start a run, the same run again a second later (each appended to `procs`, for the caller's cleanup), and wait
    until one of them exits: (the one that exited, the one still running)."""
    procs.append(start())
    time.sleep(1)
    procs.append(start())
    deadline = time.time() + timeout
    while all(p.poll() is None for p in procs):
        assert time.time() < deadline, "neither run was refused"
        time.sleep(0.05)
    (refused,) = [p for p in procs if p.poll() is not None]
    (owner,) = [p for p in procs if p is not refused]
    return refused, owner


# --- 1. the output folder belongs to one run ---------------------------------------------------------------------

def test_a_new_run_refuses_a_folder_that_holds_another(tmp_path, far_pair, isolated_cache, capsys):
    recipe = recipe_for(tmp_path, far_pair, "gkd")
    out = tmp_path / "out"
    assert main([str(recipe), "train.max_steps=4", "train.save_steps=2"]) == 0
    before = (out / "metrics.jsonl").read_text()
    assert main([str(recipe), "train.max_steps=2", "train.save_steps=1"]) == 2
    err = capsys.readouterr().err.replace("\n", " ")
    assert "already holds a run" in err and "train.resume_from=latest" in err and "train.overwrite=true" in err
    assert (out / "metrics.jsonl").read_text() == before  # nothing touched
    assert main([str(recipe), "train.max_steps=2", "train.save_steps=1", "train.overwrite=true"]) == 0
    assert steps_logged(out) == [1, 2]  # the old run's records were cleared, not appended to
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-0000001", "checkpoint-0000002"]


def test_one_run_owns_its_folder_and_a_killed_runs_lock_is_taken_over(tmp_path, far_pair, isolated_cache, capsys):
    """Two real processes into one new folder, the second a second after the first: exactly one trains, the other
    is refused at start-up naming the first's pid. The one that trains is then SIGKILLed: the lock file it leaves
    does not block the next run, which says whose lock it took over."""
    from onpolicy_kd.metrics_log import read_metrics

    recipe = recipe_for(tmp_path, far_pair, "gkd")
    out = tmp_path / "out"
    args = ("train.max_steps=100000", "train.save_steps=1")
    procs = []
    try:
        refused, owner = race(lambda: _subprocess(recipe, *args), procs, timeout=120)
        err = " ".join(refused.communicate()[1].split())
        assert refused.returncode == 2 and "is in use by another run" in err and f"pid {owner.pid} " in err, err[-2000:]
        assert "Traceback" not in err
        checkpoints = out / "checkpoints"
        _wait_for(lambda: checkpoints.is_dir() and any(p.name.startswith("checkpoint-") for p in checkpoints.iterdir()),
                  owner)
    finally:
        for proc in procs:  # SIGKILL: as if the machine killed the run (and no run is left behind by a failure)
            proc.kill()
            proc.communicate()
    assert json.loads((out / ".run.lock").read_text())["pid"] == owner.pid  # the file stays; the kernel's lock went
    steps = [r["step"] for r in read_metrics(out / "metrics.jsonl")[0] if "train/loss" in r]
    assert steps == list(range(1, len(steps) + 1))  # one run's records, none interleaved with another's
    assert main([str(recipe), "train.resume_from=latest", f"train.max_steps={len(steps) + 1}"]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert f"the lock left by pid {owner.pid} " in printed and "was taken over" in printed
    assert not (out / ".run.lock").exists()  # released when the run ended


def test_only_the_main_process_locks_the_folder_until_the_run_ends(tmp_path, monkeypatch):
    from onpolicy_kd.training.checkpoint import claim_output_dir

    out = tmp_path / "out"
    monkeypatch.setenv("RANK", "1")  # another rank of a multi-process run: the main process's lock covers it
    with claim_output_dir(out, None, False):
        assert not out.exists()
    monkeypatch.setenv("RANK", "0")
    with claim_output_dir(out, None, False):
        assert json.loads((out / ".run.lock").read_text())["pid"] == os.getpid()
        with pytest.raises(UserError, match=rf"in use by another run \(pid {os.getpid()} "):
            with claim_output_dir(out, None, False):
                pass
    assert not out.exists()  # released; the folder the claim created held nothing else, so it went too


def test_a_dry_run_refuses_what_the_run_would_refuse(tmp_path, far_pair, isolated_cache, capsys, monkeypatch):
    import onpolicy_kd.train as train_module
    from onpolicy_kd.training.checkpoint import claim_output_dir

    monkeypatch.setattr(train_module, "load_models", lambda *a, **k: pytest.fail("loaded models before refusing"))
    recipe = recipe_for(tmp_path, far_pair, "gkd")
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1}\n')  # the folder holds a run
    assert main([str(recipe), "--dry-run"]) == 2
    assert "already holds a run" in capsys.readouterr().err
    other = load_recipe(recipe, ["student.config_overrides={num_hidden_layers: 1}"])
    fake_checkpoint(out / "checkpoints" / "checkpoint-0000001", other)
    assert main([str(recipe), "--dry-run", "train.resume_from=latest"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "cannot resume" in err and "student.config_overrides" in err
    with claim_output_dir(out, "latest", False):  # a run is using the folder
        assert main([str(recipe), "--dry-run", "train.resume_from=latest"]) == 2
        assert f"in use by another run (pid {os.getpid()} " in " ".join(capsys.readouterr().err.split())


def fake_checkpoint(folder: Path, recipe, step: int = 1) -> Path:
    """What resuming reads before anything loads: trainer_state.json and the recipe the checkpoint was trained with."""
    folder.mkdir(parents=True)
    (folder / "trainer_state.json").write_text(json.dumps({"step": step, "num_processes": 1}))
    (folder / "recipe.yaml").write_text(recipe_to_yaml(recipe))
    return folder


def test_rotation_keeps_the_checkpoints_of_the_run_that_writes(tmp_path, far_pair, isolated_cache):
    """Resuming from an earlier checkpoint: rotation removes this run's older checkpoints, never its new one (nor
    the later ones another branch of the run left)."""
    recipe = recipe_for(tmp_path, far_pair, "gkd")
    ckpts = tmp_path / "out" / "checkpoints"
    assert main([str(recipe), "train.max_steps=6", "train.save_steps=2", "train.save_total_limit=2"]) == 0
    assert sorted(p.name for p in ckpts.iterdir()) == ["checkpoint-0000004", "checkpoint-0000006"]
    assert main([str(recipe), "train.max_steps=5", "train.save_total_limit=1",
                 f"train.resume_from={ckpts / 'checkpoint-0000004'}"]) == 0
    assert sorted(p.name for p in ckpts.iterdir()) == ["checkpoint-0000005", "checkpoint-0000006"]


# --- 2. resume applies changed hyper-parameters, or refuses the ones it cannot take --------------------------------

def test_resume_applies_a_new_learning_rate_and_records_it(tmp_path, far_pair, isolated_cache, capsys):
    recipe = recipe_for(tmp_path, far_pair, "gkd")
    out = tmp_path / "out"
    assert main([str(recipe), "train.max_steps=2"]) == 0
    assert main([str(recipe), "train.max_steps=4", "train.resume_from=latest", "optim.lr=1.0e-6"]) == 0
    printed = capsys.readouterr().out.replace("\n", " ")
    assert "resumed with changed settings (applied)" in printed and "optim.lr 0.003 -> 1e-06" in printed
    lrs = [r["optim/lr"] for r in metrics_of(out) if "optim/lr" in r]
    assert lrs[:2] == [pytest.approx(3e-3)] * 2 and lrs[2:] == [pytest.approx(1e-6)] * 2  # trained with it
    import yaml

    assert yaml.safe_load((out / "final" / "recipe.yaml").read_text())["optim"]["lr"] == 1e-6
    assert "lr 1e-06" in (out / "final" / "README.md").read_text()


@pytest.mark.parametrize("change, named", [
    (["student.config_overrides={num_hidden_layers: 1}"], "student.config_overrides"),
    (["optim.name=sgd"], "optim.name"),
    (["train.seed=6"], "train.seed"),
])
def test_resume_refuses_changes_the_checkpoint_cannot_take(tmp_path, far_pair, isolated_cache, capsys, monkeypatch,
                                                           change, named):
    recipe = recipe_for(tmp_path, far_pair, "gkd")
    assert main([str(recipe), "train.max_steps=2"]) == 0
    import onpolicy_kd.training.loop as loop

    monkeypatch.setattr(loop, "setup", lambda *a, **k: pytest.fail("loaded models before refusing"))
    assert main([str(recipe), "train.max_steps=3", "train.resume_from=latest", *change]) == 2
    err = capsys.readouterr().err.replace("\n", " ")
    assert "cannot resume" in err and named in err and "train.overwrite=true" in err


def test_resume_refuses_another_number_of_processes_before_loading(tmp_path, far_pair, isolated_cache, capsys,
                                                                    monkeypatch):
    recipe = recipe_for(tmp_path, far_pair, "gkd")
    assert main([str(recipe), "train.max_steps=2"]) == 0
    (checkpoint,) = (tmp_path / "out" / "checkpoints").iterdir()
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    (checkpoint / "trainer_state.json").write_text(json.dumps({**state, "num_processes": 2}))
    import onpolicy_kd.training.loop as loop

    monkeypatch.setattr(loop, "setup", lambda *a, **k: pytest.fail("loaded models before refusing"))
    assert main([str(recipe), "train.max_steps=3", "train.resume_from=latest"]) == 2
    assert "written by 2 processes, this run has 1" in capsys.readouterr().err.replace("\n", " ")


def test_a_staged_resume_refuses_a_checkpoint_of_another_recipe(tmp_path, far_pair, isolated_cache, capsys,
                                                                 monkeypatch):
    import onpolicy_kd.training.stages as stages

    monkeypatch.setattr(stages, "load_models", lambda *a, **k: pytest.fail("loaded models before refusing"))
    path = staged(tmp_path, far_pair)
    (tmp_path / "other").mkdir()
    other = load_recipe(recipe_for(tmp_path / "other", far_pair, "gkd"),
                        ["student.config_overrides={num_hidden_layers: 1}"])
    checkpoint = fake_checkpoint(tmp_path / "other" / "out" / "checkpoints" / "checkpoint-0000002", other, step=2)
    assert main([str(path), f"train.resume_from={checkpoint}"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "cannot resume" in err and "student.config_overrides" in err and "train.overwrite=true" in err


def test_a_resume_that_finds_nothing_says_what_it_looked_for(tmp_path, far_pair, isolated_cache, capsys):
    recipe = recipe_for(tmp_path, far_pair, "gkd")
    misspelt = tmp_path / "outt"
    assert main([str(recipe), "train.max_steps=1", "train.resume_from=latest", f"train.output_dir={misspelt}"]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert "train.resume_from=latest found no checkpoint in" in printed and "outt" in printed
    assert "starting a new run" in printed
    stages = "stages=[{name: a, max_steps: 1}, {name: b, max_steps: 1}]"
    assert main([str(recipe), stages, "train.max_steps=null", "train.resume_from=latest",
                 f"train.output_dir={tmp_path / 'staged'}"]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert "found no finished stage and no checkpoint under" in printed and "starting a new run" in printed


# --- 3. signals: a signal to one rank of a multi-process run is in tests/test_distributed_train.py -----------------

def test_a_staged_run_stopped_by_a_signal_names_the_run_step_and_the_stage_step(tmp_path, far_pair, isolated_cache,
                                                                                capsys, monkeypatch):
    """The console counts steps over the whole run; the message a stop prints says that step, and the stage's own."""
    import onpolicy_kd.training.loop as loop

    real = loop.agree_on_stop

    def sigterm_at_step_2_of_stage_b(run):
        real(run)
        if run.monitor.stage.get("stage") == "b" and run.state.step == 2:
            run.stop.signal = int(signal.SIGTERM)

    monkeypatch.setattr(loop, "agree_on_stop", sigterm_at_step_2_of_stage_b)
    stages = "stages=[{name: a, max_steps: 2}, {name: b, max_steps: 3}]"
    recipe = recipe_for(tmp_path, far_pair, "gkd")
    assert main([str(recipe), stages, "train.max_steps=null"]) == 128 + signal.SIGTERM
    printed = " ".join(capsys.readouterr().out.split())
    assert "stopped by signal 15 at step 4 (step 2 of stage 2/2 b): checkpoint saved" in printed


@pytest.mark.parametrize("when", ["generating", "writing"])
def test_ctrl_c_while_the_teacher_cache_is_made_ends_like_one_in_training(when, tmp_path, far_pair, isolated_cache,
                                                                         capsys, monkeypatch, request):
    """A real SIGINT to the process while the teacher's completions are generated, or while they are written: one
    line, exit status 130, and no half-written cache entry."""
    import onpolicy_kd.rollout.teacher_cache as teacher_cache

    # Python's own Ctrl-C handler, whatever pytest was started with (a job started with & from a script without job
    # control starts with SIGINT ignored, and then the signal below would do nothing)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    request.addfinalizer(lambda: signal.signal(signal.SIGINT, previous))

    def then_ctrl_c(real):
        def call(*args, **kwargs):
            result = real(*args, **kwargs)
            os.kill(os.getpid(), signal.SIGINT)  # Python's own handler raises KeyboardInterrupt right here
            return result
        return call

    if when == "generating":
        monkeypatch.setattr(teacher_cache, "rollout", then_ctrl_c(teacher_cache.rollout))
    else:
        from datasets import Dataset

        monkeypatch.setattr(Dataset, "save_to_disk", then_ctrl_c(Dataset.save_to_disk))
    try:
        code = main([str(recipe_for(tmp_path, far_pair, "seqkd")), "teacher_text.cache=true"])
    except KeyboardInterrupt:
        pytest.fail("a KeyboardInterrupt traceback")
    err = capsys.readouterr().err
    assert code == 130 and "interrupted (Ctrl-C)" in err and "Traceback" not in err
    entries = isolated_cache / "data" / "teacher"
    assert not entries.exists() or not any(entries.iterdir())  # nothing half-written



def test_a_signal_that_lands_during_the_agreement_stops_the_run_at_the_next_step():
    """On 2 processes rank 1 often waits in the step's gather for rank 0; a SIGTERM there runs its handler when the
    gather returns, after the flags were sent. The next step's agreement must carry it (it once overwrote the flag
    with the gathered "no", and the run trained on: the 2-process SIGTERM test hung on a loaded CI machine)."""
    from types import SimpleNamespace

    from onpolicy_kd.training.loop import StopRequested, agree_on_stop

    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        stop = StopRequested()
        land_signal = [True]

        def gather(flags):  # the other rank's flags beside ours; the signal arrives while we wait for them
            if land_signal.pop() if land_signal else False:
                signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)
            return torch.cat([flags, torch.zeros_like(flags)])

        run = SimpleNamespace(stop=stop, out_of_time=False, recipe=SimpleNamespace(train=SimpleNamespace(max_time=None)),
                              state=SimpleNamespace(train_seconds=0.0),
                              accelerator=SimpleNamespace(device="cpu", num_processes=2, gather=gather))
        agree_on_stop(run)
        assert run.stop.signal is None  # the flags had been sent: this step's agreement is "go on" on every rank
        agree_on_stop(run)
        assert run.stop.signal == signal.SIGTERM and not run.out_of_time
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def test_a_second_signal_ends_the_process_at_once():
    """The first SIGINT/SIGTERM asks for a checkpoint at the end of the step; the handler then gives the signal
    back its default action, so a second one (an impatient Ctrl-C) ends the process without waiting."""
    import signal

    from onpolicy_kd.training.loop import StopRequested

    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        stop = StopRequested()
        assert signal.getsignal(signal.SIGINT) == stop._handle
        signal.getsignal(signal.SIGINT)(signal.SIGINT, None)  # what the first Ctrl-C runs
        assert stop.received == signal.SIGINT and signal.getsignal(signal.SIGINT) == signal.SIG_DFL
        assert signal.getsignal(signal.SIGTERM) == stop._handle  # the other signal still asks for a checkpoint
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)

# --- 4. modes that read references see the whole split -----------------------------------------------------------

def few_references(tmp_path: Path, rows: int = 80, with_reference=(70, 75)) -> Path:
    data = tmp_path / "few_refs.jsonl"
    with open(data, "w") as f:
        for i in range(rows):
            record = {"article": f"The Senate count {i} was finalised and the Greens won."}
            if i in with_reference:
                record["highlights"] = f"Greens win seat {i}."
            f.write(json.dumps(record) + "\n")
    return data


def test_sft_trains_on_the_rows_that_have_references(tmp_path, far_pair, isolated_cache, capsys):
    recipe = recipe_for(tmp_path, far_pair, "sft")
    data = few_references(tmp_path)
    assert main([str(recipe), f"data.path={data}", "data.eval_size=4", "train.batch_size=2"]) == 0
    assert "sft trains on the 2 of 76 training rows that have a reference" in capsys.readouterr().out.replace("\n", " ")
    assert steps_logged(tmp_path / "out") == [1, 2, 3]


def test_dry_run_checks_references(tmp_path, far_pair, isolated_cache, capsys):
    recipe = recipe_for(tmp_path, far_pair, "sft")
    none = few_references(tmp_path, with_reference=())
    assert main([str(recipe), "--dry-run", f"data.path={none}", "data.eval_size=4"]) == 2
    assert "reference" in capsys.readouterr().err
    some = few_references(tmp_path)
    assert main([str(recipe), "--dry-run", f"data.path={some}", "data.eval_size=4"]) == 0
    assert "trains on the 2 of 76 training rows" in capsys.readouterr().out.replace("\n", " ")


# --- 5. output problems are found at start-up; a failed checkpoint write loses nothing -----------------------------

def test_an_output_path_that_is_a_file_is_refused_at_start_up(tmp_path, far_pair, isolated_cache, capsys):
    recipe = recipe_for(tmp_path, far_pair, "gkd")
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    for args in ([], ["--dry-run"]):
        assert main([str(recipe), f"train.output_dir={blocker / 'run'}", *args]) == 2
        assert "is a file" in capsys.readouterr().err


def test_an_unwritable_output_folder_is_refused_at_start_up(tmp_path, far_pair, isolated_cache, capsys):
    recipe = recipe_for(tmp_path, far_pair, "gkd")
    # /proc takes no new files, even from root (a read-only mount or a folder without write permission alike)
    assert main([str(recipe), "train.output_dir=/proc/onpolicy-kd-test/run"]) == 2
    assert "cannot be written" in capsys.readouterr().err


def test_too_little_disk_space_is_refused_at_start_up(tmp_path, far_pair, isolated_cache, capsys, monkeypatch):
    import shutil as shutil_module
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil_module, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    assert main([str(recipe_for(tmp_path, far_pair, "gkd"))]) == 2
    assert "GiB free" in capsys.readouterr().err


def test_a_failed_checkpoint_write_says_where_the_last_good_one_is(tmp_path, far_pair, isolated_cache, capsys,
                                                                  monkeypatch):
    from accelerate import Accelerator

    recipe = recipe_for(tmp_path, far_pair, "gkd")
    real_save = Accelerator.save_state
    calls = []

    def full_disk(self, output_dir=None, **kwargs):
        calls.append(output_dir)
        if len(calls) == 2:  # the second checkpoint: the disk is full half-way through
            real_save(self, output_dir, **kwargs)
            raise RuntimeError("basic_ios::clear: iostream error")
        return real_save(self, output_dir, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", full_disk)
    assert main([str(recipe), "train.max_steps=4", "train.save_steps=1"]) == 2
    err = capsys.readouterr().err.replace("\n", " ")
    assert "writing checkpoint" in err and "checkpoint-0000001" in err and "resume with train.resume_from=latest" in err
    assert [p.name for p in (tmp_path / "out" / "checkpoints").iterdir()] == ["checkpoint-0000001"]  # no .tmp left


def test_a_full_disk_loses_no_checkpoint_and_the_export_can_be_redone(tmp_path, far_pair, isolated_cache, capsys,
                                                                       monkeypatch):
    """ENOSPC while a checkpoint is written leaves the earlier checkpoints as they were; ENOSPC while the student is
    exported leaves no half-written final/ and says how to finish; a resume after freeing space exports it."""
    import errno

    from accelerate import Accelerator
    from safetensors.torch import load_file
    from transformers import PreTrainedModel

    recipe = recipe_for(tmp_path, far_pair, "gkd")
    out = tmp_path / "out"
    real_save_state, real_save_pretrained = Accelerator.save_state, PreTrainedModel.save_pretrained

    def full_after_half(real, when):
        def save(self, folder, *args, **kwargs):
            result = real(self, folder, *args, **kwargs)
            if when(Path(folder).name):
                raise OSError(errno.ENOSPC, "No space left on device")
            return result
        return save

    monkeypatch.setattr(Accelerator, "save_state", full_after_half(real_save_state, lambda name: name.endswith("02")))
    assert main([str(recipe), "train.max_steps=3", "train.save_steps=1"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "No space left on device" in err and "checkpoint-0000001" in err and "train.resume_from=latest" in err
    (kept,) = (out / "checkpoints").iterdir()
    assert kept.name == "checkpoint-0000001" and json.loads((kept / "trainer_state.json").read_text())["step"] == 1
    assert load_file(kept / "model.safetensors")  # whole

    monkeypatch.setattr(Accelerator, "save_state", real_save_state)
    monkeypatch.setattr(PreTrainedModel, "save_pretrained",
                        full_after_half(real_save_pretrained, lambda name: name == ".tmp-final"))
    assert main([str(recipe), "train.max_steps=3", "train.save_steps=1", "train.resume_from=latest"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "writing the exported student" in err and "checkpoint-0000003" in err and "Traceback" not in err
    assert not (out / "final").exists() and not (out / ".tmp-final").exists()

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", real_save_pretrained)  # space freed
    assert main([str(recipe), "train.max_steps=3", "train.resume_from=latest"]) == 0
    assert (out / "final" / "model.safetensors").is_file() and steps_logged(out) == [1, 2, 3]


# --- 6. lengths against the models' position limits --------------------------------------------------------------

def test_sequences_longer_than_the_models_positions_are_refused_at_load(tmp_path, far_pair, isolated_cache, capsys):
    recipe = recipe_for(tmp_path, far_pair, "gkd")
    assert main([str(recipe), "rollout.max_new_tokens=1000000000"]) == 2
    err = capsys.readouterr().err.replace("\n", " ")
    assert "max_position_embeddings" in err and "rollout.max_new_tokens=1000000000" in err
    stages = "stages=[{name: a, max_steps: 1}, {name: b, max_steps: 1, rollout: {max_new_tokens: 600}}]"
    assert main([str(recipe), stages, "train.max_steps=null", "--dry-run"]) == 2
    assert "stage 1 (b)" in capsys.readouterr().err


# --- 7. metrics.jsonl survives a torn line and a resume ------------------------------------------------------------

def test_resume_cuts_metrics_back_and_readers_skip_a_torn_line(tmp_path, far_pair, isolated_cache, capsys):
    from onpolicy_kd.metrics_log import read_metrics

    recipe = recipe_for(tmp_path, far_pair, "gkd")
    out = tmp_path / "out"
    assert main([str(recipe), "train.max_steps=4", "train.save_steps=2"]) == 0
    # as if killed after step 4 was logged but before its checkpoint: the last good checkpoint is step 2
    shutil.rmtree(out / "checkpoints" / "checkpoint-0000004")
    shutil.rmtree(out / "final")
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "train/lo')  # torn
    rows, unreadable = read_metrics(out / "metrics.jsonl")
    assert len(rows) == len(metrics_of_lines(out)) - 1 and unreadable == [len(metrics_of_lines(out))]
    assert main([str(recipe), "train.max_steps=4", "train.resume_from=latest"]) == 0
    assert steps_logged(out) == [1, 2, 3, 4]  # steps 3-4 once, the torn line gone


def metrics_of_lines(out: Path) -> list[str]:
    return [line for line in open(out / "metrics.jsonl") if line.strip()]


def test_evaluate_draws_curves_from_a_metrics_file_with_a_torn_line(tmp_path, capsys):
    from onpolicy_kd.evaluation.plots import training_curves

    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 1, "train/loss": 2.0}\n{"step": 2, "train/loss": 1.5}\n{"step": 3, "train/lo')
    assert Path(training_curves(metrics, tmp_path / "curves.png")).is_file()
    assert "skipped 1 unreadable line" in capsys.readouterr().out


# --- 8. bad files and arguments: one message, no traceback -----------------------------------------------------

def run_cli(args: list[str], capsys) -> tuple[int, str]:
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.err + captured.out


@pytest.mark.parametrize("content, expected", [
    ('{"article": "a b c", "highlights": "x"}\n{"article": "broken\n', "line 2"),
    ("", "empty"),
    (b'{"article": "caf\xe9"}\n', "UTF-8"),
])
def test_broken_data_files_name_the_file_and_row(tmp_path, far_pair, isolated_cache, capsys, content, expected):
    data = tmp_path / "bad.jsonl"
    data.write_bytes(content if isinstance(content, bytes) else content.encode())
    code, text = run_cli([str(recipe_for(tmp_path, far_pair, "gkd")), f"data.path={data}"], capsys)
    assert code == 2 and "Traceback" not in text
    assert "bad.jsonl" in text and expected in text


def test_a_missing_data_file_is_reported_before_the_models_load(tmp_path, far_pair, isolated_cache, capsys,
                                                                monkeypatch):
    import onpolicy_kd.training.loop as loop

    monkeypatch.setattr(loop, "load_models", lambda *a, **k: pytest.fail("loaded the models first"))
    code, text = run_cli([str(recipe_for(tmp_path, far_pair, "gkd")), f"data.path={tmp_path / 'nope.jsonl'}"], capsys)
    assert code == 2 and "nope.jsonl" in text


def test_a_non_utf8_recipe_is_a_clear_error(tmp_path, capsys):
    recipe = tmp_path / "latin1.yaml"
    recipe.write_bytes(b"# caf\xe9\nteacher: {name_or_path: x}\n")
    code, text = run_cli([str(recipe)], capsys)
    assert code == 2 and "UTF-8" in text and "latin1.yaml" in text and "Traceback" not in text


def test_a_truncated_weights_file_is_a_clear_error(tmp_path, far_pair, isolated_cache, capsys):
    teacher_dir, _ = far_pair
    broken = tmp_path / "broken_teacher"
    shutil.copytree(teacher_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    code, text = run_cli([str(recipe_for(tmp_path, far_pair, "gkd")), f"teacher.name_or_path={broken}"], capsys)
    assert code == 2 and "model.safetensors" in text and "Traceback" not in text


@pytest.mark.parametrize("override, expected", [
    ("data.template=Summarize {document", "data.template"),
    ("train.max_steps=[1", "train.max_steps"),
    ("train.seed=-1", "train.seed"),
    (f"train.seed={2**32}", "train.seed"),
])
def test_bad_values_are_recipe_errors(tmp_path, far_pair, isolated_cache, capsys, override, expected):
    code, text = run_cli([str(recipe_for(tmp_path, far_pair, "gkd")), override, "--dry-run"], capsys)
    assert code == 2 and expected in text and "Traceback" not in text


def test_a_number_written_as_yaml_1e_4_is_read_as_the_number(tmp_path, far_pair):
    from onpolicy_kd.recipe import load_recipe

    recipe = recipe_for(tmp_path, far_pair, "gkd")
    recipe.write_text(recipe.read_text().replace("lr: 3.0e-3", "lr: 1e-4"))  # YAML 1.1 reads this as a string
    assert load_recipe(recipe).optim.lr == 1e-4


def test_flags_and_overrides_mix_in_any_order(tmp_path, far_pair, isolated_cache, capsys):
    recipe = recipe_for(tmp_path, far_pair, "gkd")
    code, text = run_cli([str(recipe), "--dry-run", "objective.beta=0.7", "objective.divergence=jsd"], capsys)
    assert code == 0 and "beta: 0.7" in text


def test_evaluate_without_a_target_is_a_clear_error(capsys):
    from onpolicy_kd.evaluate import main as evaluate

    code = evaluate(["eval.max_samples=2"])
    captured = capsys.readouterr()
    assert code == 2 and "run folder or a recipe" in captured.err and "Traceback" not in captured.err
