"""The headline recipe, end to end: `accelerate launch -m onpolicy_kd.train recipes/gpt2_cnn.yaml`, then `evaluate`.

The recipe runs exactly as written (MiniLLM-style pg with teacher-mixed sampling alpha 0.2, two PPO epochs,
importance clipping, cosine schedule with warm-up, bf16 mixed precision, GPT-2's tokenizer with no pad token,
the "TL;DR:" summarisation template) except for what this machine cannot have: the models (tiny random
GPT-2-architecture teacher and student saved to a temporary folder, with a GPT-2-like byte-level BPE tokenizer
whose pad token is unset, as GPT-2's), the data (CNN/DailyMail-shaped article/highlights rows in a local file)
and the sizes (lengths, batch, steps, evaluation size, and the logging cadence to match 3 steps).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import CORPUS, train_tokenizer

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def tiny_gpt2(path: Path, tokenizer, layers: int, width: int, seed: int) -> Path:
    from transformers import AutoModelForCausalLM, GPT2Config

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=width, n_layer=layers, n_head=4, n_positions=256,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_gpt2_cnn_recipe_trains_resumes_nothing_and_evaluates(tmp_path):
    tokenizer = train_tokenizer(CORPUS)  # GPT-2-like: byte-level BPE, bos = eos, no pad token
    assert tokenizer.pad_token is None
    teacher = tiny_gpt2(tmp_path / "gpt2-medium", tokenizer, layers=4, width=64, seed=0)
    student = tiny_gpt2(tmp_path / "gpt2", tokenizer, layers=2, width=32, seed=1)
    data = tmp_path / "cnn_dailymail.jsonl"
    with open(data, "w") as f:
        for i in range(24):
            f.write(json.dumps({"article": f"The council approved the new budget for the year {i}. " * 4,
                                "highlights": f"Council approves budget {i}.", "id": str(i)}) + "\n")
    out = tmp_path / "out"
    overrides = [
        f"teacher.name_or_path={teacher}", f"student.name_or_path={student}",  # the models
        f"data.path={data}", "data.name=null", "data.split=train[4:]", "data.eval_split=train[:4]",  # the data
        "data.max_prompt_tokens=96", "data.max_response_tokens=16", "rollout.max_new_tokens=12",  # the sizes
        "train.max_steps=3", "train.batch_size=2", "train.save_steps=2", "eval.max_samples=4", "eval.batch_size=4",
        "eval.max_new_tokens=12", "logging.log_steps=1", "logging.sample_steps=2", "logging.live=false",
        f"train.output_dir={out}",
    ]
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2"}
    env.pop("ACCELERATE_USE_CPU", None)
    launch = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "-m", "onpolicy_kd.train",
                             str(ROOT / "recipes" / "gpt2_cnn.yaml"), *overrides],
                            capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert launch.returncode == 0, launch.stdout[-3000:] + launch.stderr[-3000:]
    printed = " ".join(launch.stdout.split())
    assert "runs as: single process, 1 process on cpu" in printed and "mixed precision bf16" in printed
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    steps = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3] and all(torch.isfinite(torch.tensor(r["train/loss"])) for r in steps)
    assert all("pg/reward" in r or any(k.startswith("pg/") for k in r) for r in steps)  # the policy gradient ran
    lrs = [r["optim/lr"] for r in steps]  # cosine warm-up over 100 steps: rising through the first three
    assert 0 < lrs[0] < lrs[1] < lrs[2] < 5.0e-6
    assert "samples at step 2" in printed
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-0000002", "checkpoint-0000003"]
    final = out / "final"
    assert (final / "model.safetensors").is_file() and "# Distilled student (pg)" in (final / "README.md").read_text()

    evaluate = subprocess.run([sys.executable, "-m", "onpolicy_kd.evaluate", str(out)], capture_output=True, text=True,
                              timeout=300, env=env, cwd=ROOT)
    assert evaluate.returncode == 0, evaluate.stdout[-3000:] + evaluate.stderr[-3000:]
    summary = json.loads((out / "eval" / "metrics.json").read_text())
    assert summary["reverse_kl_samples"] > 0 and 0 <= summary["greedy/rougeL_ref"] <= 1  # against the highlights
    predictions = [json.loads(line) for line in open(out / "eval" / "predictions.jsonl")]
    assert len(predictions) == 4 and all(p["prompt"].endswith("TL;DR:") for p in predictions)
