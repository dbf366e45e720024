"""Rollouts: completions sampled from the student, or token by token from the teacher-mixed distribution.

At each step the distribution sampled from is p~ = alpha * p_teacher + (1 - alpha) * q_student, both
after temperature (alpha = 0: the student alone; alpha = 1: the teacher alone, for sequence-level
KD). top-k and top-p are then applied to p~ itself (the distribution actually sampled from) and it is
renormalised; the recorded `sample_logprobs` are log-probabilities under that filtered distribution,
while `student_logprobs` and `teacher_logprobs` are the unfiltered tempered log-probabilities, and
`student_entropy` the entropy of the student's tempered distribution at each sampled position.

Decoding is our own KV-cached loop: one prefill, then one single-token forward per step per model,
with position ids taken from the attention mask so left padding does not shift positions (a prompt
gives the same greedy completion alone or in a padded batch). An encoder-decoder model (T5, BART)
encodes the prompt once and steps its decoder instead (models/seq2seq.py); `decoding` picks which.
With alpha > 0 both models decode in lockstep, each with its own cache, and the teacher's log-probs
come for free. With alpha = 0 only the student decodes (the teacher is not needed and its log-probs
are not recorded: the training loop's teacher forward over the finished completions gives them when
a loss needs them).

A row finishes at its first EOS (or stop string), which is kept in the completion mask; later
positions are padding and masked. Masks come from the step at which each row finished, never from
comparing ids with the pad id (GPT-2 pads with EOS). Under several processes, `all_finished`
reduces the local "all rows done" flag over ranks, so every rank keeps stepping until all are done
(ranks that finish early feed padding): no rank leaves a collective behind.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from onpolicy_kd.batch import Completions, Source, completion_mask, position_ids
from onpolicy_kd.models.module_lm import CACHE
from onpolicy_kd.models.seq2seq import Seq2SeqDecoding, is_encoder_decoder
from onpolicy_kd.objectives.divergences import log_probs

Tensor = torch.Tensor


def filter_logprobs(logprobs_BV: Tensor, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Keep the top-k tokens and the smallest set with probability >= top_p; renormalise (log space)."""
    if not (top_k and top_k < logprobs_BV.shape[-1]) and top_p >= 1.0:
        return logprobs_BV  # nothing filtered: already normalised
    if top_k and top_k < logprobs_BV.shape[-1]:
        kth = torch.topk(logprobs_BV, top_k, dim=-1).values[..., -1:]
        logprobs_BV = logprobs_BV.masked_fill(logprobs_BV < kth, -math.inf)
        logprobs_BV = logprobs_BV - torch.logsumexp(logprobs_BV, dim=-1, keepdim=True)  # top-p sees the top-k mass
    if top_p < 1.0:
        sorted_lp, order = torch.sort(logprobs_BV, dim=-1, descending=True)
        mass_before = torch.cumsum(sorted_lp.exp(), dim=-1) - sorted_lp.exp()
        drop_sorted = mass_before >= top_p  # the token that crosses top_p is kept; never drops the first
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logprobs_BV = logprobs_BV.masked_fill(drop, -math.inf)
    return logprobs_BV - torch.logsumexp(logprobs_BV, dim=-1, keepdim=True)


def mixture_logprobs(student_BV: Tensor, teacher_BV: Tensor | None, alpha: float) -> Tensor:
    """log(alpha * p + (1 - alpha) * q) from log-probabilities, stably (alpha in [0, 1])."""
    if alpha == 0 or teacher_BV is None:
        return student_BV
    if alpha == 1:
        return teacher_BV
    return torch.logaddexp(teacher_BV + math.log(alpha), student_BV + math.log1p(-alpha))


def all_ranks_finished(done: bool) -> bool:
    """True when every process's batch is done (a MIN all-reduce); the local flag when not distributed."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return done
    backend = torch.distributed.get_backend()
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    flag = torch.tensor([int(done)], device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return bool(flag.item())


@contextlib.contextmanager
def eval_mode(*models: nn.Module) -> Iterator[None]:
    """Dropout off while sampling (the behaviour policy is the deterministic network), then restore."""
    was_training = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        yield
    finally:
        for m, training in zip(models, was_training):
            m.train(training)


class CausalDecoding:
    """A decoder-only model's incremental decoding: one prefill, then one token per step with the KV cache, the
    positions counted over attended tokens (left padding does not shift them). With `keep_prompt_graph`, the
    prefill of all but the prompt's last token runs with gradient and its keys and values are kept
    (`prompt_cache`): the loss's forward continues from them (models/forward.py), so the student's prompt runs
    once per step; the last prompt token then starts the decoding like any other step."""

    def __init__(self, model: nn.Module, prompt_ids: Tensor, prompt_mask: Tensor, keep_prompt_graph: bool = False) -> None:
        self.model, self.ids, self.cache = model, prompt_ids, None
        self.attention = prompt_mask.long()
        self.positions = position_ids(self.attention)
        self.keep_prompt_graph = keep_prompt_graph and prompt_ids.shape[1] > 1
        self.prompt_cache: list[tuple[Tensor, Tensor]] | None = None

    def _forward(self, ids: Tensor) -> Tensor:
        out = self.model(input_ids=ids, attention_mask=self.attention, position_ids=self.positions, use_cache=True,
                         logits_to_keep=1, **{CACHE: self.cache})
        self.cache = getattr(out, CACHE)
        self.positions = self.positions[:, -1:] + 1
        return out.logits[:, -1].float()

    def start(self) -> Tensor:
        """(B, V) logits of the first completion token."""
        if not self.keep_prompt_graph:
            return self._forward(self.ids)
        attention, positions = self.attention, self.positions
        self.attention, self.positions = attention[:, :-1], positions[:, :-1]
        with torch.enable_grad():  # (the copies too: a copy made without gradient would cut the path)
            self._forward(self.ids[:, :-1])
            self.prompt_cache = kept_layers(self.cache)
        self.attention, self.positions = attention, positions[:, -1:]
        return self._forward(self.ids[:, -1:])

    def step(self, tokens_B: Tensor) -> Tensor:
        """Feed each row's latest token (finished rows feed padding, still attended: harmless, they are masked out
        later); (B, V) logits of the next."""
        self.attention = torch.cat([self.attention, torch.ones_like(self.attention[:, :1])], dim=1)
        return self._forward(tokens_B.unsqueeze(1))


def kept_layers(cache) -> list[tuple[Tensor, Tensor]] | None:
    """Each layer's (keys, values) of a transformers DynamicCache, copied (decoding then appends to the cache's
    own); None for any other cache (sliding-window or recurrent layers keep other state): the loss then runs the
    prompt itself."""
    layers = getattr(cache, "layers", None)
    if not layers or any(type(layer).__name__ != "DynamicLayer" for layer in layers):
        return None
    return [(layer.keys.clone(), layer.values.clone()) for layer in layers]


def decoding(model: nn.Module, prompt_ids: Tensor, prompt_mask: Tensor,
             keep_prompt_graph: bool = False) -> "CausalDecoding | Seq2SeqDecoding":
    """How `model` decodes: the prompt as a decoder-only model's prefix, or as an encoder-decoder's encoder input."""
    if is_encoder_decoder(model):
        return Seq2SeqDecoding(model, prompt_ids, prompt_mask)
    return CausalDecoding(model, prompt_ids, prompt_mask, keep_prompt_graph)


class _StopStrings:
    """Which rows' completions so far end with one of the stop strings (decoding only their tails)."""

    def __init__(self, tokenizer, stop_strings: Sequence[str], batch_size: int) -> None:
        self.tokenizer, self.stop_strings = tokenizer, list(stop_strings)
        self.longest = max((len(tokenizer(s, add_special_tokens=False).input_ids) for s in stop_strings), default=0) + 2
        self.rows: list[list[int]] = [[] for _ in range(batch_size)]

    def update(self, next_tok: Tensor, finished: Tensor, ended: Tensor) -> Tensor:
        """Record this step's tokens; True for the open rows a stop string has just ended."""
        for b, tok in enumerate(next_tok.tolist()):
            if not finished[b]:
                self.rows[b].append(tok)
        hit = torch.zeros_like(ended)
        open_rows = [b for b in range(len(self.rows)) if not finished[b] and not ended[b]]
        if open_rows:
            tails = self.tokenizer.batch_decode([self.rows[b][-self.longest:] for b in open_rows],
                                                skip_special_tokens=False)
            for b, tail in zip(open_rows, tails):
                hit[b] = any(s in tail for s in self.stop_strings)
        return hit


def _draw(sampling_lp: Tensor, do_sample: bool, generator: torch.Generator | None, step: int) -> Tensor:
    """The next token of every row: sampled from the (filtered) distribution, or its argmax when greedy.

    Sampling inverts the cumulative distribution at one uniform draw per row (float64, so the tail's mass is
    not lost to rounding; filtered tokens have probability 0 and are never drawn). It draws from the same
    distribution as `torch.multinomial`, which instead draws an exponential variate for every vocabulary entry:
    at a 49k vocabulary that was the costliest part of a decode step after the forward itself."""
    if torch.isnan(sampling_lp).any():
        raise FloatingPointError(f"non-finite logits while sampling (decode step {step + 1})")
    if not do_sample:
        return sampling_lp.argmax(-1)
    cumulative = sampling_lp.exp().cumsum(-1, dtype=torch.float64)
    uniform = torch.rand(cumulative.shape[0], 1, generator=generator, dtype=cumulative.dtype, device=cumulative.device)
    drawn = torch.searchsorted(cumulative, uniform * cumulative[:, -1:], right=True)
    return drawn.squeeze(1).clamp_max(cumulative.shape[-1] - 1)


@torch.no_grad()
def rollout(
    student: nn.Module,
    teacher: nn.Module | None,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    *,
    tokenizer,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    alpha: float = 0.0,
    do_sample: bool = True,
    stop_strings: Sequence[str] = (),
    eos_token_ids: Sequence[int] | None = None,
    generator: torch.Generator | None = None,
    all_finished: Callable[[bool], bool] = all_ranks_finished,
    vocab_size: int | None = None,
    source: Source | None = None,
    rows: Sequence[int] = (),
    keep_prompt_graph: bool = False,
    autocast: torch.dtype | None = None,
) -> Completions:
    """Sample completions for a left-padded batch of prompts (module docstring); `teacher` only for alpha > 0.
    `source` says who wrote them (default: 'teacher' at alpha = 1, else 'student'), `rows` where the prompts are;
    `keep_prompt_graph`: the student's prompt keys and values with gradient, for the loss (`CausalDecoding`);
    `autocast`: the student decodes in this autocast precision (train.mixed_precision), the teacher never."""
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha={alpha} must be in [0, 1]")
    if teacher is None and alpha > 0:
        raise ValueError("alpha > 0 needs the teacher")
    device = prompt_ids.device
    B = prompt_ids.shape[0]
    eos = torch.tensor(list(eos_token_ids if eos_token_ids is not None else [tokenizer.eos_token_id]), device=device)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else int(eos[0])
    lockstep = alpha > 0
    stops = _StopStrings(tokenizer, stop_strings, B)

    records = _Records()
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    lengths = torch.zeros(B, dtype=torch.long, device=device)
    # one autocast region for the whole decode: it casts each student weight once and keeps the copy (autocast's
    # cache, for weights that train), where autocast around each forward would cast every weight at every token;
    # the kept prompt's graph runs first, so the cached copies carry the gradient path back to the weights
    student_precision = torch.autocast(device.type, dtype=autocast) if autocast else contextlib.nullcontext()
    teacher_precision = torch.autocast(device.type, enabled=False) if autocast else contextlib.nullcontext()
    with eval_mode(*((student, teacher) if lockstep else (student,))), student_precision:
        s_decoding = decoding(student, prompt_ids, prompt_mask, keep_prompt_graph)
        s_logits = s_decoding.start()
        if lockstep:
            t_decoding = decoding(teacher, prompt_ids, prompt_mask)
            with teacher_precision:
                t_logits = t_decoding.start()
        steps = 0
        while steps < max_new_tokens:
            vocab = vocab_size or (min(s_logits.shape[-1], t_logits.shape[-1]) if lockstep else s_logits.shape[-1])
            s_lp = log_probs(s_logits[:, :vocab], temperature)
            t_lp = log_probs(t_logits[:, :vocab], temperature) if lockstep else None
            sampling_lp = filter_logprobs(mixture_logprobs(s_lp, t_lp, alpha), top_k, top_p)
            next_tok = _draw(sampling_lp, do_sample, generator, steps)
            next_tok = torch.where(finished, torch.full_like(next_tok, pad_id), next_tok)
            records.add(next_tok, s_lp, t_lp, sampling_lp)
            lengths += (~finished).long()
            ended = torch.isin(next_tok, eos)
            if stop_strings:
                ended |= stops.update(next_tok, finished, ended)
            finished |= ended
            steps += 1
            if all_finished(bool(finished.all())) or steps == max_new_tokens:
                break
            s_logits = s_decoding.step(next_tok)
            if lockstep:
                with teacher_precision:
                    t_logits = t_decoding.step(next_tok)

    completions = _completions(prompt_ids, prompt_mask, records, lengths, pad_id, tokenizer, source or (
        "teacher" if alpha == 1 else "student"), temperature, alpha, steps, rows)
    completions.prompt_cache = getattr(s_decoding, "prompt_cache", None)
    completions.truncated = ~finished  # cut at max_new_tokens: no EOS or stop string
    return completions


class _Records:
    """What a rollout records at each decode step: the tokens drawn, their log-probs under the student, the teacher
    (lockstep only) and the distribution sampled from, and the student's entropy."""

    def __init__(self) -> None:
        self.tokens: list[Tensor] = []
        self.student: list[Tensor] = []
        self.teacher: list[Tensor] = []
        self.sample: list[Tensor] = []
        self.entropy: list[Tensor] = []

    def add(self, tokens_B: Tensor, student_BV: Tensor, teacher_BV: Tensor | None, sampling_BV: Tensor) -> None:
        take = lambda lp: lp.gather(-1, tokens_B.unsqueeze(-1)).squeeze(-1)  # noqa: E731
        self.tokens.append(tokens_B)
        self.student.append(take(student_BV))
        finite = student_BV.clamp_min(torch.finfo(student_BV.dtype).min)  # 0 log 0 = 0
        self.entropy.append(-(student_BV.exp() * finite).sum(-1))
        self.sample.append(take(sampling_BV))
        if teacher_BV is not None:
            self.teacher.append(take(teacher_BV))


def _completions(prompt_ids, prompt_mask, records: _Records, lengths, pad_id, tokenizer, source, temperature, alpha,
                 steps, rows) -> Completions:
    """The batch from the per-step records: ids padded after each row's end, masks from the lengths."""
    completion_ids = torch.stack(records.tokens, 1)
    mask = completion_mask(lengths, completion_ids.shape[1])
    completion_ids = completion_ids.masked_fill(~mask, pad_id)
    zero = torch.zeros((), device=prompt_ids.device)
    recorded = lambda values: torch.where(mask, torch.stack(values, 1), zero)  # noqa: E731
    texts = tokenizer.batch_decode(
        [ids[: int(n)] for ids, n in zip(completion_ids.tolist(), lengths.tolist())], skip_special_tokens=True
    )
    return Completions(
        prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids, completion_mask=mask,
        source=source, texts=texts, temperature=temperature, alpha=alpha, student_logprobs=recorded(records.student),
        teacher_logprobs=recorded(records.teacher) if records.teacher else None,
        sample_logprobs=recorded(records.sample), student_entropy=recorded(records.entropy), decode_steps=steps,
        rows=list(rows),
    )
