"""Encoder-decoder teachers and students (T5, Flan-T5, BART): how a batch maps onto them.

The batch stays the one `Completions` type. For an encoder-decoder pair the prompt is the encoder's input
and the completion the decoder's target: the decoder reads `[decoder_start, y_1 .. y_{T-1}]` and its output
at column t predicts y_t. So the losses get the same (B, T, V) logits (or last hidden states and heads) as
from a decoder-only model, and nothing after the forward pass knows the difference.

- Encoder input: a batch's prompts are left-padded; the encoder gets each row moved to the left edge
  (padding after it), so a model with learned absolute positions (BART) encodes a prompt the same alone or
  in a padded batch. The decoder needs no padding at its start: every row begins with `decoder_start`.
- Decoding (`Seq2SeqDecoding`): the encoder runs once per rollout; the decoder then steps one token at a
  time with its KV cache and the cached encoder states. With alpha > 0 the teacher does the same in lockstep.
- The memory-bounded head: these models' forward always applies the lm_head to every position, so for one
  forward the head is swapped for a pass-through and the "logits" are what the head reads (the original T5
  scales the decoder output by d_model^-0.5 first: that scaled state is what gets projected); the losses then
  project it chunk by chunk. Where the head is more than that matrix (BART adds `final_logits_bias`), a probe finds
  out (`head_is_plain`) and the losses read full logits.
- What needs a decoder-only model is an error at load (`check_keys`): copying the teacher's layers, BitNet
  layers, a quantised teacher, hidden-state distillation and `train.trainable` layer ranges (which count the
  layers of one stack), and the divergence on the prompt (an encoder predicts no prompt tokens).
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Iterator

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutput

from onpolicy_kd.errors import ConfigError
from onpolicy_kd.models.distributed import innermost, whole
from onpolicy_kd.models.module_lm import CACHE

from onpolicy_kd.recipe.schema import parse_trainable

if TYPE_CHECKING:
    from onpolicy_kd.batch import Completions
    from onpolicy_kd.recipe import Recipe

Tensor = torch.Tensor


def is_encoder_decoder(model: nn.Module) -> bool:
    """Whether `model` (or the transformers model inside its DDP / DeepSpeed / peft wrappers) is encoder-decoder."""
    return bool(getattr(innermost(model).config, "is_encoder_decoder", False))


def encoder_inputs(prompt_ids: Tensor, prompt_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Left-padded prompts -> the same rows with their tokens first and the padding after them."""
    P = prompt_ids.shape[1]
    pads = P - prompt_mask.long().sum(1, keepdim=True)  # (B, 1) leading padding columns of each row
    take = (torch.arange(P, device=prompt_ids.device).unsqueeze(0) + pads) % P
    return prompt_ids.gather(1, take), prompt_mask.gather(1, take)


def decoder_start_id(model: nn.Module) -> int:
    inner = innermost(model)
    start = getattr(inner.config, "decoder_start_token_id", None)
    if start is None:  # some checkpoints keep it in generation_config.json only
        start = getattr(getattr(inner, "generation_config", None), "decoder_start_token_id", None)
    if start is None:
        raise ConfigError(f"the encoder-decoder model {type(innermost(model)).__name__} has no "
                          f"config.decoder_start_token_id: set it (T5 uses the pad id, BART the EOS id)")
    return int(start)


def decoder_inputs(model: nn.Module, completion_ids: Tensor) -> Tensor:
    """[decoder_start, y_1 .. y_{T-1}]: the decoder's input when teacher-forcing the completions."""
    start = torch.full_like(completion_ids[:, :1], decoder_start_id(model))
    return torch.cat([start, completion_ids[:, :-1]], dim=1)


class _HeadInput(nn.Module):
    """Stands in for the lm_head during one forward: returns what the head reads."""

    def forward(self, states: Tensor) -> Tensor:
        return states


@contextlib.contextmanager
def head_input_as_logits(model: nn.Module) -> Iterator[None]:
    """For the duration, the model's "logits" are its lm_head's input (the head module itself is put back after)."""
    inner = innermost(model)
    head = inner.get_output_embeddings()
    inner.set_output_embeddings(_HeadInput())
    try:
        yield
    finally:
        inner.set_output_embeddings(head)


def teacher_forced(model: nn.Module, batch: "Completions", *, logits: bool,
                   hidden: bool) -> tuple[Tensor | None, tuple[Tensor, ...] | None]:
    """(logits (B, T, V) predicting each completion token, or None; the decoder's hidden states at those positions,
    or None). Without `logits` (the memory-bounded head) the last hidden state is what the lm_head reads."""
    ids, mask = encoder_inputs(batch.prompt_ids, batch.prompt_mask)
    decoder_ids = decoder_inputs(model, batch.completion_ids)
    with contextlib.nullcontext() if logits else head_input_as_logits(model):
        out = model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids, use_cache=False,
                    output_hidden_states=hidden)
    if logits:
        return out.logits, tuple(out.decoder_hidden_states) if hidden else None
    states = tuple(out.decoder_hidden_states[:-1]) if hidden else ()
    return None, (*states, out.logits)


@torch.no_grad()
def head_is_plain(model: nn.Module) -> bool:
    """Whether the model's logits are exactly its lm_head's input times the head's weight, for a bias-free head
    module (models/loading.py `logits_are_linear` checks that first): a probe on a 2-token prompt and 2 decoder
    tokens (T5's output scaling passes, BART's final_logits_bias does not). The tolerance follows the weights'
    precision (a bfloat16 model rounds its logits to ~0.4%); the forward runs without accelerate's autocast
    wrapper, if it has one."""
    inner = innermost(model)
    weight = whole(inner.get_output_embeddings().weight)  # (gathered under ZeRO-3)
    device, vocab = weight.device, weight.shape[0]
    ids = torch.tensor([[1, 2]], device=device) % vocab
    batch_like = dict(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False,
                      decoder_input_ids=torch.tensor([[decoder_start_id(inner), 3]], device=device) % vocab)
    forward = inner.__dict__.get("_original_forward", inner.forward)  # set by accelerate's prepare (autocast)
    was_training = inner.training
    inner.eval()  # no dropout between the two forwards
    try:
        logits = forward(**batch_like).logits.float()
        try:
            with head_input_as_logits(inner):
                states = forward(**batch_like).logits.float()
        except (RuntimeError, ValueError, IndexError):  # e.g. a vocabulary-sized bias added to the head's input
            return False
    finally:
        inner.train(was_training)
    if states.shape[-1] != weight.shape[1]:
        return False
    tf32 = device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32
    relative = max(1e-4, 4 * (2.0 ** -10 if tf32 else torch.finfo(weight.dtype).eps))
    error = (states @ weight.float().T - logits).abs().max()
    return bool(error <= relative * (1 + logits.abs().max()))


class Seq2SeqDecoding:
    """One model's incremental decoding: the encoder once, then one decoder token per step with the KV cache."""

    def __init__(self, model: nn.Module, prompt_ids: Tensor, prompt_mask: Tensor) -> None:
        self.model = model
        self.ids, self.mask = encoder_inputs(prompt_ids, prompt_mask.long())
        self.encoded: BaseModelOutput | None = None
        self.cache = None

    def _forward(self, decoder_ids: Tensor) -> Tensor:
        inputs = dict(input_ids=self.ids) if self.encoded is None else dict(encoder_outputs=self.encoded)
        out = self.model(**inputs, attention_mask=self.mask, decoder_input_ids=decoder_ids, use_cache=True,
                         **{CACHE: self.cache})
        if self.encoded is None:
            self.encoded = BaseModelOutput(last_hidden_state=out.encoder_last_hidden_state)
        self.cache = getattr(out, CACHE)
        return out.logits[:, -1].float()

    def start(self) -> Tensor:
        """(B, V) logits of the first completion token."""
        return self._forward(torch.full_like(self.ids[:, :1], decoder_start_id(self.model)))

    def step(self, tokens_B: Tensor) -> Tensor:
        """Feed each row's latest token; (B, V) logits of the next."""
        return self._forward(tokens_B.unsqueeze(1))


def check_same_kind(teacher: nn.Module, student: nn.Module) -> None:
    """Both models encoder-decoder, or both decoder-only."""
    kinds = {"teacher": is_encoder_decoder(teacher), "student": is_encoder_decoder(student)}
    if kinds["teacher"] != kinds["student"]:
        describe = lambda role: "an encoder-decoder" if kinds[role] else "a decoder-only"  # noqa: E731
        raise ConfigError(
            f"the teacher is {describe('teacher')} model and the student {describe('student')} one: the losses compare "
            f"their next-token distributions over the same completion, which needs both of one kind (both "
            f"AutoModelForSeq2SeqLM, as T5 or BART, or both causal LMs)")


def check_keys(recipe: "Recipe", where: str = "the recipe") -> None:
    """Stop with what to change when a recipe for an encoder-decoder pair uses a key that needs a decoder-only
    model."""
    unsupported = {
        "student.init=teacher_layers": recipe.student.init == "teacher_layers",
        "student.bitnet": recipe.student.bitnet,
        "teacher.quantization": recipe.teacher.quantization is not None,
        "hidden.weight > 0 (hidden-state distillation)": recipe.hidden.weight > 0,
        "objective.prompt_weight": recipe.objective.prompt_weight > 0,
        "train.trainable with decoder layers or other": parse_trainable(recipe.train.trainable).names_layers,
    }
    used = [key for key, on in unsupported.items() if on]
    if used:
        raise ConfigError(
            f"{where}: {', '.join(used)}: not available for encoder-decoder models (T5, BART), which these are; "
            f"remove {'it' if len(used) == 1 else 'them'}. For a smaller student use student.init=config with "
            f"config_overrides (e.g. num_layers, num_decoder_layers, d_model), or a pretrained one")
