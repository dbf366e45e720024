"""Every key of the recipe schema changes what a run does, or is an error: no key is silently ignored.

The test walks the schema. For each key it runs a tiny two-step training twice, in a context where the key
applies (e.g. `objective.beta` with the JSD), once as it is and once with the key changed, and compares what
the runs did (the changed run must succeed, unless the probe says its change is an error by design, `@error`,
which must then be a recipe error naming the key): the trained weights, metrics.jsonl (timings left out), the files written, the exit status, and
what the run asked its libraries for (model and tokenizer loading arguments, the tokenisation's processes and
cache file, the sampling calls, the divergence backend and chunk size, gradient checkpointing and the
attention implementation of the student, deterministic algorithms, the live console, the sample tables).
A key whose change leaves all of that identical fails the test, and so does a schema key missing from the
table below (a new key must say how it shows).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from onpolicy_kd.recipe import Recipe
from onpolicy_kd.recipe.loading import _schema_keys

from conftest import save_tiny_llama, train_tokenizer, CORPUS, write_recipe


def schema_leaves() -> list[str]:
    from pydantic import BaseModel

    keys = _schema_keys(Recipe)
    return sorted(".".join(k) for k, field in keys.items()
                  if not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)))


PG = ["objective.mode=pg"]
ADAPTIVE_CONTEXT = ["objective.lmbda=0.5", "eval.eval_steps=1", "train.max_steps=4"]
REPLAYING = ["replay.size=8", "replay.share=1.0"]  # every student step after the first reuses
SEQKD = ["objective.mode=seqkd"]  # trains on the teacher's text (teacher_text.*)
PRETRAINED = ["student.init=pretrained", "student.layer_stride=null", "student.name_or_path={student}"]
# key -> (context overrides, the change); values in {braces} are filled from the fixture's paths
PROBES: dict[str, tuple[list[str], list[str]]] = {
    "teacher.name_or_path": ([], ["teacher.name_or_path={other_teacher}"]),
    "teacher.revision": ([], ["@error", "teacher.revision=main"]),  # a local teacher: an error
    "teacher.tokenizer": ([], ["teacher.tokenizer={other_teacher}"]),
    "teacher.dtype": ([], ["teacher.dtype=bfloat16"]),
    "teacher.trust_remote_code": ([], ["teacher.trust_remote_code=true"]),
    "teacher.attn_implementation": ([], ["teacher.attn_implementation=eager"]),
    "teacher.quantization": ([], ["teacher.quantization={bits: 8}"]),
    "student.init": ([], ["student.init=config", "student.layer_stride=null",
                          "student.config_overrides={num_hidden_layers: 2}"]),
    "student.name_or_path": (PRETRAINED, ["student.name_or_path={other_student}"]),
    "student.revision": (PRETRAINED, ["@error", "student.revision=main"]),  # a local student: an error
    "student.tokenizer": (PRETRAINED, ["student.tokenizer={other_teacher}"]),
    "student.config_overrides": (["student.init=config", "student.layer_stride=null",
                                  "student.config_overrides={num_hidden_layers: 2}"],
                                 ["student.config_overrides={num_hidden_layers: 1}"]),
    "student.layer_stride": ([], ["student.layer_stride=3"]),
    "student.keep_layers": (["student.layer_stride=null", "student.keep_layers=[0, 2]"], ["student.keep_layers=[0, 1]"]),
    "student.dtype": ([], ["student.dtype=bfloat16"]),
    "student.trust_remote_code": (PRETRAINED, ["student.trust_remote_code=true"]),
    "student.attn_implementation": ([], ["student.attn_implementation=eager"]),
    "student.gradient_checkpointing": ([], ["student.gradient_checkpointing=true"]),
    "student.lora": ([], ["student.lora={r: 2}"]),
    "student.bitnet": ([], ["student.bitnet=true"]),
    "data.path": ([], ["data.path={other_data}"]),
    "data.name": ([], ["@error", "data.name=3.0.0"]),  # a local file: an error
    "data.split": ([], ["data.split=train[:40]"]),
    "data.eval_split": ([], ["data.eval_split=train[50:60]", "data.eval_size=0.05"]),
    "data.eval_size": ([], ["data.eval_size=6"]),
    # held-out prompts from another file (the base recipe's eval_size applies only without one)
    "data.eval_path": ([], ["data.eval_path={other_data}", "data.eval_size=0.05"]),
    "data.eval_columns": (["data.eval_path={other_data}", "data.eval_size=0.05"],
                          ["data.eval_columns={document: highlights, reference: article}"]),
    "data.format": ([], ["data.format=instruction", "data.columns={instruction: article, reference: highlights}"]),
    "data.columns": (["objective.mode=sft"], ["data.columns={document: article, reference: article}"]),
    "data.template": ([], ["data.template='{document} TL;DR:'"]),
    "data.chat_template": ([], ["data.chat_template=true"]),
    "data.system_prompt": (["data.chat_template=true", "data.max_prompt_tokens=64"], ["data.system_prompt=Be brief."]),
    # two prompt fields (the instruction format's highlights + article: ~11 + ~70 tokens) and a limit that only the
    # article fits alone: the default cuts the article, the change cuts the instruction
    "data.truncate_field": (["data.format=instruction", "data.max_prompt_tokens=84",
                             "data.columns={instruction: highlights, context: article, reference: highlights}"],
                            ["data.truncate_field=instruction"]),
    "data.max_prompt_tokens": ([], ["data.max_prompt_tokens=12"]),
    "data.max_response_tokens": (["objective.mode=sft"], ["data.max_response_tokens=2"]),
    "data.text_prompt_tokens": (["data.path={text_data}"], ["data.text_prompt_tokens=4"]),
    "data.max_samples": ([], ["data.max_samples=20"]),
    "data.cache_dir": ([], ["data.cache_dir={cache2}"]),
    "data.num_proc": ([], ["data.num_proc=2"]),
    "rollout.max_new_tokens": ([], ["rollout.max_new_tokens=2"]),
    "rollout.temperature": ([], ["rollout.temperature=0.6"]),
    "rollout.top_k": ([], ["rollout.top_k=3"]),
    "rollout.top_p": ([], ["rollout.top_p=0.3"]),
    "rollout.alpha": ([], ["rollout.alpha=0.4"]),
    "rollout.do_sample": ([], ["rollout.do_sample=false"]),
    "rollout.stop_strings": (["rollout.max_new_tokens=8"], ["rollout.stop_strings=[' ']"]),
    "rollout.batch_size": ([], ["rollout.batch_size=1"]),
    "objective.mode": ([], ["objective.mode=pg"]),
    "objective.divergence": ([], ["objective.divergence=forward_kl"]),
    "objective.beta": (["objective.divergence=jsd"], ["objective.beta=0.2"]),
    "objective.skew": (["objective.divergence=skew_forward_kl"], ["objective.skew=0.4"]),
    "objective.temperature": ([], ["objective.temperature=0.5"]),
    "objective.lmbda": ([], ["objective.lmbda=0.0"]),
    "objective.seq_kd": (["objective.lmbda=0.0"], ["objective.seq_kd=true"]),
    "objective.lmbda_schedule": (ADAPTIVE_CONTEXT, ["objective.lmbda_schedule=adaptive"]),
    # a high learning rate makes the held-out KL of the 1-step evaluations rise at least once in 4 steps
    "objective.lmbda_step": ([*ADAPTIVE_CONTEXT, "objective.lmbda_schedule=adaptive", "optim.lr=0.05"],
                             ["objective.lmbda_step=0.9"]),
    "replay.size": ([], ["replay.size=4"]),
    "replay.share": (["replay.size=4"], ["replay.share=1.0"]),
    "replay.reuse": ([*REPLAYING, "train.max_steps=4"], ["replay.reuse=2"]),  # step 3 reuses instead of sampling
    "replay.max_age": ([*REPLAYING, "train.max_steps=3", "replay.reuse=3"], ["replay.max_age=1"]),
    "rollout.truncated": (["rollout.max_new_tokens=2"], ["rollout.truncated=mask"]),
    "rollout.truncation_penalty": (["rollout.max_new_tokens=2", "rollout.truncated=penalise"],
                                   ["rollout.truncation_penalty=5.0"]),
    "objective.discount": (PG, ["objective.discount=0.5"]),
    "objective.length_norm": (PG, ["objective.length_norm=false"]),
    "objective.single_step": (PG, ["objective.single_step=false"]),
    "objective.importance": ([*PG, "rollout.alpha=0.4"], ["objective.importance=sequence"]),
    "objective.is_clip": ([*PG, "rollout.alpha=0.4"], ["objective.is_clip=1.01"]),
    "objective.pg_baseline": (PG, ["objective.pg_baseline=none"]),
    "objective.ppo_epochs": (PG, ["objective.ppo_epochs=2"]),
    "objective.ppo_clip": ([*PG, "objective.ppo_epochs=3", "optim.lr=0.05"], ["objective.ppo_clip=0.01"]),
    "objective.lm_coef": (PG, ["objective.lm_coef=0.5"]),
    "objective.backend": ([], ["objective.backend=torch"]),
    "objective.chunk_size": ([], ["objective.chunk_size=1"]),
    "objective.prompt_weight": ([], ["objective.prompt_weight=1.0"]),
    "penalties.frequency": ([], ["penalties.frequency=0.5"]),
    "penalties.diversity": ([], ["penalties.diversity=0.5"]),
    "penalties.entropy": ([], ["penalties.entropy=0.5"]),
    "penalties.entropy_floor": (["penalties.entropy=0.5"], ["penalties.entropy_floor=1.0"]),
    "penalties.shape_reward": ([*PG, "penalties.entropy=0.5"], ["penalties.shape_reward=true"]),
    "hidden.weight": ([], ["hidden.weight=0.5"]),
    "hidden.loss": (["hidden.weight=0.5"], ["hidden.loss=cosine"]),
    "hidden.layers": (["hidden.weight=0.5"], ["hidden.layers=[[1, 1]]"]),
    "hidden.relation_heads": (["hidden.weight=0.5", "hidden.loss=attention_relation"], ["hidden.relation_heads=2"]),
    "optim.name": ([], ["optim.name=sgd"]),
    "optim.lr": ([], ["optim.lr=0.01"]),
    "optim.weight_decay": ([], ["optim.weight_decay=0.5"]),
    "optim.betas": ([], ["optim.betas=[0.5, 0.9]"]),
    "optim.eps": ([], ["optim.eps=0.001"]),
    "optim.momentum": (["optim.name=sgd"], ["optim.momentum=0.9"]),
    "optim.scheduler": ([], ["optim.scheduler=linear"]),
    "optim.warmup_steps": ([], ["optim.warmup_steps=1"]),
    "optim.warmup_ratio": ([], ["optim.warmup_ratio=0.5"]),
    "optim.max_grad_norm": ([], ["optim.max_grad_norm=0.001"]),
    "train.max_steps": ([], ["train.max_steps=3"]),
    "train.max_time": (["train.max_steps=50"], ["train.max_time=0.01"]),  # stops after the first step
    "train.batch_size": ([], ["train.batch_size=3"]),
    "train.grad_accum": ([], ["train.grad_accum=2"]),
    "train.seed": ([], ["train.seed=6"]),
    "train.output_dir": ([], ["train.output_dir={out2}"]),
    "train.save_steps": ([], ["train.save_steps=1"]),
    "train.save_total_limit": (["train.save_steps=1", "train.max_steps=3"], ["train.save_total_limit=1"]),
    # the context starts over in the folder (train.overwrite), the change continues the run that is there
    "train.resume_from": (["@prior-run", "train.overwrite=true"], ["train.resume_from=latest"]),
    "train.overwrite": (["@prior-run", "@may-fail"], ["train.overwrite=true"]),  # refused, then cleared and run
    "train.mixed_precision": ([], ["train.mixed_precision=bf16"]),
    "train.push_to_hub": ([], ["train.push_to_hub=true", "train.hub_model_id=me/student"]),
    "train.hub_model_id": (["train.push_to_hub=true", "train.hub_model_id=me/student"], ["train.hub_model_id=me/other"]),
    "train.hub_private": (["train.push_to_hub=true", "train.hub_model_id=me/student"], ["train.hub_private=true"]),
    "train.epochs": (["train.max_steps=null", "train.epochs=0.05"], ["train.epochs=0.1"]),  # 2 steps, then 3
    "train.deterministic": ([], ["train.deterministic=true"]),
    "train.trainable": ([], ["train.trainable=[layer 1]"]),  # the other weights stay as initialised
    # weights blown up by the first step make every later loss non-finite (kd: no sampling to fail first);
    # both runs end with an error, at different steps
    "train.max_bad_steps": (["@may-fail", "objective.mode=kd", "optim.lr=1.0e+30", "optim.max_grad_norm=null",
                             "train.max_steps=4"], ["train.max_bad_steps=1"]),
    "eval.eval_steps": ([], ["eval.eval_steps=1"]),
    "eval.max_samples": ([], ["eval.max_samples=1"]),
    "eval.batch_size": ([], ["eval.batch_size=1"]),
    "eval.max_new_tokens": ([], ["eval.max_new_tokens=2"]),
    "eval.seed": ([], ["eval.seed=5"]),
    "eval.full": ([], ["eval.full=true"]),
    "eval.temperature": ([], ["eval.temperature=0.5"]),
    "eval.samples_per_prompt": ([], ["eval.samples_per_prompt=1"]),
    "eval.answer_pattern": ([], ["eval.answer_pattern='seat ([0-9]+)'"]),  # the references say "Greens win seat N."
    "logging.log_steps": ([], ["logging.log_steps=2"]),
    "logging.sample_steps": ([], ["logging.sample_steps=1"]),
    "logging.num_samples": (["logging.sample_steps=1"], ["logging.num_samples=1"]),
    "logging.report_to": ([], ["logging.report_to=[tensorboard]"]),
    "logging.run_name": (["logging.report_to=[tensorboard]"], ["logging.run_name=other"]),
    "logging.live": ([], ["logging.live=true"]),
    "eval.collapse_distinct1": (["eval.max_new_tokens=12"], ["eval.collapse_distinct1=1.0"]),  # a console warning
    "eval.stop_on_collapse": (["eval.max_new_tokens=12", "eval.collapse_distinct1=1.0", "eval.eval_steps=1",
                               "train.max_steps=3"],
                              ["eval.stop_on_collapse=true"]),
    "teacher_text.cache": (SEQKD, ["teacher_text.cache=true"]),
    "teacher_text.do_sample": (SEQKD, ["teacher_text.do_sample=true"]),
    "teacher_text.temperature": ([*SEQKD, "teacher_text.do_sample=true"], ["teacher_text.temperature=0.6"]),
    "teacher_text.top_k": ([*SEQKD, "teacher_text.do_sample=true"], ["teacher_text.top_k=3"]),
    "teacher_text.top_p": ([*SEQKD, "teacher_text.do_sample=true"], ["teacher_text.top_p=0.3"]),
    "teacher_text.max_new_tokens": (SEQKD, ["teacher_text.max_new_tokens=2"]),
    "teacher_text.stop_strings": ([*SEQKD, "rollout.max_new_tokens=8"], ["teacher_text.stop_strings=[' ']"]),
    # KD from the cached top-1: a different loss than the dense one (the weights differ)
    "teacher_text.topk": (["objective.mode=gkd", "objective.seq_kd=true", "objective.lmbda=0", "teacher_text.cache=true"],
                          ["teacher_text.topk=1"]),
    # ULD instead of the divergence (one tokenizer here: the probe is the loss, the full-logits head)
    "objective.cross_tokenizer": (PRETRAINED, ["objective.cross_tokenizer=uld"]),
    "teacher_text.samples_per_prompt": ([*SEQKD, "teacher_text.do_sample=true", "teacher_text.cache=true"],
                                        ["teacher_text.samples_per_prompt=3"]),
    "stages": ([], ["stages=[{name: a, max_steps: 1}, {name: b, max_steps: 1, optim: {lr: 0.01}}]",
                    "train.max_steps=null"]),
}


def test_every_schema_key_has_a_probe():
    assert set(schema_leaves()) == set(PROBES), (set(schema_leaves()) ^ set(PROBES))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Two teachers and two students sharing one tokenizer, summarisation data, plain-text data."""
    root = tmp_path_factory.mktemp("keys")
    tok = train_tokenizer(CORPUS, chat_template=True)
    paths = {
        "teacher": save_tiny_llama(root / "teacher", tok, layers=3, hidden=32, seed=0),
        "other_teacher": save_tiny_llama(root / "teacher2", tok, layers=3, hidden=32, seed=1),
        "student": save_tiny_llama(root / "student", tok, layers=2, hidden=32, seed=2),
        "other_student": save_tiny_llama(root / "student2", tok, layers=2, hidden=32, seed=3),
    }
    from transformers import AutoModelForCausalLM

    for name in ("teacher", "other_teacher"):  # sharp distributions, far from the students' (as trained models are)
        model = AutoModelForCausalLM.from_pretrained(paths[name])
        with torch.no_grad():
            model.lm_head.weight *= 20
        model.save_pretrained(paths[name])
    for name, offset in (("data", 0), ("other_data", 100)):
        paths[name] = root / f"{name}.jsonl"
        with open(paths[name], "w") as f:
            for i in range(64):
                f.write(json.dumps({"article": f"The Senate count {i + offset} was finalised and the Greens won. " * 2,
                                    "highlights": f"Greens win seat {i + offset}."}) + "\n")
    paths["text_data"] = root / "text.jsonl"
    with open(paths["text_data"], "w") as f:
        for i in range(40):
            f.write(json.dumps({"text": f"A bushfire near the town {i} forced hundreds of people from their homes."})
                    + "\n")
    return root, paths


def base_recipe(folder: Path, paths: dict) -> Path:
    return write_recipe(folder / "base.yaml", f"""
        teacher:
          name_or_path: {paths["teacher"]}
        student:
          init: teacher_layers
          layer_stride: 2
        data:
          path: {paths["data"]}
          eval_size: 4
          max_prompt_tokens: 24
          max_response_tokens: 6
        rollout:
          max_new_tokens: 4
        optim:
          lr: 3.0e-3
        train:
          max_steps: 2
          batch_size: 2
          seed: 5
          output_dir: {folder / "out"}
        eval:
          max_samples: 2
          batch_size: 2
          max_new_tokens: 3
        logging:
          live: false
    """)


class Spy:
    """Records what a run asks its libraries for."""

    def __init__(self, monkeypatch) -> None:
        self.calls: list = []
        import onpolicy_kd.data.loading as data_loading
        import onpolicy_kd.evaluation.heldout as heldout
        import onpolicy_kd.models.loading as models_loading
        import onpolicy_kd.objectives.loss as loss
        import onpolicy_kd.training.loop as loop
        import onpolicy_kd.training.monitor as monitor
        import onpolicy_kd.training.phases as phases

        def wrap(module, name, record):
            original = getattr(module, name)

            def spy(*args, **kwargs):
                out = original(*args, **kwargs)
                self.calls.append((name, record(args, kwargs, out)))
                return out

            monkeypatch.setattr(module, name, spy)

        wrap(models_loading, "_from_pretrained", lambda a, k, out: (str(a[1].location), sorted(
            (key, str(v)) for key, v in k.items())))
        wrap(models_loading, "prepare_student", lambda a, k, out: (
            a[0].is_gradient_checkpointing, a[0].config._attn_implementation, str(a[0].dtype)))
        wrap(data_loading, "_tokenize", lambda a, k, out: (str(a[2]), a[4]))
        sampling = ("max_new_tokens", "temperature", "top_k", "top_p", "alpha", "do_sample", "stop_strings")
        for module in (phases, heldout):
            wrap(module, "rollout", lambda a, k, out: (tuple(a[2].shape), tuple(str(k.get(s)) for s in sampling)))
        wrap(loss, "linear_divergence", lambda a, k, out: (k.get("backend"), k.get("chunk_size")))
        wrap(loop, "set_seed", lambda a, k, out: (a, sorted(k.items()), torch.are_deterministic_algorithms_enabled()))
        wrap(monitor.Monitor, "samples", lambda a, k, out: len(a[2]))
        import accelerate

        # the Hub, stood in for: a push records the repository and its privacy
        import huggingface_hub

        import onpolicy_kd.training.publish as publish

        spy = self

        class Hub:
            def create_repo(self, repo_id, private=False, **kwargs):
                spy.calls.append(("create_repo", repo_id, private))

            def upload_folder(self, folder_path, repo_id, **kwargs):
                spy.calls.append(("upload_folder", repo_id, sorted(p.name for p in Path(folder_path).iterdir())))

        monkeypatch.setattr(publish, "hub_reachable", lambda: True)
        monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_test")
        monkeypatch.setattr(huggingface_hub, "HfApi", Hub)
        wrap(accelerate.Accelerator, "init_trackers", lambda a, k, out: (a[1:], sorted(
            (key, str(v)) for key, v in k.get("init_kwargs", {}).items())))

        original_init = monitor.Monitor.__init__

        def init(monitor_self, *args, **kwargs):
            original_init(monitor_self, *args, **kwargs)
            self.calls.append(("live", monitor_self.live_mode))

        monkeypatch.setattr(monitor.Monitor, "__init__", init)


def observe(recipe: Path, overrides: list[str], monkeypatch, capsys) -> dict:
    from onpolicy_kd.console import console
    from onpolicy_kd.train import main

    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # a new run may ask for another mixed precision
    spy = Spy(monkeypatch)
    monkeypatch.setattr(console, "_force_terminal", True)  # so that logging.live can show
    status = main([str(recipe), *overrides])
    torch.use_deterministic_algorithms(False)
    out_dir = Path([o for o in overrides if o.startswith("train.output_dir=")][-1].split("=", 1)[1])
    files, weights, metrics = [], None, []
    if out_dir.is_dir():
        files = sorted(str(p.relative_to(out_dir)) for p in out_dir.rglob("*") if "tfevents" not in p.name) + [
            "tensorboard" for p in out_dir.rglob("*tfevents*")]
        final = out_dir / "final" / "model.safetensors"
        weights = hashlib.sha256(final.read_bytes()).hexdigest() if final.is_file() else None
        if (out_dir / "metrics.jsonl").is_file():
            for line in (out_dir / "metrics.jsonl").read_text().splitlines():
                row = json.loads(line)
                metrics.append({k: v for k, v in row.items() if not k.startswith(("time/", "perf/"))})
    printed = capsys.readouterr()  # kept (not compared) to debug a failing key
    warnings = [line for line in printed.out.splitlines() if "warning:" in line]
    return {"log": printed.err[-2000:], "warnings": warnings, "status": status, "output": str(out_dir), "files": files, "weights": weights, "metrics": metrics,
            "calls": spy.calls}


@pytest.mark.slow
@pytest.mark.parametrize("key", sorted(PROBES))
def test_changing_the_key_changes_the_run(key, world, tmp_path, monkeypatch, capsys):
    root, paths = world
    fill = {**{k: str(v) for k, v in paths.items()}, "cache2": str(tmp_path / "cache2"), "out2": str(tmp_path / "out2")}
    monkeypatch.setenv("ONPOLICY_KD_CACHE_DIR", str(tmp_path / "cache"))
    context, change = PROBES[key]
    recipe = base_recipe(tmp_path, paths)
    def filled(item: str) -> str:
        for name, value in fill.items():
            item = item.replace("{" + name + "}", value)
        return item

    markers = {c for c in context + change if c.startswith("@")}
    may_fail = "@may-fail" in markers
    expect_error = "@error" in markers  # a change that is a recipe error by design (it names the key)
    prior_run = "@prior-run" in markers
    context = [filled(c) for c in context if c not in markers]
    change = [filled(c) for c in change if c not in markers]
    out = tmp_path / "out"
    runs = []
    for overrides in (context, context + change):
        shutil.rmtree(out, ignore_errors=True)
        if prior_run:  # a checkpoint of another run (another learning rate, one step) waits in the output folder
            observe(recipe, [f"train.output_dir={out}", "optim.lr=0.05", "train.max_steps=1"], monkeypatch, capsys)
            monkeypatch.undo()
            monkeypatch.setenv("ONPOLICY_KD_CACHE_DIR", str(tmp_path / "cache"))
        runs.append(observe(recipe, [f"train.output_dir={out}", *overrides], monkeypatch, capsys))
        monkeypatch.undo()
        monkeypatch.setenv("ONPOLICY_KD_CACHE_DIR", str(tmp_path / "cache"))
    as_is, changed = runs
    assert as_is["status"] == 0 or may_fail, f"{key}: the context run failed"
    # the change must change the run, not break it: a wrongly raised error would also "change" the run
    if expect_error:
        assert changed["status"] == 2 and key in changed["log"], f"{key}: expected a recipe error naming the key"
    elif not may_fail:
        assert changed["status"] == 0, f"{key}: the changed run failed: {changed['log'][-800:]}"
    differs = [part for part in as_is if part != "log" and as_is[part] != changed[part]]
    assert differs, f"changing {key} ({change}) left the run identical"
