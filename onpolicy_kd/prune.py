"""`onpolicy-kd prune RECIPE --keep N`: which N of the teacher's decoder layers a layer-dropped student should keep.

Measures, on a few of the recipe's training prompts with the teacher's greedy completions, the layer choices of
block influence (one pass) and of greedy removal by KL (slower; `--method influence` skips it), next to the
recipe's own choice and evenly spaced layers, each scored by the teacher-forced KL(p || q) of the copy it would
give, and prints the `student.keep_layers` line to put in the recipe. The lower that KL, the less the student
has to heal (docs/pruning.md has the measurements on the offline default).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Sequence

import torch
from rich.table import Table

from onpolicy_kd.console import console, print_error
from onpolicy_kd.data.loading import load_prompt_data
from onpolicy_kd.data.sampler import prompt_batch
from onpolicy_kd.errors import ConfigError, UserError
from onpolicy_kd.models.loading import load_config, load_teacher
from onpolicy_kd.models.pruning import block_influence, greedy_removal, layer_subset_kl, most_influential
from onpolicy_kd.models.seq2seq import is_encoder_decoder
from onpolicy_kd.recipe import load_recipe
from onpolicy_kd.recipe.loading import recipe_and_overrides
from onpolicy_kd.rollout import rollout


def check_keep(recipe, recipe_path: str, keep: int) -> None:
    """--keep against the teacher's decoder layers, read from its config before the weights load (a minute for a
    real teacher). A teacher without a config transformers reads (a plain torch module) is checked once loaded."""
    cfg = recipe.teacher
    try:
        config = load_config(cfg.name_or_path, "teacher.name_or_path", revision=cfg.revision,
                             trust_remote_code=cfg.trust_remote_code, recipe_path=recipe_path)
    except UserError:
        return
    if getattr(config, "is_encoder_decoder", False):
        raise ConfigError(f"{cfg.name_or_path} is an encoder-decoder model: prune measures which layers of a "
                          f"decoder-only teacher to copy into a student (student.init=teacher_layers), which "
                          f"encoder-decoder pairs do not use")
    layers = getattr(config, "num_hidden_layers", None)
    if layers is not None:
        check_layer_count(keep, layers)


def check_layer_count(keep: int, layers: int) -> None:
    if not 1 <= keep < layers:
        raise UserError(f"--keep {keep}: the teacher has {layers} decoder layers; keep 1 to {layers - 1}")


def measurement_batch(recipe, recipe_path: str, samples: int, prompt_tokens: int, new_tokens: int):
    """(teacher, batch): `samples` training prompts spread over the split (their last `prompt_tokens` tokens) with
    the teacher's greedy completions."""
    teacher, tokenizer = load_teacher(recipe.teacher, recipe_path)
    if is_encoder_decoder(teacher):
        raise ConfigError(f"{recipe.teacher.name_or_path} is an encoder-decoder model: prune measures which layers "
                          f"of a decoder-only teacher to copy into a student (student.init=teacher_layers), which "
                          f"encoder-decoder pairs do not use")
    teacher.eval()
    train = load_prompt_data(recipe.data, tokenizer, seed=recipe.train.seed).train
    rows = sorted({round(i * (len(train) - 1) / max(samples - 1, 1)) for i in range(samples)})
    ids, mask = prompt_batch(train, rows, tokenizer.pad_token_id, "cpu")
    ids, mask = ids[:, -prompt_tokens:], mask[:, -prompt_tokens:]
    with torch.no_grad():
        batch = rollout(teacher, None, ids, mask, tokenizer=tokenizer, max_new_tokens=new_tokens, do_sample=False,
                        source="teacher")
    return teacher, batch


def candidates(recipe, teacher, batch, keep: int, method: str) -> list[tuple[str, list[int], float, float]]:
    """(name, layers, KL, seconds) of each choice."""
    n_layers = teacher.config.num_hidden_layers
    out = []
    started = time.perf_counter()
    influence = block_influence(teacher, batch)
    chosen = most_influential(influence, keep)
    out.append(("block influence", chosen, layer_subset_kl(teacher, batch, chosen), time.perf_counter() - started))
    spaced = sorted({round(i * (n_layers - 1) / max(keep - 1, 1)) for i in range(keep)})
    out.append(("evenly spaced", spaced, layer_subset_kl(teacher, batch, spaced), 0.0))
    own = recipe.student.keep_layers
    if own is not None and len(own) == keep:
        out.append(("the recipe's keep_layers", list(own), layer_subset_kl(teacher, batch, own), 0.0))
    if method == "all":
        started = time.perf_counter()
        with console.status("greedy removal by KL") as status:
            chosen, kl = greedy_removal(teacher, batch, keep, progress=lambda layer, value, kept: status.update(
                f"greedy removal by KL: dropped layer {layer} (KL {value:.3f}), {len(kept)} left"))
        out.append(("greedy removal by KL", chosen, kl, time.perf_counter() - started))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="onpolicy-kd prune", description=__doc__.split("\n")[0])
    parser.add_argument("recipe", help="a recipe file, then any section.key=value overrides")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--keep", type=int, required=True, help="how many decoder layers the student keeps")
    parser.add_argument("--method", choices=["all", "influence"], default="all",
                        help="all: also greedy removal by KL (one forward per layer per removed layer)")
    parser.add_argument("--samples", type=int, default=6, help="training prompts to measure on")
    parser.add_argument("--prompt-tokens", type=int, default=120, help="last tokens of each prompt kept")
    parser.add_argument("--new-tokens", type=int, default=24, help="teacher greedy tokens after each prompt")
    args = parser.parse_args(argv)
    try:
        recipe_path, overrides = recipe_and_overrides([args.recipe, *args.overrides])
        recipe = load_recipe(recipe_path, overrides)
        check_keep(recipe, recipe_path, args.keep)  # before a minute of loading
        teacher, batch = measurement_batch(recipe, recipe_path, args.samples, args.prompt_tokens, args.new_tokens)
        n_layers = teacher.config.num_hidden_layers
        check_layer_count(args.keep, n_layers)
        rows = candidates(recipe, teacher, batch, args.keep, args.method)
    except UserError as err:
        print_error(err)
        return err.exit_code
    table = Table(title=f"{args.keep} of {n_layers} teacher layers: teacher-forced KL(p||q) on {len(batch.texts)} "
                        f"training prompts + teacher completions")
    for column in ("choice", "layers", "KL(p||q)", "time"):
        table.add_column(column)
    for name, layers, kl, seconds in sorted(rows, key=lambda r: r[2]):
        table.add_row(name, str(layers), f"{kl:.3f}", f"{seconds:.0f} s" if seconds else "")
    console.print(table)
    best = min(rows, key=lambda r: r[2])
    console.print(f"lowest KL: {best[0]}; in the recipe:\n  student:\n    init: teacher_layers\n"
                  f"    keep_layers: {best[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
