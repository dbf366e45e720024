"""A nanoGPT-style student written in plain PyTorch, distilled from the offline SmolLM2-135M-Instruct teacher.

    onpolicy-kd train examples/nanogpt/distill.py          # after scripts/setup.sh; a few minutes on 2 CPU cores
    onpolicy-kd evaluate outputs/nanogpt                   # rebuilds the student with NanoDistill.student(state_dict)

The student is not a transformers model: a `torch.nn.Module` that maps (input_ids, attention_mask) to logits.
onpolicy-kd wraps it (no KV cache: sampling runs full forward passes) and trains it like any other student. The
class below names the student; the teacher, the data and everything else come from `recipe` and `overrides`.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from onpolicy_kd import Distillation


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention, then a GELU MLP."""

    def __init__(self, n_embd: int, n_head: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.ln_1, self.ln_2 = nn.LayerNorm(n_embd), nn.LayerNorm(n_embd)
        self.qkv = nn.Linear(n_embd, 3 * n_embd)
        self.proj = nn.Linear(n_embd, n_embd)
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.GELU(), nn.Linear(4 * n_embd, n_embd))

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln_1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, C))
        return x + self.mlp(self.ln_2(x))


class NanoGPT(nn.Module):
    """Token and learned position embeddings, `n_layer` blocks, a final LayerNorm and a head tied to the embeddings."""

    def __init__(self, vocab_size: int, n_layer: int = 4, n_head: int = 8, n_embd: int = 576,
                 block_size: int = 512) -> None:
        super().__init__()
        self.max_position_embeddings = block_size  # onpolicy-kd checks the recipe's lengths against it
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.wpe = nn.Embedding(block_size, n_embd)
        self.blocks = nn.ModuleList(Block(n_embd, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight
        for name, parameter in self.named_parameters():
            if name.endswith("proj.weight") or name.endswith("mlp.2.weight"):  # GPT-2's scaled residual init
                nn.init.normal_(parameter, std=0.02 / math.sqrt(2 * n_layer))
            elif parameter.dim() == 2 and "ln" not in name:
                nn.init.normal_(parameter, std=0.02)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, output_hidden_states: bool = False,
                logits_to_keep: int = 0):
        # Batches are left-padded: positions count real tokens only, so a prompt reads the same alone or padded.
        positions = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
        T = input_ids.shape[1]
        causal = torch.ones(T, T, dtype=torch.bool, device=input_ids.device).tril()
        # each position sees earlier real tokens, and itself (a padding row that saw nothing would give NaN)
        allowed = (causal & attention_mask.bool()[:, None, None, :]) | torch.eye(T, dtype=torch.bool,
                                                                                   device=input_ids.device)
        x = self.wte(input_ids) + self.wpe(positions)
        hidden = [x]
        for block in self.blocks:
            x = block(x, allowed)
            hidden.append(x)
        x = self.ln_f(x)
        hidden[-1] = x  # as transformers numbers hidden states: the last is what the head reads
        logits = self.lm_head(x[:, -logits_to_keep:])  # decoding wants the last position only (0: every position)
        return (logits, tuple(hidden)) if output_hidden_states else logits


TEACHER = Path(os.environ.get("ONPOLICY_KD_CACHE_DIR") or "~/.cache/onpolicy_kd").expanduser() / \
    "models" / "smollm2-135m-instruct"


class NanoDistill(Distillation):
    recipe = "../../recipes/smollm2_news.yaml"  # teacher, data, teacher-written summaries, evaluation
    overrides = [
        "objective.prompt_weight=1.0",  # a student trained from scratch learns from the teacher at every token
        "penalties.frequency=0.0",
        "optim.lr=1e-3",
        "optim.warmup_steps=10",
        "train.max_steps=null",
        "train.max_time=300",  # five minutes of training steps
        "eval.eval_steps=1000",
        "train.output_dir=outputs/nanogpt",
    ]

    def student(self, state_dict=None):
        from safetensors import safe_open

        model = NanoGPT(vocab_size=49152)
        if state_dict is not None:  # a trained student, as the export saved it
            model.load_state_dict(state_dict)
        else:  # start from the teacher's token embeddings (576 wide, as the blocks): words before grammar
            with safe_open(str(TEACHER / "model.safetensors"), "pt") as weights:
                model.wte.weight.data.copy_(weights.get_tensor("model.embed_tokens.weight"))
        return model
