"""Data: task formats and prompt templates (prompts.py), dataset loading and its tokenised cache (loading.py),
and which rows each process takes, as prompt and reference batches (sampler.py)."""
