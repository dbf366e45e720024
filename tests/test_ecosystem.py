"""Fitting the Hugging Face ecosystem: experiment trackers through accelerate (logging.report_to) and the run's
description at start-up. (TRL's dataset formats: tests/test_data.py; train.epochs: tests/test_train.py.)"""

from __future__ import annotations

import json

import pytest
import torch

from onpolicy_kd.train import main

from test_train import metrics_of, recipe_for


def test_trackers_write_their_files_with_the_run_name_and_the_recipe(tmp_path, far_pair, isolated_cache, monkeypatch):
    """TensorBoard (event files with the step metrics and the recipe as hyper-parameters) and W&B in offline mode
    (a local run folder with the metrics, the run's name and the recipe as config): no network needed."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    recipe = recipe_for(tmp_path, far_pair, "gkd")
    assert main([str(recipe), "logging.report_to=[tensorboard, wandb]", "logging.run_name=trial-7"]) == 0
    out = tmp_path / "out"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = [p for p in out.rglob("events.out.tfevents.*") if p.parent.name == "onpolicy_kd"]
    acc = EventAccumulator(str(events.parent))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3]
    assert acc.Scalars("eval/reverse_kl")[-1].value == pytest.approx(metrics_of(out)[-1]["eval/reverse_kl"], rel=1e-6)
    (hparams,) = out.rglob("hparams.yml")
    assert "objective.mode: gkd" in hparams.read_text() and "train.max_steps: 3" in hparams.read_text()

    (run_dir,) = (out / "wandb").glob("offline-run-*")
    (wandb_file,) = run_dir.glob("*.wandb")
    from wandb.proto import wandb_internal_pb2

    names, config, losses = set(), {}, []
    for data in wandb_records(wandb_file.read_bytes()):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            names.add(record.run.display_name)
            config |= {item.key: json.loads(item.value_json) for item in record.run.config.update}
        elif kind == "config":
            config |= {item.key: json.loads(item.value_json) for item in record.config.update}
        elif kind == "history":
            losses += [json.loads(item.value_json) for item in record.history.item
                       if (item.key or "/".join(item.nested_key)) == "train/loss"]
    assert names == {"trial-7"}
    assert config["objective.mode"] == "gkd" and config["train.batch_size"] == 4
    assert losses == pytest.approx([r["train/loss"] for r in metrics_of(out) if "train/loss" in r], rel=1e-6)


def wandb_records(raw: bytes) -> list[bytes]:
    """The protobuf records of a W&B offline run file (wandb ships no Python reader for it): a 7-byte header
    (':W&B', magic, version), then LevelDB's log format: 32 KiB blocks of chunks, each crc32 (4 bytes), length (2,
    little-endian), type (1: full, 2: first, 3: middle, 4: last) and data; a block's tail under 7 bytes is padding."""
    assert raw[:4] == b":W&B"
    records, pending, pos = [], b"", 7
    while pos + 7 <= len(raw):
        room = 32768 - pos % 32768
        if room < 7:
            pos += room
            continue
        length, kind = int.from_bytes(raw[pos + 4 : pos + 6], "little"), raw[pos + 6]
        data, pos = raw[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0 and length == 0:  # zero padding at the end of the file
            break
        pending = data if kind in (1, 2) else pending + data
        if kind in (1, 4):
            records.append(pending)
    return records


def test_a_tracker_that_is_not_installed_is_a_clear_error_before_loading(tmp_path, far_pair, isolated_cache, capsys,
                                                                        monkeypatch):
    import accelerate.tracking

    monkeypatch.setattr(accelerate.tracking, "get_available_trackers", lambda: ["tensorboard"])
    recipe = recipe_for(tmp_path, far_pair, "gkd")
    assert main([str(recipe), "logging.report_to=[tensorboard, mlflow]"]) == 2
    err = capsys.readouterr().err.replace("\n", " ")
    assert "logging.report_to: mlflow not installed; install it (pip install mlflow)" in err
    assert not (tmp_path / "out" / "metrics.jsonl").exists()  # stopped before anything ran
    assert main([str(recipe), "logging.tensorboard=true"]) == 2
    assert "logging.tensorboard is now logging.report_to: [tensorboard]" in capsys.readouterr().err.replace("\n", " ")
    assert main([str(recipe), "logging.report_to=[tensorboard, neptune]"]) == 2
    assert "logging.report_to" in capsys.readouterr().err


def test_the_run_says_how_it_runs(tmp_path, far_pair, isolated_cache, capsys):
    recipe = recipe_for(tmp_path, far_pair, "gkd")
    assert main([str(recipe), "train.grad_accum=2", "train.max_steps=1"]) == 0
    printed = capsys.readouterr().out.replace("\n", " ")
    assert ("runs as: single process, 1 process on cpu; student float32, teacher float32, mixed precision no; "
            "batch 4 x 2 accumulation x 1 process = 8 prompts per step") in " ".join(printed.split())
    first = metrics_of(tmp_path / "out")[0]
    assert first["step"] == 0 and first["run"]["effective_batch"] == 8 and first["run"]["backend"] == "single process"


# --- Hub export ---------------------------------------------------------------------------------------------------

class FakeHub:
    """Stands in for huggingface_hub.HfApi: records the repository made and the files uploaded."""

    calls: list = []

    def create_repo(self, repo_id, private=False, exist_ok=False, repo_type=None):
        FakeHub.calls.append(("create_repo", repo_id, private))

    def upload_folder(self, folder_path, repo_id, repo_type=None, commit_message=""):
        from pathlib import Path

        files = sorted(p.name for p in Path(folder_path).iterdir())
        card = (Path(folder_path) / "README.md").read_text()
        FakeHub.calls.append(("upload_folder", repo_id, files, card))
        return type("Commit", (), {"commit_url": f"https://hub.example/{repo_id}/commit/1"})()


def test_push_to_hub_uploads_the_exported_student(tmp_path, far_pair, isolated_cache, monkeypatch, capsys):
    import huggingface_hub

    import onpolicy_kd.training.publish as publish

    FakeHub.calls = []
    monkeypatch.setattr(publish, "hub_reachable", lambda: True)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_test")
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHub)
    recipe = recipe_for(tmp_path, far_pair, "gkd")
    assert main([str(recipe), "train.push_to_hub=true", "train.hub_model_id=me/student", "train.hub_private=true"]) == 0
    (create, upload) = FakeHub.calls
    assert create == ("create_repo", "me/student", True)
    _, repo, files, card = upload
    assert repo == "me/student" and {"model.safetensors", "config.json", "README.md", "recipe.yaml",
                                     "tokenizer.json"} <= set(files)
    assert "## Held-out metrics, before and after" in card and "eval/reverse_kl" in card
    assert "to https://hub.example/me/student/commit/1" in " ".join(capsys.readouterr().out.split())


def test_push_fails_at_start_up_offline_and_says_how_to_push_later(tmp_path, far_pair, isolated_cache, monkeypatch,
                                                                   capsys):
    import onpolicy_kd.training.publish as publish
    from onpolicy_kd.cli import main as cli

    monkeypatch.setattr(publish, "hub_reachable", lambda: False)
    recipe = recipe_for(tmp_path, far_pair, "gkd")
    out = tmp_path / "out"
    assert main([str(recipe), "train.push_to_hub=true", "train.hub_model_id=me/student"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "train.push_to_hub needs the Hugging Face Hub, which is unreachable" in err
    assert f"onpolicy-kd push {out} me/student" in err
    assert not (out / "metrics.jsonl").exists()  # failed before anything trained
    assert main([str(recipe), "train.push_to_hub=true"]) == 2
    assert "train.push_to_hub needs train.hub_model_id" in capsys.readouterr().err
    assert main([str(recipe), "train.hub_model_id=me/student"]) == 2  # no effect without push_to_hub
    assert "train.hub_model_id='me/student' has no effect" in capsys.readouterr().err
    # the later push: of a finished run only, and it needs the Hub too
    assert cli(["push", str(out), "me/student"]) == 2
    assert "is not an exported student" in " ".join(capsys.readouterr().err.split())
    assert main([str(recipe)]) == 0
    assert cli(["push", str(out), "me/student"]) == 2
    assert "pushing to me/student needs the Hugging Face Hub" in " ".join(capsys.readouterr().err.split())


# --- LoRA students ------------------------------------------------------------------------------------------------

LORA = ["student.lora={r: 4, alpha: 8, target_modules: [q_proj, v_proj], keep_adapters: true}"]


def test_a_lora_student_trains_only_its_adapters_and_exports_them_merged(tmp_path, far_pair, isolated_cache, capsys):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from test_train import initial_student

    recipe = recipe_for(tmp_path, far_pair, "gkd")
    assert main([str(recipe), *LORA, "objective.backend=chunked", "optim.lr=0.05"]) == 0
    assert "lm head: chunked" in capsys.readouterr().out  # the memory-bounded head reads the adapted model
    out, before = tmp_path / "out", initial_student(tmp_path, far_pair)
    merged = load_file(out / "final" / "model.safetensors")
    assert set(merged) == set(before)  # a plain model: no peft keys, no stitching
    changed = {k for k in merged if not torch.equal(merged[k], before[k])}
    assert changed and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in changed)  # only what LoRA adapts
    # the merged export is the adapted model: base + the saved adapters gives the same logits
    base = AutoModelForCausalLM.from_config(AutoModelForCausalLM.from_pretrained(out / "final").config)
    base.load_state_dict(before)
    adapted = PeftModel.from_pretrained(base, out / "final" / "adapter").eval()
    plain = AutoModelForCausalLM.from_pretrained(out / "final").eval()
    ids = torch.tensor([[1, 5, 9, 13, 2, 7]])
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, adapted(ids).logits, atol=1e-5, rtol=1e-5)


def test_a_lora_run_resumes_to_the_weights_of_an_uninterrupted_one(tmp_path, far_pair, isolated_cache):
    common = [*LORA, "train.deterministic=true", "train.max_steps=4"]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    whole = recipe_for(tmp_path / "a", far_pair, "gkd")
    assert main([str(whole), *common]) == 0
    split = recipe_for(tmp_path / "b", far_pair, "gkd")
    assert main([str(split), *common, "train.max_steps=2", "train.save_steps=2"]) == 0
    assert main([str(split), *common, "train.resume_from=latest"]) == 0
    from safetensors.torch import load_file

    a = load_file(tmp_path / "a" / "out" / "final" / "model.safetensors")
    b = load_file(tmp_path / "b" / "out" / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [r["step"] for r in metrics_of(tmp_path / "b" / "out") if "train/loss" in r]
    assert steps == [1, 2, 3, 4]


def test_lora_settings_are_checked(tmp_path, far_pair, isolated_cache, capsys):
    recipe = recipe_for(tmp_path, far_pair, "gkd")
    assert main([str(recipe), "student.lora={r: 4, target_modules: [no_such_proj]}"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "student.lora:" in err and "no_such_proj" in err
    assert main([str(recipe), "student.lora={r: 0}"]) == 2
    assert "student.lora.r" in " ".join(capsys.readouterr().err.split())
