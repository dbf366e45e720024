"""Run by tests/test_rollout_distributed.py: the held-out evaluation of tiny random models, either plainly (one
process) or under `accelerate launch` with 2 CPU processes. 5 prompts in batches of 2 make 3 batches: rank 0
evaluates batches 0 and 2, rank 1 batch 1 and then repeats it (dropped) to stay in step. Rank 0 writes the
summary and the predictions; the test compares them with the one-process run's, to the last digit."""

import json
import os
import sys
from pathlib import Path

import torch
from accelerate import Accelerator, InitProcessGroupKwargs
from datasets import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from conftest import CORPUS, tiny_student_and_teacher, train_tokenizer  # noqa: E402

from onpolicy_kd.evaluation.heldout import evaluate  # noqa: E402
from onpolicy_kd.evaluation.teacher_answers import teacher_answers  # noqa: E402
from onpolicy_kd.recipe.schema import EvalConfig  # noqa: E402

torch.set_num_threads(1)  # the same arithmetic in both runs (thread counts change float reduction order)
launched = "WORLD_SIZE" in os.environ  # under `accelerate launch`; else one plain process
accelerator = Accelerator(kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")] if launched else [])
tok = train_tokenizer(CORPUS)
tok.pad_token = tok.eos_token
student, teacher = tiny_student_and_teacher(tok)
prompts = ["Hello world", "The quick brown fox", "A bushfire near Sydney", "Summary:", "Rain fell on the city today"]
references = ["It was fine.", "jumps over", "burned for days", "Nothing.", "and the streets flooded"]
dataset = Dataset.from_list([{"prompt": p, "prompt_ids": tok(p).input_ids, "reference": r,
                              "reference_ids": tok(r).input_ids} for p, r in zip(prompts, references)])
cfg = EvalConfig(max_samples=5, batch_size=2, max_new_tokens=6, seed=7, samples_per_prompt=2)
answers = teacher_answers(teacher, tok, dataset, cfg, device=torch.device("cpu"), vocab=len(tok), cache_dir=None)
result = evaluate(student, teacher, tok, dataset, cfg, answers, references=True, accelerator=accelerator)
if accelerator.is_main_process:
    Path(sys.argv[1]).write_text(json.dumps({"world_size": accelerator.num_processes, "summary": result.summary,
                                             "predictions": result.predictions}))
accelerator.wait_for_everyone()
accelerator.end_training()
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)  # a gloo worker thread can race the interpreter's teardown and abort (docs/distributed.md)
