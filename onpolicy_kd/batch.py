"""The one batch type: prompts with their completions, and how the completions were made.

Every mode trains on a `Completions` batch, whether the completions were sampled from the student,
sampled from the teacher (or a mixture of both, token by token), or read from the dataset's
references. Prompts are left-padded and completions right-padded, so the sequence the models read is
`[pad.. prompt | completion ..pad]` and the completion starts at the same column in every row.

Masks and positions are built here and nowhere else:
- `completion_mask(lengths, width)`: a row's first `length` completion tokens are valid (up to and
  including its EOS); masks come from lengths, never from comparing ids with the pad id (GPT-2 pads
  with EOS).
- `next_token_mask(real)`: the positions whose next token is also real (teacher-forced targets).
- `position_ids(attention_mask)`: positions count only attended tokens, so left padding does not
  shift them (a prompt gets the same positions alone or in a padded batch).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal, NamedTuple, Sequence

import torch

Tensor = torch.Tensor

Source = Literal["student", "teacher", "references"]


def completion_mask(lengths_B: Tensor, width: int) -> Tensor:
    """(B, width) bool: True at the first `lengths[b]` positions of row b."""
    return torch.arange(width, device=lengths_B.device).unsqueeze(0) < lengths_B.unsqueeze(1)


def next_token_mask(real_BL: Tensor) -> Tensor:
    """(B, L - 1) bool: column j predicts token j + 1, valid when both are real tokens (a sequence's first token
    has no context to predict it from)."""
    real = real_BL.bool()
    return real[:, :-1] & real[:, 1:]


def position_ids(attention_mask_BL: Tensor) -> Tensor:
    """Position of each token among the attended ones (0 at the first real token; padding before it gets 0)."""
    return (attention_mask_BL.long().cumsum(-1) - 1).clamp_min(0)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """Token-id lists -> (ids (B, P), mask (B, P)), padded on the left."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        if p:
            ids[i, width - len(p):] = torch.tensor(list(p))
            mask[i, width - len(p):] = 1
    return ids.to(device), mask.to(device)


def right_pad(completions: Sequence[Sequence[int]], pad_id: int, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """Token-id lists -> (ids (B, T), bool mask (B, T)), padded on the right (at least one column)."""
    lengths = torch.tensor([len(c) for c in completions], dtype=torch.long)
    ids = torch.full((len(completions), max(1, int(lengths.max()))), pad_id, dtype=torch.long)
    for i, c in enumerate(completions):
        if c:
            ids[i, : len(c)] = torch.tensor(list(c))
    return ids.to(device), completion_mask(lengths, ids.shape[1]).to(device)


class TeacherTopK(NamedTuple):
    """The teacher's distribution at each position, as a cache keeps it (rollout/teacher_cache.py): its k most
    likely tokens, their log-probabilities and the log of the mass left to the rest of the vocabulary, at the
    loss's temperature. Shapes (..., k), (..., k), (...); `tail` is -inf where the k tokens hold all of it."""

    ids: Tensor
    logprobs: Tensor
    tail: Tensor

    def rows(self, index: Tensor | slice) -> "TeacherTopK":
        return TeacherTopK(self.ids[index], self.logprobs[index], self.tail[index])


@dataclass
class Completions:
    """A batch of prompts and completions, with what the losses need to know about how they were made."""

    prompt_ids: Tensor  # (B, P) left-padded
    prompt_mask: Tensor  # (B, P)
    completion_ids: Tensor  # (B, T) padding after each row's end
    completion_mask: Tensor  # (B, T) bool, True up to and including the first EOS / stop string
    source: Source  # who wrote the completions
    texts: list[str]  # decoded completions (valid tokens only)
    temperature: float = 1.0  # what the sampled log-probs below were computed at
    alpha: float = 0.0  # teacher weight of the sampling mixture (0 = the student alone, 1 = the teacher alone)
    # per sampled token (B, T), 0 at padding; None for references:
    student_logprobs: Tensor | None = None  # log q_old(y_t | c_t), the behaviour student
    teacher_logprobs: Tensor | None = None  # log p(y_t | c_t); only when the teacher ran while sampling (alpha > 0)
    sample_logprobs: Tensor | None = None  # log p~(y_t | c_t) of the (filtered) distribution y_t was drawn from
    student_entropy: Tensor | None = None  # H(q_old(. | c_t)), for the entropy penalty's reward-shaping form
    decode_steps: int = 0  # decoding steps taken (the same on every process)
    rows: list[int] = field(default_factory=list)  # dataset rows of the prompts (for logging and references)
    references: "Completions | None" = None  # the same prompts' dataset references (pg's language-modelling term)
    # the student's keys and values over prompt_ids[:, :-1] from the rollout's prefill, with gradient (per layer:
    # (keys, values)); the loss's forward continues from them instead of running the prompt again (forward.py)
    prompt_cache: list[tuple[Tensor, Tensor]] | None = None
    truncated: Tensor | None = None  # (B,) bool, rollouts only: the row reached max_new_tokens without ending
    # cached teacher text with teacher_text.topk: the teacher's distribution at each position as its top-k (ids and
    # log-probs (B, T, k), the rest's log-mass (B, T)), read from the cache instead of running the teacher
    teacher_topk: "TeacherTopK | None" = None
    # objective.cross_tokenizer: the same prompts and completions in the teacher's tokens (the teacher reads those),
    # and per row the spans (student start, student stop, teacher start, teacher stop) covering the same characters
    teacher_view: "Completions | None" = None
    spans: list | None = None

    @property
    def sequences(self) -> Tensor:
        return torch.cat([self.prompt_ids, self.completion_ids], dim=1)

    @property
    def attention_mask(self) -> Tensor:
        return torch.cat([self.prompt_mask.long(), self.completion_mask.long()], dim=1)

    @property
    def position_ids(self) -> Tensor:
        return position_ids(self.attention_mask)

    @property
    def lengths(self) -> Tensor:
        return self.completion_mask.sum(1)

    @property
    def num_tokens(self) -> int:
        return int(self.completion_mask.sum())

    @property
    def prompt_target_mask(self) -> Tensor:
        """(B, P - 1) bool: the positions predicting the prompt's own tokens."""
        return next_token_mask(self.prompt_mask)

    @property
    def num_prompt_tokens(self) -> int:
        return int(self.prompt_target_mask.sum())

    def select(self, index: Sequence[int]) -> "Completions":
        """The rows in `index`, with padding columns nobody in them uses cut off."""
        take = torch.as_tensor(list(index), dtype=torch.long, device=self.prompt_ids.device)
        prompt_mask, completion_mask_ = self.prompt_mask[take], self.completion_mask[take]
        start = int((prompt_mask.sum(0) == 0).long().cumprod(0).sum())  # leading all-padding prompt columns
        width = max(1, int(completion_mask_.sum(1).max()))
        cut = lambda x: None if x is None else x[take][:, :width]  # noqa: E731
        return replace(
            self, prompt_ids=self.prompt_ids[take][:, start:], prompt_mask=prompt_mask[:, start:],
            completion_ids=cut(self.completion_ids), completion_mask=cut(self.completion_mask),
            texts=[self.texts[i] for i in index], student_logprobs=cut(self.student_logprobs),
            teacher_logprobs=cut(self.teacher_logprobs), sample_logprobs=cut(self.sample_logprobs),
            student_entropy=cut(self.student_entropy), rows=[self.rows[i] for i in index] if self.rows else [],
            references=None, prompt_cache=None, truncated=None if self.truncated is None else self.truncated[take],
            teacher_topk=None if self.teacher_topk is None else TeacherTopK(*(cut(x) for x in self.teacher_topk)),
            teacher_view=None if self.teacher_view is None else self.teacher_view.select(index),
            spans=None if self.spans is None else [self.spans[i] for i in index],
        )


def concatenate(batches: Sequence[Completions], pad_id: int) -> Completions:
    """One batch from several made the same way (prompts re-padded on the left, completions on the right)."""
    if len(batches) == 1:
        return batches[0]
    first = batches[0]
    if any(b.teacher_topk is not None or b.teacher_view is not None for b in batches):  # (made per micro-batch)
        raise ValueError("batches with the teacher's cached top-k or its own tokens are not concatenated")
    prompt_width = max(b.prompt_ids.shape[1] for b in batches)
    width = max(b.completion_ids.shape[1] for b in batches)

    def stack(name: str, right: bool, fill: float) -> Tensor | None:
        parts = [getattr(b, name) for b in batches]
        if parts[0] is None:
            return None
        goal = width if right else prompt_width
        padded = []
        for x in parts:
            pad = torch.full((x.shape[0], goal - x.shape[1]), fill, dtype=x.dtype, device=x.device)
            padded.append(torch.cat([x, pad] if right else [pad, x], dim=1))
        return torch.cat(padded, dim=0)

    return replace(
        first, prompt_ids=stack("prompt_ids", False, pad_id), prompt_mask=stack("prompt_mask", False, 0),
        completion_ids=stack("completion_ids", True, pad_id), completion_mask=stack("completion_mask", True, False),
        student_logprobs=stack("student_logprobs", True, 0.0), teacher_logprobs=stack("teacher_logprobs", True, 0.0),
        sample_logprobs=stack("sample_logprobs", True, 0.0), student_entropy=stack("student_entropy", True, 0.0),
        texts=[t for b in batches for t in b.texts], rows=[r for b in batches for r in b.rows],
        decode_steps=max(b.decode_steps for b in batches), references=None, prompt_cache=None,
        truncated=None if first.truncated is None else torch.cat([b.truncated for b in batches]),
    )
