"""Fitting the Hugging Face ecosystem: experiment trackers through accelerate (logging.report_to) and the run's
description at start-up. (TRL's dataset formats: tests/test_data.py; train.epochs: tests/test_train.py.)"""

from __future__ import annotations

import json

import pytest

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
