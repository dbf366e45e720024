"""The held-out evaluation: one batch loop, used by training (at every evaluation point) and by the
`evaluate` command.

On the first `eval.max_samples` held-out prompts, in batches of `eval.batch_size`, the student's text is
judged two ways, greedy and sampled, because a method may win on one decoding and lose on the other:
- greedy: one completion per prompt;
- sampled: `eval.samples_per_prompt` completions per prompt at `eval.temperature`, the k-th drawn with a
  generator seeded from `eval.seed`, k and the batch index (successive evaluations see comparable samples, so
  differences come from the student); a prompt's sampled figure is the mean over its samples.
Each completion gets ROUGE-2/L against the human references (the best-matching one, when the data has
references), ROUGE-L against the teacher's greedy answer and against the best-matching of the teacher's
sampled answers (`evaluation/teacher_answers.py`), its length, whether the length limit cut it, distinct-1/2,
repetition rate and, with `eval.answer_pattern`, whether its final answer equals the reference's. The teacher's
own answers get the same text metrics (a sampled answer is compared with the teacher's other samples), so the
student's figures have a ceiling beside them.

On the student's first sampled completion of each prompt: the per-token KL(q || p) (`reverse_kl_samples`, what
on-policy reverse-KL distillation minimises) and KL(p || q) over the full vocabulary at temperature 1 (one
sample: these two forwards over the whole prompt cost more than decoding the text). With `references`
(the `evaluate` command, or `eval.full: true` in training): KL both ways and perplexity of both models on the
references. For a student with hidden-state stitching projections, each layer pair's hidden-state MSE on the
sampled completions (`hidden_mse_layer_S_to_T`, the training loss's mse).

Token-level means are over all tokens of the set; per-completion metrics are means over prompts (with their
standard error over prompts in `Evaluated.errors`). Under several processes the batches are dealt out
round-robin (each keeps its seeds), the per-batch results are gathered and reduced in batch order, so every
rank gets the numbers of a one-process run; the ranks decode in lockstep (as ZeRO-3 needs).
"""

from __future__ import annotations

import re
import statistics
from dataclasses import dataclass, field

import torch
from accelerate.utils import gather_object
from datasets import Dataset

from onpolicy_kd.data.sampler import prompt_batch, reference_batch
from onpolicy_kd.errors import DataError
from onpolicy_kd.evaluation import metrics as M
from onpolicy_kd.evaluation.teacher_answers import Answer, TeacherAnswers
from onpolicy_kd.evaluation.uncertainty import standard_error
from onpolicy_kd.models.distributed import for_generation, innermost
from onpolicy_kd.models.forward import forward_completions
from onpolicy_kd.objectives.cross_tokenizer import spans_loss, uld_loss
from onpolicy_kd.objectives.divergences import log_probs
from onpolicy_kd.objectives.hidden import STITCHING, hidden_state_loss
from onpolicy_kd.recipe import EvalConfig, Recipe
from onpolicy_kd.rollout import rollout

DECODINGS = ("greedy", "sampled")
# per-completion text metrics, in the order reports list them
TEXT_KEYS = ("rougeL_ref", "rouge2_ref", "rougeL_teacher", "rougeL_teacher_samples", "accuracy", "length", "truncated",
             "distinct1", "distinct2", "repetition")


@dataclass
class Evaluated:
    name: str
    summary: dict[str, float]  # reverse_kl_samples, greedy/..., sampled/..., teacher/greedy/..., ...
    predictions: list[dict]  # prompt, references, the teacher's and student's completions, per-prompt metrics and
    # KL sums (kl_sums: the first sample's token count and summed KLs; the set's KLs are the sums over prompts / tokens)
    errors: dict[str, float] = field(default_factory=dict)  # standard error over prompts of each per-prompt mean


def references_of(record: dict) -> list[str]:
    """A held-out row's references (several when the data has several; rows built before the column: one)."""
    return list(record.get("references") or ([record["reference"]] if record.get("reference") else []))


def text_metrics(answer: Answer, *, references: list[str], teacher: str | None, teacher_samples: list[str],
                 gold: str | None, pattern: re.Pattern | None, max_new_tokens: int, eos_ids: list[int]) -> dict:
    """One completion's text metrics (module docstring); a comparison without a target is left out."""
    tokens = answer.ids
    out = {"length": len(tokens), "truncated": float(M.was_cut(tokens, max_new_tokens, eos_ids)),
           "distinct1": M.distinct_n(tokens, 1), "distinct2": M.distinct_n(tokens, 2),
           "repetition": M.repetition_rate(tokens)}
    if references:
        scores = M.rouge(answer.text, references)
        out |= {"rougeL_ref": scores["rougeL"], "rouge2_ref": scores["rouge2"]}
    if teacher is not None:
        out["rougeL_teacher"] = M.rouge(answer.text, teacher)["rougeL"]
    if teacher_samples:
        out["rougeL_teacher_samples"] = M.rouge(answer.text, teacher_samples)["rougeL"]
    if pattern is not None and gold is not None:
        out["accuracy"] = M.exact_match(answer.text, gold, pattern)
    return out


def mean_over_samples(per_sample: list[dict]) -> dict[str, float]:
    """A prompt's sampled figure: the mean of each metric over its sampled completions."""
    return {key: statistics.fmean(m[key] for m in per_sample) for key in per_sample[0]}


def gold_answers(dataset: Dataset, n: int, pattern: str | None) -> list[str | None] | None:
    """The reference's final answer of each of the first n held-out rows (eval.answer_pattern), or None without a
    pattern; a reference the pattern finds no answer in is a data error that names the row."""
    if pattern is None:
        return None
    golds = []
    for row in range(n):
        refs = references_of(dataset[row])
        answer = M.final_answer(refs[0], pattern) if refs else None
        if answer is None:
            raise DataError(f"eval.answer_pattern {pattern!r} finds no answer in the reference of held-out row {row} "
                            f"({refs[0][:80] if refs else 'no reference'!r}); every held-out row needs a reference "
                            f"with an answer the pattern matches")
        golds.append(answer)
    return golds


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


def _answers(completions) -> list[Answer]:
    return [Answer(completions.completion_ids[b][completions.completion_mask[b]].tolist(), completions.texts[b])
            for b in range(len(completions.texts))]


def _hidden_sums(stitching, student_hidden, teacher_hidden, mask: torch.Tensor) -> dict[str, float]:
    """Per layer pair, the summed squared distance (mean over the teacher's width) between the student's projected
    and the teacher's hidden states over the valid tokens, and the token count "n" (the training loss's mse)."""
    projected = stitching(student_hidden)
    sums = hidden_state_loss(projected, [teacher_hidden[t] for _, t in stitching.pairs], mask, kind="mse",
                             num_tokens=1.0, per_pair=True)
    return {f"hidden_mse_layer_{s}_to_{t}": float(v) for (s, t), v in zip(stitching.pairs, sums)} | {"n": int(mask.sum())}


def _sample_seed(cfg: EvalConfig, k: int, index: int) -> int:
    return cfg.seed * 1_000_003 + k * 10_007 + index


def _kl_on_sample(student, teacher, sampled, vocab: int, stitching) -> tuple[dict, dict | None]:
    """Token sums of KL(p || q) and KL(q || p) (and the hidden-state MSE) over the student's sampled completions."""
    hidden = stitching is not None
    s_out = forward_completions(student, sampled, vocab=vocab, hidden=hidden)
    t_out = forward_completions(teacher, sampled, vocab=vocab, hidden=hidden)
    forward_kl, reverse_kl = M.token_kls(s_out.logits, t_out.logits)
    mask = sampled.completion_mask
    kl_sums = _token_sums(mask, forward_kl=forward_kl, reverse_kl=reverse_kl)
    # each prompt's own sums (a prompt's KL = its sum / its tokens), for uncertainties over prompts
    kl_sums["per_prompt"] = [{"tokens": int(mask[b].sum()), "forward_kl": float(forward_kl[b][mask[b]].sum()),
                              "reverse_kl": float(reverse_kl[b][mask[b]].sum())} for b in range(mask.shape[0])]
    return kl_sums, _hidden_sums(stitching, s_out.hidden, t_out.hidden, mask) if hidden else None


def _cross_on_sample(student, teacher, sampled, dataset: Dataset, rows: list[int], cross) -> dict:
    """Across two tokenizers (objective.cross_tokenizer): token sums of the training loss (spans or ULD) on the
    student's sampled completions, read by the teacher in its own tokens, and each prompt's own sums."""
    paired = cross.pair(sampled, dataset, rows)
    s_logits = forward_completions(student, paired, vocab=cross.student_vocab).logits
    t_logits = forward_completions(teacher, paired.teacher_view, vocab=cross.teacher_vocab).logits
    per_prompt = []
    for b in range(len(rows)):
        n_s, n_t = int(paired.completion_mask[b].sum()), int(paired.teacher_view.completion_mask[b].sum())
        s_lp, t_lp = [log_probs(s_logits[b, :n_s])], [log_probs(t_logits[b, :n_t])]
        if cross.how == "uld":
            value = uld_loss(s_lp, t_lp, num_tokens=1)
        else:
            value, _ = spans_loss(s_lp, t_lp, [paired.completion_ids[b, :n_s]],
                                  [paired.teacher_view.completion_ids[b, :n_t]], [paired.spans[b]], cross.shared,
                                  kind=cross.kind, beta=cross.beta, skew=cross.skew, num_tokens=1)
        per_prompt.append({"tokens": n_s, "cross_loss": float(value)})
    return {"cross_loss": sum(p["cross_loss"] for p in per_prompt), "n": sum(p["tokens"] for p in per_prompt),
            "per_prompt": per_prompt}


def _reference_sums(student, teacher, dataset, rows, tokenizer, device, vocab: int) -> tuple[dict, dict[int, dict]]:
    """Token sums of both KLs and both models' NLL on the references, and each prompt's perplexities."""
    ref = reference_batch(dataset, rows, tokenizer.pad_token_id, device)
    s_logits = forward_completions(student, ref, vocab=vocab).logits
    t_logits = forward_completions(teacher, ref, vocab=vocab).logits
    fkl, rkl = M.token_kls(s_logits, t_logits)
    nll_s, nll_t = M.token_nll(s_logits, ref.completion_ids), M.token_nll(t_logits, ref.completion_ids)
    valid = ref.completion_mask
    sums = _token_sums(valid, forward_kl=fkl, reverse_kl=rkl, nll_student=nll_s, nll_teacher=nll_t)
    perplexities = {b: {"ppl_student": float(nll_s[b][valid[b]].mean().exp()),
                        "ppl_teacher": float(nll_t[b][valid[b]].mean().exp())} for b in range(len(rows))}
    return sums, perplexities


def _evaluate_batch(student, teacher, tokenizer, dataset: Dataset, rows: list[int], cfg: EvalConfig, index: int, *,
                    answers: TeacherAnswers, references: bool, golds: list[str | None] | None, stitching=None,
                    cross=None) -> dict:
    """One batch of held-out prompts: token sums on sampled completions (and references), per-prompt records.
    `cross` (data/retokenize.py: CrossTokenizer): the student has a tokenizer of its own; it writes with it, and
    the training loss across the two tokenizers stands in for the KLs."""
    vocab, device = len(tokenizer), next(student.parameters()).device
    teacher_tokenizer = tokenizer
    if cross is not None:
        tokenizer = cross.student_tokenizer
    ids, mask = prompt_batch(dataset, rows, tokenizer.pad_token_id, device,
                             column="student_prompt_ids" if cross is not None else "prompt_ids")
    samples = []
    for k in range(cfg.samples_per_prompt):
        generator = torch.Generator(device=device).manual_seed(_sample_seed(cfg, k, index))
        samples.append(rollout(student, None, ids, mask, tokenizer=tokenizer, max_new_tokens=cfg.max_new_tokens,
                               temperature=cfg.temperature, generator=generator))
    # the KLs on the first sample of each prompt: the two forwards over the prompt cost more than decoding the text
    if cross is not None:
        kl_sums, hidden_sums = _cross_on_sample(student, teacher, samples[0], dataset, rows, cross), None
    else:
        kl_sums, hidden_sums = _kl_on_sample(student, teacher, samples[0], vocab, stitching)
    greedy = _answers(_greedy(student, ids, mask, tokenizer, cfg.max_new_tokens))
    sampled = list(zip(*(_answers(s) for s in samples)))  # per prompt: its samples
    reference_sums, perplexities = (_reference_sums(student, teacher, dataset, rows, teacher_tokenizer, device, vocab)
                                    if references and cross is None else (None, {}))
    pattern = re.compile(cfg.answer_pattern) if cfg.answer_pattern else None
    common = dict(pattern=pattern, max_new_tokens=cfg.max_new_tokens, eos_ids=[tokenizer.eos_token_id])
    predictions = []
    for b, row in enumerate(rows):
        record = dataset[row]
        refs, gold = references_of(record), golds[row] if golds is not None else None
        t_greedy, t_samples = answers.greedy[row], answers.samples[row]
        judge = dict(references=refs, teacher=t_greedy.text, teacher_samples=[a.text for a in t_samples], gold=gold,
                     **common)
        metrics = {f"greedy/{k}": v for k, v in text_metrics(greedy[b], **judge).items()}
        metrics |= {f"sampled/{k}": v for k, v in mean_over_samples([text_metrics(a, **judge)
                                                                      for a in sampled[b]]).items()}
        metrics |= teacher_metrics(t_greedy, t_samples, refs, gold, common | {"eos_ids": [teacher_tokenizer.eos_token_id]})
        metrics |= perplexities.get(b, {})
        predictions.append({"prompt": record["prompt"], "reference": record["reference"], "references": refs,
                            "teacher": t_greedy.text, "teacher_samples": [a.text for a in t_samples],
                            "student": greedy[b].text, "student_samples": [a.text for a in sampled[b]],
                            "metrics": metrics, "kl_sums": kl_sums["per_prompt"][b]})
    return {"index": index, "samples": kl_sums, "references": reference_sums, "hidden": hidden_sums,
            "predictions": predictions}


def teacher_metrics(greedy: Answer, samples: list[Answer], refs: list[str], gold: str | None, common: dict) -> dict:
    """The teacher's own text metrics on one prompt: its greedy answer against its samples, and each sample against
    the greedy answer and the other samples (the comparisons with itself, trivially perfect, are left out)."""
    texts = [a.text for a in samples]
    out = {f"teacher/greedy/{k}": v for k, v in text_metrics(
        greedy, references=refs, teacher=None, teacher_samples=texts, gold=gold, **common).items()}
    per_sample = [text_metrics(a, references=refs, teacher=greedy.text, teacher_samples=texts[:k] + texts[k + 1:],
                               gold=gold, **common) for k, a in enumerate(samples)]
    return out | {f"teacher/sampled/{k}": v for k, v in mean_over_samples(per_sample).items()}


def _my_batches(num_batches: int, accelerator) -> list[tuple[int, bool]]:
    """(batch index, keep its result) for this process: batches dealt round-robin over the processes, and every
    process runs as many batches as the busiest (repeating its first one, result dropped), because decoding
    agrees on stopping across processes and a ZeRO-3 teacher's forward is collective: the ranks stay in step."""
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator is not None else (0, 1)
    mine = list(range(rank, num_batches, world))
    rounds = -(-num_batches // world)
    return [(i, True) for i in mine] + [(mine[0] if mine else 0, False)] * (rounds - len(mine))


@torch.no_grad()
def evaluate(student, teacher, tokenizer, dataset: Dataset, cfg: EvalConfig, answers: TeacherAnswers, *,
             references: bool, name: str = "student", accelerator=None, stitching=None, cross=None) -> Evaluated:
    """The held-out evaluation of `student` against `teacher` (plain modules, on the same device) and the teacher's
    `answers` to the same prompts. With an `accelerator` of several processes, each process evaluates its share of
    the batches and the results are gathered: every process gets the numbers one process would compute, to the
    last digit. With `stitching` (the hidden-state projections of a run that trained them), also each layer pair's
    hidden-state MSE on the sampled completions."""
    n = min(cfg.max_samples, len(dataset))
    if len(answers) < n:
        raise ValueError(f"the teacher's answers cover {len(answers)} of the {n} held-out prompts evaluated")
    starts = list(range(0, n, cfg.batch_size))
    # reference metrics need every held-out prompt's reference (one decision for all batches and processes)
    references = references and all(len(dataset[r]["reference_ids"]) > 0 for r in range(n))
    golds = gold_answers(dataset, n, cfg.answer_pattern)
    results = []
    for index, keep in _my_batches(len(starts), accelerator):
        rows = list(range(starts[index], min(starts[index] + cfg.batch_size, n)))
        result = _evaluate_batch(student, teacher, tokenizer, dataset, rows, cfg, index, answers=answers,
                                 references=references, golds=golds, stitching=stitching, cross=cross)
        if keep:
            results.append(result)
    if accelerator is not None and accelerator.num_processes > 1:
        results = gather_object(results)
    results = sorted(results, key=lambda r: r["index"])
    predictions = [p for r in results for p in r["predictions"]]
    summary, errors = _summary(results, predictions)
    return Evaluated(name, summary, predictions, errors)


def _summary(results: list[dict], predictions: list[dict]) -> tuple[dict[str, float], dict[str, float]]:
    """The set's figures (token-level means, means over prompts) and the standard errors of the per-prompt means."""
    samples = [r["samples"] for r in results]
    if "cross_loss" in samples[0]:  # two tokenizers: the training loss on the student's samples
        summary = {"cross_loss_samples": _token_mean(samples, "cross_loss")}
    else:
        summary = {"reverse_kl_samples": _token_mean(samples, "reverse_kl"),
                   "forward_kl_samples": _token_mean(samples, "forward_kl")}
    keys = [key for key in predictions[0]["metrics"] if all(key in p["metrics"] for p in predictions)]
    summary |= {key: statistics.fmean(p["metrics"][key] for p in predictions) for key in keys}
    errors = {key: standard_error([p["metrics"][key] for p in predictions]) for key in keys}
    hidden = [r["hidden"] for r in results if r["hidden"] is not None]
    if hidden:
        summary |= {key: _token_mean(hidden, key) for key in hidden[0] if key != "n"}
    refs = [r["references"] for r in results if r["references"] is not None]
    if refs and sum(r["n"] for r in refs):
        summary |= {"reverse_kl_refs": _token_mean(refs, "reverse_kl"), "forward_kl_refs": _token_mean(refs, "forward_kl"),
                    "ppl_student": float(torch.tensor(_token_mean(refs, "nll_student")).exp()),
                    "ppl_teacher": float(torch.tensor(_token_mean(refs, "nll_teacher")).exp())}
    return summary, errors


def hidden_keys(summary: dict[str, float]) -> list[str]:
    """The per-layer-pair hidden-state MSEs of an evaluation, in layer order."""
    return [key for key in summary if key.startswith("hidden_mse_layer_")]


def logged_metrics(summary: dict[str, float]) -> dict[str, float]:
    """An evaluation's figures as training logs them: `eval/reverse_kl` (the headline), `eval/<key>` for the rest."""
    renamed = {"reverse_kl_samples": "eval/reverse_kl", "cross_loss_samples": "eval/cross_loss"}
    return {renamed.get(key, f"eval/{key}"): value for key, value in summary.items()}


def headline(metrics: dict[str, float]) -> tuple[str, str]:
    """(what, key) of an evaluation's headline figure in `eval/...` metrics: the held-out KL(student || teacher), or
    across two tokenizers the training loss on the student's samples."""
    if "eval/cross_loss" in metrics:
        return "held-out cross-tokenizer loss", "eval/cross_loss"
    return "held-out reverse KL (student || teacher)", "eval/reverse_kl"


def heldout_evaluation(recipe: Recipe, accelerator, student, teacher, tokenizer, dataset: Dataset,
                       answers: TeacherAnswers, cross=None) -> Evaluated:
    """Training's evaluation point: the held-out evaluation of the (possibly wrapped) student, with the reference
    KLs and perplexities only under `eval.full`; `cross`: a student with a tokenizer of its own."""
    with for_generation(student, accelerator) as model:
        return evaluate(model, teacher, tokenizer, dataset, recipe.eval, answers, references=recipe.eval.full,
                        accelerator=accelerator, stitching=getattr(innermost(model), STITCHING, None), cross=cross)


def heldout_metrics(recipe: Recipe, accelerator, student, teacher, tokenizer, dataset: Dataset,
                    answers: TeacherAnswers) -> dict[str, float]:
    """Every figure of training's held-out evaluation, as `eval/...` metrics."""
    return logged_metrics(heldout_evaluation(recipe, accelerator, student, teacher, tokenizer, dataset, answers).summary)


@torch.no_grad()
def greedy_samples(recipe: Recipe, accelerator, student, tokenizer, dataset: Dataset,
                   answers: TeacherAnswers, cross=None) -> list[dict]:
    """The first `logging.num_samples` held-out prompts with the student's and the teacher's greedy completions."""
    rows = list(range(min(recipe.logging.num_samples, len(dataset), len(answers))))
    if cross is not None:  # the student writes with its own tokenizer
        tokenizer = cross.student_tokenizer
    ids, mask = prompt_batch(dataset, rows, tokenizer.pad_token_id, accelerator.device,
                             column="student_prompt_ids" if cross is not None else "prompt_ids")
    with for_generation(student, accelerator) as model:
        student_out = _greedy(model, ids, mask, tokenizer, recipe.eval.max_new_tokens)
    return [{"prompt": dataset[r]["prompt"], "reference": dataset[r]["reference"], "teacher": answers.greedy[r].text,
             "student": s} for r, s in zip(rows, student_out.texts)]
