"""Benchmark: distillation methods at equal wall time, judged by the student they hand back, on two tasks.

    python benchmarks/methods.py --task news --methods kd kd_freq seqkd gkd_rkl trl         # 300 s, seeds 1 2 3
    python benchmarks/methods.py --task arithmetic --methods kd seqkd gkd_rkl trl --budget 300 --seeds 1 2 3
    python benchmarks/methods.py --table-only                  # redraw methods.md and methods.png from the records

Tasks (each recipe supplies the models, data, batch and held-out evaluation; every method of a task starts from
the recipe's student):
- news (recipes/smollm2_news.yaml): SmolLM2-135M-Instruct -> its 17-layer copy, "summarize in one sentence" on
  Lee news articles (train rows 0-279, batch 4, 32 new tokens); judged on 60 articles of other outlets against
  their human-written headlines, against the teacher's greedy and sampled answers, and by KL, diversity and
  truncation.
- arithmetic (recipes/smollm2_arithmetic.yaml): the toolkit's own arithmetic teacher (SmolLM2 fine-tuned on
  worked multi-step sums) -> its 17-layer copy, 1,000 training questions, batch 8, 64 new tokens; judged on 100
  held-out questions by exact-match accuracy of the final answer.
Every method trains for the same wall-clock budget of training steps (`train.max_time`; loading, the teacher's
cached answers and evaluation not counted) in its own process, one seed at a time, alone on the machine, and is
then measured by the same held-out evaluation (evaluation/heldout.py): greedy and 3 sampled completions per
prompt at temperature 1. Equal seconds are equal work only on an equally fast machine: each record names its CPU
and the seconds of a fixed forward and backward pass of the student (the speed check) taken before training, and
the tables mark seeds from another CPU and seeds whose check ran more than 10% slower than their section's median.

Methods (each states its own objective, completions and schedule):
- kd: dense forward KL on the teacher's cached greedy answers (GKD with lambda 0 and seq_kd), lr 5e-4 cosine;
- kd_freq: kd with the frequency penalty 5 (the news recipe's own pipeline; the arithmetic recipe's is kd);
- seqkd: cross-entropy on the same cached teacher answers (SeqKD), lr 5e-4 cosine;
- gkd_rkl: on-policy reverse KL on the student's own samples alone, lr 1e-4 constant;
- gkd_jsd: the same with the generalized JSD (beta 0.5); pg: MiniLLM-style policy gradient (its defaults);
- staged / staged_fkl: kd for 1/2 (2/3) of the budget, then on-policy reverse (forward) KL;
- seqkd_staged: seqkd for 1/2 of the budget, then on-policy reverse KL (off-policy first, as Qwen3 did);
- seqkd_distillm2: seqkd for 1/3, then the DistiLLM-2 loss (lr 2e-4); distillm2_seqkd: the other order, the
  DistiLLM-2 loss for 3/4 (lr 5e-4), then seqkd (lr 2e-4) to narrow the student's distribution for sampling;
- trl: TRL's DistillationTrainer (on-policy reverse KL, its only objective) on the same student, prompt ids,
  learning rate (1e-4 constant) and budget;
- gkd_mix: GKD with lambda 0.5 and the JSD (beta 0.5): the teacher's cached greedy answers at half the steps, the
  student's samples at temperature 1 at the others, lr 5e-4 cosine;
- distillm: DistiLLM's recipe: skew forward KL (0.1), the student-sample share starting at 0 and raised by 0.25
  whenever the held-out KL rises (evaluations every 20 steps, not counted in the budget), a replay buffer of 64
  samples reused once with probability 0.5;
- distillm2: DistiLLM-2's loss, skew forward KL on the cached teacher answers and skew reverse KL on the student's
  samples of the same prompts at every step;
- pg_mix: the policy gradient with teacher mixing alpha 0.2, importance weights capped at 5 and the three penalties.

Figures: the mean over seeds and prompts, ± the standard error of a bootstrap that resamples both the training
seeds and the prompts (evaluation/uncertainty.py; KLs are token-level means, resampled by prompt). The
"differences from kd" table pairs each method with kd on the same prompts and marks with * a difference whose
95% interval excludes 0: only those are differences. Each (task, method, seed) appends one JSON record with its
per-prompt figures to benchmarks/results/methods.jsonl.gz (gzip: the records with their per-prompt figures and texts
run to megabytes); methods.md and methods.png are drawn from all records.
"""

from __future__ import annotations

import argparse
import gzip
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

TASKS = {"news": ROOT / "recipes" / "smollm2_news.yaml", "arithmetic": ROOT / "recipes" / "smollm2_arithmetic.yaml"}
DEFAULT_METHOD = {"news": "kd_freq", "arithmetic": "kd"}  # each recipe's own pipeline
RESULTS = ROOT / "benchmarks" / "results"
RECORDS = RESULTS / "methods.jsonl.gz"

TEACHER_TEXT = ["teacher_text.cache=true", "teacher_text.do_sample=false", "optim.lr=5.0e-4", "optim.scheduler=cosine",
                "optim.warmup_steps=5", "objective.lmbda=0.0", "objective.seq_kd=true"]
HEAL = ("objective: {mode: gkd, lmbda: 0.0, seq_kd: true, divergence: forward_kl}, "
        "teacher_text: {cache: true, do_sample: false}, optim: {lr: 5.0e-4, scheduler: cosine, warmup_steps: 5}")
ON_POLICY_STAGE = ("teacher_text: {cache: false}, rollout: {do_sample: true, batch_size: null}, optim: {lr: 1.0e-4, "
                   "scheduler: constant, warmup_steps: 0}, objective: {mode: gkd, lmbda: 1.0, seq_kd: false, "
                   "divergence: %s}")
# one phase of on-policy GKD: the student's own samples at temperature 1, lr 1e-4 constant
ON_POLICY = ["stages=[]", "objective.mode=gkd", "objective.lmbda=1.0", "objective.seq_kd=false",
             "objective.divergence=reverse_kl", "teacher_text.cache=false", "rollout.do_sample=true",
             "rollout.batch_size=null", "optim.lr=1.0e-4", "optim.scheduler=constant", "optim.warmup_steps=0"]


# gkd mixing the teacher's cached greedy text with the student's samples at temperature 1 (lmbda set per method)
MIXED = ["stages=[]", "objective.mode=gkd", "objective.seq_kd=true", "teacher_text.cache=true",
         "teacher_text.do_sample=false", "rollout.do_sample=true", "rollout.batch_size=null", "optim.lr=5.0e-4",
         "optim.scheduler=cosine", "optim.warmup_steps=5"]


def seqkd_stage(lr: str = "5.0e-4") -> str:
    """SeqKD as a stage: cross-entropy on the teacher's cached greedy answers (gkd's keys back at their defaults)."""
    return ("objective: {mode: seqkd, lmbda: 1.0, seq_kd: false, divergence: reverse_kl}, "
            "teacher_text: {cache: true, do_sample: false}, optim: {lr: %s, scheduler: cosine, warmup_steps: 5}" % lr)


def distillm2_stage(lr: str = "2.0e-4") -> str:
    """DistiLLM-2 as a stage: skew forward KL on the cached teacher text and skew reverse KL on the student's own
    samples in every step (half of each step's completions are the student's); as a later stage, lr restarting
    lower than the first stage's."""
    return ("objective: {mode: distillm2, skew: 0.1, lmbda: 1.0, seq_kd: false, divergence: reverse_kl}, "
            "teacher_text: {cache: true, do_sample: false}, rollout: {do_sample: true, batch_size: null}, "
            "optim: {lr: %s, scheduler: cosine, warmup_steps: 5}" % lr)


def staged(budget: float, heal_share: float, divergence: str, first: str = HEAL, second: str | None = None,
           names: tuple[str, str] = ("heal", "onpolicy")) -> list[str]:
    second = second or ON_POLICY_STAGE % divergence
    return ["train.max_time=null", "train.max_steps=null",
            f"stages=[{{name: {names[0]}, max_time: {budget * heal_share:g}, {first}}}, "
            f"{{name: {names[1]}, max_time: {budget * (1 - heal_share):g}, {second}}}]"]


METHODS: dict[str, object] = {
    "kd": lambda budget: ["stages=[]", "objective.mode=gkd", "objective.divergence=forward_kl", *TEACHER_TEXT],
    "kd_freq": lambda budget: ["stages=[]", "objective.mode=gkd", "objective.divergence=forward_kl",
                               "penalties.frequency=5.0", *TEACHER_TEXT],
    # MiniLMv2's self-attention relations of the student's last layer (17 of both tasks' students) and the
    # teacher's last, beside KD (issue "what the peers have"); weight 1: the untrained copy's relation KL is ~0.3;
    # 3 relation heads of 192 / 64 (queries / keys and values), as first measured (the default is now 12)
    "kd_relation": lambda budget: ["stages=[]", "objective.mode=gkd", "objective.divergence=forward_kl",
                                   "hidden.weight=1.0", "hidden.loss=attention_relation", "hidden.layers=[[17, 30]]",
                                   "hidden.relation_heads=3", *TEACHER_TEXT],
    # KD from the teacher's top-k log-probs kept in the cache beside its text: no teacher forward at any step (issue
    # "what the peers have"); the cache is made once per k before the first run and not counted, as the text is
    **{f"kd_top{k}": (lambda budget, k=k: ["stages=[]", "objective.mode=gkd", "objective.divergence=forward_kl",
                                           f"teacher_text.topk={k}", *TEACHER_TEXT]) for k in (20, 50, 100)},
    # Distily's logit MSE (centred logits) in place of the forward KL, on the same teacher text (issue "what the
    # peers have")
    "kd_logit_mse": lambda budget: ["stages=[]", "objective.mode=gkd", "objective.divergence=logit_mse",
                                    *TEACHER_TEXT],
    "seqkd": lambda budget: ["stages=[]", "objective.mode=seqkd", "objective.divergence=reverse_kl",
                             "objective.lmbda=1.0", "objective.seq_kd=false",
                             *[t for t in TEACHER_TEXT if not t.startswith("objective.")]],
    "gkd_rkl": lambda budget: ON_POLICY,
    "gkd_jsd": lambda budget: ON_POLICY + ["objective.divergence=jsd", "objective.beta=0.5"],
    "pg": lambda budget: ON_POLICY + ["objective.mode=pg"],
    "staged": lambda budget: staged(budget, 1 / 2, "reverse_kl"),
    "staged_fkl": lambda budget: staged(budget, 2 / 3, "forward_kl"),
    "seqkd_staged": lambda budget: staged(budget, 1 / 2, "reverse_kl", seqkd_stage()),
    "seqkd_distillm2": lambda budget: staged(budget, 1 / 3, "reverse_kl", seqkd_stage(), distillm2_stage()),
    # the other order: DistiLLM-2 first (at the one-stage method's lr), then SeqKD (lr restarting lower) to narrow
    # the student's own distribution, which is what SeqKD's sampled text owes its lead to (its KL(p||q) doubles)
    "distillm2_seqkd": lambda budget: staged(budget, 3 / 4, "reverse_kl", distillm2_stage("5.0e-4"),
                                             seqkd_stage("2.0e-4"), ("distillm2", "seqkd")),
    "trl": lambda budget: ON_POLICY,
    # the on-policy methods of the published work (issue "on-policy earns its place"); teacher text from the cache
    "gkd_mix": lambda budget: [*MIXED, "objective.lmbda=0.5", "objective.divergence=jsd", "objective.beta=0.5"],
    "distillm": lambda budget: [*MIXED, "objective.lmbda=0.0", "objective.lmbda_schedule=adaptive",
                                "objective.lmbda_step=0.25", "eval.eval_steps=20", "objective.divergence=skew_forward_kl",
                                "objective.skew=0.1", "replay.size=64", "replay.share=0.5", "replay.reuse=1"],
    "distillm2": lambda budget: [*MIXED, "objective.mode=distillm2", "objective.skew=0.1", "objective.seq_kd=false",
                                 "objective.lmbda=1.0", "objective.divergence=reverse_kl"],  # (the defaults: unused)
    "pg_mix": lambda budget: ON_POLICY + ["objective.mode=pg", "rollout.alpha=0.2", "objective.is_clip=5.0",
                                          "penalties.frequency=1.0", "penalties.diversity=0.1",
                                          "penalties.entropy=0.01"],
}
LABELS = {"kd": "KD: forward KL on teacher text", "kd_freq": "KD + frequency penalty 5",
          "kd_relation": "KD + attention relations (MiniLMv2, last layer, 3 heads)",
          **{f"kd_top{k}": f"KD from the cached top-{k} (no teacher forward)" for k in (20, 50, 100)},
          "kd_logit_mse": "KD with the centred-logit MSE instead of the KL",
          "seqkd": "SeqKD: CE on teacher text", "gkd_rkl": "on-policy GKD, reverse KL",
          "gkd_jsd": "on-policy GKD, JSD 0.5", "pg": "PG (MiniLLM-style)",
          "staged": "KD 1/2, then on-policy reverse KL", "staged_fkl": "KD 2/3, then on-policy forward KL",
          "seqkd_staged": "SeqKD 1/2, then on-policy reverse KL",
          "seqkd_distillm2": "SeqKD 1/3, then the DistiLLM-2 loss",
          "distillm2_seqkd": "the DistiLLM-2 loss 3/4, then SeqKD",
          "trl": "TRL DistillationTrainer (on-policy reverse KL)",
          "gkd_mix": "GKD λ 0.5, JSD 0.5, teacher text from the cache",
          "distillm": "DistiLLM: skew KL, adaptive λ from 0, replay", "distillm2": "DistiLLM-2 loss",
          "pg_mix": "PG, α 0.2, three penalties"}
# this toolkit's methods that train on the student's own samples (at least in a stage): each is compared with TRL's
# on-policy trainer when both ran at a budget
ON_POLICY_METHODS = ("gkd_rkl", "gkd_jsd", "pg", "staged", "staged_fkl", "seqkd_staged", "seqkd_distillm2",
                     "distillm2_seqkd", "gkd_mix", "distillm", "distillm2", "pg_mix")
# the staged pipelines that spend part of their budget on SeqKD: each is also compared with SeqKD alone
SEQKD_PIPELINES = ("seqkd_staged", "seqkd_distillm2", "distillm2_seqkd")
# the columns of each task's main table: (summary key, heading)
COLUMNS = {
    "news": (("greedy/rougeL_ref", "ROUGE-L vs refs, greedy"), ("sampled/rougeL_ref", "ROUGE-L vs refs, sampled"),
             ("greedy/rougeL_teacher", "ROUGE-L vs teacher, greedy"),
             ("sampled/rougeL_teacher_samples", "ROUGE-L vs teacher samples, sampled"),
             ("reverse_kl_samples", "KL(q‖p)"), ("forward_kl_samples", "KL(p‖q)"),
             ("greedy/distinct1", "distinct-1, greedy"), ("greedy/repetition", "repetition, greedy"),
             ("greedy/truncated", "cut, greedy")),
    "arithmetic": (("greedy/accuracy", "accuracy, greedy"), ("sampled/accuracy", "accuracy, sampled"),
                   ("reverse_kl_samples", "KL(q‖p)"), ("forward_kl_samples", "KL(p‖q)"),
                   ("greedy/repetition", "repetition, greedy"), ("greedy/truncated", "cut, greedy"),
                   ("sampled/truncated", "cut, sampled"), ("greedy/length", "length, greedy")),
}
KL_KEYS = ("reverse_kl_samples", "forward_kl_samples")


def overrides(method: str, seed: int, budget: float, work: Path) -> list[str]:
    common = [f"train.seed={seed}", f"train.output_dir={work}", "logging.live=false", "eval.eval_steps=0"]
    budget_keys = [] if "staged" in method else [f"train.max_time={budget:g}", "train.max_steps=100000"]
    # every method without the frequency penalty the news recipe has, unless it names it (kd_freq)
    return ["penalties.frequency=0.0", *budget_keys, *common, *METHODS[method](budget)]  # the method's keys win


def record_of(evaluation) -> dict:
    """What a record keeps of an evaluation: the summary, every per-prompt figure, each prompt's KL sums, and the
    first two prompts' texts."""
    predictions = evaluation.predictions
    keys = list(predictions[0]["metrics"])
    return {"summary": evaluation.summary, "prompts": len(predictions),
            "per_prompt": {key: [p["metrics"][key] for p in predictions] for key in keys},
            "kl": {name: [p["kl_sums"][name] for p in predictions] for name in ("tokens", "reverse_kl", "forward_kl")},
            "samples": [{"reference": p["reference"], "teacher": p["teacher"], "student": p["student"],
                         "student_sampled": p["student_samples"][0]} for p in predictions[:2]]}


def learning_curve(rows: list[dict], task: str) -> list[dict]:
    """The held-out figures of every evaluation during a run, each at the seconds of training steps before it."""
    from onpolicy_kd.evaluation.heldout import logged_metrics  # how training names an evaluation's figures

    names = {key: next(iter(logged_metrics({key: 0.0}))) for key, _ in COLUMNS[task]}
    curve, seconds = [], 0.0
    for row in rows:
        seconds += row.get("time/step_s", 0.0)
        if "eval/reverse_kl" in row:
            figures = {key: row[name] for key, name in names.items() if name in row}
            curve.append({"step": row["step"], "train_s": round(seconds, 1), **figures})
    return curve


def run_one(task: str, method: str, seed: int, budget: float, out_json: Path, curve_every: int = 0) -> None:
    """In a child process: train one method for the budget, evaluate, write a JSON record (with the learning curve
    when curve_every > 0: a held-out evaluation every that many steps, not counted in the budget)."""
    import torch
    from accelerate import Accelerator

    from onpolicy_kd.data.loading import load_prompt_data
    from onpolicy_kd.evaluation.heldout import heldout_evaluation, logged_metrics
    from onpolicy_kd.evaluation.teacher_answers import recipe_teacher_answers
    from onpolicy_kd.models.loading import load_models
    from onpolicy_kd.recipe import load_recipe
    from onpolicy_kd.train import train
    from onpolicy_kd.training.stages import run_stages

    recipe_path = TASKS[task]
    work = Path(tempfile.mkdtemp(prefix=f"methods-{task}-{method}-"))
    curve_keys = [f"eval.eval_steps={curve_every}"] if curve_every else []
    recipe = load_recipe(recipe_path, overrides("gkd_rkl" if method == "initial" else method, seed, budget, work)
                         + curve_keys)
    models = load_models(recipe, str(recipe_path))
    speed_s = speed_check(models.student)
    started = time.perf_counter()
    initial = initial_record(task)
    before = logged_metrics(initial["summary"]) if initial else None
    curve = None
    if method in ("initial", "trl"):
        data = load_prompt_data(recipe.data, models.tokenizer, seed=recipe.train.seed)
        answers = recipe_teacher_answers(recipe, models.teacher, models.tokenizer, data.eval)
        if method == "initial":  # the untrained student, measured like every trained one
            evaluation, steps, train_s = heldout_evaluation(recipe, Accelerator(cpu=True), models.student,
                                                            models.teacher, models.tokenizer, data.eval, answers), 0, 0.0
        else:
            trained, steps, train_s = run_trl(recipe, models, budget, data)
            evaluation = heldout_evaluation(recipe, Accelerator(cpu=True), trained, models.teacher, models.tokenizer,
                                            data.eval, answers)
    else:
        result = (run_stages(recipe, str(recipe_path), models, before=before) if recipe.stages
                  else train(recipe, str(recipe_path), models, before=before))
        rows = [json.loads(line) for line in open(work / "metrics.jsonl")]
        step_rows = [r for r in rows if "time/step_s" in r]
        evaluation, steps, train_s = result.evaluation, len(step_rows), sum(r["time/step_s"] for r in step_rows)
        curve = learning_curve(rows, task) if curve_every else None
    record = record_of(evaluation) | {
        "task": task, "method": method, "seed": seed, "budget_s": budget, "steps": steps, "train_s": train_s,
        "wall_s": time.perf_counter() - started, "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "machine": machine(), "speed_s": speed_s}
    if curve:  # (only a run of the package's own trainer has one)
        record["curve"] = curve
    out_json.write_text(json.dumps(record))
    shutil.rmtree(work, ignore_errors=True)  # checkpoints and exports: 1.4-3 GB a run


def speed_check(model, repeats: int = 5) -> float:
    """Seconds of one fixed forward and backward pass of the student (the median of `repeats`, after one warm-up):
    the same CPU model is not always the same speed (a shared host, another day), and at equal wall time a slower
    machine gives fewer steps; the tables flag the runs whose check was slow. It draws from its own generator and
    leaves no gradient behind, so the run that follows is the run it would have been."""
    import torch

    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (4, 96), generator=generator)
    times = []
    for _ in range(repeats + 1):
        started = time.perf_counter()
        loss = model(input_ids=ids).logits.float().logsumexp(-1).mean()
        if loss.requires_grad:  # (a student with every weight frozen has no backward to time)
            loss.backward()
        times.append(time.perf_counter() - started)
    model.zero_grad(set_to_none=True)
    return statistics.median(times[1:])


# a run whose speed check took this much longer than the median of its section's is flagged as timed on a slow machine
SLOW = 1.10


def machine() -> str:
    """The CPU a run was timed on: at equal wall time a faster CPU buys more steps, so seeds measured on different
    machines are marked as such in the tables (the model name, the cores and the matrix instructions PyTorch uses)."""
    import os

    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "")
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    matrix = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return f"{name or 'unknown CPU'}, {os.cpu_count()} cores, {' '.join(matrix) or 'no AVX2'}"


def run_trl(recipe, models, budget: float, data) -> tuple[object, int, float]:
    """TRL's DistillationTrainer for `budget` seconds of steps, fed our exact prompt ids (as benchmarks/step.py):
    (the trained student, steps, seconds of steps)."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DistillationConfig, DistillationTrainer

    tokenizer, student, teacher = models.tokenizer, models.student, models.teacher
    texts = [tokenizer.decode(ids, skip_special_tokens=False) for ids in data.train["prompt_ids"]]
    ids_of = dict(zip(texts, data.train["prompt_ids"]))

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
        top_k=0, top_p=1.0, beta=1.0, max_completion_length=recipe.rollout.max_new_tokens, use_cpu=True,
        bf16=recipe.train.mixed_precision == "bf16", fp16=False, gradient_checkpointing=False, disable_dropout=True,
        logging_steps=10, save_strategy="no", report_to=[], seed=recipe.train.seed, dataloader_num_workers=0,
    )
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args,
                                  train_dataset=Dataset.from_dict({"prompt": texts}), processing_class=tokenizer,
                                  callbacks=[budget_cb])
    trainer._tokenize_prompts = lambda prompts: ([list(ids_of[p]) for p in prompts], None, {})
    trainer.train()
    shutil.rmtree(args.output_dir, ignore_errors=True)
    return trainer.accelerator.unwrap_model(trainer.model).eval(), budget_cb.steps, budget_cb.spent


# --- the tables and the plot --------------------------------------------------------------------------------------

def read_records() -> list[dict]:
    if not RECORDS.is_file():
        return []
    with gzip.open(RECORDS, "rt") as f:  # (appended records are gzip members one after another)
        return [json.loads(line) for line in f]


def initial_record(task: str) -> dict | None:
    """The untrained student's record of a task: every run starts from it and the evaluation is seeded, so it is
    measured once, before the first method runs."""
    return next((r for r in read_records() if r["task"] == task and r["method"] == "initial"), None)


def cells(runs: list[dict], key: str, teacher: bool = False) -> tuple[list[list[float]], list[list[float]] | None]:
    """(seeds x prompts values, their weights): per-prompt figures; a KL is each prompt's sum / its tokens, weighted
    by the tokens (a token-level mean); the teacher's figures are read under teacher/."""
    if key in KL_KEYS:
        name = key.removesuffix("_samples")
        tokens = [r["kl"]["tokens"] for r in runs]
        return [[s / max(n, 1) for s, n in zip(r["kl"][name], t)] for r, t in zip(runs, tokens)], tokens
    return [r["per_prompt"][f"teacher/{key}" if teacher else key] for r in runs], None


def estimate(runs: list[dict], key: str, teacher: bool = False):
    from onpolicy_kd.evaluation.uncertainty import seed_prompt_bootstrap

    values, weights = cells(runs, key, teacher)
    return seed_prompt_bootstrap(values, weights=weights)


def teacher_figure(record: dict, key: str):
    """The teacher's own figure for a column, from a record (the initial one, or a run's: each keeps the figures of
    the teacher it was judged beside); None where it has none (no KL to itself, no ROUGE-L of its greedy answer
    against itself)."""
    return estimate([record], key, teacher=True) if f"teacher/{key}" in record["per_prompt"] else None


# records made before runs noted their CPU (all of 2026-12-06 and the first of 2026-12-07)
UNRECORDED = "CPU not recorded (runs of 2026-12-06/07)"


def teacher_groups(runs: list[dict]) -> list[list[dict]]:
    """The section's runs grouped by the teacher they were distilled from, the most common first. A teacher is known
    by its own per-prompt figures in the record: the arithmetic teacher is trained on each machine and its answers
    differ from machine to machine, and a teacher's sampled answers are drawn again where its cache was made anew.
    Runs without the teacher's figures are left out."""
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        keys = sorted(k for k in run["per_prompt"] if k.startswith("teacher/"))
        if keys:
            groups.setdefault(tuple((k, tuple(run["per_prompt"][k])) for k in keys), []).append(run)
    return sorted(groups.values(), key=len, reverse=True)


def task_tables(task: str, records: list[dict]) -> list[str]:
    columns = COLUMNS[task]
    initial = next((r for r in records if r["method"] == "initial"), None)
    lines: list[str] = []
    for budget in sorted({r["budget_s"] for r in records if r["method"] != "initial"}):
        by_method = {m: [r for r in records if r["method"] == m and r["budget_s"] == budget] for m in METHODS}
        by_method = {m: runs for m, runs in by_method.items() if runs}
        prompts = next(iter(by_method.values()))[0]["prompts"]
        machines = sorted({r.get("machine", UNRECORDED) for runs in by_method.values() for r in runs})
        mark = {m: "abcdefghij"[i] for i, m in enumerate(machines)} if len(machines) > 1 else {}
        lines += [f"### {task}, budget {budget:g} s ({prompts} held-out prompts)", ""]
        lines += ([f"Runs from {len(machines)} machines, marked after each seed (a faster CPU takes more steps in the "
                   f"same seconds): " + "; ".join(f"{mark[m]}: {m}" for m in machines) + ".", ""] if mark
                  else [f"Machine: {machines[0]}.", ""])
        speeds = {id(r): r["speed_s"] for runs in by_method.values() for r in runs if "speed_s" in r}
        typical = statistics.median(speeds.values()) if speeds else 0.0
        slow = {run for run, seconds in speeds.items() if seconds > SLOW * typical}
        if speeds:
            lines += [f"Speed check (one fixed forward and backward pass of the student before training): median "
                      f"{typical:.3f} s over the {len(speeds)} runs that have one"
                      + (f"; † marks a seed whose check took more than {SLOW - 1:.0%} longer (fewer steps in the "
                         f"same seconds)" if slow else "") + ".", ""]
        teachers = teacher_groups([r for runs in by_method.values() for r in runs])
        other_teacher = {id(r): "‡" * i for i, group in enumerate(teachers) for r in group}
        if len(teachers) > 1:
            lines += ["‡ marks a seed distilled from another teacher than the rest of the section (the arithmetic "
                      "teacher is trained on each machine; a teacher's sampled answers are drawn again where its "
                      "cache is made anew): each teacher has its own row.", ""]
        lines += ["| method | seeds | steps | " + " | ".join(h for _, h in columns) + " | train time | peak RSS |",
                  "|---|---|---|" + "---|" * len(columns) + "---|---|"]
        if initial is not None:
            lines.append("| initial student | - | 0 | " + " | ".join(str(estimate([initial], k)) for k, _ in columns)
                         + " | - | - |")
        for method, runs in by_method.items():
            name = LABELS[method] + (" (the recipe's own)" if method == DEFAULT_METHOD[task] else "")
            seeds = ", ".join(f"{r['seed']}{mark.get(r.get('machine', UNRECORDED), '')}{'†' if id(r) in slow else ''}"
                              f"{other_teacher.get(id(r), '')}" for r in runs)
            lines.append(f"| {name} | {seeds} | "
                         f"{statistics.fmean(r['steps'] for r in runs):.0f} | "
                         + " | ".join(str(estimate(runs, k)) for k, _ in columns)
                         + f" | {statistics.fmean(r['train_s'] for r in runs):.0f} s | "
                         f"{max(r['peak_rss_gib'] for r in runs):.2f} GiB |")
        for i, source in enumerate([group[0] for group in teachers] or ([initial] if initial is not None else [])):
            lines.append(f"| teacher{' ' + '‡' * i if i else ''} | - | - | " + " | ".join(
                str(teacher_figure(source, k) or "-") for k, _ in columns) + " | - | - |")
        if "kd" in by_method and len(by_method) > 1:
            lines += difference_table("Differences from KD", columns, by_method, "kd",
                                      [m for m in by_method if m != "kd"])
        with_seqkd = [m for m in by_method if m in SEQKD_PIPELINES]
        if "seqkd" in by_method and with_seqkd:  # does the other stage add to SeqKD, or only dilute it?
            lines += difference_table("Pipelines with a SeqKD stage minus SeqKD alone", columns, by_method, "seqkd",
                                      with_seqkd)
        ours = [m for m in by_method if m in ON_POLICY_METHODS]
        if "trl" in by_method and ours:  # gkd_rkl: the same objective, models, prompts, lr and budget as TRL's run
            lines += difference_table("The on-policy methods minus TRL's trainer", columns, by_method, "trl", ours,
                                      aside="gkd_rkl: the same on-policy reverse KL, models, prompts, lr and budget; ")
        lines += ["", "First held-out prompt (seed of the first run): the reference, the teacher's greedy answer, each "
                      "student's greedy and first sampled completion:", ""]
        first = next(iter(by_method.values()))[0]["samples"][0]
        lines += [f"- reference: {first['reference']!r}", f"- teacher: {first['teacher']!r}"]
        if initial is not None:
            lines.append(f"- initial student: {initial['samples'][0]['student']!r}")
        for method, runs in by_method.items():
            sample = runs[0]["samples"][0]
            lines.append(f"- {method}: greedy {sample['student']!r}; sampled {sample['student_sampled']!r}")
        lines.append("")
    lines += curve_tables(task, records)
    return lines


def curve_tables(task: str, records: list[dict]) -> list[str]:
    """Runs with a learning curve (--curve-every): each held-out evaluation at its seconds of training steps, from the
    untrained student's figures at 0 s. One seed per run: the points carry no uncertainty here; compare them with
    the 3-seed tables' ± before reading a gap. A point of a long run is not a run with that budget: the learning-rate
    schedule of every point is the whole run's."""
    logged = {key for r in records for point in r.get("curve", []) for key in point}
    columns = [(key, heading) for key, heading in COLUMNS[task] if key in logged]
    initial = next((r for r in records if r["method"] == "initial"), None)
    lines = []
    for run in (r for r in records if r.get("curve")):
        lines += [f"### {task}: learning curve of {LABELS[run['method']]}, seed {run['seed']}, budget {run['budget_s']:g} s",
                  "", "| step | training s | " + " | ".join(h for _, h in columns) + " |",
                  "|---|---|" + "---|" * len(columns)]
        points = ([{"step": 0, "train_s": 0.0, **initial["summary"]}] if initial else []) + run["curve"]
        for point in points:
            lines.append(f"| {point['step']} | {point['train_s']:.0f} | "
                         + " | ".join(f"{point[k]:.3f}" if k in point else "-" for k, _ in columns) + " |")
        lines.append("")
    return lines


def difference_table(title: str, columns, by_method: dict[str, list[dict]], base: str,
                     methods: list[str], aside: str = "") -> list[str]:
    """Each method's difference from `base` per column, paired on the prompts, ± its bootstrap standard error,
    under its title (and an aside on what the comparison holds equal)."""
    from onpolicy_kd.evaluation.uncertainty import difference

    lines = ["", f"{title} ({aside}paired on the prompts; * where the 95% interval excludes 0):", "",
             "| method | " + " | ".join(h for _, h in columns) + " |", "|---|" + "---|" * len(columns)]
    for method in methods:
        diffs = []
        for key, _ in columns:
            (a, wa), (b, wb) = cells(by_method[method], key), cells(by_method[base], key)
            d = difference(a, b, weights_a=wa, weights_b=wb)
            diffs.append(f"{d.mean:+.3f} ± {d.se:.3f}{' *' if d.excludes_zero else ''}")
        lines.append(f"| {LABELS[method]} | " + " | ".join(diffs) + " |")
    return lines


def table(records: list[dict]) -> str:
    lines = ["# Methods at equal wall time (benchmarks/methods.py)", "",
             "2-core CPU machine. Budget: seconds of training steps per run (loading, the teacher's cached answers "
             "and evaluation not counted). Every figure is the mean over training seeds and held-out prompts ± the "
             "standard error of a bootstrap over both (KLs: token-level, on the first sampled completion of each "
             "prompt); greedy: one completion per prompt, sampled: the mean over 3 completions at temperature 1. "
             "The teacher's row is its own answers, judged the same way (its sampled answers against its other "
             "samples). Differences inside their uncertainty are not results.", ""]
    for task in TASKS:
        runs = [r for r in records if r["task"] == task]
        if runs:
            lines += [f"## Task: {task} (`{TASKS[task].relative_to(ROOT)}`)", "", *task_tables(task, runs)]
    dates = sorted({r["date"] for r in records})
    lines.append(f"Records: benchmarks/results/methods.jsonl.gz ({len(records)} runs, {', '.join(dates)}; torch "
                 f"{records[0]['torch']}). Command: `python benchmarks/methods.py --task T --budget B --seeds ... "
                 f"--methods ...`. The figures of the 12-prompt judge before these (greedy text against the teacher "
                 f"only): methods_lee12.md.")
    return "\n".join(lines) + "\n"


def plot(records: list[dict], path: Path) -> None:
    """Per task, each main figure per method with its error bar (± 1 standard error), the teacher dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in TASKS if any(r["task"] == t and r["method"] != "initial" for r in records)]
    width = max(len(COLUMNS[t]) for t in tasks)
    fig, axes = plt.subplots(len(tasks), width, figsize=(2.6 * width, 3.2 * len(tasks)), squeeze=False)
    for row, task in enumerate(tasks):
        runs = [r for r in records if r["task"] == task]
        budget = max(r["budget_s"] for r in runs)
        methods = [m for m in METHODS if any(r["method"] == m and r["budget_s"] == budget for r in runs)]
        initial = next((r for r in runs if r["method"] == "initial"), None)
        teachers = teacher_groups([r for r in runs if r["budget_s"] == budget and r["method"] != "initial"])
        source = teachers[0][0] if teachers else initial  # the teacher most of the plotted runs had
        for col in range(width):
            ax = axes[row][col]
            if col >= len(COLUMNS[task]):
                ax.axis("off")
                continue
            key, heading = COLUMNS[task][col]
            points = [estimate([r for r in runs if r["method"] == m and r["budget_s"] == budget], key) for m in methods]
            ax.errorbar(range(len(methods)), [p.mean for p in points], yerr=[p.se for p in points], fmt="o", capsize=3)
            teacher = teacher_figure(source, key) if source is not None else None
            if teacher is not None:
                ax.axhline(teacher.mean, color="gray", linestyle=":", linewidth=1)
            ax.set_xticks(range(len(methods)), methods, rotation=60, fontsize=7)
            ax.set_title(f"{task}: {heading}", fontsize=8)
    fig.suptitle("Methods at equal wall time: mean ± 1 s.e. over seeds and prompts (dotted: the teacher)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def publish() -> None:
    records = read_records()
    if not records:
        raise SystemExit(f"no records in {RECORDS}")
    text = table(records)
    (RESULTS / "methods.md").write_text(text)
    if any(r["method"] != "initial" for r in records):
        plot(records, RESULTS / "methods.png")
    print(text)


def main() -> None:
    global RESULTS, RECORDS
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", choices=list(TASKS), default="news")
    parser.add_argument("--budget", type=float, default=300.0, help="seconds of training steps per run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--methods", nargs="+", default=["kd", "seqkd", "gkd_rkl", "trl"], choices=list(METHODS))
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of methods.jsonl.gz / .md / .png")
    parser.add_argument("--curve-every", type=int, default=0, metavar="STEPS",
                        help="also evaluate every STEPS steps and keep the learning curve in the record (for long "
                             "budgets; the evaluations are not counted as training time)")
    parser.add_argument("--table-only", action="store_true", help="redraw methods.md and methods.png from the records")
    parser.add_argument("--run", choices=[*METHODS, "initial"], help=argparse.SUPPRESS)  # a child process: one run
    parser.add_argument("--json", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    RESULTS, RECORDS = args.results, args.results / "methods.jsonl.gz"
    if args.run:
        run_one(args.task, args.run, args.seeds[0], args.budget, args.json, args.curve_every)
        return
    own_eval = [m for m in args.methods if any(k.startswith("eval.eval_steps=") for k in METHODS[m](args.budget))]
    if args.curve_every and own_eval:  # distillm's adaptive λ reads every evaluation: more would change the method
        parser.error(f"--curve-every would change the evaluation cadence {', '.join(own_eval)} set for itself")
    if not args.table_only:
        first = [] if initial_record(args.task) is not None else [(args.seeds[0], "initial")]
        for seed, method in first + [(seed, method) for seed in args.seeds for method in args.methods]:
            out = Path(tempfile.mkdtemp()) / "record.json"
            print(f"--- {args.task}: {method}, seed {seed}, {args.budget:g} s", flush=True)
            subprocess.run([sys.executable, __file__, "--task", args.task, "--run", method, "--seeds", str(seed),
                            "--budget", str(args.budget), "--json", str(out), "--curve-every", str(args.curve_every)],
                           check=True, cwd=ROOT)
            RESULTS.mkdir(parents=True, exist_ok=True)
            with gzip.open(RECORDS, "at") as f:
                f.write(out.read_text() + "\n")
            publish()
    publish()


if __name__ == "__main__":
    main()
