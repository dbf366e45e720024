"""benchmarks/methods.py's tables from records: every figure with its uncertainty, the teacher's row without the
figures it has none of, and the difference table marking only differences whose interval excludes 0."""

import random
from pathlib import Path

import pytest

from module_from_file import module_from_file

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def methods():
    return module_from_file("bench_methods", ROOT / "benchmarks" / "methods.py")


def record(methods, method: str, seed: int, shift: float, prompts: int = 40, teacher: bool = False) -> dict:
    """A record as run_one writes it: per-prompt figures around 0.3 + shift (prompt difficulty shared by all)."""
    rng = random.Random(seed)
    difficulty = [random.Random(p).uniform(-0.2, 0.2) for p in range(prompts)]
    per_prompt = {key: [0.3 + shift + d + rng.gauss(0, 0.01) for d in difficulty]
                  for key, _ in methods.COLUMNS["news"] if key not in methods.KL_KEYS}
    if teacher:  # the teacher's own answers: no ROUGE-L of its greedy answer against itself
        per_prompt |= {f"teacher/{k}": v for k, v in per_prompt.items() if k != "greedy/rougeL_teacher"}
    tokens = [30] * prompts
    kl = {"tokens": tokens, "reverse_kl": [30 * (1.5 - shift)] * prompts, "forward_kl": [30 * 1.4] * prompts}
    sample = {"reference": "r", "teacher": "t", "student": "s", "student_sampled": "x"}
    return {"task": "news", "method": method, "seed": seed, "budget_s": 300.0, "steps": 10, "train_s": 300.0,
            "peak_rss_gib": 1.0, "prompts": prompts, "per_prompt": per_prompt, "kl": kl, "samples": [sample],
            "summary": {}, "torch": "x", "date": "2026-12-06"}


def test_method_table_marks_only_real_differences(methods, tmp_path):
    records = [record(methods, "initial", 0, -0.2, teacher=True), record(methods, "kd", 1, 0.0),
               record(methods, "kd", 2, 0.0),
               record(methods, "seqkd", 1, 0.0), record(methods, "seqkd", 2, 0.0),  # the same as KD up to noise
               record(methods, "gkd_rkl", 1, 0.1), record(methods, "gkd_rkl", 2, 0.1)]  # better by 0.1 everywhere
    text = methods.table(records)
    teacher_row = next(line for line in text.splitlines() if line.startswith("| teacher |"))
    cells = [c.strip() for c in teacher_row.strip("|").split("|")]
    assert cells[5] == "-" and cells[7] == "-" and cells[8] == "-"  # vs its own greedy answer; the two KLs
    assert "±" in cells[3]
    diffs = text.split("Differences from KD")[1]
    seqkd = next(line for line in diffs.splitlines() if line.startswith(f"| {methods.LABELS['seqkd']} |"))
    gkd = next(line for line in diffs.splitlines() if line.startswith(f"| {methods.LABELS['gkd_rkl']} |"))
    assert "*" not in seqkd
    first = gkd.split("|")[2].strip()  # ROUGE-L vs refs, greedy: +0.100 ± ... *
    assert first.startswith("+0.100") and first.endswith("*")
    methods.plot(records, tmp_path / "methods.png")
    assert (tmp_path / "methods.png").stat().st_size > 10_000


def test_learning_curve_puts_each_evaluation_at_the_training_seconds_before_it(methods):
    rows = [{"step": 0, "eval/reverse_kl": 1.0, "eval/greedy/accuracy": 0.1},
            {"step": 1, "time/step_s": 2.0, "train/loss": 1.0}, {"step": 2, "time/step_s": 2.5, "train/loss": 1.0},
            {"step": 2, "eval/reverse_kl": 0.8, "eval/greedy/accuracy": 0.2, "eval/forward_kl_samples": 0.7},
            {"step": 3, "time/step_s": 3.0, "train/loss": 1.0},
            {"step": 3, "eval/reverse_kl": 0.7, "eval/greedy/accuracy": 0.3, "eval/forward_kl_samples": 0.6}]
    curve = methods.learning_curve(rows, "arithmetic")
    assert [(p["step"], p["train_s"], p["greedy/accuracy"]) for p in curve] == [(0, 0.0, 0.1), (2, 4.5, 0.2), (3, 7.5, 0.3)]
    assert curve[1]["reverse_kl_samples"] == 0.8 and curve[2]["forward_kl_samples"] == 0.6
    text = "\n".join(methods.curve_tables("arithmetic", [{"method": "seqkd", "seed": 1, "budget_s": 1800.0,
                                                          "curve": curve}]))
    assert "learning curve of SeqKD" in text and "| 2 | 4 | 0.200 | 0.800 | 0.700 |" in text
    assert "| 0 | 0 | 0.100 | 1.000 | - |" in text  # the figure the first evaluation did not have


def test_seeds_timed_on_different_machines_are_marked(methods):
    """At equal wall time a faster CPU takes more steps: a section whose runs come from two machines names both and
    marks each seed with its machine; a section from one machine names it once and marks nothing."""
    old = [record(methods, "kd", 1, 0.0), record(methods, "kd", 2, 0.0)]  # before records noted the machine
    new = record(methods, "kd", 3, 0.0) | {"machine": "Xeon, 2 cores, avx2 amx_bf16"}
    mixed = methods.task_tables("news", [*old, new])
    assert f"a: {methods.UNRECORDED}" in mixed[2] and "b: Xeon, 2 cores, avx2 amx_bf16" in mixed[2]
    assert any(line.startswith(f"| {methods.LABELS['kd']} | 1a, 2a, 3b |") for line in mixed)
    alone = methods.task_tables("news", [new | {"budget_s": 900.0}])
    assert alone[2] == "Machine: Xeon, 2 cores, avx2 amx_bf16."
    assert any(line.startswith(f"| {methods.LABELS['kd']} | 3 |") for line in alone)
    assert methods.machine().split(", ")[1] == f"{__import__('os').cpu_count()} cores"


def test_pipelines_with_a_seqkd_stage_are_compared_with_seqkd_alone(methods):
    records = [record(methods, "kd", 1, 0.0), record(methods, "seqkd", 1, 0.2), record(methods, "seqkd", 2, 0.2),
               record(methods, "distillm2_seqkd", 1, 0.25), record(methods, "distillm2_seqkd", 2, 0.25),
               record(methods, "distillm2", 1, 0.25)]
    text = methods.table(records)
    against_seqkd = text.split("minus SeqKD alone")[1].split("First held-out prompt")[0]
    rows = [line for line in against_seqkd.splitlines() if line.startswith("| ") and not line.startswith("| method")]
    assert [row.split("|")[1].strip() for row in rows] == [methods.LABELS["distillm2_seqkd"]]  # not DistiLLM-2 alone
    first = rows[0].split("|")[2].strip()  # ROUGE-L vs refs, greedy: 0.25 - 0.2
    assert first.startswith("+0.050") and first.endswith("*")
    assert "minus SeqKD alone" not in methods.table([r for r in records if r["method"] != "seqkd"])


def test_every_on_policy_method_is_compared_with_trls_trainer(methods):
    records = [record(methods, "kd", 1, 0.0), record(methods, "trl", 1, 0.0), record(methods, "trl", 2, 0.0),
               record(methods, "gkd_rkl", 1, 0.1), record(methods, "distillm2", 1, -0.1), record(methods, "seqkd", 1, 0.3)]
    text = methods.table(records)
    against_trl = text.split("minus TRL's trainer")[1].split("First held-out prompt")[0]
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in against_trl.splitlines()
            if line.startswith("| ") and not line.startswith("| method")}
    assert set(rows) == {methods.LABELS["gkd_rkl"], methods.LABELS["distillm2"]}  # SeqKD is off-policy, KD too
    greedy = {label: float(cell.split("±")[0]) for label, cell in rows.items()}  # ROUGE-L vs refs: shifts ± noise
    assert greedy[methods.LABELS["gkd_rkl"]] == pytest.approx(0.1, abs=0.01)
    assert greedy[methods.LABELS["distillm2"]] == pytest.approx(-0.1, abs=0.01)
    assert set(methods.ON_POLICY_METHODS) <= set(methods.METHODS)  # a renamed method is not silently left out


def test_seeds_timed_on_a_slow_machine_are_flagged(methods):
    """The same CPU model is not always the same speed: a seed whose speed check ran more than 10% slower than the
    section's median is flagged with †; records without a check (older runs) are neither counted nor flagged."""
    runs = [record(methods, "kd", 1, 0.0) | {"speed_s": 0.50}, record(methods, "kd", 2, 0.0) | {"speed_s": 0.52},
            record(methods, "seqkd", 1, 0.0) | {"speed_s": 0.60}, record(methods, "seqkd", 2, 0.0)]
    lines = methods.task_tables("news", runs)
    assert any("median 0.520 s over the 3 runs that have one; † marks" in line for line in lines)
    assert any(line.startswith(f"| {methods.LABELS['kd']} | 1, 2 |") for line in lines)
    assert any(line.startswith(f"| {methods.LABELS['seqkd']} | 1†, 2 |") for line in lines)
    even = methods.task_tables("news", runs[:2])
    assert not any("†" in line for line in even) and any("median 0.510 s over the 2 runs" in line for line in even)
    assert not any("Speed check" in line for line in methods.task_tables("news", [record(methods, "kd", 1, 0.0)]))


def test_runs_distilled_from_another_teacher_are_marked_with_its_own_row(methods):
    """The arithmetic teacher is trained on each machine and answers differently from machine to machine: a seed
    judged beside another teacher than the section's most common one is marked ‡, and each teacher gets its own row
    (from the runs' records, not from the untrained student's); one teacher throughout: no mark, one row."""
    def with_teacher(run, answers):
        run["per_prompt"] |= {f"teacher/{key}": [answers] * run["prompts"] for key in ("greedy/rougeL_ref",
                                                                                      "sampled/rougeL_ref")}
        return run

    initial = with_teacher(record(methods, "initial", 0, -0.2), 0.11)
    runs = [with_teacher(record(methods, "kd", 1, 0.0), 0.5), with_teacher(record(methods, "kd", 2, 0.0), 0.5),
            with_teacher(record(methods, "seqkd", 1, 0.0), 0.6)]
    lines = methods.task_tables("news", [initial, *runs])
    assert any(line.startswith(f"| {methods.LABELS['kd']} | 1, 2 |") for line in lines)
    assert any(line.startswith(f"| {methods.LABELS['seqkd']} | 1‡ |") for line in lines)
    teacher_rows = [line.split(" | ") for line in lines if line.startswith("| teacher")]
    assert [(row[0], row[3], row[4]) for row in teacher_rows] == [("| teacher", "0.500 ± 0.000", "0.500 ± 0.000"),
                                                                  ("| teacher ‡", "0.600 ± 0.000", "0.600 ± 0.000")]
    assert any(line.startswith("‡ marks a seed distilled from another teacher") for line in lines)
    same = methods.task_tables("news", [initial, *runs[:2]])
    assert [line for line in same if line.startswith("| teacher")] == ["| teacher | - | - | 0.500 ± 0.000 | "
                                                                       "0.500 ± 0.000 | - | - | - | - | - | - | - | - | - |"]
    assert not any("‡" in line for line in same)


def test_the_speed_check_leaves_the_run_as_it_was(methods):
    """It times a forward and backward pass without touching the global random state or leaving gradients."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    state = torch.get_rng_state()
    assert methods.speed_check(model, repeats=2) > 0
    assert torch.equal(torch.get_rng_state(), state)
    assert all(p.grad is None for p in model.parameters())
    for p in model.parameters():
        p.requires_grad_(False)
    assert methods.speed_check(model, repeats=1) > 0  # a frozen model: the forward alone
