"""Evaluation: metrics against direct/naive computations, the predictions schema, plots, the command."""

from __future__ import annotations

import json
import math

import pytest
import torch
from rouge_score import rouge_scorer

from onpolicy_kd.evaluation import metrics as M
from onpolicy_kd.evaluate import main as evaluate_main
from onpolicy_kd.train import main as train_main

from test_train import metrics_of, recipe_for


def test_rouge_equals_rouge_score():
    candidate, target = "The fires forced hundreds from their homes", "Hundreds were forced from homes by the bushfires"
    direct = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True).score(target, candidate)
    assert M.rouge(candidate, target) == {k: direct[k].fmeasure for k in ("rouge1", "rouge2", "rougeL")}


def test_distinct_and_repetition():
    tokens = [5, 6, 5, 6, 7]
    assert M.distinct_n(tokens, 1) == 3 / 5
    assert M.distinct_n(tokens, 2) == 3 / 4  # (5,6) twice, (6,5), (6,7)
    assert M.repetition_rate(tokens) == 2 / 5  # the second 5 and the second 6
    assert M.distinct_n([], 2) == 0.0 and M.repetition_rate([]) == 0.0


def test_kl_and_nll_equal_naive_loops():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 11, generator=g), torch.randn(2, 5, 11, generator=g)
    tokens = torch.randint(0, 11, (2, 5), generator=g)
    fkl, rkl = M.token_kls(s, t)
    nll = M.token_nll(s, tokens)
    for b in range(2):
        for i in range(5):
            q, p = torch.softmax(s[b, i].double(), -1), torch.softmax(t[b, i].double(), -1)
            assert math.isclose(fkl[b, i].item(), float((p * (p / q).log()).sum()), rel_tol=1e-5)
            assert math.isclose(rkl[b, i].item(), float((q * (q / p).log()).sum()), rel_tol=1e-5)
            assert math.isclose(nll[b, i].item(), -math.log(q[tokens[b, i]].item()), rel_tol=1e-5)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, far_pair):
    root = tmp_path_factory.mktemp("run")
    import os

    os.environ["ONPOLICY_KD_CACHE_DIR"] = str(root / "cache")
    recipe = recipe_for(root, far_pair, "gkd")
    assert train_main([str(recipe), "train.max_steps=4", "eval.eval_steps=2"]) == 0
    return root / "out", recipe


def test_evaluate_a_run(trained_run, capsys):
    run, _ = trained_run
    assert evaluate_main([str(run), "eval.max_samples=5", "eval.max_new_tokens=6"]) == 0
    out = capsys.readouterr().out
    assert "held-out evaluation (5 prompts)" in out and "teacher (reference)" in out
    rows = [json.loads(line) for line in open(run / "eval" / "predictions.jsonl")]
    assert len(rows) == 5
    for row in rows:
        assert set(row) == {"prompt", "reference", "teacher", "student", "metrics"}
        assert {"rouge1_ref", "rougeL_teacher", "length", "distinct1", "distinct2", "repetition", "ppl_student",
                "ppl_teacher"} <= set(row["metrics"])
        assert row["metrics"]["rouge1_ref"] == M.rouge(row["student"], row["reference"])["rouge1"]
    summary = json.loads((run / "eval" / "metrics.json").read_text())
    assert summary["reverse_kl_samples"] > 0 and summary["ppl_teacher"] > 1
    plot = run / "plots" / "training_curves.png"
    assert plot.is_file() and plot.stat().st_size > 10_000 and plot.read_bytes()[:4] == b"\x89PNG"
    assert "## Evaluation" in (run / "final" / "README.md").read_text()


def test_teacher_row_is_a_reference(trained_run, capsys):
    """The teacher evaluated against itself: zero KL, ROUGE 1 against its own completions."""
    from onpolicy_kd.recipe import load_recipe
    from onpolicy_kd.data.loading import load_prompt_data
    from onpolicy_kd.evaluate import evaluate_heldout
    from onpolicy_kd.models.loading import load_models

    _, recipe_path = trained_run
    recipe = load_recipe(recipe_path, ["eval.max_samples=3", "eval.max_new_tokens=5"])
    models = load_models(recipe)
    data = load_prompt_data(recipe.data, models.tokenizer)
    result = evaluate_heldout(recipe, models.teacher, models, data.eval, "teacher")
    assert abs(result.summary["reverse_kl_samples"]) < 1e-6 and result.summary["rouge1_teacher"] == 1.0
    assert math.isclose(result.summary["ppl_student"], result.summary["ppl_teacher"], rel_tol=1e-6)


def test_compare_prints_one_table(trained_run, tmp_path, capsys):
    run, recipe = trained_run
    assert evaluate_main(["--compare", str(run), str(recipe), "eval.max_samples=3", "eval.max_new_tokens=5",
                          "--out", str(tmp_path / "cmp")]) == 0
    out = capsys.readouterr().out
    assert "(initial)" in out and "teacher" in out and "KL(q||p), own samples" in out
    assert (tmp_path / "cmp" / "out" / "predictions.jsonl").is_file()  # the trained run
    assert (tmp_path / "cmp" / "gkd" / "predictions.jsonl").is_file()  # the recipe's initial student


def test_several_targets_need_compare(trained_run, capsys):
    run, recipe = trained_run
    assert evaluate_main([str(run), str(recipe)]) == 2
    assert "add --compare" in capsys.readouterr().err


def test_full_evaluation_inside_training(tmp_path, far_pair, isolated_cache):
    recipe = recipe_for(tmp_path, far_pair, "kd")
    assert train_main([str(recipe), "train.max_steps=2", "eval.eval_steps=1", "eval.full=true",
                       "eval.max_samples=3", "eval.max_new_tokens=4"]) == 0
    evals = [r for r in metrics_of(tmp_path / "out") if "eval/reverse_kl" in r]
    assert [r["step"] for r in evals] == [0, 1, 2]
    for row in evals:
        assert {"eval/rouge1_ref", "eval/rougeL_teacher", "eval/ppl_student", "eval/forward_kl_refs",
                "eval/distinct2", "eval/repetition"} <= set(row)
