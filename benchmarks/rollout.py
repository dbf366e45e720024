"""Benchmark: rollout tokens/s, our cached decode loop vs transformers' `generate` on the same batch.

    python benchmarks/rollout.py                  # CPU: SmolLM2-135M-shaped student (10 layers) / teacher (30)
    python benchmarks/rollout.py --device cuda    # GPU: Qwen3-0.6B-shaped student / Qwen3-4B-shaped teacher, bf16

Random-init models of real shapes (throughput does not depend on the weights), completion length fixed
(EOS disabled) so every variant generates the same number of tokens. Variants:
- generate: `model.generate(do_sample=True)`, dynamic cache (what TRL's non-vLLM path uses);
- ours_student: our loop, alpha = 0, student only (no teacher scoring) - compares with `generate`;
- ours_alpha0: an alpha = 0 rollout as training runs it: student decode, then the teacher's batched forward;
- ours_alpha0.3: teacher-mixed sampling, both models decoding in lockstep.
Median of --repeat runs after one warm-up; results appended to benchmarks/results/rollout.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3Config

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from onpolicy_kd.models.forward import teacher_forward  # noqa: E402
from onpolicy_kd.rollout import rollout  # noqa: E402
from results_file import publish  # noqa: E402


class _Tokenizer:
    """What the engine needs of a tokenizer when EOS is disabled and texts are not inspected."""

    def __init__(self, pad: int):
        self.pad_token_id = self.eos_token_id = pad

    def batch_decode(self, rows, skip_special_tokens=True):
        return ["" for _ in rows]


def models(device: str):
    if device == "cuda":
        def shape(layers, hidden, inter, heads, kv):
            return Qwen3Config(vocab_size=151936, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                               num_attention_heads=heads, num_key_value_heads=kv, head_dim=128, tie_word_embeddings=True)
        s_cfg, t_cfg, dtype = shape(28, 1024, 3072, 16, 8), shape(36, 2560, 9728, 32, 8), torch.bfloat16
    else:
        def shape(layers):
            return LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
                               num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
        s_cfg, t_cfg, dtype = shape(10), shape(30), torch.float32
    torch.manual_seed(0)
    student = AutoModelForCausalLM.from_config(s_cfg, dtype=dtype).to(device).eval()
    teacher = AutoModelForCausalLM.from_config(t_cfg, dtype=dtype).to(device).eval()
    return student, teacher


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batch", type=int, default=None, help="default 8 CPU, 32 CUDA")
    parser.add_argument("--prompt", type=int, default=None, help="prompt tokens (128 CPU, 256 CUDA)")
    parser.add_argument("--new", type=int, default=None, help="new tokens (64 CPU, 512 CUDA)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "rollout.md"))
    args = parser.parse_args()
    gpu = args.device == "cuda"
    batch, prompt_len, new = args.batch or (32 if gpu else 8), args.prompt or (256 if gpu else 128), args.new or (512 if gpu else 64)
    student, teacher = models(args.device)
    tok = _Tokenizer(pad=0)
    g = torch.Generator(device=args.device).manual_seed(0)
    ids = torch.randint(1, 1000, (batch, prompt_len), device=args.device, generator=g)
    mask = torch.ones_like(ids)

    def sync():
        if gpu:
            torch.cuda.synchronize()

    variants = {
        "generate (HF, dynamic cache)": lambda: student.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=True, top_k=0,
            pad_token_id=0, eos_token_id=None),
        "ours, student only": lambda: rollout(student, None, ids, mask, tokenizer=tok, max_new_tokens=new, eos_token_ids=[]),
        "ours, alpha=0 (+ teacher scoring)": lambda: teacher_forward(
            teacher, rollout(student, None, ids, mask, tokenizer=tok, max_new_tokens=new, eos_token_ids=[]),
            vocab=None, logits=True, hidden=False),
        "ours, alpha=0.3 (lockstep)": lambda: rollout(student, teacher, ids, mask, tokenizer=tok, max_new_tokens=new,
                                                       alpha=0.3, eos_token_ids=[]),
    }
    results = {}
    with torch.inference_mode():
        for name, fn in variants.items():
            times = []
            for i in range(args.repeat + 1):
                sync()
                start = time.perf_counter()
                fn()
                sync()
                if i:
                    times.append(time.perf_counter() - start)
            results[name] = statistics.median(times)
            print(f"{name}: {results[name]:.2f} s, {batch * new / results[name]:.0f} tok/s", flush=True)

    base = results["generate (HF, dynamic cache)"]
    device_name = torch.cuda.get_device_name() if gpu else "CPU (2 cores)" if torch.get_num_threads() <= 2 else "CPU"
    lines = [f"\n## {time.strftime('%Y-%m-%d')} {device_name}: batch {batch}, prompt {prompt_len}, {new} new tokens "
             f"(fixed), student {student.config.num_hidden_layers} layers / teacher {teacher.config.num_hidden_layers} "
             f"layers, hidden {student.config.hidden_size}, V={student.config.vocab_size}, torch {torch.__version__}\n",
             f"`python benchmarks/rollout.py --device {args.device}` (median of {args.repeat} after a warm-up)\n",
             "| variant | time | tokens/s | speed vs generate |", "|---|---|---|---|"]
    for name, seconds in results.items():
        lines.append(f"| {name} | {seconds:.2f} s | {batch * new / seconds:.0f} | {base / seconds:.2f}x |")
    table = "\n".join(lines) + "\n"
    publish(table, args.out)


if __name__ == "__main__":
    main()
