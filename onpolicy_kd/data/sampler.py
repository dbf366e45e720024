"""Which prompts each process takes, and the prompt and reference batches of those rows.

The prompt order is a sequence of seeded permutations of the training rows (one per epoch), read
`batch_size * num_processes` rows at a time; process r takes its own slice of each global batch.
The only state is the global position, so a resumed run continues with exactly the prompts the
interrupted one would have seen next, whatever the number of processes.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

import torch
from datasets import Dataset

from onpolicy_kd.batch import Completions, Source, TeacherTopK, left_pad, right_pad
from onpolicy_kd.errors import DataError
from onpolicy_kd.recipe import TrainConfig

Tensor = torch.Tensor


@dataclass
class PromptSampler:
    n_rows: int
    batch_size: int  # per process
    num_processes: int
    process_index: int
    seed: int
    position: int = 0  # global rows consumed so far (saved in checkpoints)

    def _row(self, global_index: int) -> int:
        epoch, offset = divmod(global_index, self.n_rows)
        order = torch.randperm(self.n_rows, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
        return int(order[offset])

    def next_batch(self) -> list[int]:
        start = self.position + self.process_index * self.batch_size
        rows = [self._row(start + i) for i in range(self.batch_size)]
        self.position += self.batch_size * self.num_processes
        return rows


def repeated_rows(cfg: TrainConfig, rows: int, processes: int) -> str | None:
    """What to warn about when a step takes more prompts than the training split has: rows repeat within a step."""
    per_step = cfg.batch_size * cfg.grad_accum * processes
    if per_step <= rows:
        return None
    return (f"a step takes {per_step} prompts (train.batch_size={cfg.batch_size} x grad_accum "
            f"{cfg.grad_accum} x {processes} process{'es' if processes > 1 else ''}) and the training split has "
            f"{rows} row{'s' if rows != 1 else ''}: each row appears about {per_step / rows:.1f} times in every step; "
            f"lower train.batch_size or train on more rows")


def prompt_batch(dataset: Dataset, rows: list[int], pad_id: int, device: torch.device,
                 column: str = "prompt_ids") -> tuple[Tensor, Tensor]:
    """The prompts of `rows`, left-padded: (ids (B, P), mask (B, P)); `column`: student_prompt_ids for a student
    with a tokenizer of its own (objective.cross_tokenizer)."""
    return left_pad([dataset[i][column] for i in rows], pad_id, device)


def reference_batch(dataset: Dataset, rows: list[int], pad_id: int, device: torch.device, *,
                    source: Source = "references", seed: int = 0, step: int = 0,
                    topk: Sequence[Dataset] | None = None) -> Completions:
    """The completions stored with `rows` as a batch (no sampling log-probs): the dataset's references, or with
    source='teacher' one of each row's cached teacher completions (teacher_text.cache; which one: `teacher_sample`
    of (seed, step, row)), with `topk` (one dataset per cached completion, row-aligned: teacher_text.topk) the
    teacher's top-k distribution at each of its positions."""
    prompt_ids, prompt_mask = prompt_batch(dataset, rows, pad_id, device)
    picks = []
    if source == "teacher":
        completions, texts = [], []
        for row in rows:
            answers = dataset[row]
            k = teacher_sample(seed, step, row, len(answers["teacher_ids"]))
            completions.append(answers["teacher_ids"][k])
            texts.append(answers["teacher_text"][k])
            picks.append(k)
    else:
        completions, texts = [dataset[i]["reference_ids"] for i in rows], [dataset[i]["reference"] for i in rows]
    ids, mask = right_pad(completions, pad_id, device)
    batch = Completions(prompt_ids, prompt_mask, ids, mask, source=source, texts=texts, rows=list(rows))
    if topk is not None and source == "teacher":
        batch.teacher_topk = topk_batch([topk[k][row] for row, k in zip(rows, picks)], ids.shape[1], device)
    return batch


def topk_batch(entries: Sequence[dict], width: int, device: torch.device) -> TeacherTopK:
    """Rows of a top-k cache (each topk_ids and topk_logprobs (T_b, k), tail_logprob (T_b,)) right-padded to `width`
    positions: ids 0, log-probs 0 and tails -inf at padding (the losses read valid positions only)."""
    k = next((len(e["topk_ids"][0]) for e in entries if len(e["topk_ids"])), 1)  # (an empty completion has no row)
    ids = torch.zeros((len(entries), width, k), dtype=torch.long)
    logprobs = torch.zeros((len(entries), width, k), dtype=torch.float32)
    tail = torch.full((len(entries), width), float("-inf"), dtype=torch.float32)
    for b, entry in enumerate(entries):
        length = len(entry["tail_logprob"])
        assert length <= width, "a top-k row longer than its completion (cached_teacher_topk checks the lengths)"
        if length:
            ids[b, :length] = torch.as_tensor(entry["topk_ids"], dtype=torch.long)
            logprobs[b, :length] = torch.as_tensor(entry["topk_logprobs"], dtype=torch.float32)
            tail[b, :length] = torch.as_tensor(entry["tail_logprob"], dtype=torch.float32)
    return TeacherTopK(ids.to(device), logprobs.to(device), tail.to(device))


def stored_batch(dataset: Dataset, stored: list, pad_id: int, device: torch.device, *, temperature: float,
                 alpha: float) -> Completions:
    """Student samples kept in the replay buffer (rollout/replay.py: each with its row, tokens and text) as a batch
    of the student's completions drawn at `temperature` (and teacher mixing `alpha`), without the sampler's
    log-probabilities (the divergences do not read them)."""
    rows = [s.row for s in stored]
    prompt_ids, prompt_mask = prompt_batch(dataset, rows, pad_id, device)
    ids, mask = right_pad([s.ids for s in stored], pad_id, device)
    return Completions(prompt_ids, prompt_mask, ids, mask, source="student", texts=[s.text for s in stored], rows=rows,
                       temperature=temperature, alpha=alpha, truncated=torch.tensor([s.truncated for s in stored], dtype=torch.bool, device=device))


def teacher_sample(seed: int, step: int, row: int, count: int) -> int:
    """Which of a row's `count` cached teacher completions a step trains on: uniform, a function of (seed, step, row)
    only (the same on every process and after a resume)."""
    return 0 if count == 1 else random.Random(f"{seed}-{step}-{row}").randrange(count)


def count_references(dataset: Dataset) -> int:
    """How many rows have a non-empty reference completion (the whole split: it is tokenised once)."""
    return sum(1 for r in dataset["reference_ids"] if len(r) > 0)


def rows_with_references(dataset: Dataset, reason: str, where: str) -> Dataset:
    """The rows a mode that reads references trains on: those that have one (counted over the whole split).
    `reason` says why the mode needs them; `where` names the data (path, format, columns) for the error."""
    keep = [i for i, ids in enumerate(dataset["reference_ids"]) if len(ids) > 0]
    if not keep:
        raise DataError(f"{reason}, but {where} has none; map a reference column with data.columns.reference=<column>")
    return dataset if len(keep) == len(dataset) else dataset.select(keep)
