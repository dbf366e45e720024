"""The frozen teacher's answers to the held-out prompts: its greedy completion and `eval.samples_per_prompt`
sampled ones (at `eval.temperature`, the k-th with seed `eval.seed + k`), generated once and cached.

They are what the student's text is compared with ("vs teacher": the greedy answer; "vs teacher samples": the
best-matching sample, since a good summary need not be the teacher's single most likely one), and the teacher's
own text metrics are computed on them. They go through the teacher-completion cache (rollout/teacher_cache.py):
keyed by the teacher, the prompts' token ids, the decoding settings and, for samples, the seed, so every run
and every `evaluate` on the same held-out prompts reads them in seconds after the first.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from datasets import Dataset

from onpolicy_kd.console import console
from onpolicy_kd.data.loading import data_cache_dir
from onpolicy_kd.recipe import EvalConfig, Recipe
from onpolicy_kd.rollout.teacher_cache import cached_teacher_completions


@dataclass(frozen=True)
class Answer:
    ids: list[int]  # the completion's tokens, up to and including its EOS
    text: str


@dataclass
class TeacherAnswers:
    greedy: list[Answer]  # one per held-out prompt (the first eval.max_samples rows)
    samples: list[list[Answer]]  # per prompt, eval.samples_per_prompt sampled answers
    folders: list[Path]  # the cache entries they were read from or written to (empty without a cache)
    hits: int = 0  # how many of those entries were read rather than generated

    def __len__(self) -> int:
        return len(self.greedy)


def decoding_settings(cfg: EvalConfig, sampled: bool) -> dict:
    """The rollout settings of the held-out completions (the student's are decoded the same way)."""
    return {"max_new_tokens": cfg.max_new_tokens, "temperature": cfg.temperature if sampled else 1.0, "top_k": 0,
            "top_p": 1.0, "do_sample": sampled, "stop_strings": []}


@torch.no_grad()
def teacher_answers(teacher, tokenizer, dataset: Dataset, cfg: EvalConfig, *, device: torch.device, vocab: int,
                    cache_dir: Path | None, progress: Callable[[str, int, int], None] | None = None) -> TeacherAnswers:
    """The teacher's greedy and sampled answers to the first `cfg.max_samples` held-out prompts, from the cache
    under `cache_dir` (generated and written on a miss), or generated and not kept when `cache_dir` is None."""
    prompts = dataset.select(range(min(cfg.max_samples, len(dataset)))).select_columns(["prompt_ids"])
    runs = [("greedy", decoding_settings(cfg, False), cfg.seed)]
    runs += [(f"sample {k + 1}", decoding_settings(cfg, True), cfg.seed + k) for k in range(cfg.samples_per_prompt)]
    decoded, folders, hits = [], [], 0
    for name, settings, seed in runs:
        report = (lambda done, total, name=name: progress(name, done, total)) if progress else None
        completions, hit, folder = cached_teacher_completions(
            teacher, tokenizer, prompts, settings, cache_dir=cache_dir, batch_size=cfg.batch_size, seed=seed,
            device=device, vocab=vocab, progress=report)
        folders += [folder] if folder is not None else []
        hits += hit
        decoded.append([Answer(list(ids), text) for ids, text in
                        zip(completions["teacher_ids"], completions["teacher_text"])])
    greedy, sampled = decoded[0], decoded[1:]
    return TeacherAnswers(greedy, [list(per_prompt) for per_prompt in zip(*sampled)], folders, hits)


def recipe_teacher_answers(recipe: Recipe, teacher, tokenizer, dataset: Dataset, accelerator=None) -> TeacherAnswers:
    """The teacher's answers to a recipe's held-out prompts, through the recipe's data cache. Under several
    processes the main process generates and writes a missing entry, the others then read it (call this before a
    ZeRO-3 teacher is sharded: the main process decodes alone)."""
    main = accelerator is None or accelerator.is_main_process
    device = accelerator.device if accelerator is not None else next(teacher.parameters()).device

    def progress(name: str, done: int, total: int) -> None:
        if main and done == total:
            console.print(f"the teacher's held-out answers ({name}, {total} prompts): generated and cached")

    first = accelerator.main_process_first() if accelerator is not None else contextlib.nullcontext()
    with first:
        return teacher_answers(teacher.to(device), tokenizer, dataset, recipe.eval, device=device, vocab=len(tokenizer),
                               cache_dir=data_cache_dir(recipe.data), progress=progress)
