"""A model's teacher-forced forward pass over a batch's completions, returning what the losses read.

Only the positions that predict completion tokens are projected to the vocabulary (`logits_to_keep`),
and those that predict the prompt's own tokens when the loss reads them (`objective.prompt_weight`);
on the memory-bounded path no logits are computed at all: the loss projects the last hidden state
chunk by chunk itself, with the lm_head weight returned here. Logits are cut to the shared vocabulary
(models may have padded embedding rows). An encoder-decoder model reads the prompt with its encoder and
the completion with its decoder (models/seq2seq.py); the outputs have the same shapes.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from transformers.cache_utils import DynamicCache

from onpolicy_kd.batch import Completions
from onpolicy_kd.models.attention import captured_projections
from onpolicy_kd.models.module_lm import CACHE
from onpolicy_kd.models.distributed import innermost, whole
from onpolicy_kd.models.seq2seq import is_encoder_decoder, teacher_forced
from onpolicy_kd.objectives.divergences import first
from onpolicy_kd.objectives.hidden import STITCHING
from onpolicy_kd.objectives.loss import ModelOutputs

Tensor = torch.Tensor


def forward_completions(model: nn.Module, batch: Completions, *, vocab: int | None = None, logits: bool = True,
                        hidden: bool = False, head: bool = False, prompt: bool = False,
                        prompt_cache: list[tuple[Tensor, Tensor]] | None = None,
                        relation_layers: Sequence[int] = ()) -> ModelOutputs:
    """`forward_pass` with, for `relation_layers` (decoder layers, 1-based), those layers' query, key and value
    projections at the same positions as `.relations` (attention-relation distillation, models/attention.py)."""
    if not relation_layers:
        return forward_pass(model, batch, vocab=vocab, logits=logits, hidden=hidden, head=head, prompt=prompt,
                            prompt_cache=prompt_cache)
    T = batch.completion_ids.shape[1]
    with captured_projections(innermost(model), relation_layers) as captured:
        out = forward_pass(model, batch, vocab=vocab, logits=logits, hidden=hidden, head=head, prompt=prompt,
                           prompt_cache=prompt_cache)
    # the forward ran over the whole sequence (positions P-1..P+T-2 are its last T+1 but one) or, on the prompt
    # cache, over those T positions alone
    window = [[a[:, -T - 1 : -1] if prompt_cache is None else a for a in captured[layer]] for layer in relation_layers]
    # without gradient (the teacher), copies: a view would keep the whole (B, P + T, W) output for the step
    out.relations = [tuple(a if a.requires_grad else a.clone() for a in qkv) for qkv in window]
    return out


def forward_pass(model: nn.Module, batch: Completions, *, vocab: int | None, logits: bool, hidden: bool, head: bool,
                 prompt: bool, prompt_cache: list[tuple[Tensor, Tensor]] | None) -> ModelOutputs:
    """logits (B, T, V) predicting each completion token (or None), every layer's (B, T, H) hidden states at those
    positions with `hidden` (as `output_hidden_states` numbers them; the last is post-norm, what the lm_head
    reads), and with `head` the lm_head weight. With `prompt`, also the outputs at the (B, P - 1) positions that
    predict the prompt's tokens 1..P-1, as `.prompt`: logits, or (with `hidden`) the last hidden state there.
    With `prompt_cache` (the model's own keys and values over the prompt but its last token, with gradient: the
    rollout's prefill), only the T positions predicting the completion run, on top of them: the same outputs and,
    through the cache's graph, the same gradient as the whole forward, without running the prompt again."""
    P, T = batch.prompt_ids.shape[1], batch.completion_ids.shape[1]
    head_weight = first(whole(innermost(model).get_output_embeddings().weight), vocab) if head else None
    if prompt_cache is not None:
        assert not prompt and not is_encoder_decoder(model), "a prompt cache is only kept for these (training/loop.py)"
        out = model(input_ids=batch.sequences[:, P - 1 : P + T - 1], attention_mask=batch.attention_mask[:, : P + T - 1],
                    position_ids=batch.position_ids[:, P - 1 : P + T - 1], logits_to_keep=0 if logits else 1,
                    output_hidden_states=hidden, use_cache=True, **{CACHE: DynamicCache(ddp_cache_data=prompt_cache)})
        return ModelOutputs(logits=first(out.logits, vocab, -1) if logits else None,
                            hidden=tuple(out.hidden_states) if hidden else None, head=head_weight)
    if is_encoder_decoder(model):  # the prompt is the encoder's input: no position of the decoder predicts it
        assert not prompt, "objective.prompt_weight needs a decoder-only model (refused at load)"
        all_logits, states = teacher_forced(model, batch, logits=logits, hidden=hidden)
        return ModelOutputs(logits=first(all_logits, vocab, -1) if logits else None, hidden=states, head=head_weight)
    keep = (0 if prompt else T + 1) if logits else 1  # 0 keeps every position
    out = model(input_ids=batch.sequences, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                logits_to_keep=keep, output_hidden_states=hidden, use_cache=False)
    states = tuple(h[:, -T - 1 : -1] for h in out.hidden_states) if hidden else None
    result = ModelOutputs(logits=first(out.logits[:, -T - 1 : -1], vocab, -1) if logits else None, hidden=states,
                          head=head_weight)
    if prompt:
        result.prompt = ModelOutputs(logits=first(out.logits[:, : P - 1], vocab, -1) if logits else None,
                                     hidden=(out.hidden_states[-1][:, : P - 1],) if hidden else None, head=result.head)
    return result


def student_forward(student: nn.Module, batch: Completions, *, vocab: int, logits: bool, hidden: bool,
                    lm_batch: Completions | None = None, input_embeddings: bool = False,
                    prompt: bool = False, relation_pairs: Sequence[tuple[int, int]] = ()) -> ModelOutputs:
    """The student's outputs for the loss: logits or (memory-bounded) the last hidden state and head, the stitched
    hidden states for hidden-state distillation, the same outputs over `lm_batch` for pg's language-modelling term,
    and with `prompt` the outputs predicting the prompt's own tokens."""
    cache, batch.prompt_cache = batch.prompt_cache, None  # its graph is backwarded once
    out = forward_completions(student, batch, vocab=vocab, logits=logits, hidden=hidden or not logits,
                              head=not logits, prompt=prompt, prompt_cache=cache,
                              relation_layers=[s for s, _ in relation_pairs])
    out.pairs = tuple(relation_pairs)
    if hidden:
        stitching = getattr(innermost(student), STITCHING)  # called as a module: ZeRO-3 gathers its weights
        out.projected, out.pairs = stitching(out.hidden), stitching.pairs
    if lm_batch is not None:
        out.lm = forward_completions(student, lm_batch, vocab=vocab, logits=logits, hidden=not logits, head=not logits)
        out.lm_batch = lm_batch
    if input_embeddings:
        out.input_embeddings = embedding_matrix(student)
    return out


def embedding_matrix(student: nn.Module) -> Tensor:
    """The student's input embedding matrix (V, H), whole and held constant (the diversity penalty reads it)."""
    return whole(innermost(student).get_input_embeddings().weight).detach()


@torch.no_grad()
def teacher_forward(teacher: nn.Module, batch: Completions, *, vocab: int, logits: bool,
                    hidden: bool, prompt: bool = False, relation_layers: Sequence[int] = (),
                    distribution: bool = True) -> ModelOutputs:
    """The frozen teacher's outputs: its distribution as logits, or (memory-bounded) the last hidden state and head;
    every layer's hidden states for hidden-state distillation; with `prompt` also at the positions predicting the
    prompt; the query, key and value projections of `relation_layers` for attention relations. Without
    `distribution` (the loss reads only hidden states or relations) neither logits nor the head."""
    bounded = distribution and not logits
    return forward_completions(teacher, batch, vocab=vocab, logits=logits and distribution, hidden=hidden or bounded,
                               head=bounded, prompt=prompt, relation_layers=relation_layers)
