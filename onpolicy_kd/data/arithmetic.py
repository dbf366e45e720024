"""A task with a checkable answer: multi-step arithmetic, written out one operation per line.

    Compute 47 + 38 - 21 + 66. Work it out step by step.
    ->  47 + 38 = 85
        85 - 21 = 64
        64 + 66 = 130
        Answer: 130

Each line starts from the running total of the line before, so one wrong digit in the middle spoils every later
line and the final answer: a student that drifts from the teacher on its own prefixes (exposure bias) is caught,
and exact-match accuracy of the final answer (`eval.answer_pattern`, ANSWER_PATTERN) judges it without any
reference text to match. Problems start from a two-digit number and apply STEPS_MIN to STEPS_MAX additions or
subtractions of two-digit numbers (a subtraction that would go below zero becomes an addition). The generator is
deterministic for a seed; the training and held-out sets use different seeds and share no question.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

ANSWER_PATTERN = r"Answer: (-?[0-9]+)"
STEPS_MIN, STEPS_MAX = 3, 4
TRAIN_SEED, EVAL_SEED = 1, 2
TRAIN_ROWS, EVAL_ROWS = 4000, 500


def problem(rng: random.Random) -> dict[str, str]:
    """One problem: {"question": ..., "answer": the worked lines and "Answer: N"}."""
    total = rng.randint(10, 99)
    expression, lines = [str(total)], []
    for _ in range(rng.randint(STEPS_MIN, STEPS_MAX)):
        operand = rng.randint(10, 99)
        op = "+" if rng.random() < 0.5 or operand > total else "-"
        result = total + operand if op == "+" else total - operand
        expression.append(f"{op} {operand}")
        lines.append(f"{total} {op} {operand} = {result}")
        total = result
    return {"question": f"Compute {' '.join(expression)}. Work it out step by step.",
            "answer": "\n".join(lines) + f"\nAnswer: {total}"}


def problems(count: int, seed: int, exclude: set[str] = frozenset()) -> list[dict[str, str]]:
    """`count` distinct problems from `seed`, none of whose questions is in `exclude`."""
    rng, seen, out = random.Random(seed), set(exclude), []
    while len(out) < count:
        item = problem(rng)
        if item["question"] not in seen:
            seen.add(item["question"])
            out.append(item)
    return out


def write_arithmetic(dest: Path) -> Path:
    """train.jsonl (TRAIN_ROWS problems) and eval.jsonl (EVAL_ROWS others) into `dest`; `dest` itself."""
    dest.mkdir(parents=True, exist_ok=True)
    train = problems(TRAIN_ROWS, TRAIN_SEED)
    held_out = problems(EVAL_ROWS, EVAL_SEED, exclude={p["question"] for p in train})
    for name, rows in (("train.jsonl", train), ("eval.jsonl", held_out)):
        tmp = dest / f".{name}.tmp"
        tmp.write_text("".join(json.dumps(row) + "\n" for row in rows))
        tmp.replace(dest / name)
    return dest
