"""The teacher's top-k log-probabilities kept with its cached text (teacher_text.topk): the divergence over the
teacher's k tokens and one bucket for the rest against a float64 hand computation, equal to the dense divergence
when k is the vocabulary; the cache holds what the teacher's forward gives; a run that reads it never runs the
teacher's forward, and with k = V trains exactly as the dense run does."""

from __future__ import annotations

import math

import datasets
import pytest
import torch

from onpolicy_kd.batch import Completions, left_pad, right_pad
from onpolicy_kd.errors import ConfigError
from onpolicy_kd.models.forward import forward_completions
from onpolicy_kd.objectives.divergences import (
    TeacherTopK, chunked_topk_divergence, divergence, topk_divergence,
)
from onpolicy_kd.recipe import load_recipe
from onpolicy_kd.rollout.teacher_cache import teacher_topk
from onpolicy_kd.train import main

from test_train import metrics_of, recipe_for

KINDS = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3), ("tv", 0.5), ("skew_forward_kl", 0.5),
         ("skew_reverse_kl", 0.5)]


def teacher_top(teacher_logits: torch.Tensor, k: int, temperature: float = 1.0) -> TeacherTopK:
    logprobs = torch.log_softmax(teacher_logits.double() / temperature, -1)
    top, ids = logprobs.topk(k, -1)
    rest = 1 - top.exp().sum(-1)
    tail = rest.clamp_min(0).log() if k < teacher_logits.shape[-1] else torch.full(rest.shape, -math.inf)
    return TeacherTopK(ids, top, tail)


def naive(student_logits, top: TeacherTopK, mask, kind: str, beta: float, skew: float, temperature: float) -> torch.Tensor:
    """Row by row in float64: each model's probability of every one of the teacher's k tokens, then of all the
    other tokens together (counted token by token), and the divergence between those k + 1 numbers."""
    total, count = torch.zeros((), dtype=torch.float64), 0
    V = student_logits.shape[-1]
    for b in range(student_logits.shape[0]):
        for t in range(student_logits.shape[1]):
            if not mask[b, t]:
                continue
            count += 1
            q = torch.softmax(student_logits[b, t].double() / temperature, -1)
            ids = [int(i) for i in top.ids[b, t]]
            others = [v for v in range(V) if v not in ids]
            p_buckets = [math.exp(float(x)) for x in top.logprobs[b, t]]
            q_buckets = [q[i] for i in ids]
            if others:
                p_buckets.append(math.exp(float(top.tail[b, t])))
                q_buckets.append(sum(q[v] for v in others))
            p = torch.tensor(p_buckets, dtype=torch.float64)
            q = torch.stack(q_buckets)
            kl = lambda a, c: sum(a[i] * (torch.log(a[i]) - torch.log(c[i])) for i in range(len(a)) if a[i] > 0)  # noqa: E731
            if kind == "forward_kl":
                value = kl(p, q)
            elif kind == "reverse_kl":
                value = kl(q, p)
            elif kind == "jsd":
                m = beta * p + (1 - beta) * q
                value = beta * kl(p, m) + (1 - beta) * kl(q, m)
            elif kind == "tv":
                value = 0.5 * (p - q).abs().sum()
            elif kind == "skew_forward_kl":
                value = kl(p, skew * p + (1 - skew) * q)
            else:
                value = kl(q, skew * q + (1 - skew) * p)
            total = total + value
    return total / count


@pytest.mark.parametrize("kind, beta", KINDS)
@pytest.mark.parametrize("k", [1, 3, 7])
def test_topk_divergence_and_gradient_against_a_float64_hand_computation(kind, beta, k):
    torch.manual_seed(0)
    B, T, V = 2, 3, 7
    student = torch.randn(B, T, V, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(B, T, V, dtype=torch.float64) * 2
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    top = teacher_top(teacher, k, temperature=1.5)
    got = topk_divergence(student, top, mask, kind=kind, beta=beta, skew=0.2, temperature=1.5)
    want = naive(student, top, mask, kind, beta, 0.2, 1.5)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    (grad,) = torch.autograd.grad(got, student)
    (want_grad,) = torch.autograd.grad(want, student)
    torch.testing.assert_close(grad, want_grad, rtol=1e-9, atol=1e-12)
    assert grad[0, 2].abs().sum() == 0  # a masked position gets no gradient


@pytest.mark.parametrize("kind, beta", KINDS)
def test_with_k_the_whole_vocabulary_it_is_the_dense_divergence(kind, beta):
    torch.manual_seed(1)
    student = torch.randn(3, 4, 11, dtype=torch.float64)
    teacher = torch.randn(3, 4, 11, dtype=torch.float64)
    mask = torch.rand(3, 4) > 0.3
    top = teacher_top(teacher, 11, temperature=0.8)
    got = topk_divergence(student, top, mask, kind=kind, beta=beta, skew=0.3, temperature=0.8)
    torch.testing.assert_close(got, divergence(student, teacher, mask, kind=kind, beta=beta, skew=0.3, temperature=0.8))


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd", "tv"])
def test_the_bucketed_divergence_is_a_lower_bound_rising_with_k(kind):
    torch.manual_seed(2)
    student, teacher = torch.randn(64, 50, dtype=torch.float64), torch.randn(64, 50, dtype=torch.float64) * 3
    values = [float(topk_divergence(student, teacher_top(teacher, k), kind=kind, beta=0.5)) for k in (1, 5, 20, 49, 50)]
    dense = float(divergence(student, teacher, kind=kind, beta=0.5))
    assert all(a <= b + 1e-12 for a, b in zip(values, values[1:]))  # more buckets, a larger divergence
    assert values[-1] == pytest.approx(dense, rel=1e-12) and values[0] < dense


@pytest.mark.parametrize("kind, beta", KINDS)
def test_chunked_topk_divergence_equals_the_full_logits_one(kind, beta):
    torch.manual_seed(3)
    hidden = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    head = torch.randn(13, 6, dtype=torch.float64, requires_grad=True)
    top = teacher_top(torch.randn(2, 5, 13, dtype=torch.float64), 4)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    plain = topk_divergence(hidden @ head.T, top, mask, kind=kind, beta=beta, num_tokens=10)
    chunked = chunked_topk_divergence(hidden, head, top, mask, kind=kind, beta=beta, num_tokens=10, chunk_size=3)
    torch.testing.assert_close(chunked, plain)
    for a, b in zip(torch.autograd.grad(plain, [hidden, head]), torch.autograd.grad(chunked, [hidden, head])):
        torch.testing.assert_close(a, b)


def test_chunked_topk_divergence_by_default_a_head_with_padded_rows_and_one_row_a_chunk():
    """Without num_tokens both divide by the valid positions; `vocab_size` leaves out the head's padded rows; a chunk
    of one position is allowed, of none refused; the defaults of beta and skew are the plain function's."""
    torch.manual_seed(9)
    hidden = torch.randn(2, 5, 6, dtype=torch.float64)
    head = torch.randn(13, 6, dtype=torch.float64)
    padded = torch.cat([head, torch.randn(3, 6, dtype=torch.float64) * 5])  # 3 rows past the vocabulary
    top = teacher_top(torch.randn(2, 5, 13, dtype=torch.float64), 4)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    for kind in ("jsd", "skew_reverse_kl"):
        plain = topk_divergence(hidden @ head.T, top, mask, kind=kind)
        torch.testing.assert_close(chunked_topk_divergence(hidden, padded, top, mask, kind=kind, vocab_size=13,
                                                           chunk_size=1), plain)
        torch.testing.assert_close(chunked_topk_divergence(hidden, head, top, kind=kind),
                                   topk_divergence(hidden @ head.T, top, kind=kind))
    with pytest.raises(ValueError, match="^chunk_size=0 must be >= 1$"):
        chunked_topk_divergence(hidden, head, top, kind="forward_kl", chunk_size=0)
    with pytest.raises(ValueError, match="^the student has 10 positions, the teacher's top-k 4$"):
        chunked_topk_divergence(hidden, head, teacher_top(torch.randn(1, 4, 13), 2), kind="forward_kl")


def test_topk_divergence_is_in_the_students_precision():
    """A float64 top-k (the cache's) against a float32 student: the divergence is float32."""
    top = teacher_top(torch.randn(3, 7, dtype=torch.float64), 3)
    assert topk_divergence(torch.randn(3, 7), top, kind="forward_kl").dtype == torch.float32


def test_topk_divergence_refuses_logit_mse():
    top = teacher_top(torch.randn(2, 5), 2)
    with pytest.raises(ValueError, match="^logit_mse compares whole rows of logits, which a top-k cache does not "
                       "keep; use a KL, the JSD or tv$"):
        topk_divergence(torch.randn(2, 5), top, kind="logit_mse")


@pytest.mark.parametrize("kind", ["jsd", "skew_forward_kl", "skew_reverse_kl"])
def test_topk_divergence_defaults_are_the_dense_divergences(kind):
    """Left out, beta and skew are what `divergence` takes by default: at k = V the two agree without them."""
    torch.manual_seed(8)
    student, teacher = torch.randn(4, 7, dtype=torch.float64), torch.randn(4, 7, dtype=torch.float64)
    torch.testing.assert_close(topk_divergence(student, teacher_top(teacher, 7), kind=kind),
                               divergence(student, teacher, kind=kind))


def test_topk_divergence_refuses_a_top_k_of_other_positions():
    top = teacher_top(torch.randn(1, 4, 5), 2)  # (B, T, k) for B = 1, T = 4 against the student's B = 2, T = 3
    with pytest.raises(ValueError, match="^the student has 6 positions, the teacher's top-k 4$"):
        topk_divergence(torch.randn(2, 3, 5), top, kind="forward_kl")


def test_the_cache_holds_the_teachers_top_k_of_its_forward(far_pair):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    teacher_dir, _ = far_pair
    teacher, tokenizer = AutoModelForCausalLM.from_pretrained(teacher_dir), AutoTokenizer.from_pretrained(teacher_dir)
    vocab = len(tokenizer)
    prompts = datasets.Dataset.from_dict({"prompt_ids": [[5, 6, 7], [8, 9], [10, 11, 12, 13]]})
    completions = [[20, 21, 22], [23], [24, 25]]
    stored = teacher_topk(teacher, prompts, completions, k=4, temperature=2.0, batch_size=2, device=torch.device("cpu"),
                          vocab=vocab, pad_id=0).with_format("numpy")
    for row in range(3):
        ids, mask = right_pad([completions[row]], 0)
        p_ids, p_mask = left_pad([prompts[row]["prompt_ids"]], 0)
        batch = Completions(p_ids, p_mask, ids, mask, source="teacher", texts=[""])
        with torch.no_grad():
            logprobs = torch.log_softmax(forward_completions(teacher, batch, vocab=vocab).logits[0].double() / 2, -1)
        top, top_ids = logprobs.topk(4, -1)
        entry = stored[row]
        assert entry["topk_ids"].shape == (len(completions[row]), 4)
        assert (torch.as_tensor(entry["topk_ids"]) == top_ids).all()
        torch.testing.assert_close(torch.as_tensor(entry["topk_logprobs"]).double(), top, atol=1e-5, rtol=0)
        rest = torch.log1p(-top.exp().sum(-1))
        torch.testing.assert_close(torch.as_tensor(entry["tail_logprob"]).double(), rest, atol=1e-4, rtol=1e-4)


def test_the_cached_top_k_rows_come_back_in_the_callers_order(far_pair):
    """The cache is made in the prompts' canonical order (sorted by token ids, as the completions are) and handed
    back in the caller's: each row is the top-k of that row's own completion."""
    from transformers import AutoModelForCausalLM

    from onpolicy_kd.rollout.teacher_cache import cached_teacher_topk

    teacher = AutoModelForCausalLM.from_pretrained(far_pair[0])
    prompts = datasets.Dataset.from_dict({"prompt_ids": [[30, 31], [5, 6, 7], [12], [9, 9]]})  # not sorted
    completions = [[40, 41, 42], [43], [44, 45], [46, 47, 48, 49]]
    common = dict(k=3, temperature=1.0, device=torch.device("cpu"), vocab=64, pad_id=0)
    got, hit = cached_teacher_topk(teacher, prompts, completions, None, batch_size=3, **common)
    assert not hit
    for row in range(4):
        alone = teacher_topk(teacher, prompts.select([row]), [completions[row]], batch_size=1, **common)[0]
        assert got[row]["topk_ids"] == alone["topk_ids"] and len(got[row]["tail_logprob"]) == len(completions[row])
        torch.testing.assert_close(torch.tensor(got[row]["topk_logprobs"]), torch.tensor(alone["topk_logprobs"]))


TOPK_RUN = ["objective.mode=gkd", "objective.seq_kd=true", "objective.lmbda=0", "teacher_text.cache=true",
            "train.max_steps=3", "eval.max_samples=2", "objective.divergence=jsd", "objective.beta=0.3"]


DISTILLM2 = ["objective.mode=distillm2", "objective.seq_kd=false", "objective.lmbda=1.0", "teacher_text.cache=true",
             "train.max_steps=3", "eval.max_samples=2", "rollout.do_sample=true"]


SAMPLED = [*TOPK_RUN, "teacher_text.do_sample=true", "teacher_text.samples_per_prompt=2"]


@pytest.mark.parametrize("keys", [TOPK_RUN, DISTILLM2, SAMPLED], ids=["gkd-jsd", "distillm2", "two-samples-per-prompt"])
def test_a_run_on_the_top_k_trains_as_the_dense_run_when_k_is_the_vocabulary_without_the_teachers_forward_on_its_text(
        keys, tmp_path, far_pair, isolated_cache, monkeypatch):
    import onpolicy_kd.training.phases as phases

    path = recipe_for(tmp_path, far_pair, "gkd")
    assert main([str(path), *keys, f"train.output_dir={tmp_path / 'dense'}"]) == 0
    dense = [r for r in metrics_of(tmp_path / "dense") if "train/loss" in r]
    forwards = []

    def teacher_forward(teacher, batch, real=phases.teacher_forward, **kwargs):
        forwards.append(batch.source)
        return real(teacher, batch, **kwargs)

    monkeypatch.setattr(phases, "teacher_forward", teacher_forward)
    vocab = 4096  # more than the tiny tokenizer has: the cache keeps all of it
    assert main([str(path), *keys, f"teacher_text.topk={vocab}", f"train.output_dir={tmp_path / 'topk'}"]) == 0
    topk = [r for r in metrics_of(tmp_path / "topk") if "train/loss" in r]
    # the teacher runs over the student's samples only (distillm2's other half), never over its own cached text
    assert forwards == (["student"] * 3 if "objective.mode=distillm2" in keys else [])
    assert [r["train/loss"] for r in topk] == pytest.approx([r["train/loss"] for r in dense], rel=1e-5)
    entries = sorted(p.name for p in (isolated_cache / "data" / "teacher").iterdir())
    assert [e for e in entries if "-top" in e] and all("-t1-" in e for e in entries if "-top" in e)


def test_a_run_on_a_small_top_k_learns_and_a_second_run_reads_the_cache(tmp_path, far_pair, isolated_cache,
                                                                        monkeypatch, capsys):
    import onpolicy_kd.rollout.teacher_cache as cache

    path = recipe_for(tmp_path, far_pair, "gkd")
    run = [str(path), *TOPK_RUN, "teacher_text.topk=3", "objective.divergence=forward_kl", "objective.beta=0.5",
           "train.max_steps=12", "optim.lr=1e-2"]
    assert main([*run, f"train.output_dir={tmp_path / 'a'}"]) == 0
    losses = [r["train/forward_kl"] for r in metrics_of(tmp_path / "a") if "train/loss" in r]
    assert sum(losses[-3:]) < 0.7 * sum(losses[:3])
    made = []
    monkeypatch.setattr(cache, "teacher_topk", lambda *a, **k: made.append(1))
    capsys.readouterr()
    assert main([*run, "train.max_steps=1", f"train.output_dir={tmp_path / 'b'}"]) == 0
    assert not made and "teacher top-3: read from" in capsys.readouterr().out


@pytest.mark.parametrize("overrides, message", [
    (["teacher_text.cache=false"], "set teacher_text.cache=true"),
    (["objective.mode=seqkd", "objective.seq_kd=false", "objective.lmbda=0.5"], "reads no teacher distribution"),
    (["hidden.weight=1", "hidden.layers=[[1,1]]"], "hidden.weight > 0"),
    (["objective.prompt_weight=0.5"], "objective.prompt_weight"),
    (["objective.divergence=logit_mse"], "logit_mse"),
])
def test_top_k_where_it_cannot_apply_is_refused(tmp_path, far_pair, overrides, message):
    path = recipe_for(tmp_path, far_pair, "gkd")
    base = ["objective.seq_kd=true", "objective.lmbda=0", "teacher_text.cache=true", "teacher_text.topk=5"]
    with pytest.raises(ConfigError, match=message):
        load_recipe(path, [*base, *overrides])


def watch_teachers(monkeypatch) -> tuple[list, list[int]]:
    """(a weak reference to every teacher loaded, how many of them are alive at each training step)."""
    import gc
    import weakref

    import onpolicy_kd.models.loading as loading
    import onpolicy_kd.training.loop as loop

    teachers, alive_at_steps = [], []

    def load_teacher(*args, real=loading.load_teacher, **kwargs):
        teacher, tokenizer = real(*args, **kwargs)
        teachers.append(weakref.ref(teacher))
        return teacher, tokenizer

    def draw_completions(*args, real=loop.draw_completions, **kwargs):
        gc.collect()
        alive_at_steps.append(sum(ref() is not None for ref in teachers))
        return real(*args, **kwargs)

    monkeypatch.setattr(loading, "load_teacher", load_teacher)
    monkeypatch.setattr(loop, "draw_completions", draw_completions)
    return teachers, alive_at_steps


@pytest.mark.parametrize("topk, released", [(5, True), (None, False)])
def test_a_run_whose_steps_read_only_the_cache_trains_without_the_teacher_in_memory(
        topk, released, tmp_path, far_pair, isolated_cache, monkeypatch, capsys):
    """The teacher is loaded for the caches and the held-out answers, let go before the first step, and loaded
    again for each evaluation only; a run whose steps run it keeps it."""
    teachers, alive_at_steps = watch_teachers(monkeypatch)
    path = recipe_for(tmp_path, far_pair, "gkd")
    keys = [*TOPK_RUN, "eval.eval_steps=2", *([f"teacher_text.topk={topk}"] if topk else [])]
    assert main([str(path), *keys]) == 0
    out = capsys.readouterr().out
    if released:  # loaded for set-up, again for the evaluations before training, at step 2 and at the end
        assert alive_at_steps == [0, 0, 0] and len(teachers) == 4
        assert "teacher: out of memory while training" in out and "top-5 log-probabilities from the cache" in out
    else:
        assert alive_at_steps == [1, 1, 1] and len(teachers) == 1
        assert "out of memory while training" not in out
    after = [r for r in metrics_of(tmp_path / "out") if "eval/reverse_kl" in r]
    assert len(after) == 3 and all(math.isfinite(r["eval/reverse_kl"]) for r in after)


def test_a_staged_run_lets_the_teacher_go_for_a_top_k_stage_and_loads_it_again_for_the_next(
        tmp_path, far_pair, isolated_cache, monkeypatch):
    teachers, alive_at_steps = watch_teachers(monkeypatch)
    path = recipe_for(tmp_path, far_pair, "gkd")
    keys = [k for k in TOPK_RUN if not k.startswith("train.max_steps")]
    assert main([str(path), *keys, "train.max_steps=null",
                 "stages=[{name: cached, max_steps: 2, teacher_text: {topk: 5}}, {name: dense, max_steps: 2}]"]) == 0
    assert alive_at_steps == [0, 0, 1, 1]  # the top-k stage trains without it; the dense stage has it back
    assert len(teachers) >= 3  # loaded for the run, again for the first stage's evaluation, again for the second
