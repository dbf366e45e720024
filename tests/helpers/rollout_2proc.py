"""Launched by tests/test_rollout_distributed.py under `accelerate launch` with 2 CPU processes (gloo).

Each rank rolls out its own prompts; rank 0's rows end at their first token (EOS), rank 1's never end.
Every rank must keep stepping until both are done, then they meet in a gather (a deadlock would time out).
"""

import json
import os
import sys
from pathlib import Path

import torch
from accelerate import Accelerator, InitProcessGroupKwargs

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from conftest import CORPUS, tiny_student_and_teacher, train_tokenizer  # noqa: E402

from onpolicy_kd.batch import left_pad  # noqa: E402
from onpolicy_kd.rollout import rollout  # noqa: E402

accelerator = Accelerator(kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])
tok = train_tokenizer(CORPUS)
tok.pad_token = tok.eos_token
student, teacher = tiny_student_and_teacher(tok)
rank = accelerator.process_index
prompts = [tok(t).input_ids for t in (["Hello world", "The quick"] if rank == 0 else ["A bushfire near", "Summary:"])]
ids, mask = left_pad(prompts, tok.pad_token_id)
alpha = float(sys.argv[2])
first = rollout(student, teacher, ids, mask, tokenizer=tok, max_new_tokens=1, do_sample=False, alpha=alpha,
                all_finished=lambda done: done)
# rank 0: every row's first greedy token is an EOS -> done after one step; rank 1: no EOS at all
eos = first.completion_ids[:, 0].tolist() if rank == 0 else []
out = rollout(student, teacher, ids, mask, tokenizer=tok, max_new_tokens=6, alpha=alpha, eos_token_ids=eos, do_sample=False,
              generator=torch.Generator().manual_seed(rank))
stats = accelerator.gather(torch.tensor([[out.decode_steps, int(out.lengths.max()), int(out.lengths.min())]]))
if accelerator.is_main_process:
    Path(sys.argv[1]).write_text(json.dumps({"world_size": accelerator.num_processes, "stats": stats.tolist()}))
accelerator.wait_for_everyone()
accelerator.end_training()
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)  # a gloo worker thread can race the interpreter's teardown and abort (docs/distributed.md)
