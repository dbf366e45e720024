"""Build an encoder-decoder teacher offline: a small T5 trained from scratch to continue news articles.

No T5 can be downloaded here (the Hub does not answer), so `recipes/t5_news.yaml` distils this one. It reads
the first `PROMPT` tokens of a passage with its encoder and writes the next `TARGET` with its decoder, trained
with transformers' Seq2SeqTrainer on every such window of the 280 training articles of the offline news data
(the same rows and the same split as the recipe; articles 280-291 stay held out). Tokenizer: the offline
SmolLM2 teacher's (49,152 tokens), so its folder is needed: run `./scripts/setup.sh` (or `python -m
onpolicy_kd.assets`) first.

    python examples/t5_news/make_teacher.py [--steps 600]    # ~9 min on 2 CPU cores; writes the cache folder below

The result is a weak language model (minutes of CPU training: training loss 9.5 -> 6.05 over the 600 steps, and
its greedy continuations do not yet depend on the article), enough to exercise encoder-decoder distillation end
to end, not to make a useful student.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from datasets import Dataset
from transformers import (AutoModelForSeq2SeqLM, AutoTokenizer, DataCollatorForSeq2Seq, Seq2SeqTrainer,
                          Seq2SeqTrainingArguments, T5Config)

from onpolicy_kd.recipe import cache_root

PROMPT, TARGET, STRIDE = 64, 32, 32  # tokens the encoder reads, the decoder writes, and the step between windows
TEACHER = cache_root() / "models" / "t5-news-teacher"


def windows(articles: list[str], tokenizer) -> Dataset:
    """(encoder input, decoder target) pairs: each article's windows of PROMPT tokens and the TARGET after them;
    targets end with EOS only where the article does."""
    rows = {"input_ids": [], "labels": []}
    for text in articles:
        ids = tokenizer(text, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        for start in range(0, max(1, len(ids) - PROMPT - 1), STRIDE):
            rows["input_ids"].append(ids[start : start + PROMPT])
            rows["labels"].append(ids[start + PROMPT : start + PROMPT + TARGET])
    return Dataset.from_dict(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--out", default=str(TEACHER))
    args = parser.parse_args()

    source = cache_root() / "models" / "smollm2-135m-instruct"
    if not source.is_dir():
        raise SystemExit(f"{source} is missing: run ./scripts/setup.sh (or python -m onpolicy_kd.assets) first")
    tokenizer = AutoTokenizer.from_pretrained(source)
    tokenizer.padding_side = "right"  # decoder targets padded after their end (the collator pads labels with -100)
    news = cache_root() / "data" / "news" / "lee_background.jsonl"
    articles = [json.loads(line)["article"] for line in open(news)][:280]  # the recipe's training rows
    data = windows(articles, tokenizer)

    torch.manual_seed(0)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    config = T5Config(vocab_size=len(tokenizer), d_model=256, d_kv=64, d_ff=1024, num_layers=4,
                      num_decoder_layers=4, num_heads=4, dropout_rate=0.0, tie_word_embeddings=True,
                      pad_token_id=pad, eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=pad)
    model = AutoModelForSeq2SeqLM.from_config(config)
    with tempfile.TemporaryDirectory() as scratch:
        trainer = Seq2SeqTrainer(
            model=model, train_dataset=data, data_collator=DataCollatorForSeq2Seq(tokenizer, model=model),
            args=Seq2SeqTrainingArguments(
                output_dir=scratch, max_steps=args.steps, per_device_train_batch_size=16, learning_rate=3e-3,
                lr_scheduler_type="cosine", warmup_steps=30, logging_steps=50, save_strategy="no", report_to=[],
                seed=0, use_cpu=True),
        )
        trainer.train()
    out = Path(args.out)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    print(f"{len(data)} windows; {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters; saved to {out}")


if __name__ == "__main__":
    main()
