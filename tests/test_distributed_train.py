"""The real `accelerate launch` entry point with real process groups: CPU DDP and DeepSpeed ZeRO-2/3.

Each launch trains the tiny recipe for 2 steps with a checkpoint, then a second launch resumes from it and
trains 2 more. The world size is read back from the checkpoint (a 2-process CPU config that silently ran
one process would show 1). Launches run one at a time (2 processes fill the 2 cores; the race test starts two at
once by design), each on a free port, each with a timeout. DeepSpeed compiles its CPU communication op on first use (~30 s, cached afterwards).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from test_faults import race
from test_train import recipe_for

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow

# hidden-state distillation rides along in two launches: its stitching projections live on the student, so
# DDP must reduce their gradients and ZeRO-3 must gather them (they are called outside the engine's forward)
HIDDEN = ["hidden.weight=1.0", "student.config_overrides={num_hidden_layers: 2, hidden_size: 16, intermediate_size: 32}"]
# a LoRA student rides along under DDP: only its adapters (and the stitching) train, and the export merges them
LORA = ["student.lora={r: 4, target_modules: [q_proj, v_proj]}"]
LAUNCHES = {
    "ddp_2proc": ("cpu_2proc.yaml", 2, {"ACCELERATE_USE_CPU": "true"}, HIDDEN + LORA),
    "zero2_1proc": ("deepspeed_zero2.yaml", 1, {}, []),
    "zero2_2proc": ("deepspeed_zero2.yaml", 2, {}, []),
    "zero3_1proc": ("deepspeed_zero3.yaml", 1, {}, []),
    "zero3_2proc": ("deepspeed_zero3.yaml", 2, {}, HIDDEN),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(config: str, processes: int, env_extra: dict, recipe: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, **env_extra, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "accelerate_configs" / config),
           "--num_processes", str(processes), "--mixed_precision", "no", "--main_process_port", str(free_port()),
           "-m", "onpolicy_kd.train", str(recipe), *overrides]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env, cwd=ROOT)


@pytest.mark.parametrize("name", list(LAUNCHES))
def test_launch_and_resume(name, tmp_path, far_pair, isolated_cache):
    config, processes, env_extra, extra = LAUNCHES[name]
    recipe = recipe_for(tmp_path, far_pair, "gkd")
    out = tmp_path / "out"
    first = launch(config, processes, env_extra, recipe, "train.max_steps=2", "train.batch_size=2", "eval.max_samples=4",
                   *extra)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-4000:]
    (checkpoint,) = (out / "checkpoints").iterdir()
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["num_processes"] == processes and state["step"] == 2
    assert state["data_position"] == 2 * 2 * processes  # every rank took its own prompts
    # the run says how it runs: on the console and as metrics.jsonl's first record
    described = json.loads(open(out / "metrics.jsonl").readline())["run"]
    backend = {"ddp": "DDP (gloo)", "zero2": "DeepSpeed ZeRO-2", "zero3": "DeepSpeed ZeRO-3"}[name.split("_")[0]]
    assert described["backend"].startswith(backend) and described["processes"] == processes
    assert described["effective_batch"] == 2 * processes and f"runs as: {backend}" in first.stdout.replace("\n", " ")

    second = launch(config, processes, env_extra, recipe, "train.max_steps=4", "train.batch_size=2", "eval.max_samples=4",
                    "train.resume_from=latest", *extra)
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-4000:]
    steps = [json.loads(line)["step"] for line in open(out / "metrics.jsonl") if "train/loss" in line]
    assert steps == [1, 2, 3, 4]  # the resumed run continued at step 3
    final = out / "final"
    assert (final / "model.safetensors").is_file() and (final / "README.md").is_file()
    if extra:
        hidden = [json.loads(line)["train/hidden_mse"] for line in open(out / "metrics.jsonl") if "train/hidden_mse" in line]
        assert len(hidden) == 4 and all(h > 0 for h in hidden)
        stitching = load_file(final / "stitching.safetensors")  # gathered (not empty ZeRO-3 shards)
        assert [w.shape for w in stitching.values()] == [(32, 16), (32, 16)]
    if LORA[0] in extra:  # the adapters merged: a plain model's keys
        weights = load_file(final / "model.safetensors")
        assert not any("lora" in k or "base_layer" in k for k in weights)
        assert "runs as: DDP (gloo)" in " ".join(second.stdout.split())
    # the exported student loads in a fresh process (under ZeRO-3 the weights were gathered before saving)
    check = subprocess.run([sys.executable, "-c", (
        "import sys, torch; from transformers import AutoModelForCausalLM as M; "
        "m = M.from_pretrained(sys.argv[1]); "
        "assert all(p.numel() > 0 and torch.isfinite(p).all() for p in m.parameters()); print('ok')"), str(final)],
        capture_output=True, text=True, timeout=120)
    assert check.stdout.strip() == "ok", check.stderr[-2000:]


def test_lora_under_zero3_is_a_clear_error(tmp_path, far_pair, isolated_cache):
    recipe = recipe_for(tmp_path, far_pair, "gkd")
    run = launch("deepspeed_zero3.yaml", 1, {}, recipe, "train.max_steps=1", *LORA)
    assert run.returncode != 0, run.stdout[-2000:] + run.stderr[-2000:]  # the launcher reports its worker's exit 2
    assert "student.lora does not run under DeepSpeed ZeRO-3" in " ".join(run.stderr.split())
    assert "ChildFailedError" in run.stderr and "exitcode: 2" in run.stderr


def worker_pids(launcher_pid: int) -> dict[int, int]:
    """{LOCAL_RANK: pid} of the training processes `accelerate launch` started (read from /proc)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:  # (a process may end while the list is read)
            environ = (entry / "environ").read_bytes().split(b"\0")
            status = (entry / "status").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        parent = int(next(line.split()[1] for line in status.splitlines() if line.startswith("PPid:")))
        rank = next((v.split(b"=", 1)[1] for v in environ if v.startswith(b"LOCAL_RANK=")), None)
        if rank is not None and parent == launcher_pid and b"onpolicy_kd.train" in cmdline:
            found[int(rank)] = int(entry.name)
    return found


def stop_launches(*procs: subprocess.Popen) -> None:
    """SIGKILL each launch's workers, then the launcher (a killed launcher would leave its workers running)."""
    for proc in procs:
        for pid in worker_pids(proc.pid).values():
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        proc.kill()
        proc.communicate()


def launch_background(recipe: Path, *overrides: str, log: Path | None = None) -> subprocess.Popen:
    """A 2-process CPU DDP run started, not waited for (its stdout and stderr into `log` when given: nobody reads
    pipes while it runs)."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "accelerate_configs" / "cpu_2proc.yaml"),
           "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", str(free_port()),
           "-m", "onpolicy_kd.train", str(recipe), *overrides]
    out = open(log, "w") if log else subprocess.PIPE
    return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT if log else subprocess.PIPE, text=True,
                            env=env, cwd=ROOT)


def wait_for_step(proc: subprocess.Popen, metrics: Path, predicate, timeout: float = 300) -> None:
    """Until a step record of metrics.jsonl satisfies predicate (the run still going)."""
    import time

    deadline = time.time() + timeout
    while not (metrics.is_file() and any(predicate(json.loads(line)) for line in metrics.read_text().splitlines()
                                         if line.strip().endswith("}") and "train/loss" in line)):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.5)


@pytest.mark.parametrize("staged", [False, True], ids=["one_stage", "staged"])
def test_sigterm_to_one_rank_stops_every_rank_with_a_checkpoint(staged, tmp_path, far_pair, isolated_cache):
    """The stop flag is agreed at each step: a signal to rank 1 alone makes both ranks checkpoint and exit
    (not rank 1 waiting in the checkpoint barrier while rank 0 trains on), with a non-zero status. In a staged run
    the signal lands in the second stage: the message names the run's step and the stage's, and the checkpoint
    is the stage's, from which the run resumes (still on 2 processes) into that stage."""
    import signal

    recipe = recipe_for(tmp_path, far_pair, "gkd")
    out = tmp_path / "out"
    common = ["train.batch_size=2", "eval.max_samples=4"]
    stages = ["train.max_steps=null", "stages=[{name: a, max_steps: 2}, {name: b, max_steps: 100000}]"] if staged else []
    proc = launch_background(recipe, "train.max_steps=100000", *common, *stages)
    try:
        wait_for_step(proc, out / "metrics.jsonl", (lambda r: r.get("stage") == "b") if staged else (lambda r: True))
        workers = worker_pids(proc.pid)
        assert set(workers) == {0, 1}, workers
        os.kill(workers[1], signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        pytest.fail("the run did not stop after SIGTERM to rank 1 (deadlock)")
    finally:
        if proc.poll() is None:
            stop_launches(proc)
    assert proc.returncode != 0, "a signal-stopped run must not look finished"
    printed = " ".join(stdout.split())
    assert "checkpoint saved; resume with train.resume_from=latest" in printed, stderr[-3000:]
    checkpoints = out / "stages" / "2-b" / "checkpoints" if staged else out / "checkpoints"
    (checkpoint,) = checkpoints.iterdir()
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["num_processes"] == 2 and state["step"] >= 1
    assert not (out / "final").exists()
    if not staged:
        return
    run_step = 2 + state["step"]
    assert f"stopped by signal 15 at step {run_step} (step {state['step']} of stage 2/2 b)" in printed, printed[-2000:]
    assert (out / "stages" / "1-a" / "final" / "model.safetensors").is_file()  # the first stage stays done
    resumed = launch("cpu_2proc.yaml", 2, {"ACCELERATE_USE_CPU": "true"}, recipe, *common, "train.max_steps=null",
                     f"stages=[{{name: a, max_steps: 2}}, {{name: b, max_steps: {state['step'] + 1}}}]",
                     "train.resume_from=latest")
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    steps = [(r.get("stage"), r["step"]) for r in map(json.loads, open(out / "metrics.jsonl")) if "train/loss" in r]
    assert steps[-1] == ("b", run_step + 1) and [s for _, s in steps] == list(range(1, run_step + 2))
    assert (out / "final" / "model.safetensors").is_file()


def test_two_multi_process_runs_into_one_folder_one_trains_the_other_is_refused(tmp_path, far_pair, isolated_cache):
    """The race of two runs into one new folder, each a 2-process launch (the one test that runs two launches at
    once): the lock is the main process's, so exactly one launch trains and the other's rank 0 refuses naming the
    first's rank-0 pid, and that launch ends (its launcher stops the rank that was not refused)."""
    recipe = recipe_for(tmp_path, far_pair, "gkd")
    out = tmp_path / "out"
    args = ("train.max_steps=100000", "train.batch_size=2", "eval.max_samples=4", "train.save_steps=1")
    logs, procs = [tmp_path / "first.log", tmp_path / "second.log"], []
    try:
        refused, owner = race(lambda: launch_background(recipe, *args, log=logs[len(procs)]), procs, timeout=300)
        refused.communicate()
        err = " ".join(logs[procs.index(refused)].read_text().split())
        owner_ranks = worker_pids(owner.pid)
        assert refused.returncode != 0 and "is in use by another run" in err, err[-3000:]
        assert f"pid {owner_ranks[0]} " in err, (owner_ranks, err[-3000:])  # the owner's main process
        wait_for_step(owner, out / "metrics.jsonl", lambda r: r["step"] >= 2)
    finally:
        stop_launches(*procs)
    steps = [json.loads(line)["step"] for line in open(out / "metrics.jsonl")
             if "train/loss" in line and line.strip().endswith("}")]  # (a line the kill cut short is skipped)
    assert steps == list(range(1, len(steps) + 1))  # one run's records


@pytest.mark.parametrize("name", ["ddp_2proc", "zero2_2proc", "zero3_2proc"])
def test_a_step_with_a_non_finite_loss_on_one_rank_changes_nothing(name, tmp_path, far_pair, isolated_cache):
    """The last rank's loss is infinite at step 2: every rank skips that step exactly (weights, optimizer state and
    learning rate as after step 1), and step 3 trains on. Under DeepSpeed the engine steps inside backward, so the
    skip comes from its ZeRO optimizer discarding a step with a non-finite gradient norm (training/phases.py)."""
    config, processes, env_extra, _ = LAUNCHES[name]
    recipe = recipe_for(tmp_path, far_pair, "gkd")
    env = {**os.environ, **env_extra, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "accelerate_configs" / config),
           "--num_processes", str(processes), "--mixed_precision", "no", "--main_process_port", str(free_port()),
           str(ROOT / "tests/helpers/nan_step.py"), str(tmp_path / "digests"), str(recipe), "train.max_steps=3",
           "train.batch_size=2", "eval.max_samples=4", "optim.scheduler=linear"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "non-finite loss at step 2: step skipped" in " ".join(proc.stdout.split())
    for rank in range(processes):
        records = json.loads((tmp_path / "digests" / f"rank{rank}.json").read_text())
        assert [r["skipped"] for r in records] == [False, True, False]
        first, skipped, third = records
        assert skipped["digest"] == first["digest"] and skipped["lr"] == first["lr"]  # nothing moved
        assert third["digest"] != first["digest"] and third["lr"] < first["lr"]  # and training went on


def test_block_stages_under_ddp(tmp_path, far_pair, isolated_cache):
    """Block-by-block stages on 2 DDP processes: a hidden-mode stage leaves the head (and layers past its pair)
    without gradient, which DDP accepts only when told to look for unused parameters; frozen blocks stay put."""
    from test_blocks import block_recipe, layer_keys

    recipe = block_recipe(tmp_path, far_pair)
    run = launch("cpu_2proc.yaml", 2, {"ACCELERATE_USE_CPU": "true"}, recipe, "train.batch_size=2", "eval.max_samples=4")
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    out = tmp_path / "out"
    block1, block2 = (load_file(out / "stages" / name / "final" / "model.safetensors") for name in ("1-block-1", "2-block-2"))
    frozen = [k for k in block2 if k not in layer_keys(block2, 2)]
    assert all((block1[k] == block2[k]).all() for k in frozen)  # block 2 moved layer 2 only
    assert any(not (block1[k] == block2[k]).all() for k in layer_keys(block2, 2))
    assert sorted(load_file(out / "final" / "stitching.safetensors")) == ["projections.0.weight", "projections.1.weight"]


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_the_bounded_head_under_zero3_moves_the_student_as_full_logits_do(tied, tmp_path, far_pair, isolated_cache):
    """2-process ZeRO-3, one on-policy gkd step with all three penalties (the chunked divergence and the chunked
    token terms), plain SGD: with the memory-bounded head each rank gathers the two sharded lm_head weights, and
    the head's gradient goes back into the shards, so the student moves as with full logits. A tied student's head
    is its embedding matrix: the two gradients meet in the one sharded parameter."""
    from onpolicy_kd.models.loading import load_student, load_teacher
    from onpolicy_kd.recipe import StudentConfig, TeacherConfig

    student = {"num_hidden_layers": 2, "tie_word_embeddings": tied}
    recipe = recipe_for(tmp_path, far_pair, "gkd")
    common = ["train.max_steps=1", "train.batch_size=2", "eval.max_samples=4", "objective.lmbda=1.0",
              "penalties.frequency=0.1", "penalties.diversity=0.05", "penalties.entropy=0.01", "optim.name=sgd",
              "optim.lr=1.0", "optim.max_grad_norm=null", f"student.config_overrides={student}"]
    trained, losses = {}, {}
    for backend in ("torch", "chunked"):
        out = tmp_path / backend
        run = launch("deepspeed_zero3.yaml", 2, {}, recipe, *common, f"objective.backend={backend}",
                     f"train.output_dir={out}")
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
        assert f"lm head: {backend}" in run.stdout
        trained[backend] = load_file(out / "final" / "model.safetensors")
        losses[backend] = [json.loads(line)["train/loss"] for line in open(out / "metrics.jsonl") if "train/loss" in line]
    assert losses["chunked"] == pytest.approx(losses["torch"], rel=1e-5)
    teacher, tok = load_teacher(TeacherConfig(name_or_path=str(far_pair[0])))
    initial, _ = load_student(StudentConfig(init="config", config_overrides=student), teacher, tok, seed=5)
    before = initial.state_dict()
    assert sorted(trained["chunked"]) == sorted(trained["torch"])
    for key, full in trained["torch"].items():
        update, bounded = full - before[key], trained["chunked"][key] - before[key]
        assert update.abs().max() > 0, key  # every weight moved (the head and embeddings included)
        # float32 weights round the updates (a weight ~0.02 carries ~2e-9): the updates agree to 0.1% of the largest
        error = (bounded - update).abs().max() / update.abs().max()
        assert error < 1e-3, (key, float(error))


def test_a_student_copied_from_teacher_layers_under_zero3_is_the_copy(tmp_path, far_pair, isolated_cache):
    """Under a ZeRO-3 launch transformers builds models sharded (DeepSpeed's zero.Init) once an Accelerator exists,
    and a student copied from sharded teacher layers would silently keep its random weights. Models load whole
    (zero3_init_flag: false), so the copy starts where a one-process run's does: the same held-out KL."""
    from onpolicy_kd.train import main

    recipe = recipe_for(tmp_path, far_pair, "kd")
    text = recipe.read_text()
    recipe.write_text(text.replace("config_overrides: {num_hidden_layers: 2}", "layer_stride: 2"))
    assert recipe.read_text() != text
    common = ["student.init=teacher_layers", "train.max_steps=1", "train.batch_size=2", "eval.max_samples=4"]
    run = launch("deepspeed_zero3.yaml", 1, {}, recipe, *common, f"train.output_dir={tmp_path / 'zero3'}")
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    assert main([str(recipe), *common, f"train.output_dir={tmp_path / 'one'}"]) == 0

    def before(out: Path) -> float:
        return next(json.loads(line)["eval/reverse_kl"] for line in open(out / "metrics.jsonl") if "eval/reverse_kl" in line)

    assert before(tmp_path / "zero3") == pytest.approx(before(tmp_path / "one"), rel=1e-4)


def test_the_prompt_kept_from_the_rollout_under_ddp_moves_the_student_as_the_whole_forward(tmp_path, far_pair,
                                                                                           isolated_cache):
    """2-process DDP, one on-policy step, plain SGD: the loss continuing from the rollout's prompt keys and values
    (the prefill ran on the unwrapped student, outside DDP's forward) gives the gradient DDP averages as the whole
    forward does (here forced by gradient checkpointing, which keeps the prompt run twice)."""
    recipe = recipe_for(tmp_path, far_pair, "gkd")
    common = ["train.max_steps=1", "train.batch_size=2", "eval.max_samples=4", "objective.lmbda=1.0",
              "penalties.frequency=0.1", "optim.name=sgd", "optim.lr=1.0", "optim.max_grad_norm=null"]
    trained = {}
    for name, extra in (("once", []), ("twice", ["student.gradient_checkpointing=true"])):
        out = tmp_path / name
        run = launch("cpu_2proc.yaml", 2, {"ACCELERATE_USE_CPU": "true"}, recipe, *common, *extra,
                     f"train.output_dir={out}")
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
        assert f"student prompt: run {name}" in run.stdout
        trained[name] = load_file(out / "final" / "model.safetensors")
    for key, value in trained["twice"].items():
        torch.testing.assert_close(trained["once"][key], value, rtol=1e-4, atol=1e-6, msg=key)


def test_attention_relations_under_ddp_with_lora(tmp_path, far_pair, isolated_cache):
    """hidden.loss=attention_relation alone (mode hidden: no next-token loss) on 2 DDP processes, the student
    narrower than the teacher and LoRA-wrapped: the hooks read q_proj and v_proj through their adapters, so the
    relation loss is all that gives the adapters a gradient (a non-zero gradient norm after DDP's all-reduce); each
    step logs the relation loss of both layer pairs, and the export is a plain model with no stitching."""
    recipe = recipe_for(tmp_path, far_pair, "gkd")
    out = tmp_path / "out"
    run = launch("cpu_2proc.yaml", 2, {"ACCELERATE_USE_CPU": "true"}, recipe, "train.max_steps=2", "train.batch_size=2",
                 "eval.max_samples=4", HIDDEN[1], "hidden.weight=1.0", "hidden.loss=attention_relation",
                 "objective.mode=hidden", *LORA)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    rows = [json.loads(line) for line in open(out / "metrics.jsonl") if "train/hidden_attention_relation" in line]
    assert len(rows) == 2 and all(r["train/hidden_attention_relation"] > 0 for r in rows)
    assert all(r["train/loss"] == pytest.approx(r["train/hidden_attention_relation"], rel=1e-5) for r in rows)
    assert all(r["optim/grad_norm"] > 0 for r in rows)
    assert all(r["hidden/attention_relation_layer_1_to_2"] > 0 and r["hidden/attention_relation_layer_2_to_3"] > 0
               for r in rows)
    final = out / "final"
    assert not (final / "stitching.safetensors").exists()
    weights = load_file(final / "model.safetensors")
    assert not any("lora" in k or "base_layer" in k or "stitching" in k for k in weights)


def test_logit_mse_under_ddp_moves_the_student_as_one_process_does(tmp_path, far_pair, isolated_cache):
    """divergence=logit_mse on 2 DDP processes (2 prompts each) takes the same SGD step as one process on the same
    4 prompts: the loss is divided by the step's global token count, so DDP's averaging reproduces the whole batch."""
    from onpolicy_kd.train import main

    recipe = recipe_for(tmp_path, far_pair, "kd")
    common = ["train.max_steps=1", "eval.max_samples=4", "objective.divergence=logit_mse", "optim.name=sgd",
              "optim.lr=1.0", "optim.max_grad_norm=null"]
    run = launch("cpu_2proc.yaml", 2, {"ACCELERATE_USE_CPU": "true"}, recipe, *common, "train.batch_size=2",
                 f"train.output_dir={tmp_path / 'ddp'}")
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    assert main([str(recipe), *common, "train.batch_size=4", f"train.output_dir={tmp_path / 'one'}"]) == 0
    rows = {name: [json.loads(line) for line in open(tmp_path / name / "metrics.jsonl") if "train/logit_mse" in line]
            for name in ("ddp", "one")}
    assert rows["one"][0]["train/logit_mse"] > 0  # a gradient to take (the two models' logits differ)
    assert rows["ddp"][0]["train/logit_mse"] == pytest.approx(rows["one"][0]["train/logit_mse"], rel=1e-4)
    ddp = load_file(tmp_path / "ddp" / "final" / "model.safetensors")
    one = load_file(tmp_path / "one" / "final" / "model.safetensors")
    for key, value in one.items():
        torch.testing.assert_close(ddp[key], value, rtol=1e-4, atol=1e-6, msg=key)
