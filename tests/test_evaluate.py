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
    """The F-measures rouge-score gives, with stemming. Against one target F is symmetric (2PR / (P + R) with P and R
    swapped), so which text is the target cannot show here and does not matter; against several it does (the best
    target is chosen): tests/test_fair_judge.py checks that direction by hand."""
    candidate, target = "The fires forced hundreds from their homes", "Hundreds were forced from homes by the bushfires"
    direct = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True).score(target, candidate)
    assert M.rouge(candidate, target) == {k: direct[k].fmeasure for k in ("rouge1", "rouge2", "rougeL")}
    # by hand: 5 shared words (the, forced, hundreds, from, homes) of 7 and of 8: P 5/7, R 5/8, F 2/3
    assert M.rouge(candidate, target)["rouge1"] == pytest.approx(2 / 3)
    assert M.rouge("fires forced", "fire forcing")["rouge1"] == 1.0  # with stemming (Porter: fire, forc), as published


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


EVALUATE_KEYS = {f"{who}{d}/{k}" for who in ("", "teacher/") for d in ("greedy", "sampled")
                 for k in ("rougeL_ref", "rouge2_ref", "rougeL_teacher_samples", "length", "truncated", "distinct1",
                           "distinct2", "repetition")}
EVALUATE_KEYS |= {"greedy/rougeL_teacher", "sampled/rougeL_teacher", "teacher/sampled/rougeL_teacher"}


def test_evaluate_a_run(trained_run, capsys, monkeypatch):
    from onpolicy_kd.console import console

    monkeypatch.setattr(console, "width", 220)  # one line per table row
    run, _ = trained_run
    assert evaluate_main([str(run), "eval.max_samples=5", "eval.max_new_tokens=6", "eval.samples_per_prompt=2"]) == 0
    out = capsys.readouterr().out
    assert "held-out text (5 prompts; greedy, and 2 samples per prompt" in out and "teacher" in out
    for row in ("ROUGE-L F vs references", "ROUGE-L F vs teacher (greedy)", "ROUGE-L F vs teacher samples (best)",
                "cut at max_new_tokens (share)", "distinct-1", "repetition rate", "length (tokens)", "±"):
        assert row in out
    rows = [json.loads(line) for line in open(run / "eval" / "predictions.jsonl")]
    assert len(rows) == 5
    for row in rows:
        assert set(row) == {"prompt", "reference", "references", "teacher", "teacher_samples", "student",
                            "student_samples", "metrics", "kl_sums"}
        assert EVALUATE_KEYS | {"ppl_student", "ppl_teacher"} <= set(row["metrics"])
        assert len(row["student_samples"]) == len(row["teacher_samples"]) == 2
        # each figure from the texts: greedy against the references, sampled the mean over the samples
        assert row["metrics"]["greedy/rougeL_ref"] == M.rouge(row["student"], row["references"])["rougeL"]
        sampled = [M.rouge(text, row["references"])["rougeL"] for text in row["student_samples"]]
        assert math.isclose(row["metrics"]["sampled/rougeL_ref"], sum(sampled) / 2)
        best = [M.rouge(text, row["teacher_samples"])["rougeL"] for text in row["student_samples"]]
        assert math.isclose(row["metrics"]["sampled/rougeL_teacher_samples"], sum(best) / 2)
    summary = json.loads((run / "eval" / "metrics.json").read_text())
    assert summary["reverse_kl_samples"] > 0 and summary["ppl_teacher"] > 1 and summary["prompts"] == 5
    assert math.isclose(summary["greedy/rougeL_ref"], sum(r["metrics"]["greedy/rougeL_ref"] for r in rows) / 5)
    assert set(summary["standard_error"]) >= EVALUATE_KEYS
    # the set's KL is a token-level mean: the prompts' summed KLs over their tokens
    tokens = sum(r["kl_sums"]["tokens"] for r in rows)
    assert math.isclose(summary["reverse_kl_samples"], sum(r["kl_sums"]["reverse_kl"] for r in rows) / tokens,
                        rel_tol=1e-6)  # (float32 sums, added in another order)
    plot = run / "plots" / "training_curves.png"
    assert plot.is_file() and plot.stat().st_size > 10_000 and plot.read_bytes()[:4] == b"\x89PNG"
    assert "## Evaluation" in (run / "final" / "README.md").read_text()


def test_evaluate_checks_out_before_any_work(trained_run, tmp_path, capsys):
    run, _ = trained_run
    taken = tmp_path / "a_file"
    taken.write_text("keep me")
    assert evaluate_main([str(run), "--out", str(taken)]) == 2
    assert "is a file" in capsys.readouterr().err and taken.read_text() == "keep me"


def test_teacher_answers_judged_against_themselves(trained_run):
    """The teacher evaluated as the student: zero KL, its greedy text is its greedy answer, its own perplexity."""
    from onpolicy_kd.recipe import load_recipe
    from onpolicy_kd.data.loading import load_prompt_data
    from onpolicy_kd.evaluate import evaluate_heldout
    from onpolicy_kd.evaluation.teacher_answers import recipe_teacher_answers
    from onpolicy_kd.models.loading import load_models

    _, recipe_path = trained_run
    recipe = load_recipe(recipe_path, ["eval.max_samples=3", "eval.max_new_tokens=5"])
    models = load_models(recipe)
    data = load_prompt_data(recipe.data, models.tokenizer)
    answers = recipe_teacher_answers(recipe, models.teacher, models.tokenizer, data.eval)
    result = evaluate_heldout(recipe, models.teacher, models, data.eval, "teacher", answers)
    assert abs(result.summary["reverse_kl_samples"]) < 1e-6 and result.summary["greedy/rougeL_teacher"] == 1.0
    assert math.isclose(result.summary["ppl_student"], result.summary["ppl_teacher"], rel_tol=1e-6)
    for key in ("rougeL_ref", "length", "truncated", "distinct1", "repetition"):  # the teacher's figures = its own
        assert result.summary[f"greedy/{key}"] == result.summary[f"teacher/greedy/{key}"]


def test_compare_prints_one_table(trained_run, tmp_path, capsys):
    run, recipe = trained_run
    assert evaluate_main(["--compare", str(run), str(recipe), "eval.max_samples=3", "eval.max_new_tokens=5",
                          "--out", str(tmp_path / "cmp")]) == 0
    out = capsys.readouterr().out
    assert "(initial)" in out and "teacher" in out and "KL(q||p), own samples" in out
    assert (tmp_path / "cmp" / "out" / "predictions.jsonl").is_file()  # the trained run
    assert (tmp_path / "cmp" / "gkd-initial" / "predictions.jsonl").is_file()  # the recipe's initial student


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
        assert {"eval/greedy/rougeL_ref", "eval/greedy/rougeL_teacher", "eval/ppl_student", "eval/forward_kl_refs",
                "eval/greedy/distinct2", "eval/sampled/repetition"} <= set(row)


def test_every_training_evaluation_logs_what_evaluate_prints(tmp_path, far_pair, isolated_cache):
    """metrics.jsonl holds the same keys at every evaluation: both decodings, student and teacher (the reference
    KLs and perplexities only with eval.full)."""
    recipe = recipe_for(tmp_path, far_pair, "gkd")
    assert train_main([str(recipe), "train.max_steps=2", "eval.eval_steps=1", "eval.max_samples=3",
                       "eval.max_new_tokens=4", "eval.samples_per_prompt=2"]) == 0
    evals = [set(r) - {"step"} for r in metrics_of(tmp_path / "out") if "eval/reverse_kl" in r]
    assert len(evals) == 3 and evals[0] == evals[1] == evals[2]
    assert {f"eval/{k}" for k in EVALUATE_KEYS} | {"eval/reverse_kl", "eval/forward_kl_samples"} <= evals[0]
    assert not {"eval/ppl_student", "eval/forward_kl_refs"} & evals[0]


def test_compared_results_never_share_a_folder():
    from onpolicy_kd.evaluate import result_folders

    # a run and its own recipe's untrained student (outputs/my_distill, my_distill.yaml), and two runs named alike
    assert result_folders(["my_distill", "my_distill (initial)", "run", "run"]) == [
        "my_distill", "my_distill-initial", "run", "run-2"]
