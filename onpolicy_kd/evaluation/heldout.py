"""The held-out evaluation: one batch loop, used by training (at every evaluation point) and by the
`evaluate` command.

On the first `eval.max_samples` held-out prompts, in batches of `eval.batch_size`:
- the student's own completions sampled at `rollout.temperature` with a generator seeded from
  `eval.seed` and the batch index (so successive evaluations see comparable samples, and differences
  come from the student), and on them the per-token KL(q || p) (`eval/reverse_kl`, what on-policy
  reverse-KL distillation minimises) and KL(p || q) over the full vocabulary at temperature 1;
- greedy completions of student and teacher: the student's length, distinct-1/2 and repetition rate, and
  ROUGE-1/2/L against the teacher's completion (and against the reference when the data has one). These
  show a student whose KL falls while its text collapses onto repeats. The teacher, frozen, is decoded once
  per run (`teacher_texts` hands its completions back in);
- with `references` (the `evaluate` command, or `eval.full: true` in training): KL both ways and perplexity
  of both models on the references;
- for a student with hidden-state stitching projections (trained with hidden.weight > 0), each layer pair's
  hidden-state MSE on the sampled completions (`hidden_mse_layer_S_to_T`, the training loss's mse).
Token-level means are over all tokens of the set; per-completion metrics are means over prompts. Under
several processes the batches are dealt out round-robin (each keeps its seed), the per-batch results are
gathered and reduced in batch order, so every rank gets the numbers of a one-process run; the ranks decode
in lockstep (as ZeRO-3 needs). Reference metrics need a reference for every held-out prompt.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import torch
from accelerate.utils import gather_object
from datasets import Dataset

from onpolicy_kd.data.sampler import prompt_batch, reference_batch
from onpolicy_kd.evaluation import metrics as M
from onpolicy_kd.models.distributed import for_generation, innermost
from onpolicy_kd.models.forward import forward_completions
from onpolicy_kd.objectives.hidden import STITCHING, hidden_state_loss
from onpolicy_kd.recipe import EvalConfig, Recipe
from onpolicy_kd.rollout import rollout

# the per-prompt metrics averaged into the summary (perplexities are per token instead, below)
PER_PROMPT_KEYS = ("rouge1_ref", "rouge2_ref", "rougeL_ref", "rouge1_teacher", "rouge2_teacher", "rougeL_teacher",
                   "length", "distinct1", "distinct2", "repetition")


@dataclass
class Evaluated:
    name: str
    summary: dict[str, float]  # reverse_kl_samples, forward_kl_samples, sampled_length, greedy text metrics, ...
    predictions: list[dict]  # prompt, reference, teacher, student, per-prompt metrics


def _token_sums(mask: torch.Tensor, **values: torch.Tensor) -> dict[str, float]:
    """Sums over valid tokens (and their count "n"), for token-level means over the whole set."""
    return {key: float(value[mask].sum()) for key, value in values.items()} | {"n": int(mask.sum())}


def _token_mean(batches: list[dict], key: str) -> float:
    """Sum over batches, in batch order (so any sharding adds the same floats in the same order), / the count."""
    total = count = 0.0
    for sums in batches:
        total, count = total + sums[key], count + sums["n"]
    return total / max(count, 1)


def _greedy(model, ids, mask, tokenizer, max_new_tokens: int):
    return rollout(model, None, ids, mask, tokenizer=tokenizer, max_new_tokens=max_new_tokens, do_sample=False)


def _completion_metrics(tokens: list[int], text: str, teacher_text: str, reference: str) -> dict[str, float]:
    out = {"length": len(tokens), "distinct1": M.distinct_n(tokens, 1), "distinct2": M.distinct_n(tokens, 2),
           "repetition": M.repetition_rate(tokens)}
    out |= {f"{k}_teacher": v for k, v in M.rouge(text, teacher_text).items()}
    if reference:
        out |= {f"{k}_ref": v for k, v in M.rouge(text, reference).items()}
    return out


def _hidden_sums(stitching, student_hidden, teacher_hidden, mask: torch.Tensor) -> dict[str, float]:
    """Per layer pair, the summed squared distance (mean over the teacher's width) between the student's projected
    and the teacher's hidden states over the valid tokens, and the token count "n" (the training loss's mse)."""
    projected = stitching(student_hidden)
    sums = hidden_state_loss(projected, [teacher_hidden[t] for _, t in stitching.pairs], mask, kind="mse",
                             num_tokens=1.0, per_pair=True)
    return {f"hidden_mse_layer_{s}_to_{t}": float(v) for (s, t), v in zip(stitching.pairs, sums)} | {"n": int(mask.sum())}


def _evaluate_batch(student, teacher, tokenizer, dataset: Dataset, rows: list[int], cfg: EvalConfig, index: int, *,
                    temperature: float, references: bool, teacher_texts: list[str] | None, stitching=None) -> dict:
    """One batch of held-out prompts: token sums on sampled completions (and references), per-prompt records."""
    vocab, device = len(tokenizer), next(student.parameters()).device
    ids, mask = prompt_batch(dataset, rows, tokenizer.pad_token_id, device)
    generator = torch.Generator(device=device).manual_seed(cfg.seed + index)
    sampled = rollout(student, None, ids, mask, tokenizer=tokenizer, max_new_tokens=cfg.max_new_tokens,
                      temperature=temperature, generator=generator)
    hidden = stitching is not None
    s_out = forward_completions(student, sampled, vocab=vocab, hidden=hidden)
    t_out = forward_completions(teacher, sampled, vocab=vocab, hidden=hidden)
    forward_kl, reverse_kl = M.token_kls(s_out.logits, t_out.logits)
    result = {"index": index, "samples": _token_sums(sampled.completion_mask, forward_kl=forward_kl,
                                                     reverse_kl=reverse_kl),
              "sampled_lengths": sampled.lengths.tolist(), "references": None, "predictions": [],
              "hidden": _hidden_sums(stitching, s_out.hidden, t_out.hidden, sampled.completion_mask) if hidden else None}
    greedy_s = _greedy(student, ids, mask, tokenizer, cfg.max_new_tokens)
    teacher_batch = ([teacher_texts[r] for r in rows] if teacher_texts is not None
                     else _greedy(teacher, ids, mask, tokenizer, cfg.max_new_tokens).texts)
    perplexities: dict[int, dict] = {}
    if references:
        ref = reference_batch(dataset, rows, tokenizer.pad_token_id, device)
        s_logits = forward_completions(student, ref, vocab=vocab).logits
        t_logits = forward_completions(teacher, ref, vocab=vocab).logits
        fkl, rkl = M.token_kls(s_logits, t_logits)
        nll_s, nll_t = M.token_nll(s_logits, ref.completion_ids), M.token_nll(t_logits, ref.completion_ids)
        valid = ref.completion_mask
        result["references"] = _token_sums(valid, forward_kl=fkl, reverse_kl=rkl, nll_student=nll_s,
                                           nll_teacher=nll_t)
        perplexities = {b: {"ppl_student": float(nll_s[b][valid[b]].mean().exp()),
                            "ppl_teacher": float(nll_t[b][valid[b]].mean().exp())} for b in range(len(rows))}
    for b, row in enumerate(rows):
        record = dataset[row]
        tokens = greedy_s.completion_ids[b][greedy_s.completion_mask[b]].tolist()
        sample = _completion_metrics(tokens, greedy_s.texts[b], teacher_batch[b], record["reference"])
        result["predictions"].append({"prompt": record["prompt"], "reference": record["reference"],
                                      "teacher": teacher_batch[b], "student": greedy_s.texts[b],
                                      "metrics": sample | perplexities.get(b, {})})
    return result


def _my_batches(num_batches: int, accelerator) -> list[tuple[int, bool]]:
    """(batch index, keep its result) for this process: batches dealt round-robin over the processes, and every
    process runs as many batches as the busiest (repeating its first one, result dropped), because decoding
    agrees on stopping across processes and a ZeRO-3 teacher's forward is collective: the ranks stay in step."""
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator is not None else (0, 1)
    mine = list(range(rank, num_batches, world))
    rounds = -(-num_batches // world)
    return [(i, True) for i in mine] + [(mine[0] if mine else 0, False)] * (rounds - len(mine))


@torch.no_grad()
def evaluate(student, teacher, tokenizer, dataset: Dataset, cfg: EvalConfig, *, temperature: float, references: bool,
             name: str = "student", teacher_texts: list[str] | None = None, accelerator=None,
             stitching=None) -> Evaluated:
    """The held-out evaluation of `student` against `teacher` (plain modules, on the same device). With an
    `accelerator` of several processes, each process evaluates its share of the batches and the results are
    gathered: every process gets the numbers one process would compute, to the last digit. With `stitching` (the
    hidden-state projections of a run that trained them), also each layer pair's hidden-state MSE on the sampled
    completions."""
    n = min(cfg.max_samples, len(dataset))
    starts = list(range(0, n, cfg.batch_size))
    # reference metrics need every held-out prompt's reference (one decision for all batches and processes)
    references = references and all(len(dataset[r]["reference_ids"]) > 0 for r in range(n))
    results = []
    for index, keep in _my_batches(len(starts), accelerator):
        rows = list(range(starts[index], min(starts[index] + cfg.batch_size, n)))
        result = _evaluate_batch(student, teacher, tokenizer, dataset, rows, cfg, index, temperature=temperature,
                                 references=references, teacher_texts=teacher_texts, stitching=stitching)
        if keep:
            results.append(result)
    if accelerator is not None and accelerator.num_processes > 1:
        results = gather_object(results)
    results = sorted(results, key=lambda r: r["index"])
    return Evaluated(name, _summary(results), [p for r in results for p in r["predictions"]])


def _summary(results: list[dict]) -> dict[str, float]:
    samples = [r["samples"] for r in results]
    predictions = [p for r in results for p in r["predictions"]]
    summary = {"reverse_kl_samples": _token_mean(samples, "reverse_kl"),
               "forward_kl_samples": _token_mean(samples, "forward_kl"),
               "sampled_length": statistics.fmean(n for r in results for n in r["sampled_lengths"])}
    summary |= {key: statistics.fmean(p["metrics"][key] for p in predictions)
                for key in PER_PROMPT_KEYS if predictions and all(key in p["metrics"] for p in predictions)}
    hidden = [r["hidden"] for r in results if r["hidden"] is not None]
    if hidden:
        summary |= {key: _token_mean(hidden, key) for key in hidden[0] if key != "n"}
    refs = [r["references"] for r in results if r["references"] is not None]
    if refs and sum(r["n"] for r in refs):
        summary |= {"reverse_kl_refs": _token_mean(refs, "reverse_kl"), "forward_kl_refs": _token_mean(refs, "forward_kl"),
                    "ppl_student": float(torch.tensor(_token_mean(refs, "nll_student")).exp()),
                    "ppl_teacher": float(torch.tensor(_token_mean(refs, "nll_teacher")).exp())}
    return summary


TRAINING_KEYS = ("distinct1", "repetition", "rougeL_teacher")  # always logged: a collapsing text shows in them


def hidden_keys(summary: dict[str, float]) -> list[str]:
    """The per-layer-pair hidden-state MSEs of an evaluation, in layer order."""
    return [key for key in summary if key.startswith("hidden_mse_layer_")]


def heldout_metrics(recipe: Recipe, accelerator, student, teacher, tokenizer, dataset: Dataset,
                    teacher_texts: list[str] | None = None) -> tuple[dict[str, float], list[str]]:
    """Training's evaluation point: `eval/reverse_kl`, `eval/mean_len` and the greedy text metrics (everything with
    `eval.full`); and the teacher's greedy completions, to hand back in next time."""
    with for_generation(student, accelerator) as model:
        result = evaluate(model, teacher, tokenizer, dataset, recipe.eval, temperature=recipe.rollout.temperature,
                          references=recipe.eval.full, teacher_texts=teacher_texts, accelerator=accelerator,
                          stitching=getattr(innermost(model), STITCHING, None))
    out = {"eval/reverse_kl": result.summary["reverse_kl_samples"], "eval/mean_len": result.summary["sampled_length"]}
    keys = result.summary if recipe.eval.full else (*TRAINING_KEYS, *hidden_keys(result.summary))
    out |= {f"eval/{key}": result.summary[key] for key in keys if key in result.summary}
    return out, [p["teacher"] for p in result.predictions]


@torch.no_grad()
def greedy_samples(recipe: Recipe, accelerator, student, teacher, tokenizer, dataset: Dataset,
                   teacher_texts: list[str] | None = None) -> list[dict]:
    """The first `logging.num_samples` held-out prompts with the student's and the teacher's greedy completions
    (`teacher_texts`: the teacher's, from the last evaluation, which decoded these prompts the same way)."""
    rows = list(range(min(recipe.logging.num_samples, len(dataset))))
    ids, mask = prompt_batch(dataset, rows, tokenizer.pad_token_id, accelerator.device)
    with for_generation(student, accelerator) as model:
        student_out = _greedy(model, ids, mask, tokenizer, recipe.eval.max_new_tokens)
    if teacher_texts is None or len(teacher_texts) < len(rows):
        teacher_texts = _greedy(teacher, ids, mask, tokenizer, recipe.eval.max_new_tokens).texts  # decodes alone
    return [{"prompt": dataset[r]["prompt"], "reference": dataset[r]["reference"], "teacher": t, "student": s}
            for r, s, t in zip(rows, student_out.texts, teacher_texts)]
