"""Hidden-state distillation: an auxiliary loss pulling the student's hidden states towards the teacher's.

(docs/algorithms.md, "Hidden-state distillation".) Layers are numbered as transformers'
`output_hidden_states` numbers them: 0 is the embedding output, i the output of decoder layer i, and the
last is after the final norm (what the lm_head reads).

- Layer pairs: `hidden.layers: auto` maps every student layer i = 1..L_s to the teacher layer nearest to
  i * L_t / L_s (halves round up), so the student's last layer meets the teacher's last; or list the
  [student, teacher] pairs yourself.
- Stitching: one bias-free `Linear(d_student, d_teacher)` per pair, the identity when the widths are equal
  (so an exact copy starts at zero loss) and Xavier-uniform otherwise. The projections are trained with the
  student: they are attached to it as the submodule `kd_stitching`, so the optimizer, DDP, DeepSpeed
  (ZeRO-3 gathers them in their own forward) and checkpoints carry them with no extra wiring, and
  `split_stitching` takes them out again for the exported student.
- Loss, at the positions that predict completion tokens (those the divergences use), averaged over the
  L pairs, summed over valid tokens and divided by the global valid-token count:
      mse:    (1/L) Σ_l mean_d ((W_l h^s_l)_d − (h^t_l)_d)²
      cosine: (1/L) Σ_l (1 − cos(W_l h^s_l, h^t_l))
  The teacher side carries no gradient. Float32 math for half-precision models (float64 stays float64).
"""

from __future__ import annotations

import json
from typing import Sequence

import torch
from safetensors import safe_open
from torch import nn

from onpolicy_kd.errors import ConfigError

Tensor = torch.Tensor

STITCHING = "kd_stitching"  # the student's submodule holding the projections
STITCHING_FILE = "stitching.safetensors"  # where an exported run keeps them (beside the student's weights)


def auto_layer_pairs(student_layers: int, teacher_layers: int) -> list[tuple[int, int]]:
    """Student layer i -> teacher layer round(i * L_t / L_s), halves up: uniform, last to last."""
    return [(i, (2 * i * teacher_layers + student_layers) // (2 * student_layers)) for i in range(1, student_layers + 1)]


def layer_pairs(layers: str | Sequence[Sequence[int]], student_layers: int, teacher_layers: int) -> list[tuple[int, int]]:
    """`hidden.layers` ('auto' or [[student, teacher], ...]) as checked pairs."""
    if layers == "auto":
        return auto_layer_pairs(student_layers, teacher_layers)
    for s, t in layers:
        if s > student_layers or t > teacher_layers:
            raise ConfigError(
                f"hidden.layers: pair [{s}, {t}] is out of range: the student has layers 0..{student_layers} and the "
                f"teacher 0..{teacher_layers} (0 = embedding output, i = output of decoder layer i)")
    return [(s, t) for s, t in layers]


class Stitching(nn.Module):
    """The learned projections from student to teacher widths, one per layer pair."""

    def __init__(self, pairs: Sequence[tuple[int, int]], student_width: int, teacher_width: int) -> None:
        super().__init__()
        self.pairs = [tuple(p) for p in pairs]
        self.projections = nn.ModuleList(nn.Linear(student_width, teacher_width, bias=False) for _ in self.pairs)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for linear in self.projections:
            if linear.in_features == linear.out_features:
                nn.init.eye_(linear.weight)
            else:
                nn.init.xavier_uniform_(linear.weight)

    def start_from(self, weights: dict[tuple[int, int], Tensor]) -> list[tuple[int, int]]:
        """Take over the projections an earlier stage trained for the same pairs; the pairs taken over."""
        taken = []
        with torch.no_grad():
            for pair, proj in zip(self.pairs, self.projections):
                if pair in weights and weights[pair].shape == proj.weight.shape:
                    proj.weight.copy_(weights[pair])
                    taken.append(pair)
        return taken

    def forward(self, student_hidden: Sequence[Tensor]) -> list[Tensor]:
        """Project the student's paired hidden states (all layers in, as `output_hidden_states` gives them)."""
        return [proj(student_hidden[s]) for proj, (s, _) in zip(self.projections, self.pairs)]


def attach_stitching(student: nn.Module, teacher: nn.Module, layers: str | Sequence[Sequence[int]]) -> Stitching:
    """Create the projections for `hidden.layers` and register them on the student (before the optimizer is built)."""
    s_cfg, t_cfg = student.config, teacher.config
    pairs = layer_pairs(layers, s_cfg.num_hidden_layers, t_cfg.num_hidden_layers)
    reference = student.get_input_embeddings().weight
    stitching = Stitching(pairs, s_cfg.hidden_size, t_cfg.hidden_size).to(reference.device, reference.dtype)
    student.add_module(STITCHING, stitching)
    return stitching


def stitching_file(weights: dict[tuple[int, int], Tensor]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(tensors, metadata) of `stitching.safetensors` (a Stitching module's state dict, its pairs in the metadata)."""
    pairs = list(weights)
    tensors = {f"projections.{i}.weight": weights[pair].contiguous() for i, pair in enumerate(pairs)}
    return tensors, {"pairs": json.dumps([list(p) for p in pairs])}


def read_stitching_file(path) -> dict[tuple[int, int], Tensor]:
    """{(student layer, teacher layer): weight} from a `stitching.safetensors` a run exported."""
    with safe_open(str(path), "pt") as f:
        pairs = [tuple(p) for p in json.loads(f.metadata()["pairs"])]
        return {pair: f.get_tensor(f"projections.{i}.weight") for i, pair in enumerate(pairs)}


def stitching_from_file(path) -> Stitching:
    """The Stitching module a run exported (for the evaluation's per-layer hidden-state distances)."""
    weights = read_stitching_file(path)
    some = next(iter(weights.values()))
    stitching = Stitching(list(weights), some.shape[1], some.shape[0])
    stitching.start_from(weights)
    return stitching


def projected_teacher_head(teacher_head_VD: Tensor, projection_DS: Tensor) -> Tensor:
    """W_t P: the teacher's (V, d_teacher) head through a (d_teacher, d_student) stitching projection, a (V, d_student)
    head for the student whose logits on h_s equal the teacher head's on the projected P h_s."""
    dtype = torch.promote_types(teacher_head_VD.dtype, torch.float32)
    return teacher_head_VD.to(dtype) @ projection_DS.to(dtype)


def split_stitching(state_dict: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(the student's own weights, the stitching weights) of a state dict of the student with stitching attached."""
    prefix = STITCHING + "."
    own = {k: v for k, v in state_dict.items() if not k.startswith(prefix)}
    stitching = {k.removeprefix(prefix): v for k, v in state_dict.items() if k.startswith(prefix)}
    return own, stitching


def hidden_state_loss(
    projected: Sequence[Tensor], teacher_hidden: Sequence[Tensor], mask: Tensor, *, kind: str = "mse",
    num_tokens: float | None = None, per_pair: bool = False,
) -> Tensor:
    """The mean over layer pairs of the per-token distance, summed over valid tokens / `num_tokens`.

    projected[l], teacher_hidden[l]: (B, T, D_t), the student's projected and the teacher's hidden states of
    pair l; mask (B, T). `num_tokens` defaults to this batch's valid-token count; 0 valid tokens give 0.
    With `per_pair`, the (L,) values of the pairs instead of their mean (for per-layer logging).
    """
    if kind not in ("mse", "cosine"):
        raise ValueError(f"unknown hidden-state loss {kind!r}: use mse or cosine")
    sums = []
    for student_h, teacher_h in zip(projected, teacher_hidden, strict=True):
        # valid rows only: padded positions never enter the math (their hidden states may be anything)
        dtype = torch.promote_types(student_h.dtype, torch.float32)
        student_h, teacher_h = student_h[mask].to(dtype), teacher_h[mask].detach().to(dtype)
        if kind == "mse":
            distance = (student_h - teacher_h).pow(2).mean(-1)
        else:
            distance = 1 - nn.functional.cosine_similarity(student_h, teacher_h, dim=-1, eps=1e-8)
        sums.append(distance.sum())
    count = float(mask.sum()) if num_tokens is None else float(num_tokens)
    values = torch.stack(sums) / max(count, 1.0)
    return values if per_pair else values.mean()
