"""accelerate set-up for every launch mode: one CPU process, CPU DDP (gloo), GPUs, DeepSpeed ZeRO-2/3.

- Without CUDA the process group uses gloo; otherwise every rank of a 2-process CPU launch thinks it
  is rank 0 of 1 (docs/distributed.md).
- DeepSpeed needs the micro-batch size and clipping in its own config (we prepare no dataloader).
- The frozen teacher is a DeepSpeed inference engine under ZeRO-3 (sharded, stage 3), and a plain
  module moved to the device otherwise (TRL's `prepare_deepspeed` does exactly this; we reuse it).
- Generation gathers ZeRO-3 weights with TRL's `unwrap_model_for_generation`.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch
from accelerate import Accelerator, InitProcessGroupKwargs
from accelerate.utils import DistributedType

from onpolicy_kd.recipe import Recipe


def make_accelerator(recipe: Recipe) -> Accelerator:
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1 or os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true"
    handlers = [InitProcessGroupKwargs(backend="gloo")] if launched and not torch.cuda.is_available() else []
    accelerator = Accelerator(
        mixed_precision=recipe.train.mixed_precision,
        gradient_accumulation_steps=recipe.train.grad_accum,
        kwargs_handlers=handlers,
        log_with="tensorboard" if recipe.logging.tensorboard else None,
        project_dir=recipe.train.output_dir,
    )
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None:
        ds = plugin.deepspeed_config
        ds["train_micro_batch_size_per_gpu"] = recipe.train.batch_size
        ds["gradient_accumulation_steps"] = recipe.train.grad_accum
        ds["train_batch_size"] = recipe.train.batch_size * recipe.train.grad_accum * accelerator.num_processes
        ds["gradient_clipping"] = recipe.optim.max_grad_norm or 0.0
    return accelerator


def zero_stage(accelerator: Accelerator) -> int:
    plugin = accelerator.state.deepspeed_plugin
    return int(plugin.zero_stage) if plugin is not None else 0


def prepare_teacher(teacher: torch.nn.Module, accelerator: Accelerator) -> torch.nn.Module:
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        from trl.models.utils import prepare_deepspeed

        return prepare_deepspeed(teacher, accelerator)
    return teacher.to(accelerator.device)


@contextlib.contextmanager
def for_generation(model: torch.nn.Module, accelerator: Accelerator) -> Iterator[torch.nn.Module]:
    """The plain module to decode with (ZeRO-3 weights gathered for the duration)."""
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        from trl.models.utils import unwrap_model_for_generation

        with unwrap_model_for_generation(model, accelerator) as unwrapped:
            yield unwrapped
    else:
        yield accelerator.unwrap_model(model)


def innermost(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside DDP / DeepSpeed wrappers (training engine or inference engine)."""
    while hasattr(model, "module"):
        model = model.module
    return model


def global_sum(accelerator: Accelerator, value: float | int) -> float:
    tensor = torch.tensor([float(value)], device=accelerator.device)
    return float(accelerator.reduce(tensor, reduction="sum").item())
