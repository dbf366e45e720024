"""Evaluate a distilled student against its teacher on the held-out prompts, in numbers and pictures.

    python -m onpolicy_kd.evaluate outputs/smollm2_news                  # a trained run (its final/ student)
    python -m onpolicy_kd.evaluate recipes/smollm2_news.yaml             # the recipe's initial student
    python -m onpolicy_kd.evaluate --compare outputs/a outputs/b recipes/smollm2_news.yaml   # one table
    (also `onpolicy-kd evaluate ...`; `section.key=value` overrides apply to the recipe, e.g. eval.max_samples=50)

On the first `eval.max_samples` prompts of the recipe's held-out split (evaluation/heldout.py), for the student
and for the teacher, greedy and sampled (`eval.samples_per_prompt` completions per prompt at `eval.temperature`):
- ROUGE-L and ROUGE-2 against the human references (the best-matching one, when the data has references);
  ROUGE-L against the teacher's greedy answer and against the best-matching of its sampled answers;
- exact-match accuracy of the final answer (with `eval.answer_pattern`);
- length, the share cut at `eval.max_new_tokens`, distinct-1/2 and repetition rate;
each as its mean over the prompts ± its standard error. And, per model: token-level KL(p || q) and KL(q || p) on
the student's own sampled completions and on the references, perplexity of both models on the references, and
for a run that trained hidden-state stitching projections (final/stitching.safetensors) each layer pair's
hidden-state MSE. The teacher's answers are generated once and cached (evaluation/teacher_answers.py).
Writes `<out>/predictions.jsonl` (prompt, references, the teacher's and the student's completions, per-prompt
metrics), `<out>/metrics.json` (with the standard errors), and for a run `<run>/plots/training_curves.png` from
its metrics.jsonl; adds the evaluation to the run's model card. Token-level means are over all tokens of the set.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
import sys
from pathlib import Path
from typing import Sequence

from onpolicy_kd.console import console, print_error
from onpolicy_kd.data.loading import load_prompt_data
from onpolicy_kd.data.retokenize import cross_tokenizer, with_student_prompts
from onpolicy_kd.errors import UserError
from onpolicy_kd.evaluation.heldout import evaluate
from onpolicy_kd.evaluation.plots import training_curves
from onpolicy_kd.evaluation.report import (
    add_to_model_card, distribution_table, samples_table, text_table, write_outputs,
)
from onpolicy_kd.evaluation.teacher_answers import TeacherAnswers, recipe_teacher_answers
from onpolicy_kd.models.loading import load_model, load_models, load_tokenizer
from onpolicy_kd.models.seq2seq import is_encoder_decoder
from onpolicy_kd.objectives.hidden import STITCHING_FILE, stitching_from_file
from onpolicy_kd.recipe import Recipe, load_recipe
from onpolicy_kd.recipe.loading import load_run_recipe
from onpolicy_kd.training.run_inputs import file_rows


def result_folders(names: Sequence[str]) -> list[str]:
    """A folder name per compared result, all different: the run's folder name, `<recipe>-initial` for a recipe's
    untrained student (a run and its own recipe often share a name), `-2`, `-3` ... after a repeat."""
    folders: list[str] = []
    for name in names:
        base = name.replace(" (initial)", "-initial").replace(" ", "_")
        folder, k = base, 1
        while folder in folders:
            k += 1
            folder = f"{base}-{k}"
        folders.append(folder)
    return folders


def resolve_target(target: str, overrides: Sequence[str]) -> tuple[Recipe, str, Path | None]:
    """(recipe, its path, the run folder or None) for a run folder or a recipe file."""
    path = Path(target)
    if path.is_dir():
        recipe_file = path / "final" / "recipe.yaml"
        if not recipe_file.is_file():
            raise UserError(f"{path} is not a finished run (no final/recipe.yaml); give a run's output_dir or a recipe")
        return load_run_recipe(recipe_file, overrides), str(recipe_file), path
    return load_recipe(path, overrides), str(path), None


def evaluate_heldout(recipe: Recipe, student, models, dataset, name: str, answers: TeacherAnswers, stitching=None,
                     cross=None):
    """The full held-out evaluation of one student against the teacher and its `answers` (`stitching`, a run's
    hidden-state projections: each layer pair's hidden-state MSE is reported; `cross`, a student with a tokenizer
    of its own: the cross-tokenizer loss stands in for the KLs)."""
    return evaluate(student, models.teacher, models.tokenizer, dataset, recipe.eval, answers, references=True,
                    name=name, stitching=stitching, cross=cross)


def check_out(out: Path) -> None:
    """Before any work: `--out` must be a folder (existing or to be made), never a file."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a folder for predictions.jsonl and metrics.json (it is made "
                        f"if missing)")


def run_stitching(run: Path | None, student):
    """The hidden-state projections a run exported (final/stitching.safetensors), on the student's device, or None."""
    path = run / "final" / STITCHING_FILE if run is not None else None
    if path is None or not path.is_file():
        return None
    reference = next(student.parameters())
    return stitching_from_file(path).to(reference.device, reference.dtype)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="onpolicy-kd evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("targets", nargs="+", help="run folders and/or recipe files, then section.key=value overrides")
    parser.add_argument("--compare", action="store_true", help="evaluate every target on the first one's prompts")
    parser.add_argument("--out", default=None, help="where to write predictions and metrics (default: <run>/eval)")
    args = parser.parse_intermixed_args(argv)  # flags and targets/overrides in any order
    overrides = [t for t in args.targets if "=" in t]
    targets = [t for t in args.targets if "=" not in t]
    try:
        if not targets:
            raise UserError("nothing to evaluate: give a run folder or a recipe first, then any section.key=value "
                            "overrides, e.g. python -m onpolicy_kd.evaluate outputs/smollm2_news eval.max_samples=30")
        if len(targets) > 1 and not args.compare:
            raise UserError("several targets: add --compare to evaluate them side by side")
        recipe, recipe_path, run = resolve_target(targets[0], overrides)
        out = Path(args.out) if args.out else (run / "eval" if run else Path(recipe.train.output_dir) / "eval_initial")
        check_out(out)
        models = load_models(recipe, recipe_path)  # the teacher, and the recipe's initial student
        data = load_prompt_data(recipe.data, models.tokenizer, seed=recipe.train.seed, **file_rows(recipe),
                                encoder_decoder=is_encoder_decoder(models.teacher))
        answers = recipe_teacher_answers(recipe, models.teacher, models.tokenizer, data.eval)  # for every column
        cross = None
        if models.student_tokenizer is not None:  # objective.cross_tokenizer: the students write with their own
            data = replace(data, eval=with_student_prompts(data.eval, models.student_tokenizer, models.tokenizer))
            for target in targets[1:]:  # --compare: every student writes with this tokenizer
                _, _, other = resolve_target(target, overrides)
                if other is None or load_tokenizer(str(other / "final"), "student").get_vocab() != \
                        models.student_tokenizer.get_vocab():
                    raise UserError(f"--compare across tokenizers: {target} is not a run whose student has the "
                                    f"first one's tokenizer; compare runs of one student tokenizer")
            cross = cross_tokenizer(recipe.objective, models.student_tokenizer, models.tokenizer,
                                    next(models.teacher.parameters()).device)
        results = []
        for target in targets:
            _, _, target_run = resolve_target(target, overrides)
            student = load_model(str(target_run / "final"), "student") if target_run else models.student
            name = target_run.name if target_run else f"{Path(target).stem} (initial)"
            results.append(evaluate_heldout(recipe, student.eval(), models, data.eval, name, answers,
                                            run_stitching(target_run, student), cross))
        for r, folder in zip(results, result_folders([r.name for r in results])):
            write_outputs(r, out if len(results) == 1 else out / folder)
        prompts = len(results[0].predictions)
        console.print(samples_table(results[0].predictions, f"samples ({results[0].name})"))
        console.print(text_table(results, f"held-out text ({prompts} prompts; greedy, and {recipe.eval.samples_per_prompt}"
                                          f" samples per prompt at temperature {recipe.eval.temperature:g}; mean ± s.e.)"))
        console.print(distribution_table(results, f"held-out distributions ({prompts} prompts)"))
        if run is not None and (run / "metrics.jsonl").is_file():
            console.print(f"plot: {training_curves(run / 'metrics.jsonl', run / 'plots' / 'training_curves.png')}")
            add_to_model_card(run, results[0])
        console.print(f"predictions and metrics: {out}")
        return 0
    except UserError as err:
        print_error(err)
        return err.exit_code


if __name__ == "__main__":
    sys.exit(main())
