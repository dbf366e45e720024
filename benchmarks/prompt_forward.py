"""Benchmark: what the student's prompt costs twice in an on-policy step (the rollout's prefill, then the loss).

    python benchmarks/prompt_forward.py [--repeat 5]

On the offline default's models and prompts (recipes/smollm2_news.yaml: the 17-layer student, batch 4 of the
~200-token chat-formatted articles, 32 completion tokens), times the parts of an on-policy step that read the
prompt: the rollout's prefill (the student's no-grad forward over the prompts that starts its KV cache), the
decode of 32 tokens from that cache, and the loss's forward + backward over prompt + completion, with the prompt
run twice (a no-grad prefill, then the whole forward) and once (the prefill kept with gradient, the loss on top
of it: what training does, docs/performance.md). Median of --repeat after a warm-up; the result is appended to
benchmarks/results/prompt_forward.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from results_file import median_time, publish  # noqa: E402

RECIPE = ROOT / "recipes" / "smollm2_news.yaml"



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "prompt_forward.md"))
    args = parser.parse_args()
    from onpolicy_kd.batch import left_pad
    from onpolicy_kd.data.loading import load_prompt_data
    from onpolicy_kd.models.loading import load_models
    from onpolicy_kd.recipe import load_recipe
    from onpolicy_kd.models.module_lm import CACHE
    from onpolicy_kd.rollout.engine import kept_layers
    from transformers.cache_utils import DynamicCache

    torch.set_num_threads(os.cpu_count() or 1)
    recipe = load_recipe(RECIPE)
    models = load_models(recipe, str(RECIPE))
    student, tok = models.student.eval(), models.tokenizer
    data = load_prompt_data(recipe.data, tok, seed=0)
    ids, mask = left_pad([data.train[i]["prompt_ids"] for i in range(recipe.train.batch_size)], tok.pad_token_id)
    completion = torch.randint(0, len(tok), (ids.shape[0], recipe.rollout.max_new_tokens))
    full_ids = torch.cat([ids, completion], 1)
    full_mask = torch.cat([mask, torch.ones_like(completion)], 1)

    def prefill():
        with torch.no_grad():
            return student(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1)

    def decode():
        out, attention = prefill(), mask
        cache = getattr(out, CACHE)
        with torch.no_grad():
            for t in range(completion.shape[1]):
                attention = torch.cat([attention, torch.ones_like(attention[:, :1])], 1)
                cache = getattr(student(input_ids=completion[:, t : t + 1], attention_mask=attention,
                                        use_cache=True, **{CACHE: cache}), CACHE)

    def loss_pass():
        student.zero_grad(set_to_none=True)
        out = student(input_ids=full_ids, attention_mask=full_mask, logits_to_keep=completion.shape[1] + 1)
        out.logits.float().logsumexp(-1).mean().backward()

    P, T = ids.shape[1], completion.shape[1]
    kept = {}

    def prefill_kept():  # what a rollout does when the loss reuses the prompt (rollout/engine.py)
        out = student(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], use_cache=True, logits_to_keep=1)
        kept["cache"] = kept_layers(getattr(out, CACHE))

    def reused_loss_pass():  # the loss's forward over the completion on the kept keys and values (models/forward.py)
        student.zero_grad(set_to_none=True)
        out = student(input_ids=full_ids[:, P - 1 : P + T - 1], attention_mask=full_mask[:, : P + T - 1],
                      use_cache=True, **{CACHE: DynamicCache(ddp_cache_data=kept.pop("cache"))})
        out.logits.float().logsumexp(-1).mean().backward()

    def once():
        prefill_kept()
        reused_loss_pass()

    def twice():
        prefill()
        loss_pass()

    prefill_s, rollout_s, loss_s = (median_time(fn, args.repeat) for fn in (prefill, decode, loss_pass))
    once_s, twice_s = median_time(once, args.repeat), median_time(twice, args.repeat)
    table = (f"\n## {time.strftime('%Y-%m-%d')} CPU ({os.cpu_count()} cores), torch {torch.__version__}: "
             f"`python benchmarks/prompt_forward.py`\n\n"
             f"Student: the default's 17-layer copy; batch {ids.shape[0]} x {ids.shape[1]} prompt tokens, "
             f"{completion.shape[1]} completion tokens; median of {args.repeat}.\n\n"
             "| part | time |\n|---|---|\n"
             f"| rollout prefill (no grad, the prompt once) | {prefill_s:.3f} s |\n"
             f"| rollout: prefill + {completion.shape[1]} decode steps | {rollout_s:.3f} s |\n"
             f"| loss forward + backward over prompt + completion | {loss_s:.3f} s |\n"
             f"| prefill / (rollout + loss) | {prefill_s / (rollout_s + loss_s):.1%} |\n"
             f"| prompt run twice: prefill (no grad) + loss forward + backward over prompt + completion | {twice_s:.3f} s |\n"
             f"| prompt run once: prefill with gradient (P - 1 tokens) + loss forward over the completion on its "
             f"keys and values + backward | {once_s:.3f} s ({twice_s / once_s:.2f}x) |\n")
    publish(table, args.out)


if __name__ == "__main__":
    main()
