"""A quantised teacher: the model that only runs forward is where memory can go down without touching training.

`teacher.quantization: {bits: 8 | 4, backend: auto | weight_only | bitsandbytes, group_size: 64}`

- `weight_only` (any device; what `auto` picks without CUDA): the Linear weights of the teacher's decoder layers are
  stored as signed integers with float scales, symmetric round-to-nearest: 8 bits with one scale per output row, or
  4 bits (two to a byte) with one scale per `group_size` consecutive inputs of a row. Each layer dequantises its
  weight to the compute dtype inside its own forward, so one layer's float weight exists at a time; activations
  stay in float. The embeddings and the LM head stay as they are: the head's logits are what every loss compares,
  and the memory-bounded head needs it as a plain Linear.
- `bitsandbytes` (CUDA and `pip install bitsandbytes`): transformers' `BitsAndBytesConfig` (LLM.int8() for 8 bits,
  NF4 for 4), applied when the teacher is loaded. Its speed and accuracy are not measured by this project (no GPU).

Why not torch's int8 kernels on the CPU (measured on SmolLM2-135M-Instruct, 4 news articles of 232 tokens, one
thread): dynamic int8 quantisation (`torch.ao.quantization.quantize_dynamic`, int8 activations as well) moves the
teacher's next-token distribution by KL 1.5 nats per token (1.53 with per-channel weight scales; top-1 agreement 38%),
because a few activation channels of this model are far larger than the rest; and the weight-only int8 matmul
`torch._weight_int8pack_mm` took 232 s for a forward that takes 5.7 s in float32. Dequantising in the forward costs
one pass over the layer's weights per call: cheap beside the matmul for a training batch, noticeable when the
teacher decodes token by token (rollout.alpha > 0). docs/performance.md has the figures of the offline default.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from transformers.pytorch_utils import Conv1D
from transformers.utils import is_bitsandbytes_available

from onpolicy_kd.errors import ConfigError

QMAX = {8: 127, 4: 7}  # symmetric: codes in [-QMAX, QMAX]
DEFAULT_GROUP_SIZE = 64  # divides the widths of most models (576, 768, 896, 2048, 4864, ...); 128 does not divide 576


class WeightOnlyLinear(nn.Module):
    """A Linear layer whose weight is kept as 8- or 4-bit integer codes and float scales, dequantised per call."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, bits: int, group_size: int) -> None:
        """weight: (out_features, in_features), as nn.Linear keeps it."""
        super().__init__()
        out_features, in_features = weight.shape
        group = in_features if bits == 8 else group_size
        self.bits, self.group, self.in_features, self.out_features = bits, group, in_features, out_features
        dtype = weight.dtype
        weight = weight.detach().float().reshape(out_features, in_features // group, group)
        scale = weight.abs().amax(-1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny) / QMAX[bits]
        codes = torch.round(weight / scale).to(torch.int8).reshape(out_features, in_features)
        if bits == 4:  # two codes to a byte, offset to 0..15: the even input in the low nibble
            nibbles = (codes + 8).to(torch.uint8)
            codes = nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)
        self.register_buffer("codes", codes)
        self.register_buffer("scale", scale.to(dtype))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def dequantized_weight(self) -> torch.Tensor:
        codes = self.codes
        if self.bits == 4:
            low, high = (codes & 0xF).to(torch.int8) - 8, (codes >> 4).to(torch.int8) - 8
            codes = torch.stack((low, high), dim=-1).reshape(self.out_features, self.in_features)
        grouped = codes.reshape(self.out_features, -1, self.group).to(self.scale.dtype)
        return (grouped * self.scale).reshape(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized_weight().to(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, group={self.group}"


def choose_backend(cfg: Any) -> str:
    """weight_only or bitsandbytes, decided once; a kind this machine cannot run is a recipe error."""
    cuda, bnb = torch.cuda.is_available(), is_bitsandbytes_available()
    if cfg.backend == "bitsandbytes" and not (cuda and bnb):
        missing = "a CUDA device" if not cuda else "the bitsandbytes package (pip install bitsandbytes)"
        raise ConfigError(f"teacher.quantization.backend=bitsandbytes needs {missing}, which this machine does not "
                          f"have; backend: weight_only runs {cfg.bits}-bit weights on any device (or remove "
                          f"teacher.quantization)")
    if cfg.backend == "auto":
        return "bitsandbytes" if cuda and bnb else "weight_only"
    return cfg.backend


def bitsandbytes_config(cfg: Any, dtype: torch.dtype | str) -> Any:
    """The `quantization_config` for `from_pretrained`: LLM.int8() for 8 bits, NF4 (compute in the teacher's
    dtype) for 4."""
    from transformers import BitsAndBytesConfig

    if cfg.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = dtype if isinstance(dtype, torch.dtype) else torch.float32
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute)


def _linear_weight(module: nn.Module) -> torch.Tensor | None:
    """The (out, in) weight of a linear map: nn.Linear, or transformers' Conv1D (GPT-2), which keeps (in, out)."""
    if isinstance(module, nn.Linear):
        return module.weight
    if isinstance(module, Conv1D):
        return module.weight.t()
    return None


def quantize_weight_only(model: nn.Module, layers: nn.ModuleList, bits: int, group_size: int) -> int:
    """Replace every linear map inside `layers` (the decoder blocks) by a WeightOnlyLinear, in place; returns how
    many."""
    count = 0
    for block in layers:
        for name, module in list(block.named_modules()):
            weight = _linear_weight(module)
            if weight is None:
                continue
            if bits == 4 and weight.shape[1] % group_size:
                raise ConfigError(
                    f"teacher.quantization.group_size={group_size} does not divide the {weight.shape[1]} inputs "
                    f"of the teacher's {name}; choose a divisor of every layer's input size (e.g. 32 or 64)")
            parent = block.get_submodule(name.rsplit(".", 1)[0]) if "." in name else block
            setattr(parent, name.rsplit(".", 1)[-1], WeightOnlyLinear(weight, module.bias, bits, group_size))
            count += 1
    if count == 0:
        raise ConfigError(f"teacher.quantization: the teacher's decoder layers ({type(model).__name__}) have no Linear "
                          f"layers to quantise; remove teacher.quantization")
    model.kd_quantization = {"backend": "weight_only", "bits": bits, "group_size": group_size if bits == 4 else None}
    return count


def model_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers, shared (tied) tensors counted once."""
    seen: dict[int, int] = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        seen[tensor.data_ptr()] = tensor.numel() * tensor.element_size()
    return sum(seen.values())
