"""Batches: which prompts each process takes, reference completions, and teacher-forced forward passes.

The prompt order is a sequence of seeded permutations of the training rows (one per epoch), read
`batch_size * num_processes` rows at a time; process r takes its own slice of each global batch.
The only state is the global position, so a resumed run continues with exactly the prompts the
interrupted one would have seen next, whatever the number of processes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from datasets import Dataset

from onpolicy_kd.rollout import Rollout, left_pad

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


def prompt_batch(dataset: Dataset, rows: list[int], pad_id: int, device: torch.device) -> tuple[Tensor, Tensor]:
    return left_pad([dataset[i]["prompt_ids"] for i in rows], pad_id, device)


def reference_rollout(dataset: Dataset, rows: list[int], pad_id: int, device: torch.device) -> Rollout:
    """The dataset's reference completions in the shape of a rollout (no sampling log-probs)."""
    prompt_ids, prompt_mask = prompt_batch(dataset, rows, pad_id, device)
    refs = [dataset[i]["reference_ids"] for i in rows]
    if not any(refs):
        raise ValueError("no reference completions in this batch")
    width = max(len(r) for r in refs)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(rows), width), dtype=torch.bool, device=device)
    for b, r in enumerate(refs):
        ids[b, : len(r)] = torch.tensor(r, device=device)
        mask[b, : len(r)] = True
    zeros = torch.zeros(ids.shape, dtype=torch.float32, device=device)
    return Rollout(prompt_ids, prompt_mask, ids, mask, zeros, zeros, zeros,
                   [dataset[i]["reference"] for i in rows], steps=width)


def has_references(dataset: Dataset) -> bool:
    return any(len(r) > 0 for r in dataset.select(range(min(len(dataset), 64)))["reference_ids"])


def forward_completions(model: torch.nn.Module, batch: Rollout, *, logits: bool = True,
                        hidden: bool = False) -> tuple[Tensor | None, tuple[Tensor, ...] | None]:
    """(logits (B, T, V) predicting each completion token, or None; with `hidden` every layer's hidden states
    (B, T, H) at those positions, as `output_hidden_states` numbers them, else None).

    Only the positions needed are projected to the vocabulary (`logits_to_keep`); the memory-bounded
    divergence asks for no logits and projects the last hidden state chunk by chunk itself.
    """
    attention = torch.cat([batch.prompt_mask.long(), batch.completion_mask.long()], 1)
    positions = (attention.cumsum(-1) - 1).clamp_min(0)
    T = batch.completion_ids.shape[1]
    out = model(input_ids=batch.sequences, attention_mask=attention, position_ids=positions,
                logits_to_keep=T + 1 if logits else 1, output_hidden_states=hidden, use_cache=False)
    # the last hidden state is post-norm (what the lm_head reads)
    states = tuple(h[:, -T - 1 : -1] for h in out.hidden_states) if hidden else None
    return (out.logits[:, :-1] if logits else None), states
