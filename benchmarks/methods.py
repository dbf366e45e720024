"""Benchmark: distillation methods at equal wall time, judged by the student they hand back.

    python benchmarks/methods.py                                  # every method, 300 s each, seeds 1 2 3
    python benchmarks/methods.py --budget 300 --seeds 1 2 3 --methods staged kd seqkd trl
    python benchmarks/methods.py --table-only                     # redraw the table and plot from the records

The task is the offline default's (recipes/smollm2_news.yaml): SmolLM2-135M-Instruct teacher, a 17-layer student
copied from it (the recipe's, or the layers given with --student; every method of a table section starts from the
same student), Lee news articles (train rows 0-279, 12 held out), batch 4, float32 on the CPU. Every method trains
for the same wall-clock budget of training steps (`train.max_time`; loading and evaluation not counted) in its own
process, one seed at a time, and is then measured by the same held-out evaluation (12 articles, 32 new tokens):
reverse KL(q||p) and KL(p||q) on the student's sampled completions; distinct-1, repetition and ROUGE-L F against
the teacher on its greedy completions.

Methods (each states its own objective, completions and schedule; the recipe supplies models, data and batch):
- kd: dense forward KL on the teacher's cached greedy summaries (GKD with lambda 0 and seq_kd; the data has no
  reference summaries, so "supervised" KD uses the teacher's), lr 5e-4 cosine: the recipe's own pipeline since
  2026-12-01 (fourth session);
- staged_fkl: the same heal for 2/3 of the budget, then on-policy forward KL (mass-covering) on the student's
  samples for 1/3 at lr 1e-4 (the default before that);
- staged: the same heal for 1/2, then on-policy reverse KL (mode-seeking) for 1/2 (the default before that);
- staged_gentle: staged_fkl with the on-policy stage at lr 2e-5;
- kd_prompt: kd with `objective.prompt_weight=1`: the same forward KL also at every article (prompt) token;
- seqkd: cross-entropy on the same cached teacher summaries (SeqKD), lr 5e-4 cosine like kd;
- gkd_rkl: on-policy reverse KL on the student's own samples alone (no heal), lr 1e-4 constant;
- gkd_jsd: the same with the generalized JSD (beta 0.5);
- pg: MiniLLM-style policy gradient (objective.mode=pg, its defaults);
- trl: TRL's DistillationTrainer (on-policy reverse KL, its only objective) on the same student, prompt ids,
  learning rate and budget (its schedule is constant: TRL's scheduler counts steps, not time).
SFT needs reference completions; the Lee articles have none, so it has no row (SeqKD is SFT on teacher text).

The teacher's summaries used by staged, kd and seqkd are generated once and cached (~6 min on this machine,
not counted in the budget: every later run reads them in seconds). Each (method, seed) appends one JSON record
to benchmarks/results/methods.jsonl; the markdown table (methods.md) and the plot (methods.png) are drawn from
all records, so the table can be built up over several invocations.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RECIPE = ROOT / "recipes" / "smollm2_news.yaml"
RESULTS = ROOT / "benchmarks" / "results"
RECORDS = RESULTS / "methods.jsonl"

# Every method states its own objective, completions and schedule: the recipe supplies the models, data,
# batch and evaluation only (its own pipeline is the `kd` row).
HEAL = ("objective: {mode: gkd, lmbda: 0.0, seq_kd: true, divergence: forward_kl}, "
        "rollout: {teacher_cache: true, do_sample: false}, optim: {lr: 5.0e-4, scheduler: cosine, warmup_steps: 5}")
ON_POLICY_STAGE = ("rollout: {teacher_cache: false, do_sample: true}, optim: {lr: %s, scheduler: constant, "
                   "warmup_steps: 0}, objective: {mode: gkd, lmbda: 1.0, seq_kd: false, divergence: %s}")
TEACHER_TEXT = ["rollout.teacher_cache=true", "rollout.do_sample=false", "optim.lr=5.0e-4", "optim.scheduler=cosine",
                "optim.warmup_steps=5", "objective.lmbda=0.0", "objective.seq_kd=true"]
# one phase of on-policy GKD (the student's own samples at temperature 1, lr 1e-4 constant), reverse KL
ON_POLICY = ["stages=[]", "objective.mode=gkd", "objective.lmbda=1.0", "objective.seq_kd=false",
             "objective.divergence=reverse_kl", "rollout.teacher_cache=false", "rollout.do_sample=true",
             "optim.lr=1.0e-4", "optim.scheduler=constant", "optim.warmup_steps=0"]


def staged(budget: float, heal_share: float, divergence: str, lr: str = "1.0e-4") -> list[str]:
    return ["train.max_steps=null", f"stages=[{{name: heal, max_time: {budget * heal_share:g}, {HEAL}}}, "
            f"{{name: onpolicy, max_time: {budget * (1 - heal_share):g}, {ON_POLICY_STAGE % (lr, divergence)}}}]"]


METHODS: dict[str, object] = {
    "staged": lambda budget: staged(budget, 1 / 2, "reverse_kl"),
    "staged_fkl": lambda budget: staged(budget, 2 / 3, "forward_kl"),
    "staged_gentle": lambda budget: staged(budget, 2 / 3, "forward_kl", lr="2.0e-5"),
    "kd": lambda budget: ["stages=[]", "objective.mode=gkd", "objective.divergence=forward_kl", *TEACHER_TEXT],
    "kd_freq": lambda budget: ["stages=[]", "objective.mode=gkd", "objective.divergence=forward_kl",
                               "penalties.frequency=5.0", *TEACHER_TEXT],
    "kd_prompt": lambda budget: ["stages=[]", "objective.mode=gkd", "objective.divergence=forward_kl",
                                 "objective.prompt_weight=1.0", *TEACHER_TEXT],
    "seqkd": lambda budget: ["stages=[]", "objective.mode=seqkd", "objective.divergence=reverse_kl",
                             "objective.lmbda=1.0", "objective.seq_kd=false",
                             *[t for t in TEACHER_TEXT if not t.startswith("objective.")]],
    "gkd_rkl": lambda budget: ON_POLICY,
    "gkd_jsd": lambda budget: ON_POLICY + ["objective.divergence=jsd", "objective.beta=0.5"],
    "pg": lambda budget: ON_POLICY + ["objective.mode=pg"],
    "trl": lambda budget: ON_POLICY,
}
LABELS = {"staged": "staged: heal 1/2, then on-policy reverse KL 1/2",
          "staged_fkl": "staged: heal 2/3, then on-policy forward KL 1/3", "kd": "KD: dense forward KL on teacher text",
          "staged_gentle": "staged: heal 2/3, then on-policy forward KL 1/3 at lr 2e-5",
          "kd_freq": "KD + frequency penalty 5 (the default recipe now)",
          "kd_prompt": "KD + the same forward KL on the articles (prompt_weight 1)",
          "seqkd": "SeqKD: CE on teacher text", "gkd_rkl": "on-policy GKD, reverse KL", "gkd_jsd": "on-policy GKD, JSD 0.5",
          "pg": "PG (MiniLLM-style)", "trl": "TRL DistillationTrainer"}
METRICS = (("eval/reverse_kl", "KL(q‖p)"), ("eval/forward_kl_samples", "KL(p‖q)"), ("eval/rougeL_teacher", "ROUGE-L vs teacher"),
           ("eval/distinct1", "distinct-1"), ("eval/repetition", "repetition"))


FIRST_STUDENT = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 27, 28, 29]  # the records from before the field


def student_of(record: dict) -> list[int]:
    """The teacher layers the run's student kept (records written before the field used FIRST_STUDENT)."""
    return record.get("student", FIRST_STUDENT)


def overrides(method: str, seed: int, budget: float, work: Path, student: list[int] | None = None) -> list[str]:
    common = [f"train.seed={seed}", f"train.output_dir={work}", "logging.live=false", "eval.full=true"]
    if student is not None:
        common.append(f"student.keep_layers={json.dumps(student)}")
    budget_keys = [] if method.startswith("staged") else [f"train.max_time={budget:g}", "train.max_steps=100000"]
    # every method without the frequency penalty the default recipe has, unless it names it (kd_freq)
    return ["penalties.frequency=0.0", *METHODS[method](budget), *budget_keys, *common]


def run_one(method: str, seed: int, budget: float, out_json: Path, student: list[int] | None = None) -> None:
    """In a child process: train one method for the budget, evaluate, write a JSON record."""
    import torch

    from onpolicy_kd.evaluation.heldout import greedy_samples
    from onpolicy_kd.models.loading import load_models
    from onpolicy_kd.recipe import load_recipe
    from onpolicy_kd.train import train
    from onpolicy_kd.training.stages import run_stages

    work = Path(tempfile.mkdtemp(prefix=f"methods-{method}-"))
    recipe = load_recipe(RECIPE, overrides("gkd_rkl" if method == "initial" else method, seed, budget, work, student))
    models = load_models(recipe, str(RECIPE))
    started = time.perf_counter()
    before = initial_metrics(recipe.student.keep_layers)
    if method == "initial":  # the untrained student, measured like every trained one
        from accelerate import Accelerator

        from onpolicy_kd.evaluation.heldout import heldout_metrics

        data = load_eval(recipe, models.tokenizer)
        after = heldout_metrics(recipe, Accelerator(cpu=True), models.student, models.teacher, models.tokenizer, data)[0]
        samples = greedy_samples(recipe.model_copy(update={"logging": recipe.logging.model_copy(update={"num_samples": 2})}),
                                 Accelerator(cpu=True), models.student, models.teacher, models.tokenizer, data)
        record = {"before": after, "after": after, "steps": 0, "train_s": 0.0,
                  "samples": [{"teacher": s["teacher"], "student": s["student"]} for s in samples]}
    elif method == "trl":
        record = run_trl(recipe, models, budget, before)
    else:
        result = (run_stages(recipe, str(RECIPE), models, before=before) if recipe.stages
                  else train(recipe, str(RECIPE), models, before=before))
        rows = [json.loads(line) for line in open(work / "metrics.jsonl")]
        steps = [r for r in rows if "time/step_s" in r]
        # a staged result's `before` is its last stage's start: the run's own start is the initial student
        record = {"before": before or result.before, "after": result.after, "steps": len(steps),
                  "train_s": sum(r["time/step_s"] for r in steps)}
        from accelerate import Accelerator

        samples = greedy_samples(recipe.model_copy(update={"logging": recipe.logging.model_copy(update={"num_samples": 2})}),
                                 Accelerator(cpu=True), result.student, models.teacher, models.tokenizer,
                                 load_eval(recipe, models.tokenizer))
        record["samples"] = [{"teacher": s["teacher"], "student": s["student"]} for s in samples]
    record |= {"method": method, "student": recipe.student.keep_layers, "seed": seed, "budget_s": budget, "wall_s": time.perf_counter() - started,
               "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "torch": torch.__version__,
               "date": time.strftime("%Y-%m-%d")}
    out_json.write_text(json.dumps(record))
    shutil.rmtree(work, ignore_errors=True)  # checkpoints and exports: 1.4-3 GB a run


def initial_metrics(student: list[int]) -> dict | None:
    """The initial student's held-out metrics (the `initial` record of that student): every run starts from the same
    student and the held-out evaluation is seeded, so they are measured once, before the first method runs."""
    for record in read_records():
        if record["method"] == "initial" and student_of(record) == student:
            return record["after"]
    return None


def load_eval(recipe, tokenizer):
    from onpolicy_kd.data.loading import load_prompt_data

    return load_prompt_data(recipe.data, tokenizer, seed=recipe.train.seed).eval


def run_trl(recipe, models, budget: float, before: dict | None = None) -> dict:
    """TRL's DistillationTrainer for `budget` seconds of steps, fed our exact prompt ids (as benchmarks/step.py)."""
    from accelerate import Accelerator
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DistillationConfig, DistillationTrainer

    from onpolicy_kd.data.loading import load_prompt_data
    from onpolicy_kd.evaluation.heldout import greedy_samples, heldout_metrics

    tokenizer, student, teacher = models.tokenizer, models.student, models.teacher
    data = load_prompt_data(recipe.data, tokenizer, seed=recipe.train.seed)
    texts = [tokenizer.decode(ids, skip_special_tokens=False) for ids in data.train["prompt_ids"]]
    ids_of = dict(zip(texts, data.train["prompt_ids"]))
    accelerator = Accelerator(cpu=True)
    before = before or heldout_metrics(recipe, accelerator, student, teacher, tokenizer, data.eval)[0]

    class TimeBudget(TrainerCallback):
        def __init__(self):
            self.spent, self.steps, self.started = 0.0, 0, 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.spent += time.perf_counter() - self.started
            self.steps += 1
            control.should_training_stop = self.spent >= budget

    budget_cb = TimeBudget()
    args = DistillationConfig(
        output_dir=tempfile.mkdtemp(prefix="methods-trl-"), per_device_train_batch_size=recipe.train.batch_size,
        gradient_accumulation_steps=1, max_steps=100000, learning_rate=recipe.optim.lr, lr_scheduler_type="constant",
        warmup_steps=0, max_grad_norm=recipe.optim.max_grad_norm, weight_decay=0.0, temperature=recipe.rollout.temperature,
        top_k=0, top_p=1.0, beta=1.0, max_completion_length=recipe.rollout.max_new_tokens, use_cpu=True, bf16=False,
        fp16=False, gradient_checkpointing=False, disable_dropout=True, logging_steps=10, save_strategy="no",
        report_to=[], seed=recipe.train.seed, dataloader_num_workers=0,
    )
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args,
                                  train_dataset=Dataset.from_dict({"prompt": texts}), processing_class=tokenizer,
                                  callbacks=[budget_cb])
    trainer._tokenize_prompts = lambda prompts: ([list(ids_of[p]) for p in prompts], None, {})
    trainer.train()
    shutil.rmtree(args.output_dir, ignore_errors=True)
    trained = trainer.accelerator.unwrap_model(trainer.model)
    after = heldout_metrics(recipe, accelerator, trained, teacher, tokenizer, data.eval)[0]
    samples = greedy_samples(recipe.model_copy(update={"logging": recipe.logging.model_copy(update={"num_samples": 2})}),
                             accelerator, trained, teacher, tokenizer, data.eval)
    return {"before": before, "after": after, "steps": budget_cb.steps, "train_s": budget_cb.spent,
            "samples": [{"teacher": s["teacher"], "student": s["student"]} for s in samples]}


# --- the table and the plot ---------------------------------------------------------------------------------------

def read_records() -> list[dict]:
    return [json.loads(line) for line in open(RECORDS)] if RECORDS.is_file() else []


def mean_sd(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f}"


def table(records: list[dict]) -> str:
    sections = []
    for student in dict.fromkeys(tuple(student_of(r)) for r in records):
        runs = [r for r in records if tuple(student_of(r)) == student]
        sections.append((list(student), runs))
    lines = ["# Methods at equal wall time (benchmarks/methods.py)", "",
             "2-core CPU machine, float32. SmolLM2-135M-Instruct teacher; in each section every method starts from "
             "the same student, a copy of the teacher keeping 17 of its 30 decoder layers (88.5M parameters, 66%). "
             "Budget: seconds of training steps per run (loading, the teacher-summary cache and evaluation not "
             "counted). Held-out: 12 Lee articles; KLs on the student's sampled completions, text metrics on its "
             "greedy 32-token completions. Mean ± standard deviation over seeds (train.seed; the held-out prompts "
             "and their sampling seed fixed).", ""]
    for student, runs in sections:
        lines += [f"## Student: teacher layers {student}", ""] + student_table(runs)
        notes = [f"- {r['method']}, seed {r['seed']}: {r['note']}" for r in runs if r.get("note")]
        if notes:  # what a record's reader should know (added to methods.jsonl by hand, with the reason)
            lines += ["Notes on single runs:", "", *notes, ""]
    dates = sorted({r["date"] for r in records})
    lines.append(f"Records: benchmarks/results/methods.jsonl ({len(records)} runs, {', '.join(dates)}; torch "
                 f"{records[0]['torch']}). Command: `python benchmarks/methods.py --budget B --seeds ... --methods ... "
                 f"[--student '[layers]']`.")
    return "\n".join(lines) + "\n"


def student_table(records: list[dict]) -> list[str]:
    """The tables of one initial student: one per budget."""
    by_key: dict[tuple[float, str], list[dict]] = {}
    initial = next((r for r in records if r["method"] == "initial"), None)
    lines: list[str] = []
    for r in records:
        if r["method"] != "initial":
            by_key.setdefault((r["budget_s"], r["method"]), []).append(r)
    budgets = sorted({b for b, _ in by_key})
    for budget in budgets:
        lines += [f"### Budget {budget:g} s", "",
                  "| method | seeds | steps | " + " | ".join(name for _, name in METRICS) + " | train time | peak RSS |",
                  "|---|---|---|" + "---|" * len(METRICS) + "---|---|"]
        rows = [(m, by_key[(budget, m)]) for m in METHODS if (budget, m) in by_key]
        if initial is not None:
            lines.append("| initial student | - | 0 | " + " | ".join(f"{initial['after'][k]:.3f}" for k, _ in METRICS)
                         + " | - | - |")
        for method, runs in rows:
            cells = [mean_sd([r["after"][k] for r in runs]) for k, _ in METRICS]
            lines.append(f"| {LABELS[method]} | {', '.join(str(r['seed']) for r in runs)} | "
                         f"{statistics.fmean(r['steps'] for r in runs):.0f} | " + " | ".join(cells) +
                         f" | {statistics.fmean(r['train_s'] for r in runs):.0f} s | "
                         f"{max(r['peak_rss_gib'] for r in runs):.2f} GiB |")
        lines += ["", "Greedy completions of the first held-out article (seed of the first run):", ""]
        teacher = rows[0][1][0].get("samples", [{}])[0].get("teacher", "")
        lines.append(f"- teacher: {teacher!r}")
        if initial is not None:
            lines.append(f"- initial student: {initial['samples'][0]['student']!r}")
        for method, runs in rows:
            sample = runs[0].get("samples", [{}])[0].get("student", "")
            lines.append(f"- {method}: {sample!r}")
        lines.append("")
    return lines


def plot(records: list[dict], path: Path) -> None:
    """Quality against wall time (each run's KL at its training seconds: with several budgets, curves), and the
    trade-off the table shows: the text metrics against the held-out KL, one point per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    panels = ((("train_s", "seconds of training"), ("eval/reverse_kl", "held-out KL(q‖p), lower is better")),
              (("eval/reverse_kl", "held-out KL(q‖p)"), ("eval/rougeL_teacher", "ROUGE-L vs teacher")),
              (("eval/reverse_kl", "held-out KL(q‖p)"), ("eval/distinct1", "distinct-1 (teacher 0.90)")))
    initial = next((r["after"] for r in records if r["method"] == "initial"), None)
    for method in METHODS:
        runs = [r for r in records if r["method"] == method]
        for ax, ((xkey, xlabel), (ykey, ylabel)) in zip(axes, panels):
            if runs:
                xs = [r[xkey] if xkey in r else r["after"][xkey] for r in runs]
                ax.scatter(xs, [r["after"][ykey] for r in runs], label=method, alpha=0.75)
            ax.set_xlabel(xlabel)
            ax.set_title(ylabel)
    if initial is not None:
        for ax, (_, (ykey, _)) in zip(axes, panels):
            ax.axhline(initial[ykey], color="gray", linestyle=":", linewidth=1)
    axes[0].legend(fontsize=8)
    fig.suptitle("Distillation methods at equal wall time, from the recipe's student (one point per run; dotted: the "
                 "initial student)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def publish() -> None:
    records = read_records()
    if not records:
        raise SystemExit(f"no records in {RECORDS}")
    text = table(records)
    (RESULTS / "methods.md").write_text(text)
    from onpolicy_kd.recipe import load_recipe

    student = load_recipe(RECIPE).student.keep_layers  # the plot shows the runs from the recipe's own student
    plot([r for r in records if student_of(r) == student], RESULTS / "methods.png")
    print(text)


def main() -> None:
    global RESULTS, RECORDS
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budget", type=float, default=300.0, help="seconds of training steps per run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of methods.jsonl / .md / .png")
    parser.add_argument("--table-only", action="store_true", help="redraw methods.md and methods.png from the records")
    parser.add_argument("--run", choices=[*METHODS, "initial"], help=argparse.SUPPRESS)  # a child process: one run
    parser.add_argument("--json", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--student", type=json.loads, default=None,
                        help="teacher layers the initial student keeps, e.g. '[0, 1, 2, 29]' (default: the recipe's)")
    args = parser.parse_args()
    RESULTS, RECORDS = args.results, args.results / "methods.jsonl"
    if args.run:
        run_one(args.run, args.seeds[0], args.budget, args.json, args.student)
        return
    if not args.table_only:
        from onpolicy_kd.recipe import load_recipe

        student = args.student or load_recipe(RECIPE).student.keep_layers
        first = [] if initial_metrics(student) is not None else [(args.seeds[0], "initial")]
        for seed, method in first + [(seed, method) for seed in args.seeds for method in args.methods]:
            out = Path(tempfile.mkdtemp()) / "record.json"
            print(f"--- {method}, seed {seed}, {args.budget:g} s", flush=True)
            subprocess.run([sys.executable, __file__, "--run", method, "--seeds", str(seed), "--budget",
                            str(args.budget), "--json", str(out), "--student", json.dumps(student)], check=True, cwd=ROOT)
            RESULTS.mkdir(parents=True, exist_ok=True)
            with open(RECORDS, "a") as f:
                f.write(out.read_text() + "\n")
            publish()
    publish()


if __name__ == "__main__":
    main()
