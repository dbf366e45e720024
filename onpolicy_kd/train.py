"""Entry point: `accelerate launch -m onpolicy_kd.train RECIPE.yaml [section.key=value ...] [--dry-run]`.

Also `python -m onpolicy_kd.train ...` and `onpolicy-kd train ...`. A user mistake (bad recipe,
missing model or data, mismatched vocabularies) prints one message and exits with status 2.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Sequence

from rich.syntax import Syntax

from onpolicy_kd.config import Recipe, load_recipe, recipe_to_yaml
from onpolicy_kd.console import console, is_main_process, print_error, summary_table
from onpolicy_kd.data import length_stats, load_prompt_data
from onpolicy_kd.errors import UserError
from onpolicy_kd.models import Models, count_parameters, load_models


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="onpolicy-kd train",
        description="On-policy knowledge distillation of a causal LM, driven by a YAML recipe.",
        epilog="Overrides: section.key=value, e.g. train.max_steps=10 objective.divergence=jsd objective.beta=0.5",
    )
    parser.add_argument("recipe", help="the YAML recipe, e.g. recipes/smollm2_news.yaml")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides (win over the file and environment)")
    parser.add_argument(
        "--dry-run", action="store_true",
        help="validate, load models and data, print the resolved recipe and a summary, then exit",
    )
    return parser.parse_args(argv)


def _model_row(source: str, model: object, tokenizer: object) -> dict[str, object]:
    config = model.config  # type: ignore[attr-defined]
    return {
        "source": source if len(source) < 40 else "..." + source[-37:],
        "architecture": type(model).__name__,
        "parameters": count_parameters(model),  # type: ignore[arg-type]
        "layers": config.num_hidden_layers,
        "hidden": config.hidden_size,
        "vocab (tokenizer / rows)": f"{len(tokenizer)} / {model.get_input_embeddings().num_embeddings}",  # type: ignore
        "dtype": str(model.dtype).removeprefix("torch."),  # type: ignore[attr-defined]
    }


def dry_run(recipe: Recipe, recipe_path: str) -> int:
    started = time.perf_counter()
    models: Models = load_models(recipe, recipe_path)
    data = load_prompt_data(recipe.data, models.tokenizer, seed=recipe.train.seed)
    if not is_main_process():
        return 0
    console.rule(f"resolved recipe: {recipe_path}")
    console.print(Syntax(recipe_to_yaml(recipe), "yaml", theme="ansi_dark", background_color="default"))
    student_source = (
        f"teacher layers {recipe.student.keep_layers or f'every {recipe.student.layer_stride}'}"
        if recipe.student.init == "teacher_layers" else f"{recipe.student.init}: {recipe.student.name_or_path or 'teacher config'}"
    )
    console.print(summary_table(
        [("teacher", _model_row(recipe.teacher.name_or_path, models.teacher, models.tokenizer)),
         ("student", _model_row(student_source, models.student, models.tokenizer))],
        title="models",
    ))
    rows = []
    for name, split in (("train", data.train), ("eval", data.eval)):
        stats = length_stats(split)
        rows.append((name, {
            "rows": stats["rows"], "prompt tokens min/mean/max": f"{stats['min']} / {stats['mean']} / {stats['max']}",
            "truncated": stats["truncated"], "with reference": sum(1 for r in split["reference"] if r),
            "cache": "hit" if data.cache_hits[name] else "written",
        }))
    console.print(summary_table(rows, title=f"data: {recipe.data.path} (format {data.task.name}, columns {data.task.columns})"))
    console.rule("first eval prompt, as the student sees it")
    console.print(data.eval[0]["prompt"], markup=False)
    console.print(f"[green]dry run OK[/] in {time.perf_counter() - started:.1f} s: recipe valid, models and data load")
    return 0


def train(recipe: Recipe, recipe_path: str) -> int:
    models = load_models(recipe, recipe_path)
    load_prompt_data(recipe.data, models.tokenizer, seed=recipe.train.seed)
    raise UserError("the training loop is not part of this version yet; run with --dry-run to check a recipe")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        recipe = load_recipe(args.recipe, args.overrides)
        if args.dry_run:
            return dry_run(recipe, args.recipe)
        return train(recipe, args.recipe)
    except UserError as err:
        print_error(err)
        return err.exit_code


if __name__ == "__main__":
    sys.exit(main())
