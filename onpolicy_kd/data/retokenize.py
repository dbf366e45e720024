"""A batch's prompts and completions in the other model's tokens, and how the two tokenizations line up
(objective.cross_tokenizer: a teacher and a student with different tokenizers).

Both models read the same text: the prompt as the teacher's tokenizer rendered it (the `prompt` column, its decoded
ids) and the completion's text. A completion keeps its own tokens on the side that wrote them (the student's samples,
the teacher's text, the data's references in the teacher's tokens) and is tokenized afresh on the other side, its
EOS (when it ended) becoming the other tokenizer's EOS. The spans (`objectives/cross_tokenizer.py: aligned_spans`)
come from each token's character end in the completion's text, found by decoding its tokens one prefix at a time
(so a side's own, possibly non-canonical, tokens are measured as they are); the two EOS tokens end at a character
one past the text, so they form a span of their own.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import torch


from onpolicy_kd.batch import Completions, left_pad, right_pad
from onpolicy_kd.errors import DataError
from onpolicy_kd.objectives.cross_tokenizer import aligned_spans, shared_vocabulary

Span = tuple[int, int, int, int]


def char_ends(tokenizer, ids: Sequence[int]) -> list[int]:
    """Each token's character end in the decoded text of `ids` (an EOS at the end ends one past it). A byte piece
    that leaves a character unfinished ends where the token completing it ends, so the pieces of one character
    travel together; ends never decrease."""
    ends: list[int] = []
    pending = 0  # tokens so far whose character is not finished yet
    eos = tokenizer.eos_token_id
    text_ids = list(ids[:-1]) if ids and ids[-1] == eos else list(ids)
    for i in range(len(text_ids)):
        text = tokenizer.decode(text_ids[: i + 1], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if text.endswith("\ufffd"):  # an unfinished character: this token ends with the one that completes it
            pending += 1
            continue
        ends.extend([len(text)] * (pending + 1))
        pending = 0
    full = len(tokenizer.decode(text_ids, skip_special_tokens=False, clean_up_tokenization_spaces=False))
    ends.extend([max([full, *ends[-1:]])] * pending)  # (a text cut inside a character)
    if len(text_ids) < len(ids):
        ends.append(full + 1)
    return ends


def tokens_of(tokenizer, text: str, ended: bool) -> list[int]:
    """`text` in this tokenizer's tokens, plus its EOS when the completion ended (it was not cut at a length)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids + [tokenizer.eos_token_id] if ended else ids


def other_side(batch: Completions, source_tokenizer, target_tokenizer, target_prompts: Sequence[Sequence[int]],
               *, source: str) -> tuple[Completions, list[list[Span]]]:
    """The same prompts (`target_prompts`: the target tokenizer's ids of each row's prompt) and completions in the
    target tokenizer's tokens, and per row the spans as (source start, source stop, target start, target stop)."""
    device = batch.completion_ids.device
    source_rows = [ids[mask].tolist() for ids, mask in zip(batch.completion_ids, batch.completion_mask)]
    ended = [bool(row) and row[-1] == source_tokenizer.eos_token_id for row in source_rows]
    texts = [source_tokenizer.decode(row[:-1] if end else row, skip_special_tokens=False, clean_up_tokenization_spaces=False)
             for row, end in zip(source_rows, ended)]
    target_rows = [tokens_of(target_tokenizer, text, end) for text, end in zip(texts, ended)]
    # the spans compare characters, so a row the target tokenizer does not give back as the same text (a control
    # character it drops in a sampled completion) gets no span; a tokenizer that normalises every text is refused
    same = [target_tokenizer.decode(row[:-1] if end else row, skip_special_tokens=False,
                                    clean_up_tokenization_spaces=False) == text
            for text, row, end in zip(texts, target_rows, ended)]
    if texts and not any(same):
        side = "student" if source != "student" else "teacher"
        raise DataError(f"objective.cross_tokenizer: the {side}'s tokenizer gives back none of the texts it is given "
                        f"(e.g. {texts[0][:60]!r}); it normalises text (a SentencePiece prefix space, lower-casing, "
                        f"...), so the two tokenizations cannot be lined up character by character")
    prompt_ids, prompt_mask = left_pad(target_prompts, target_tokenizer.pad_token_id, device)
    ids, mask = right_pad(target_rows, target_tokenizer.pad_token_id, device)
    spans = [aligned_spans(char_ends(source_tokenizer, s), char_ends(target_tokenizer, t)) if ok else []
             for s, t, ok in zip(source_rows, target_rows, same)]
    other = Completions(prompt_ids, prompt_mask, ids, mask, source=source, texts=list(batch.texts), rows=list(batch.rows),
                        truncated=batch.truncated)
    return other, spans


def pair_for_student(batch: Completions, *, student_tokenizer, teacher_tokenizer, student_prompts, teacher_prompts):
    """The batch the student trains on, in its own tokens, carrying the teacher's view of the same text
    (`.teacher_view`) and the spans (student range, teacher range) per row (`.spans`). `batch` is in the student's
    tokens when the student wrote it (its samples), else in the teacher's (its text, the data's references)."""
    if batch.source == "student":
        teacher, spans = other_side(batch, student_tokenizer, teacher_tokenizer, teacher_prompts, source="student")
        return replace(batch, teacher_view=teacher, spans=spans)
    student, spans = other_side(batch, teacher_tokenizer, student_tokenizer, student_prompts, source=batch.source)
    flipped = [[(c, d, a, b) for a, b, c, d in row] for row in spans]
    return replace(student, teacher_view=batch, spans=flipped, references=batch.references)


def prompt_ids_for(tokenizer, prompts: Sequence[str]) -> list[list[int]]:
    """Each prompt's text (as the teacher's tokenizer rendered it) in this tokenizer's ids."""
    return [tokenizer(text, add_special_tokens=False)["input_ids"] for text in prompts]


@dataclass
class CrossTokenizer:
    """What a run across two tokenizers works with (objective.cross_tokenizer), made once at set-up."""

    how: str  # spans | uld
    student_tokenizer: object
    teacher_tokenizer: object
    student_vocab: int
    teacher_vocab: int
    shared: tuple[torch.Tensor, torch.Tensor]  # (student ids, teacher ids) of the tokens both vocabularies have
    kind: str = "forward_kl"  # spans: the divergence on one-token spans (objective.divergence, beta, skew)
    beta: float = 0.5
    skew: float = 0.1

    def pair(self, batch: Completions, dataset, rows: Sequence[int] | None = None) -> Completions:
        """`pair_for_student` with the prompts of `rows` (default the batch's own) from `dataset` (columns
        student_prompt_ids and prompt_ids)."""
        rows = batch.rows if rows is None else rows
        return pair_for_student(batch, student_tokenizer=self.student_tokenizer, teacher_tokenizer=self.teacher_tokenizer,
                                student_prompts=[dataset[r]["student_prompt_ids"] for r in rows],
                                teacher_prompts=[dataset[r]["prompt_ids"] for r in rows])


def cross_tokenizer(objective, student_tokenizer, teacher_tokenizer, device) -> CrossTokenizer:
    """The run's CrossTokenizer from its objective section (cross_tokenizer, divergence, beta, skew)."""
    student_vocab, teacher_vocab = len(student_tokenizer), len(teacher_tokenizer)
    student_ids, teacher_ids = shared_vocabulary(student_tokenizer, teacher_tokenizer, student_vocab, teacher_vocab)
    return CrossTokenizer(objective.cross_tokenizer, student_tokenizer, teacher_tokenizer, student_vocab, teacher_vocab,
                          (student_ids.to(device), teacher_ids.to(device)), objective.divergence, objective.beta,
                          objective.skew)


def with_student_prompts(dataset, tokenizer, teacher_tokenizer):
    """The split with each prompt also in the student's tokens (column student_prompt_ids): the teacher's prompt
    ids decoded as they are (special tokens and spacing kept) and tokenized by the student's tokenizer."""
    texts = [teacher_tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
             for ids in dataset["prompt_ids"]]
    return dataset.add_column("student_prompt_ids", prompt_ids_for(tokenizer, texts))

