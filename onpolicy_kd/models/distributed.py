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
from accelerate import Accelerator, DistributedDataParallelKwargs, InitProcessGroupKwargs
from accelerate.utils import DistributedType
from transformers import PreTrainedModel

from onpolicy_kd.errors import ConfigError, UserError
from onpolicy_kd.models.bitnet import bitnet_layers
from onpolicy_kd.objectives.modes import MODES
from onpolicy_kd.objectives.modes import micro_batches
from onpolicy_kd.recipe import Recipe
from onpolicy_kd.recipe.schema import TRACKERS


def make_accelerator(recipe: Recipe) -> Accelerator:
    check_trackers(recipe.logging.report_to)
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1 or os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true"
    handlers = [InitProcessGroupKwargs(backend="gloo")] if launched and not torch.cuda.is_available() else []
    if not MODES[recipe.objective.mode].reads_student:
        # the head (and layers past the deepest pair) get no gradient, and the stitching projections are used
        # outside DDP's forward, which find_unused_parameters would count twice: a static graph, recorded on the
        # first step, knows which gradients come and which never do
        handlers.append(DistributedDataParallelKwargs(static_graph=True))
    accelerator = Accelerator(
        mixed_precision=recipe.train.mixed_precision,
        gradient_accumulation_steps=micro_batches(recipe),  # one optimizer step after all of a step's backwards
        kwargs_handlers=handlers,
        log_with=list(recipe.logging.report_to) or None,
        project_dir=recipe.train.output_dir,
    )
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None:
        ds = plugin.deepspeed_config
        ds["train_micro_batch_size_per_gpu"] = recipe.train.batch_size
        ds["gradient_accumulation_steps"] = micro_batches(recipe)
        ds["train_batch_size"] = recipe.train.batch_size * micro_batches(recipe) * accelerator.num_processes
        ds["gradient_clipping"] = recipe.optim.max_grad_norm or 0.0
    return accelerator


def check_trackers(names: list[str]) -> None:
    """Every tracker in logging.report_to is installed (accelerate would drop a missing one with a log line)."""
    from accelerate.tracking import get_available_trackers

    available = {str(t) for t in get_available_trackers()}
    missing = [name for name in names if name not in available]
    if missing:
        raise UserError(f"logging.report_to: {', '.join(missing)} not installed; install it (pip install "
                        f"{' '.join(TRACKERS[m] for m in missing)}) or remove it from logging.report_to")


def init_trackers(accelerator: Accelerator, recipe: Recipe, stage_name: str | None = None) -> None:
    """Start the trackers of logging.report_to with the run's name and the resolved recipe as its config (flattened
    to `section.key`, scalar values: what every tracker accepts)."""
    from pathlib import Path

    name = recipe.logging.run_name or Path(recipe.train.output_dir).resolve().name
    name = f"{name}/{stage_name}" if stage_name else name
    flat = {f"{section}.{key}": value if isinstance(value, (int, float, str, bool)) or value is None else str(value)
            for section, keys in recipe.model_dump(mode="json", exclude={"stages"}).items() for key, value in keys.items()}
    flat = {k: ("null" if v is None else v) for k, v in flat.items()}  # TensorBoard's hparams take no None
    accelerator.init_trackers("onpolicy_kd", config=flat, init_kwargs={
        "wandb": {"name": name, "dir": recipe.train.output_dir}, "mlflow": {"run_name": name},
        "trackio": {"name": name}, "swanlab": {"experiment_name": name}, "aim": {"run_name": name},
        "comet_ml": {"name": name}, "clearml": {"task_name": name}})


def describe_run(accelerator: Accelerator, recipe: Recipe, student: torch.nn.Module, teacher: torch.nn.Module) -> dict:
    """How the run runs, as printed at start-up and written first to metrics.jsonl: processes, the distributed
    backend, device, precisions and the effective batch."""
    kind = accelerator.distributed_type
    if kind == DistributedType.DEEPSPEED:
        zero = accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {})
        offload = [f"{what} offload to {zero[key]['device']}" for what, key in
                   (("optimizer", "offload_optimizer"), ("parameter", "offload_param"))
                   if isinstance(zero.get(key), dict) and zero[key].get("device") not in (None, "none")]
        backend = f"DeepSpeed ZeRO-{zero_stage(accelerator)}" + (f" ({', '.join(offload)})" if offload else "")
    elif accelerator.num_processes > 1:
        group = torch.distributed.get_backend() if torch.distributed.is_initialized() else "?"
        backend = f"DDP ({group})"
    else:
        backend = "single process"
    cfg = recipe.train
    return {
        "processes": accelerator.num_processes, "backend": backend, "device": str(accelerator.device),
        "mixed_precision": str(accelerator.mixed_precision),
        "student_dtype": str(next(student.parameters()).dtype).removeprefix("torch.") + bitnet_note(student),
        "teacher_dtype": str(next(teacher.parameters()).dtype).removeprefix("torch.") + quantized_note(teacher),
        "micro_batch": cfg.batch_size, "grad_accum": cfg.grad_accum,
        "effective_batch": cfg.batch_size * cfg.grad_accum * accelerator.num_processes,
    }


def bitnet_note(student: torch.nn.Module) -> str:
    layers = bitnet_layers(innermost(student))
    return f" (BitNet b1.58: {len(layers)} ternary Linear layers, 8-bit activations)" if layers else ""


def quantized_note(teacher: torch.nn.Module) -> str:
    quant = getattr(innermost(teacher), "kd_quantization", None)
    if not quant:
        return ""
    group = f", {quant['group_size']} inputs per scale" if quant.get("group_size") else ""
    return f" ({quant['bits']}-bit {quant['backend'].replace('_', '-')} decoder weights{group})"


def describe_text(d: dict) -> str:
    return (f"runs as: {d['backend']}, {d['processes']} process{'es' if d['processes'] > 1 else ''} on {d['device']}; "
            f"student {d['student_dtype']}, teacher {d['teacher_dtype']}, mixed precision {d['mixed_precision']}; "
            f"batch {d['micro_batch']} x {d['grad_accum']} accumulation x {d['processes']} process"
            f"{'es' if d['processes'] > 1 else ''} = {d['effective_batch']} prompts per step")


def zero_stage(accelerator: Accelerator) -> int:
    plugin = accelerator.state.deepspeed_plugin
    return int(plugin.zero_stage) if plugin is not None else 0


def steps_inside_backward(accelerator: Accelerator) -> bool:
    """DeepSpeed with a ZeRO optimizer (stage 1-3): the engine takes the optimizer step inside `backward`, and skips a
    step whose gradient norm is not finite (training/phases.py relies on that to skip a step exactly)."""
    return accelerator.distributed_type == DistributedType.DEEPSPEED and zero_stage(accelerator) >= 1


def prepare_teacher(teacher: torch.nn.Module, accelerator: Accelerator) -> torch.nn.Module:
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        if getattr(teacher, "kd_quantization", None):
            # not tried: DeepSpeed's inference engine around integer buffers (and ZeRO-3 partitioning them)
            raise ConfigError("teacher.quantization is not supported under DeepSpeed yet; run it single-process or "
                              "with DDP (accelerate_configs/multi_gpu.yaml, cpu.yaml), or remove teacher.quantization")
        from trl.models.utils import prepare_deepspeed

        return prepare_deepspeed(teacher, accelerator)
    return teacher.to(accelerator.device)


@contextlib.contextmanager
def for_generation(model: torch.nn.Module, accelerator: Accelerator) -> Iterator[torch.nn.Module]:
    """The plain module to decode with (ZeRO-3 weights gathered for the duration), its forward without accelerate's
    autocast wrapper: the caller says the precision of a decode (`autocast_dtype`), since a wrapper around each
    forward would cast every weight again at every decoded token. Under DeepSpeed the weights themselves are in
    the precision its config says."""
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        from trl.models.utils import unwrap_model_for_generation

        with unwrap_model_for_generation(model, accelerator) as unwrapped:
            yield unwrapped
        return
    unwrapped = accelerator.unwrap_model(model)
    original = unwrapped.__dict__.get("_original_forward")  # set by accelerate's prepare under mixed precision
    if original is None:
        yield unwrapped
        return
    wrapped = unwrapped.forward
    unwrapped.forward = original
    try:
        yield unwrapped
    finally:
        unwrapped.forward = wrapped


def autocast_dtype(accelerator: Accelerator) -> torch.dtype | None:
    """The autocast precision of the student's training forward (train.mixed_precision), which its rollouts decode
    in too; None in full precision, and under DeepSpeed (its weights are already in their precision)."""
    if accelerator.distributed_type == DistributedType.DEEPSPEED or not accelerator.native_amp:
        return None
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision)


def innermost(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside DDP / DeepSpeed wrappers (training engine or inference engine)."""
    while hasattr(model, "module") and not isinstance(model, PreTrainedModel):
        model = model.module
    return model


def whole(param: torch.nn.Parameter) -> torch.Tensor:
    """A weight for a computation outside its module's forward (the memory-bounded head reads the lm_head weight, the
    diversity penalty the input embeddings). Otherwise the parameter itself; under DeepSpeed ZeRO-3, where a rank
    holds only its shard, a whole copy: gathered and copied while gathered, so autograd links the copy to the
    parameter at its full shape, and the copy's gradient reaches the parameter, where DeepSpeed's hook reduces it
    into the shard as it does for a module's weight. The copy is one matrix, the size full logits gather anyway."""
    if not hasattr(param, "ds_id"):  # not a ZeRO-3 partitioned parameter
        return param
    from deepspeed.runtime.zero.partition_parameters import GatheredParameters

    with GatheredParameters([param]):
        copy = param.clone()
    if copy.requires_grad:
        copy.register_hook(lambda grad: _whole_while_accumulating(param))
    return copy


def _whole_while_accumulating(param: torch.nn.Parameter) -> None:
    """autograd adds a gradient into a parameter with the parameter's current shape, so a ZeRO-3 shard must be whole
    when the copy's gradient arrives; it is partitioned again once accumulated (after DeepSpeed's own hook has taken
    the gradient), unless a module (a tied embedding in its backward) still holds it, which then releases it."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    if param.ds_status != ZeroParamStatus.NOT_AVAILABLE:
        return

    def release(p: torch.nn.Parameter) -> None:
        handle.remove()
        if not p.ds_active_sub_modules:
            p.partition()

    param.all_gather()
    handle = param.register_post_accumulate_grad_hook(release)


def global_sum(accelerator: Accelerator, value: float | int) -> float:
    return global_sums(accelerator, [value])[0]


def global_sums(accelerator: Accelerator, values: list[float | int]) -> list[float]:
    """Each value summed over all processes, in one reduction (every rank passes the same number of values)."""
    if not values:
        return []
    tensor = torch.tensor([float(v) for v in values], device=accelerator.device)
    return accelerator.reduce(tensor, reduction="sum").tolist()
