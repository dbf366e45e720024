"""Write docs/recipes.md, the recipe reference, from the schema (onpolicy_kd/recipe/schema.py).

    python scripts/recipe_reference.py            # regenerate docs/recipes.md
    python scripts/recipe_reference.py --check    # exit 1 if docs/recipes.md is not what the schema gives

Walks `onpolicy_kd.recipe.schema.Recipe`: every section and key in schema order, its type (from the annotation),
its default, its allowed values (Literal choices, ge/gt/le/lt bounds, lengths, patterns) and its meaning
(`Field(description=...)`, else the short note in MEANINGS below), plus where a key applies when the recipe
checks refuse it elsewhere (`_conditional_keys`). tests/test_docs.py regenerates the page in memory and fails
when the file is stale. Edit the schema (or the text in this script), never docs/recipes.md.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

ROOT = Path(__file__).resolve().parents[1]
Row = tuple[str, str, str, str, str, str]  # key, type, default, allowed, meaning, where it applies
NO_MEANING = "(no description)"
PAGE = ROOT / "docs" / "recipes.md"
COMMAND = "python scripts/recipe_reference.py"

# Keys whose Field has no description: a short meaning (better: a Field(description=...) in schema.py).
MEANINGS = {
    "teacher.dtype": "the teacher's weights' dtype when loaded",
    "teacher.trust_remote_code": "run a Hub model's own modelling code (off by default)",
    "teacher.quantization.bits": "8 or 4 bits per decoder weight",
    "student.revision": "Hub revision of student.name_or_path",
    "student.dtype": "the student's weights' dtype (train.mixed_precision sets autocast separately)",
    "student.trust_remote_code": "run a Hub model's own modelling code (off by default)",
    "student.attn_implementation": "e.g. sdpa, eager, flash_attention_2",
    "student.gradient_checkpointing": "recompute activations in the backward pass (less memory, slower)",
    "student.lora.dropout": "dropout on the adapters' input",
    "data.format": "auto = detected from the columns ([data.md](data.md))",
    "data.system_prompt": "a system message put before the prompt in the chat template",
    "data.max_prompt_tokens": "prompts are cut to this many tokens (only the long field: the instruction survives)",
    "data.max_response_tokens": "references are cut to this many tokens",
    "data.num_proc": "processes for tokenising the data",
    "rollout.max_new_tokens": "tokens sampled per completion (the teacher's text too, unless "
                              "teacher_text.max_new_tokens)",
    "rollout.stop_strings": "a completion ends at the first of these (as at EOS)",
    "objective.mode": "where a step's completions come from and its loss ([algorithms.md](algorithms.md))",
    "objective.divergence": "the per-token divergence between teacher p and student q "
                            "([algorithms.md](algorithms.md#divergences-objectivedivergence-per-position))",
    "objective.length_norm": "pg: divide each return by its number of terms",
    "objective.ppo_epochs": "pg: optimizer steps per rollout (PPO ratio clipping when > 1)",
    "objective.ppo_clip": "pg: the PPO clip range epsilon",
    "penalties.frequency": "weight of the frequency penalty (the student's probability of tokens already in its "
                           "text); 0 = off",
    "penalties.diversity": "weight of the diversity penalty (spread of expected embeddings); 0 = off",
    "penalties.entropy": "weight of the entropy penalty (below entropy_floor); 0 = off",
    "hidden.loss": "mse or cosine between projected student and teacher hidden states",
    "optim.name": "the optimizer (AdamW is torch's fused one)",
    "optim.lr": "learning rate",
    "optim.weight_decay": "decoupled weight decay (AdamW)",
    "optim.betas": "AdamW's betas",
    "optim.eps": "AdamW's epsilon",
    "optim.scheduler": "learning-rate schedule after warm-up; a decaying one follows the larger of the step and "
                       "time budgets' fractions",
    "optim.warmup_steps": "linear warm-up steps",
    "optim.warmup_ratio": "warm-up as a fraction of the step budget (needs one)",
    "train.grad_accum": "micro-batches per optimizer step (gradient accumulation)",
    "train.output_dir": "the run's folder: metrics.jsonl, checkpoints/, final/ (env ONPOLICY_KD_OUTPUT_DIR)",
    "train.save_total_limit": "checkpoints of this run kept",
    "train.mixed_precision": "bf16/fp16: the student's training forward and backward under autocast (float32 "
                             "weights and optimizer; the teacher stays in its dtype)",
    "train.deterministic": "deterministic algorithms: a resumed run ends with an uninterrupted run's weights",
    "eval.max_samples": "held-out prompts judged at each evaluation",
    "eval.batch_size": "held-out prompts per generation batch (each batch its own sampling seed)",
    "eval.max_new_tokens": "tokens per held-out completion",
    "logging.log_steps": "write metrics every N steps",
    "logging.num_samples": "completions per sample table",
}

# One line per section: what it is, and the guide that explains it.
SECTIONS = {
    "teacher": "The frozen teacher. Guide: [models.md](models.md).",
    "student": "The model that trains, and how it is built. Guide: [models.md](models.md).",
    "data": "Training prompts (and references), held-out prompts, formats and templates. Guide: [data.md](data.md).",
    "rollout": "How the student's own samples are decoded (on-policy steps: mode pg, gkd with lmbda > 0, "
               "distillm2). The teacher's training text has its own keys, `teacher_text.*`. "
               "Guide: [training.md](training.md#rollouts).",
    "teacher_text": "The teacher's text that off-policy steps train on (seqkd, distillm2, gkd with seq_kd), decoded "
                    "by these keys independently of `rollout.*`, optionally cached. "
                    "Guide: [training.md](training.md#the-teachers-text-and-its-cache).",
    "replay": "Reuse of the student's samples across steps (gkd, after DistiLLM). "
              "Guide: [algorithms.md](algorithms.md).",
    "objective": "The mode (where completions come from), the divergence or policy gradient, and how the loss "
                 "reads the student. Guide: [algorithms.md](algorithms.md).",
    "penalties": "Frequency, diversity and entropy penalties, added in every mode that reads the student's "
                 "distribution. Guide: [algorithms.md](algorithms.md#penalties-penalties-all-0--off).",
    "hidden": "Hidden-state distillation through learned stitching projections. "
              "Guide: [algorithms.md](algorithms.md#hidden-state-distillation-hidden).",
    "optim": "Optimizer and learning-rate schedule. Guide: [training.md](training.md).",
    "train": "Budget, batch, seed, output folder, checkpoints and resume, precision, what trains, the Hub. "
             "Guide: [training.md](training.md).",
    "eval": "The held-out judge: when, on how many prompts, greedy and sampled. "
            "Guide: [evaluation.md](evaluation.md).",
    "logging": "Console, sample tables and experiment trackers. Guide: [training.md](training.md#what-a-run-shows).",
    "stages": "Phases run in order, each the recipe with its own keys on top and its own budget; the student flows "
              "from one into the next. Guide: [training.md](training.md#stages).",
}

PREAMBLE = """\
# Recipe reference

<!-- Generated by scripts/recipe_reference.py from onpolicy_kd/recipe/schema.py. Do not edit by hand:
     change the schema, then run `python scripts/recipe_reference.py` (tests/test_docs.py checks it). -->

A recipe is one YAML file with the sections below. Every key is typed and checked: an unknown key (with the closest
valid key suggested), a wrong type (a string is never turned into a number or a bool), a non-finite number
(`.inf`, `.nan`, except where a key allows `.inf`), an out-of-range value or a contradiction between keys is
reported with the file and line (or the command line / environment variable), the key, the bad value and what is
allowed, and the command exits with status 2 without a traceback:

    $ python -m onpolicy_kd.train recipes/smollm2_news.yaml objective.beta=1.5 train.max_stpes=5
    error: invalid recipe recipes/smollm2_news.yaml
      objective.beta = 1.5 (command line)
        Input should be less than or equal to 1
        allowed: generalized JSD weight in [0, 1]: 0 = forward KL, 1 = reverse KL
      train.max_stpes: unknown key (command line)
        did you mean 'train.max_steps'?

(`accelerate launch` adds its own `CalledProcessError` traceback when the process it launched fails; the message
above is ours.) Every key changes what a run does or is an error: a key set where it has no effect
(`objective.beta` without the JSD, PG settings in another mode, `optim.momentum` outside SGD, a revision for a
local model, ...) is refused with the place where it applies, given below after **Applies**.
`tests/test_recipe_keys.py` walks the schema and shows, key by key, that changing it changes the run.

## Overrides, the environment and precedence

Override any key on the command line with `section.key=value` (values are YAML: `train.max_steps=10`,
`rollout.stop_strings=[".", "\\n"]`, `train.resume_from=null`, `"student.lora={r: 16}"`); flags and overrides mix
in any order, and a `key=value` is never taken for the recipe. YAML is read with `safe_load` semantics, except
that `1e-4` is the number it looks like (as on the command line), not a string. `${cache:...}` in a value is a
path under the cache root. A few per-machine settings also come from the environment:

| variable | recipe key |
|---|---|
@ENV_ROWS@| `ONPOLICY_KD_CACHE_DIR` | none: the cache root (`${cache:...}` paths in recipes; tokenised data and teacher completions go to its `data/` unless `data.cache_dir` is set); default `~/.cache/onpolicy_kd` |

Precedence: command line > environment > recipe file > defaults. `--dry-run` validates the recipe, loads both
models and the data, prints the resolved recipe and a summary (parameter counts, layers, vocabulary sizes,
dataset sizes, prompt-length statistics, the first held-out prompt as the student sees it, the stages and the
hidden-state layer pairs), and exits. A run saves its resolved recipe (`final/recipe.yaml`, and beside every
checkpoint), every key written out.

## Sections

@TOC@
"""


def _cell(text: str) -> str:
    """Text for a markdown table cell: pipes escaped, no line breaks, no accidental HTML tags."""
    text = " ".join(str(text).split())
    # outside code spans a * would start emphasis (teacher_text.* ... rollout.*) and <word an HTML tag; a pipe
    # ends the cell anywhere, code spans included
    parts = re.split(r"(`[^`]*`)", text)
    text = "".join(part if k % 2 else re.sub(r"<(?=[A-Za-z/])", "&lt;", part.replace("*", "\\*"))
                   for k, part in enumerate(parts))
    return text.replace("|", "\\|")


def _value(value: Any) -> str:
    """A default or bound as a YAML reader would write it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if math.isinf(value):
            return ".inf" if value > 0 else "-.inf"
        text = f"{value:g}" if abs(value) < 1e-3 and value else repr(value)
        return re.sub(r"e-0*(\d)", r"e-\1", text)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_value(v)}" for k, v in value.items()) + "}"
    return str(value)


def _union_args(annotation: Any) -> tuple[Any, ...] | None:
    origin = typing.get_origin(annotation)
    if origin is typing.Union or origin is types.UnionType:
        return typing.get_args(annotation)
    return None


def _section_model(annotation: Any) -> type[BaseModel] | None:
    """The section class of a field that is a section (or a section or null)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in _union_args(annotation) or ():
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None


def _type_name(annotation: Any, inside_union: bool = False) -> str:
    if annotation is type(None):
        return "null"
    if annotation is Any:
        return "any"
    args = _union_args(annotation)
    if args is not None:
        return " | ".join(_type_name(a, inside_union=True) for a in args)
    origin = typing.get_origin(annotation)
    if origin is Literal:
        choices = typing.get_args(annotation)
        if inside_union and len(choices) == 1:
            return f'"{choices[0]}"'
        kinds = sorted({type(c).__name__ for c in choices})
        return " | ".join(kinds)
    if origin in (list, tuple, dict):
        inner = ", ".join(_type_name(a) for a in typing.get_args(annotation))
        return f"{origin.__name__}[{inner}]" if inner else origin.__name__
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "section"
    return getattr(annotation, "__name__", str(annotation))


def _choices(annotation: Any) -> list[Any]:
    """The Literal choices of an annotation (also inside `X | None`), when the annotation is one choice list."""
    args = _union_args(annotation)
    if args is not None:
        literal = [a for a in args if typing.get_origin(a) is Literal]
        rest = [a for a in args if typing.get_origin(a) is not Literal and a is not type(None)]
        if len(literal) == 1 and not rest:
            return list(typing.get_args(literal[0]))
        return []
    if typing.get_origin(annotation) is Literal:
        return list(typing.get_args(annotation))
    return []


def _bounds(field: Any) -> list[str]:
    """ge/gt/le/lt, lengths, multiples and patterns of a field, in words."""
    found: dict[str, Any] = {}
    for item in field.metadata:
        for name in ("ge", "gt", "le", "lt", "multiple_of", "min_length", "max_length", "pattern", "allow_inf_nan"):
            value = getattr(item, name, None)
            if value is not None:
                found[name] = value
    out = []
    low = ("[", found["ge"]) if "ge" in found else ("(", found["gt"]) if "gt" in found else None
    high = ("]", found["le"]) if "le" in found else (")", found["lt"]) if "lt" in found else None
    if low and high:
        out.append(f"{low[0]}{_value(low[1])}, {_value(high[1])}{high[0]}")
    elif low:
        out.append(f"{'≥' if low[0] == '[' else '>'} {_value(low[1])}")
    elif high:
        out.append(f"{'≤' if high[0] == ']' else '<'} {_value(high[1])}")
    if "multiple_of" in found:
        out.append(f"a multiple of {found['multiple_of']}")
    if "min_length" in found and "max_length" in found and found["min_length"] == found["max_length"]:
        out.append(f"exactly {found['min_length']} items")
    else:
        if "min_length" in found:
            out.append(f"at least {found['min_length']} item{'s' if found['min_length'] != 1 else ''}")
        if "max_length" in found:
            out.append(f"at most {found['max_length']} items")
    if "pattern" in found:
        out.append(f"matches `{found['pattern']}`")
    if found.get("allow_inf_nan"):
        out.append("`.inf` allowed")
    return out


def _allowed(field: Any) -> str:
    parts = []
    choices = _choices(field.annotation)
    if choices:
        parts.append(", ".join(f"`{_value(c)}`" for c in choices))
    parts += _bounds(field)
    nullable = type(None) in (_union_args(field.annotation) or ())
    if nullable and parts:
        parts.append("or `null`")
    return "; ".join(parts)


def _default(field: Any) -> str:
    if field.is_required():
        return "required"
    value = field.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return "(section)"
    return f"`{_value(value)}`"


def _where_keys_apply() -> dict[str, list[str]]:
    """key -> where it applies, from the recipe checks that refuse a key set where it has no effect."""
    from onpolicy_kd.recipe.schema import Recipe, _conditional_keys

    probe = Recipe.model_validate({"teacher": {"name_or_path": "teacher"},
                                   "student": {"name_or_path": "student"}, "data": {"path": "data.jsonl"}})
    where: dict[str, list[str]] = {}
    for key, _applies, text in _conditional_keys(probe):
        if text not in where.setdefault(key, []):
            where[key].append(text)
    return where


def _rows(model: type[BaseModel], prefix: str, where: dict[str, list[str]]) -> list[Row]:
    rows = []
    for name, field in model.model_fields.items():
        key = f"{prefix}.{name}"
        section = _section_model(field.annotation)
        meaning = field.description or MEANINGS.get(key, "")
        if section is not None:
            meaning = meaning or (section.__doc__ or "").strip().split("\n\n")[0]
            meaning = f"{meaning} (a section: the keys below)" if meaning else "a section: the keys below"
        elif not meaning and prefix == "stages[]" and name in SECTIONS:
            meaning = f"the recipe's `{name}` keys this stage changes"
        type_name = "section or null" if section is not None and _union_args(field.annotation) else (
            _type_name(field.annotation))
        rows.append((key, type_name, _default(field), _allowed(field), meaning or NO_MEANING,
                     "; ".join(where.get(key, []))))
        if section is not None:
            rows += _rows(section, key, where)
    return rows


def _table(rows: list[Row]) -> str:
    out = ["| key | type | default | allowed | meaning |", "|---|---|---|---|---|"]
    for key, type_name, default, allowed, meaning, applies in rows:
        text = _cell(meaning)
        if applies:
            text = f"{text.rstrip('.')}. **Applies** {_cell(applies)}."
        out.append(f"| `{key}` | {_cell(type_name)} | {_cell(default)} | {_cell(allowed)} | {text} |")
    return "\n".join(out) + "\n"


def _anchor(name: str) -> str:
    return "#" + re.sub(r"[^\w\- ]", "", name.lower()).replace(" ", "-")


def sections(recipe: type[BaseModel] | None = None) -> list[tuple[str, list[Row]]]:
    """(section name, its rows) for every top-level section of the recipe schema, in schema order."""
    if recipe is None:
        from onpolicy_kd.recipe.schema import Recipe as recipe  # noqa: N813
    where = _where_keys_apply()
    out = []
    for name, field in recipe.model_fields.items():
        section = _section_model(field.annotation)
        if section is not None:
            out.append((name, _rows(section, name, where)))
        elif typing.get_origin(field.annotation) is list:
            (item,) = typing.get_args(field.annotation)
            if isinstance(item, type) and issubclass(item, BaseModel):
                out.append((name, _rows(item, f"{name}[]", where)))
    return out


def render(recipe: type[BaseModel] | None = None) -> str:
    """The whole page, as docs/recipes.md should hold it."""
    from onpolicy_kd.recipe.schema import ENV_OVERRIDES

    parts = sections(recipe)
    env_rows = "".join(f"| `{var}` | `{key}` |\n" for var, key in ENV_OVERRIDES.items())
    toc = "\n".join(f"- [`{name}`]({_anchor(name)}): {SECTIONS.get(name, '').split(' Guide:')[0]}"
                    for name, _ in parts)
    page = PREAMBLE.replace("@ENV_ROWS@", env_rows).replace("@TOC@", toc)
    for name, rows in parts:
        page += f"\n## {name}\n\n"
        if name in SECTIONS:
            page += SECTIONS[name] + "\n\n"
        if name == "stages":
            page += ("A stage is a list item (`stages: [{name: heal, max_steps: 60, objective: {...}}, ...]`); "
                     "`stages[].objective` and the other section keys take the recipe's keys of that section.\n\n")
        page += _table(rows)
    return page


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/recipes.md is stale; write nothing")
    args = parser.parse_args(argv)
    page = render()
    if args.check:
        current = PAGE.read_text(encoding="utf-8") if PAGE.is_file() else ""
        if current != page:
            print(f"{PAGE.relative_to(ROOT)} is stale: run `{COMMAND}`", file=sys.stderr)
            return 1
        print(f"{PAGE.relative_to(ROOT)} is up to date")
        return 0
    PAGE.parent.mkdir(parents=True, exist_ok=True)
    PAGE.write_text(page, encoding="utf-8")
    print(f"wrote {PAGE.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
