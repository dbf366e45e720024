"""BitNet b1.58 students: ternary weights and 8-bit activations in every Linear layer of the decoder.

`student.bitnet: true` swaps each nn.Linear inside the student's decoder layers (not the embeddings, not the LM
head) for a BitLinear, in place, keeping its parameters (the latent full-precision weights the optimizer updates):

    forward:  y = x_q @ W_q^T + b
    W_q = gamma * clip(round(W / gamma), -1, 1),  gamma = mean |W| over the whole matrix  (absmean, ternary codes)
    x_q = clip(round(x * 127 / m), -128, 127) * m / 127,  m = max |x| over each token's features  (absmax, 8 bit)

Rounding has no useful derivative, so gradients pass straight through both quantisers (the straight-through
estimator): dL/dW = dL/dW_q and dL/dx = dL/dx_q. This is the training scheme of "The Era of 1-bit LLMs" (Ma et
al., 2024) and its training notes, without the extra normalisation those put inside BitLinear: a student copied from
a pretrained teacher keeps its own norms, and an added one would change its function at step 0.

Export (`final/`): each BitLinear weight is written as W_q itself (gamma times codes in {-1, 0, 1}), so the folder
loads with `AutoModelForCausalLM.from_pretrained` as a dense model with ternary weights; `bitnet.json` beside it
lists those layers. The project's loaders (`python -m onpolicy_kd.evaluate`, `load_model`, a recipe whose student is
that folder) see the file and wrap the layers again, with the weights taken as they are (re-deriving gamma from an
already ternary matrix would change it) and activations quantised as in training, so the reloaded student computes
exactly what the trained one did. Packing the codes into 2 bits for a BitNet inference kernel (bitnet.cpp) is left
to those tools: the export keeps what they need (the codes and one scale per matrix).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from onpolicy_kd.errors import ConfigError

EXPORT_FILE = "bitnet.json"
ACTIVATION_BITS = 8


def ternary_weight(weight: torch.Tensor) -> torch.Tensor:
    """W_q = gamma * clip(round(W / gamma), -1, 1) with gamma = mean |W| (no gradient path: see BitLinear)."""
    gamma = weight.abs().mean().clamp(min=1e-5)
    return (weight / gamma).round().clamp(-1, 1) * gamma


def quantize_activations(x: torch.Tensor) -> torch.Tensor:
    """Per-token absmax 8-bit fake quantisation: x_q = clip(round(x * 127 / m), -128, 127) * m / 127."""
    scale = 127.0 / x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5)
    return (x * scale).round().clamp(-128, 127) / scale


class BitLinear(nn.Linear):
    """nn.Linear trained as BitNet b1.58 (module docstring). `exported`: the weight is already ternary (a reloaded
    export), used as it is."""

    exported: bool = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # straight through: the forward sees x_q exactly (x - x is exactly 0, where x + (x_q - x) can be x_q off by
        # one rounding, which an 8-bit quantiser downstream can turn into a whole step), the gradient x's
        x_q = quantize_activations(x.detach()) + (x - x.detach())
        if self.exported:
            return F.linear(x_q, self.weight, self.bias)
        w_q = ternary_weight(self.weight.detach()) + (self.weight - self.weight.detach())
        return F.linear(x_q, w_q, self.bias)


def _as_bitlinear(module: nn.Linear, exported: bool) -> None:
    module.__class__ = BitLinear  # same parameters, same state-dict keys: checkpoints and resume hold
    module.exported = exported


def to_bitnet(model: nn.Module, layers_name: str, layers: nn.ModuleList) -> list[str]:
    """Turn every nn.Linear inside the decoder `layers` (model.<layers_name>, as `decoder_layers` finds them) into a
    BitLinear for training, in place (parameters kept); returns the model-level names of the layers it changed."""
    names = []
    for index, block in enumerate(layers):
        for name, module in block.named_modules():
            if type(module) is nn.Linear or isinstance(module, BitLinear):
                _as_bitlinear(module, exported=False)
                names.append(f"{layers_name}.{index}.{name}")
    if not names:
        raise ConfigError(f"student.bitnet: the student's decoder layers ({type(model).__name__}) have no nn.Linear "
                          f"layers to make ternary (GPT-2's are Conv1D); use a Llama-style student or remove bitnet")
    return names


def bitnet_layers(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, BitLinear)]


def export_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict]:
    """The state dict to save with each BitLinear weight replaced by W_q, and the contents of bitnet.json."""
    names = bitnet_layers(model)
    out = dict(state_dict)
    for name in names:
        key = f"{name}.weight"
        if key in out:
            out[key] = ternary_weight(out[key].float()).to(out[key].dtype)
    return out, {"layers": names, "weights": "ternary: gamma * {-1, 0, 1} per matrix, written as they are",
                 "activation_bits": ACTIVATION_BITS}


def write_export_file(folder: Path, contents: dict) -> None:
    (Path(folder) / EXPORT_FILE).write_text(json.dumps(contents, indent=1))


def reload_exported(model: nn.Module, folder: str | Path) -> bool:
    """If `folder` holds a BitNet export, wrap its listed layers again (weights as saved); returns whether it did."""
    path = Path(folder) / EXPORT_FILE
    if not path.is_file():
        return False
    for name in json.loads(path.read_text())["layers"]:
        _as_bitlinear(model.get_submodule(name), exported=True)
    return True
