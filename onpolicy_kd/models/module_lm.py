"""Students that are not transformers models: any `torch.nn.Module` mapping `(input_ids, attention_mask)` to logits.

`ModuleLM(module)` wraps such a module as a transformers `PreTrainedModel`, so the rest of the toolkit (rollout,
losses, accelerate/DeepSpeed, checkpoints, export) treats it like any causal LM:

- The module is called as `module(input_ids, attention_mask)` (plus `output_hidden_states=True` when its forward
  takes that argument and hidden states are wanted) and returns the (B, T, V) logits, or a tuple
  `(logits, hidden_states)`, or an object/dict with `logits` and optionally `hidden_states`.
- It has no KV cache, so the "cache" the wrapper hands the rollout is the token history: each decode step runs a
  full forward over prompt + tokens so far and keeps the last position. Quadratic in the length, exact. A forward
  that also takes `logits_to_keep` (project only the last k positions; 0 = all) is passed it, which spares
  decoding the head's (T, V) product at every position (most of the time of a small model with a large vocabulary).
- Batches are left-padded: a module with positional embeddings should take positions from the attention mask
  (`attention_mask.cumsum(-1) - 1`), or a padded prompt is read differently from the same prompt alone.
- Hidden-state distillation needs the module to return its hidden states as transformers numbers them: the
  embedding output first, then each block's output, the last one what the head reads.
- The memory-bounded head projects the last hidden state itself, which is only right when the logits are exactly
  `hidden_states[-1] @ W.T` for one bias-free Linear (or tied embedding) `W`. The wrapper checks that on a probe
  forward; otherwise it reports no output embeddings and the losses read full logits (printed at start-up).

The vocabulary size, hidden size and layer count are read from that same probe forward (one 2-token batch).
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from onpolicy_kd.errors import ModelLoadError
from onpolicy_kd.models.distillation_file import load_distillation

Tensor = torch.Tensor

# transformers 5.24 renamed the KV-cache argument and output field `past_key_values` to `cache` (the old name warns)
CACHE = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
MODULE_FILE = "onpolicy_kd_module.json"  # in an exported student's folder: how to rebuild the module (models/loading.py)


class ModuleLMConfig(PretrainedConfig):
    model_type = "onpolicy_kd_module"

    def __init__(self, vocab_size: int = 0, hidden_size: int = 0, num_hidden_layers: int = 0,
                 module_class: str = "", max_position_embeddings: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.vocab_size, self.hidden_size, self.num_hidden_layers = vocab_size, hidden_size, num_hidden_layers
        self.module_class, self.max_position_embeddings = module_class, max_position_embeddings


@dataclass
class TokenHistory:
    """The wrapper's stand-in for a KV cache: every token fed so far (the next forward re-reads them all)."""

    input_ids: Tensor

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.input_ids.shape[1]


def _split_output(out: Any) -> tuple[Tensor, tuple[Tensor, ...] | None]:
    """(logits, hidden states or None) from what a user's module returned."""
    if isinstance(out, Tensor):
        return out, None
    if isinstance(out, (tuple, list)):
        logits, hidden = out[0], (out[1] if len(out) > 1 else None)
    elif isinstance(out, dict) or hasattr(out, "logits"):
        get = out.get if isinstance(out, dict) else (lambda key: getattr(out, key, None))
        logits, hidden = get("logits"), get("hidden_states")
    else:
        logits, hidden = None, None
    if not isinstance(logits, Tensor):
        raise ModelLoadError(f"the student module returned {type(out).__name__}; it must return (B, T, V) logits, a "
                             f"tuple (logits, hidden_states), or an object/dict with .logits")
    return logits, tuple(hidden) if hidden is not None else None


def _tied_parameters(module: nn.Module) -> dict[str, str]:
    """{name: name of the first parameter it shares storage with} (a tied head), for saving without duplicates."""
    first: dict[int, str] = {}
    tied = {}
    for name, parameter in module.named_parameters(remove_duplicate=False):
        if id(parameter) in first:
            tied[name] = first[id(parameter)]
        else:
            first[id(parameter)] = name
    return tied


class ModuleLM(PreTrainedModel):
    """A plain `nn.Module` language model as a transformers causal LM (module docstring)."""

    config_class = ModuleLMConfig
    base_model_prefix = "net"
    supports_gradient_checkpointing = False

    def __init__(self, module: nn.Module, config: ModuleLMConfig | None = None, source: str | None = None) -> None:
        """`source`: the Distillation file (FILE.py:ClassName) that builds `module`, for the export to name."""
        if isinstance(module, PreTrainedModel):
            raise ModelLoadError(f"{type(module).__name__} is already a transformers model; use it directly")
        takes = inspect.signature(module.forward).parameters
        self_hidden = "output_hidden_states" in takes or any(p.kind == p.VAR_KEYWORD for p in takes.values())
        probe = _probe(module, self_hidden)
        super().__init__(config or ModuleLMConfig(
            vocab_size=probe.vocab_size, hidden_size=probe.hidden_size, num_hidden_layers=probe.num_layers,
            module_class=f"{type(module).__module__}.{type(module).__qualname__}",
            max_position_embeddings=getattr(module, "max_position_embeddings", None)))
        self.net = module  # not `.module`: that is what DDP/DeepSpeed wrappers are unwrapped by
        self.source = source
        self.takes_hidden_flag = self_hidden
        self.takes_logits_to_keep = "logits_to_keep" in takes
        self.head_name = probe.head  # a name, not a second registration of the head's parameters
        self.tied = _tied_parameters(module)
        self._tied_weights_keys = {f"net.{k}": f"net.{v}" for k, v in self.tied.items()}
        self.post_init()  # transformers' bookkeeping; the wrapper's _init_weights leaves the module's weights alone

    def _init_weights(self, module: nn.Module) -> None:
        pass  # the user's module arrives initialised (or trained): never re-initialise it

    def get_input_embeddings(self) -> nn.Module | None:
        if hasattr(self.net, "get_input_embeddings"):
            return self.net.get_input_embeddings()
        rows = [m for m in self.net.modules() if isinstance(m, nn.Embedding)
                and m.num_embeddings >= self.config.vocab_size]
        return rows[0] if len(rows) == 1 else None

    def get_output_embeddings(self) -> nn.Module | None:
        # None unless the probe showed the logits are exactly hidden_states[-1] @ head.weight.T
        return self.net.get_submodule(self.head_name) if self.head_name is not None else None

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, position_ids: Tensor | None = None,
                use_cache: bool = False, logits_to_keep: int = 0, output_hidden_states: bool = False,
                **cache_and_ignored: Any) -> CausalLMOutputWithPast:
        # position_ids are not passed on: a plain module takes positions from the attention mask itself
        history = cache_and_ignored.get(CACHE)
        if history is not None:
            input_ids = torch.cat([history.input_ids, input_ids], dim=1)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if output_hidden_states and not self.takes_hidden_flag:
            raise ModelLoadError(f"hidden states were asked of the student module {self.config.module_class}, whose "
                                 f"forward has no output_hidden_states argument; add one (returning (logits, "
                                 f"hidden_states)) for hidden-state distillation")
        extra = {"output_hidden_states": True} if output_hidden_states else {}
        if logits_to_keep and self.takes_logits_to_keep:
            extra["logits_to_keep"] = logits_to_keep  # the module projects only the last positions itself
        logits, hidden = _split_output(self.net(input_ids, attention_mask, **extra))
        if output_hidden_states and hidden is None:
            raise ModelLoadError(f"the student module {self.config.module_class} was called with "
                                 f"output_hidden_states=True but returned no hidden states")
        if logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        return CausalLMOutputWithPast(logits=logits, hidden_states=hidden,
                                      **{CACHE: TokenHistory(input_ids) if use_cache else None})


@dataclass
class _Probe:
    vocab_size: int
    hidden_size: int
    num_layers: int
    head: str | None  # the linear head's name in the module


@torch.no_grad()
def _probe(module: nn.Module, takes_hidden_flag: bool) -> _Probe:
    """One 2-token forward: the vocabulary and hidden sizes, the layer count, and whether the head is linear."""
    parameter = next(module.parameters(), None)
    if parameter is None:
        raise ModelLoadError(f"the student module {type(module).__name__} has no parameters to train")
    ids = torch.zeros((1, 2), dtype=torch.long, device=parameter.device)
    was_training = module.training
    module.eval()
    try:
        extra = {"output_hidden_states": True} if takes_hidden_flag else {}
        logits, hidden = _split_output(module(ids, torch.ones_like(ids), **extra))
    except Exception as err:  # noqa: BLE001 - any failure here is the user's module not fitting the contract
        raise ModelLoadError(f"the student module {type(module).__name__} failed on a (1, 2) batch of token ids: "
                             f"{type(err).__name__}: {err}. It must map (input_ids, attention_mask) to (B, T, V) "
                             f"logits") from None
    finally:
        module.train(was_training)
    if logits.dim() != 3 or logits.shape[:2] != ids.shape:
        raise ModelLoadError(f"the student module {type(module).__name__} returned logits of shape "
                             f"{tuple(logits.shape)} for (1, 2) token ids; expected (1, 2, vocabulary size)")
    vocab = logits.shape[-1]
    if not hidden:
        return _Probe(vocab, 0, 0, None)
    return _Probe(vocab, hidden[-1].shape[-1], len(hidden) - 1, _linear_head(module, hidden[-1], logits))


def _linear_head(module: nn.Module, last_hidden: Tensor, logits: Tensor) -> str | None:
    """The name of the module's head if its logits are exactly last_hidden @ weight.T for a bias-free head."""
    candidates = [(name, m) for name, m in module.named_modules()
                  if isinstance(m, (nn.Linear, nn.Embedding)) and getattr(m, "weight", None) is not None
                  and m.weight.shape[0] == logits.shape[-1]]
    for name, head in candidates:
        if getattr(head, "bias", None) is not None or head.weight.shape[-1] != last_hidden.shape[-1]:
            continue
        if torch.allclose(last_hidden @ head.weight.T, logits, rtol=1e-4, atol=1e-5):
            return name
    return None


def export_file(model: ModuleLM) -> dict[str, Any]:
    """What `final/onpolicy_kd_module.json` records: the file that builds the module, and the tied weights that
    the saved state dict holds once (restored before the state dict goes back to `student(state_dict=...)`)."""
    return {"class": model.config.module_class, "distillation": model.source, "tied": model.tied}


def reload_exported(location: str) -> ModuleLM | None:
    """An exported plain-module student, rebuilt by its Distillation file's `student(state_dict=...)`; None when the
    folder holds a transformers model."""
    folder = Path(location)
    if not (folder / MODULE_FILE).is_file():
        return None
    info = json.loads((folder / MODULE_FILE).read_text())
    if not info.get("distillation"):
        raise ModelLoadError(
            f"{folder} holds the weights of a plain torch module ({info.get('class')}) given to the Python API; "
            f"rebuild it with your own code and load them: module.load_state_dict({{k.removeprefix('net.'): v for "
            f"k, v in safetensors.torch.load_file('{folder}/model.safetensors').items()}}, strict=False), or train it "
            f"through a Distillation file (onpolicy-kd train FILE.py) so that this folder can be loaded by name")
    state = {key.removeprefix("net."): value for key, value in load_file(str(folder / "model.safetensors")).items()}
    for name, source in info.get("tied", {}).items():
        state.setdefault(name, state[source])
    distillation, spec = load_distillation(info["distillation"])
    return ModuleLM(distillation.student(state_dict=state), source=spec)
