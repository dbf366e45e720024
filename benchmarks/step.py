"""Benchmark: the whole on-policy step and its result, our loop vs TRL's DistillationTrainer, in one run.

    python benchmarks/step.py                     # the offline default task (recipes/smollm2_news.yaml), 40 steps
    python benchmarks/step.py --steps 10          # shorter
    python benchmarks/step.py --precision bf16    # both given bfloat16 mixed precision (the recipe's own setting)

The offline default task: SmolLM2-135M-Instruct teacher, its 10-layer copy as student, Lee news
prompts (train rows 0-279, held out 280-291), batch 4, 32 new tokens, temperature 1, lr 1e-4 constant,
grad clip 1, reverse KL (beta = 1), on the CPU in float32, or with `--precision bf16` both given accelerate's
bfloat16 mixed precision (ours train.mixed_precision=bf16, TRL's bf16=True; weights and optimizer in float32,
the teacher's forward in float32 in both). What that setting does differs between the two loops, and the
report records it: ours decodes the rollout in one autocast region and runs the student's loss forward and
backward under autocast; TRL's `generate` runs under accelerate's autocast wrapper (one autocast per forward
call, so every weight is cast again at every token) and its training forwards go through TRL's forward
redirection, which bypasses that wrapper: they run in float32 (`trl_autocast` in the report: whether autocast
was on inside TRL's hidden-state forwards and inside `generate`). Three variants, each in its own process (so peak
memory is per variant) and from the same initial student:
- trl: TRL's `DistillationTrainer` (HF `generate`, its chunked divergence; gradient checkpointing off,
  dropout off, like ours), fed exactly our prompt token ids (its prompt tokenisation is bypassed);
- ours: the recipe's on-policy settings without its frequency penalty (the same objective as TRL's: reverse KL,
  no penalty);
- ours_entropy_floor: plus the entropy floor the recipe had until 2026-11-23 (penalties.entropy 0.5,
  entropy_floor 1.5; it needs full logits). In results/step.md, tables of that date call these two
  `ours_plain` and `ours_recipe`.
Reported: median step time over the steps after the first two, the phase breakdown (ours; TRL has no
per-phase timers), mean completion length, training time, peak RSS, and the held-out reverse KL
before -> after, measured for every variant by the same function (`evaluation.heldout_metrics`, seeded).
Results are appended to benchmarks/results/step.md.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from methods import ON_POLICY  # noqa: E402  (the on-policy GKD settings, stated once)

RECIPE = ROOT / "recipes" / "smollm2_news.yaml"
VARIANTS = ("trl", "ours", "ours_entropy_floor")


# the on-policy step alone, from the 10-layer student (every 3rd teacher layer), as in the earlier results; the
# recipe's own pipeline (dense KD on teacher text) and its 17-layer student are the student-quality pipeline; the
# recipe's frequency penalty (there since 2026-12-01) is off: the same objective as TRL's
ON_POLICY_ONLY = [*ON_POLICY, "student.keep_layers=null", "student.layer_stride=3", "eval.eval_steps=0",
                  "eval.batch_size=12", "penalties.frequency=0.0"]


def setting(steps: int, output_dir: Path, variant: str, seed: int, precision: str = "fp32") -> list[str]:
    overrides = [*ON_POLICY_ONLY, f"train.max_steps={steps}", f"train.output_dir={output_dir}", "logging.live=false",
                 f"train.seed={seed}", f"train.mixed_precision={'bf16' if precision == 'bf16' else 'no'}"]
    if variant == "ours_entropy_floor":
        overrides += ["penalties.entropy=0.5", "penalties.entropy_floor=1.5"]
    return overrides


def run_variant(variant: str, steps: int, seed: int, out_json: Path, precision: str) -> None:
    import torch

    from onpolicy_kd.recipe import load_recipe
    from onpolicy_kd.models.loading import load_models
    from onpolicy_kd.train import train

    work = Path(tempfile.mkdtemp(prefix=f"step-{variant}-"))
    recipe = load_recipe(RECIPE, setting(steps, work, variant, seed, precision))
    models = load_models(recipe, str(RECIPE))
    if variant.startswith("ours"):
        started = time.perf_counter()
        result = train(recipe, str(RECIPE), models)
        wall = time.perf_counter() - started
        rows = [json.loads(line) for line in open(work / "metrics.jsonl")]
        steps_rows = [r for r in rows if "time/step_s" in r]  # the first two are warm-up, when there are more
        report = {
            "step_s": [r["time/step_s"] for r in steps_rows],
            # a phase a step does not run is not logged (no decoding on a cached-text step): 0 s
            "phases": {k: statistics.median(r.get(k, 0.0) for r in (steps_rows[2:] or steps_rows))
                       for k in ("time/rollout_s", "time/teacher_s", "time/student_s", "time/optimizer_s")},
            "mean_len": statistics.fmean(r.get("rollout/mean_len", r.get("data/mean_len")) for r in steps_rows),
            "before": result.before["eval/reverse_kl"], "after": result.after["eval/reverse_kl"],
            "text": text_metrics(result.after),
            "train_s": sum(r["time/step_s"] for r in steps_rows), "wall_s": wall,
        }
    else:
        report = run_trl(recipe, models, steps, work, precision)
    report["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    report["torch"] = torch.__version__
    out_json.write_text(json.dumps(report))


def run_trl(recipe, models, steps: int, work: Path, precision: str) -> dict:
    import torch
    from accelerate import Accelerator
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DistillationConfig, DistillationTrainer

    from onpolicy_kd.data.loading import load_prompt_data
    from onpolicy_kd.evaluation.heldout import heldout_metrics
    from onpolicy_kd.evaluation.teacher_answers import recipe_teacher_answers

    tokenizer, student, teacher = models.tokenizer, models.student, models.teacher
    data = load_prompt_data(recipe.data, tokenizer, seed=recipe.train.seed)
    # TRL takes prompt texts and tokenises them whole, which merges a few tokens across our template's pieces
    # differently (200 vs 201 tokens on the first prompt); map each text back to our exact ids instead
    texts = [tokenizer.decode(ids, skip_special_tokens=False) for ids in data.train["prompt_ids"]]
    ids_of = dict(zip(texts, data.train["prompt_ids"]))

    accelerator = Accelerator(cpu=True)
    vocab = len(tokenizer)
    answers = recipe_teacher_answers(recipe, teacher, tokenizer, data.eval)
    before = heldout_metrics(recipe, accelerator, student, teacher, tokenizer, data.eval, answers)["eval/reverse_kl"]

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self.started = [], 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self.started)

    timer = StepTimer()
    args = DistillationConfig(
        output_dir=str(work), per_device_train_batch_size=recipe.train.batch_size, gradient_accumulation_steps=1,
        max_steps=steps, learning_rate=recipe.optim.lr, lr_scheduler_type="constant", warmup_steps=0,
        max_grad_norm=recipe.optim.max_grad_norm, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999,
        temperature=recipe.rollout.temperature, top_k=0, top_p=1.0, beta=1.0,
        max_completion_length=recipe.rollout.max_new_tokens, use_cpu=True, bf16=precision == "bf16", fp16=False,
        gradient_checkpointing=False, disable_dropout=True, logging_steps=1, save_strategy="no", report_to=[],
        seed=recipe.train.seed, dataloader_num_workers=0,
    )
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args,
                                  train_dataset=Dataset.from_dict({"prompt": texts}), processing_class=tokenizer,
                                  callbacks=[timer])
    trainer._tokenize_prompts = lambda prompts: ([list(ids_of[p]) for p in prompts], None, {})
    lengths = []
    generate = trainer._generate_and_score_completions

    generation_s = []

    def recording(inputs):  # mean completion length, as our loop logs it, and the time of TRL's generation phase
        started = time.perf_counter()
        out = generate(inputs)
        generation_s.append(time.perf_counter() - started)
        lengths.append(float(out["completion_mask"].sum(1).float().mean()))
        return out

    trainer._generate_and_score_completions = recording
    autocast_seen: dict[str, bool] = {}  # whether bf16=True reached TRL's forwards (module docstring)
    hidden_state = trainer._get_last_hidden_state

    def hidden_state_recording(*args, **kwargs):
        autocast_seen["training_forward"] = torch.is_autocast_enabled("cpu")
        return hidden_state(*args, **kwargs)

    trainer._get_last_hidden_state = hidden_state_recording
    generate_method = type(student).generate

    def generate_recording(self, *args, **kwargs):
        # accelerate keeps the unwrapped forward here when it installs its autocast wrapper
        autocast_seen["generate_wrapper"] = "_original_forward" in self.__dict__
        return generate_method(self, *args, **kwargs)

    student.generate = generate_recording.__get__(student)
    started = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - started
    trained = trainer.accelerator.unwrap_model(trainer.model)
    after_metrics = heldout_metrics(recipe, accelerator, trained, teacher, tokenizer, data.eval, answers)
    after = after_metrics["eval/reverse_kl"]
    return {"step_s": timer.times, "phases": {}, "generation_s": statistics.median(generation_s[2:] or generation_s), "mean_len": statistics.fmean(lengths) if lengths else float("nan"),
            "before": before, "after": after, "text": text_metrics(after_metrics), "train_s": sum(timer.times),
            "wall_s": wall, "trl_autocast": autocast_seen}


TEXT_KEYS = ("eval/greedy/distinct1", "eval/greedy/repetition", "eval/greedy/rougeL_teacher")


def text_metrics(metrics: dict) -> list[float]:
    """The held-out greedy text's distinct-1, repetition and ROUGE-L against the teacher: a KL that falls while
    the text collapses shows here."""
    return [metrics[key] for key in TEXT_KEYS]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--seeds", type=int, nargs="+", default=[42], help="train.seed of each repetition (the "
                        "held-out prompts and their sampling seed stay fixed)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--run", choices=VARIANTS, help=argparse.SUPPRESS)  # a child process: one variant
    parser.add_argument("--json", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "step.md"))
    args = parser.parse_args()
    if args.run:
        run_variant(args.run, args.steps, args.seeds[0], args.json, args.precision)
        return

    from results_file import publish

    results: dict[str, list[dict]] = {}
    for seed in args.seeds:
        for variant in args.variants:
            out = Path(tempfile.mkdtemp()) / "result.json"
            print(f"--- {variant}, seed {seed}", flush=True)
            subprocess.run([sys.executable, __file__, "--run", variant, "--steps", str(args.steps), "--seeds", str(seed),
                            "--precision", args.precision, "--json", str(out)], check=True, cwd=ROOT)
            results.setdefault(variant, []).append(json.loads(out.read_text()))

    def median_step(r):
        return statistics.median(r["step_s"][2:] or r["step_s"])

    def mean(values):
        return statistics.fmean(values)

    base = mean([median_step(r) for r in results["trl"]]) if "trl" in results else None
    torch_version = next(iter(results.values()))[0]["torch"]
    seeds = ", ".join(map(str, args.seeds))
    lines = [f"\n## {time.strftime('%Y-%m-%d')} CPU (2 cores), torch {torch_version}: recipes/smollm2_news.yaml, "
             f"{args.steps} steps, batch 4, 32 new tokens, "
             f"{'bfloat16 autocast (float32 weights)' if args.precision == 'bf16' else 'float32'}, seeds {seeds}\n",
             f"`python benchmarks/step.py --steps {args.steps} --seeds {' '.join(map(str, args.seeds))} --precision "
             f"{args.precision} --variants {' '.join(args.variants)}` (each variant "
             f"and seed in its own process, same initial student; step times: mean over seeds of the median step)\n",
             "| variant | median step | vs TRL | rollout / teacher / student / optimizer | mean completion | "
             "train time | peak RSS | held-out reverse KL after (per seed) | mean after (before) | "
             "greedy text after: distinct-1 / repetition / ROUGE-L vs teacher (mean) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for variant, runs in results.items():
        step = mean([median_step(r) for r in runs])
        keys = ("time/rollout_s", "time/teacher_s", "time/student_s", "time/optimizer_s")
        phases = " / ".join(f"{mean([r['phases'][k] for r in runs]):.2f}" for k in keys) if runs[0]["phases"] else "-"
        ratio = f"{base / step:.2f}x" if base else "-"
        afters = [r["after"] for r in runs]
        text = " / ".join(f"{mean([r['text'][i] for r in runs]):.2f}" for i in range(len(TEXT_KEYS)))
        lines.append(f"| {variant} | {step:.2f} s | {ratio} | {phases} | {mean([r['mean_len'] for r in runs]):.1f} tokens "
                     f"| {mean([r['train_s'] for r in runs]):.0f} s | {max(r['peak_rss_gib'] for r in runs):.2f} GiB "
                     f"| {', '.join(f'{a:.3f}' for a in afters)} | {mean(afters):.3f} "
                     f"({100 * (mean(afters) / runs[0]['before'] - 1):+.0f}%) | {text} |")
    seen = [r.get("trl_autocast") for r in results.get("trl", []) if r.get("trl_autocast")]
    if args.precision == "bf16" and seen:
        lines.append(f"\nTRL with bf16=True: autocast on inside its training forwards: "
                     f"{', '.join(str(s['training_forward']) for s in seen)}; `generate` through accelerate's "
                     f"per-call autocast wrapper: {', '.join(str(s['generate_wrapper']) for s in seen)} (per seed).")
    publish("\n".join(lines) + "\n", args.out)


if __name__ == "__main__":
    main()
