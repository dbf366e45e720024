"""The pieces of one training step: the mode table, the lambda coin, the batch type (masks, positions, splitting),
the forward plan and head choice, and the step's loss being independent of how its samples are split."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from onpolicy_kd.batch import Completions, TeacherTopK, completion_mask, concatenate, left_pad, position_ids, right_pad
from onpolicy_kd.models.forward import teacher_forward
from onpolicy_kd.objectives.divergences import log_probs
from onpolicy_kd.objectives.modes import MODES, completion_source, forward_plan, lambda_coin

from conftest import llama_config, recipe, record_token_terms_chunk_sizes


# --- the mode table -------------------------------------------------------------------------------------------


def test_mode_table_sources_and_references():
    plain = recipe().objective
    assert {m: spec.completions(plain, True) for m, spec in MODES.items()} == {
        "pg": "student", "gkd": "student", "kd": "references", "seqkd": "teacher", "sft": "references",
        "hidden": "references", "distillm2": "student"}
    assert [m for m, spec in MODES.items() if spec.with_teacher_text] == ["distillm2"]  # and the teacher's text
    assert MODES["gkd"].completions(plain, False) == "references"
    seq = recipe(objective={"mode": "gkd", "lmbda": 0.5, "seq_kd": True}).objective
    assert MODES["gkd"].completions(seq, False) == "teacher" and MODES["gkd"].references(seq) is None
    assert "lmbda=0.5" in MODES["gkd"].references(recipe(objective={"lmbda": 0.5}).objective)
    assert MODES["gkd"].references(recipe(objective={"lmbda": 1.0}).objective) is None  # every step on-policy
    assert MODES["sft"].references(plain) and MODES["kd"].references(plain) and MODES["seqkd"].references(plain) is None
    assert MODES["hidden"].references(plain) and not MODES["hidden"].reads_teacher
    pg = recipe(objective={"mode": "pg", "lm_coef": 0.5, "ppo_epochs": 3}).objective
    assert "lm_coef" in MODES["pg"].references(pg) and MODES["pg"].passes(pg) == 3
    assert all(spec.passes(plain) == 1 for name, spec in MODES.items() if name != "pg")


def test_lambda_coin_is_a_function_of_seed_and_step():
    draws = [lambda_coin(7, step, 0.3) for step in range(4000)]
    assert draws == [lambda_coin(7, step, 0.3) for step in range(4000)]  # same on every process, after a resume
    assert abs(sum(draws) / len(draws) - 0.3) < 0.03
    assert draws != [lambda_coin(8, step, 0.3) for step in range(4000)]
    assert all(lambda_coin(7, s, 1.0) for s in range(100)) and not any(lambda_coin(7, s, 0.0) for s in range(100))
    r = recipe(objective={"lmbda": 0.5}, train={"seed": 7})
    assert [completion_source(r, s) for s in range(50)] == [
        "student" if lambda_coin(7, s, 0.5) else "references" for s in range(50)]


@pytest.mark.parametrize("sections, expected", [
    ({}, dict(student_logits=False, teacher=True, teacher_logits=False, hidden_states=False, head="chunked")),
    # every mode and the penalties read the student through the memory-bounded head
    ({"penalties": {"entropy": 0.1}}, dict(student_logits=False, teacher_logits=False, head="chunked")),
    ({"objective": {"mode": "sft"}}, dict(student_logits=False, teacher=False)),
    ({"objective": {"mode": "sft"}, "hidden": {"weight": 0.1}}, dict(teacher=True, teacher_logits=False,
                                                                      hidden_states=True)),
    ({"objective": {"mode": "pg"}}, dict(student_logits=False, teacher=True, teacher_logits=False)),
    # no single-step term and teacher-mixed sampling: the rewards come from the lockstep decode, no teacher pass
    ({"objective": {"mode": "pg", "single_step": False}, "rollout": {"alpha": 0.2}}, dict(teacher=False)),
    ({"objective": {"mode": "pg", "single_step": False}}, dict(teacher=True, teacher_logits=False)),
])
def test_forward_plan(sections, expected):
    plan = forward_plan(recipe(**sections), "chunked")
    assert {key: getattr(plan, key) for key in expected} == expected


@pytest.mark.parametrize("sections, runs", [
    ({}, True),  # kd: the teacher's forward over every step's completions
    ({"objective": {"mode": "seqkd"}, "teacher_text": {"cache": True}}, False),
    ({"objective": {"mode": "seqkd"}}, True),  # the teacher decodes its text at each step
    # no teacher forward in the plan, but the rollout decodes with the teacher in lockstep
    ({"objective": {"mode": "pg", "single_step": False}, "rollout": {"alpha": 0.2}}, True),
    ({"objective": {"mode": "gkd", "lmbda": 0.0, "seq_kd": True}, "teacher_text": {"cache": True, "topk": 8}}, False),
    ({"objective": {"mode": "gkd", "lmbda": 0.5, "seq_kd": True}, "teacher_text": {"cache": True, "topk": 8}}, True),
])
def test_steps_run_teacher_decides_whether_the_teacher_stays_in_memory(sections, runs):
    """training/loop.py lets the teacher go while a run trains when no step runs it (a forward the cache does not
    replace, an uncached decode of its text, or a lockstep decode with the student)."""
    from onpolicy_kd.objectives.modes import steps_run_teacher

    r = recipe(**sections)
    assert steps_run_teacher(r, forward_plan(r, "chunked")) is runs


def test_head_is_chosen_once_with_a_reason():
    from onpolicy_kd.errors import ConfigError
    from onpolicy_kd.training.loop import choose_head
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(llama_config(40, layers=1))
    models = SimpleNamespace(student=model, teacher=model)
    cpu = SimpleNamespace(device=torch.device("cpu"), state=SimpleNamespace(deepspeed_plugin=None))
    assert choose_head(recipe(), cpu, models)[0] == "chunked"
    assert choose_head(recipe(objective={"backend": "torch"}), cpu, models)[0] == "torch"
    assert choose_head(recipe(penalties={"frequency": 0.1}), cpu, models)[0] == "chunked"
    assert choose_head(recipe(objective={"mode": "pg"}), cpu, models)[0] == "chunked"
    assert choose_head(recipe(objective={"mode": "sft"}), cpu, models)[0] == "chunked"
    zero3 = SimpleNamespace(device=torch.device("cpu"), state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=3)))
    assert choose_head(recipe(), zero3, models)[0] == "chunked"  # the sharded heads are gathered for it
    with pytest.raises(ConfigError, match="needs CUDA"):
        choose_head(recipe(objective={"backend": "liger", "divergence": "jsd"}), cpu, models)
    with pytest.raises(ConfigError, match="liger computes"):
        choose_head(recipe(objective={"backend": "liger", "divergence": "tv"}), cpu, models)


def test_the_prompt_reuse_is_chosen_once_with_a_reason():
    from accelerate.utils import DistributedType
    from transformers import AutoModelForCausalLM

    from onpolicy_kd.training.loop import choose_prompt_reuse

    model = AutoModelForCausalLM.from_config(llama_config(40, layers=1))
    models = SimpleNamespace(student=model, teacher=model)
    cpu = SimpleNamespace(distributed_type=DistributedType.NO)
    gkd = {"mode": "gkd", "lmbda": 1.0}
    assert choose_prompt_reuse(recipe(objective=gkd), cpu, models) == (True, choose_prompt_reuse(recipe(), cpu, models)[1])
    assert choose_prompt_reuse(recipe(objective=gkd), cpu, models)[1].startswith("run once")
    cases = {
        "ppo_epochs": (recipe(objective={"mode": "pg", "ppo_epochs": 2}), cpu),
        "rollout.batch_size": (recipe(objective=gkd, rollout={"batch_size": 3}), cpu),
        "grad_accum": (recipe(objective=gkd, train={"grad_accum": 2}), cpu),
        "DeepSpeed": (recipe(objective=gkd), SimpleNamespace(distributed_type=DistributedType.DEEPSPEED)),
        "prompt_weight": (recipe(objective={**gkd, "prompt_weight": 0.5}), cpu),
    }
    for reason, (r, accelerator) in cases.items():
        reuse, why = choose_prompt_reuse(r, accelerator, models)
        assert not reuse and why.startswith("run twice") and reason in why, (reason, why)
    from onpolicy_kd.objectives.modes import samples_student  # when the start-up line is printed at all

    assert samples_student(recipe(objective=gkd).objective) and samples_student(recipe(objective={"mode": "pg"}).objective)
    assert not samples_student(recipe(objective={"mode": "gkd", "lmbda": 0.0}).objective)  # the offline default
    assert not samples_student(recipe(objective={"mode": "kd"}).objective)
    model.gradient_checkpointing_enable()
    assert "gradient_checkpointing" in choose_prompt_reuse(recipe(objective=gkd), cpu, models)[1]
    config = llama_config(40, layers=1)
    config.attention_dropout = 0.1
    dropout = AutoModelForCausalLM.from_config(config)
    assert "dropout" in choose_prompt_reuse(recipe(objective=gkd), cpu, SimpleNamespace(student=dropout))[1]
    sliding = AutoModelForCausalLM.from_config(llama_config(40, layers=1))
    sliding.config.sliding_window = 4
    assert "sliding" in choose_prompt_reuse(recipe(objective=gkd), cpu, SimpleNamespace(student=sliding))[1]


# --- the batch type -------------------------------------------------------------------------------------------


def test_masks_and_positions():
    mask = completion_mask(torch.tensor([0, 2, 4]), 4)
    assert mask.tolist() == [[False] * 4, [True, True, False, False], [True] * 4]
    ids, prompt_mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and prompt_mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    completions, cmask = right_pad([[1], [2, 3, 4]], pad_id=0)
    assert completions.tolist() == [[1, 0, 0], [2, 3, 4]] and cmask.tolist() == [[True, False, False], [True] * 3]
    batch = Completions(ids, prompt_mask, completions, cmask, source="references", texts=["a", "b"])
    # positions count attended tokens only: left padding does not shift them
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 3, 3], [0, 0, 0, 1, 2, 3]]  # nor does padding after the end
    assert position_ids(torch.tensor([[0, 1, 1]])).tolist() == [[0, 0, 1]]
    assert batch.lengths.tolist() == [1, 3] and batch.num_tokens == 4
    assert right_pad([[], []], 0)[0].shape == (2, 1)  # at least one (masked) column


def _sampled(rows: list[list[int]], lengths: list[int], width: int) -> Completions:
    ids, mask = left_pad(rows, 0)
    completion = torch.arange(len(rows) * width).reshape(len(rows), width) + 100
    cmask = completion_mask(torch.tensor(lengths), width)
    logprobs = torch.where(cmask, -completion.float(), torch.zeros(()))
    return Completions(ids, mask, completion, cmask, source="student", texts=[str(i) for i in range(len(rows))],
                       student_logprobs=logprobs, sample_logprobs=logprobs, student_entropy=logprobs, alpha=0.2,
                       rows=list(range(len(rows))))


def test_select_and_concatenate_keep_every_row_intact():
    a = _sampled([[1, 2, 3], [4]], [2, 3], 3)
    b = _sampled([[5, 6]], [1], 2)
    both = concatenate([a, b], pad_id=0)
    assert both.prompt_ids.tolist() == [[1, 2, 3], [0, 0, 4], [0, 5, 6]]
    assert both.completion_mask.sum(1).tolist() == [2, 3, 1] and both.completion_ids.shape == (3, 3)
    assert both.texts == ["0", "1", "0"] and both.alpha == 0.2
    part = both.select([1, 2])
    assert part.prompt_ids.tolist() == [[0, 4], [5, 6]]  # the all-padding column is dropped
    assert part.completion_ids.tolist() == [[103, 104, 105], [100, 101, 0]]  # ids kept, 0 = concatenation padding
    assert part.completion_mask.tolist() == [[True] * 3, [True, False, False]]
    assert part.student_logprobs[0].tolist() == [-103.0, -104.0, -105.0] and part.texts == ["1", "0"]
    short = both.select([2])
    assert short.completion_ids.shape == (1, 1) and short.sequences.tolist() == [[5, 6, 100]]



def test_concatenate_pads_every_field_as_the_batch_type_says():
    """Field by field against a hand-made expectation: prompts re-padded on the left with the pad id, completions
    and their per-token tensors on the right (ids with the pad id, masks False, log-probs and entropies 0), each
    tensor's dtype and device kept, the row lists joined, the longest decoding kept, what cannot be joined
    (references, the prompt cache) dropped."""
    pad = 9
    a = _sampled([[1, 2, 3], [4]], [2, 3], 4)  # prompt width 3, completion width 4
    b = _sampled([[5, 6]], [1], 2)
    for batch, step, truncated in ((a, 4, [False, True]), (b, 7, [False])):
        batch.teacher_logprobs = batch.student_logprobs * 2
        batch.student_entropy = batch.student_entropy.to(torch.bfloat16)
        batch.decode_steps, batch.truncated = step, torch.tensor(truncated)
        batch.references, batch.prompt_cache = batch, []
    b.rows = [7]
    both = concatenate([a, b], pad_id=pad)
    assert both.prompt_ids.tolist() == [[1, 2, 3], [0, 0, 4], [pad, 5, 6]]  # a's own padding (0) stays
    assert both.prompt_mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 1, 1]]
    assert both.completion_ids.tolist() == [[100, 101, 102, 103], [104, 105, 106, 107], [100, 101, pad, pad]]
    assert both.completion_mask.tolist() == [[True, True, False, False], [True, True, True, False],
                                             [True, False, False, False]]
    for name, scale in (("student_logprobs", 1), ("sample_logprobs", 1), ("teacher_logprobs", 2), ("student_entropy", 1)):
        values = getattr(both, name)
        assert values.dtype == getattr(a, name).dtype, name
        assert values.float().tolist() == [[-100 * scale, -101 * scale, 0, 0], [-104 * scale, -105 * scale, -106 * scale, 0],
                                           [-100 * scale, 0, 0, 0]], name
    assert both.rows == [0, 1, 7] and both.texts == ["0", "1", "0"] and both.decode_steps == 7
    assert both.truncated.tolist() == [False, True, False]
    assert both.references is None and both.prompt_cache is None
    assert both.source == "student" and both.alpha == 0.2
    assert concatenate([a], pad_id=pad) is a  # one batch is returned as it is
    a.teacher_logprobs = None  # a field the first batch lacks is absent from the result
    assert concatenate([a, b], pad_id=pad).teacher_logprobs is None
    # the padding is made on the batch's own device (meta stands in for an accelerator here)
    on_meta = [replace(x, **{f: getattr(x, f).to("meta") for f in ("prompt_ids", "prompt_mask", "completion_ids",
                                                                    "completion_mask", "student_logprobs")},
                       sample_logprobs=None, student_entropy=None, teacher_logprobs=None) for x in (a, b)]
    assert concatenate(on_meta, pad_id=pad).completion_ids.device.type == "meta"


def test_select_keeps_every_field_of_the_rows_it_takes():
    """select() field by field: the per-token tensors of the chosen rows, cut to the longest chosen completion (not to
    the chosen rows' total), their rows and cut flags."""
    a = _sampled([[1, 2, 3], [4], [5, 6]], [1, 3, 1], 3)
    a.teacher_logprobs, a.truncated, a.rows = a.student_logprobs * 2, torch.tensor([False, True, False]), [10, 11, 12]
    a.references, a.prompt_cache = a, []  # what belongs to all the rows together is not kept
    part = a.select([2, 0])
    assert part.references is None and part.prompt_cache is None
    assert part.completion_ids.tolist() == [[106], [100]]  # width 1: each chosen row has one token
    assert part.teacher_logprobs.tolist() == [[-212.0], [-200.0]] and part.student_logprobs.tolist() == [[-106.0], [-100.0]]
    assert part.rows == [12, 10] and part.truncated.tolist() == [False, False] and part.texts == ["2", "0"]
    assert a.select([1]).truncated.tolist() == [True]
    a.rows = []  # a batch without dataset rows (a custom model's) keeps none
    assert a.select([1]).rows == []


def test_right_pad_puts_ids_and_mask_on_the_device_asked():
    ids, mask = right_pad([[1, 2], [3]], 0, device="meta")  # (meta stands in for an accelerator)
    assert ids.device.type == mask.device.type == "meta" and ids.dtype == torch.long and mask.dtype == torch.bool


def test_token_scale_of_a_one_token_micro_batch():
    """A term divided by the step's tokens, turned into this micro-batch's per-token mean: a batch of one token
    multiplies by the step's count itself."""
    from onpolicy_kd.objectives.loss import StepContext, token_scale

    one = _sampled([[1]], [1], 1)
    assert token_scale(one, StepContext(num_tokens=5.0)) == 5.0
    assert token_scale(_sampled([[1], [2]], [2, 2], 2), StepContext(num_tokens=6.0)) == 1.5


def test_select_takes_the_same_rows_of_the_teachers_view_and_their_spans():
    """Across two tokenizers a batch carries the same rows in the teacher's tokens and, per row, their spans:
    select() takes the chosen rows of both, in the order asked."""
    a = _sampled([[1, 2, 3], [4], [5, 6]], [1, 3, 2], 3)
    a.teacher_view = _sampled([[7], [8, 9], [10]], [2, 1, 3], 4)
    a.spans = [[(0, 1, 0, 2)], [(0, 3, 0, 1)], [(0, 1, 0, 1), (1, 2, 1, 3)]]
    a.teacher_topk = TeacherTopK(torch.arange(18).reshape(3, 3, 2), -torch.arange(18.0).reshape(3, 3, 2),
                                 torch.arange(9.0).reshape(3, 3))
    part = a.select([2, 0])
    assert part.spans == [a.spans[2], a.spans[0]]
    # the cached top-k of the chosen rows, cut to the longest chosen completion (2 tokens) like the other fields
    assert part.teacher_topk.ids.tolist() == a.teacher_topk.ids[[2, 0], :2].tolist()
    assert part.teacher_topk.logprobs.tolist() == a.teacher_topk.logprobs[[2, 0], :2].tolist()
    assert part.teacher_topk.tail.tolist() == [[6.0, 7.0], [0.0, 1.0]]
    assert part.teacher_view.prompt_ids.tolist() == [[10], [7]]
    assert part.teacher_view.completion_mask.sum(1).tolist() == [3, 2] and part.teacher_view.texts == ["2", "0"]


@pytest.mark.parametrize("field", ["teacher_topk", "teacher_view"])
def test_batches_made_per_micro_batch_are_not_concatenated(field):
    """The teacher's cached top-k and the teacher's own tokens are made for each micro-batch: joining two such
    batches is refused, each field on its own."""
    a, b = _sampled([[1, 2]], [1], 2), _sampled([[3]], [2], 2)
    setattr(b, field, object())
    with pytest.raises(ValueError, match="^batches with the teacher's cached top-k or its own tokens are not concatenated$"):
        concatenate([a, b], pad_id=0)


# --- a step does not depend on how its samples are split -----------------------------------------------------


VOCAB = 300  # the tiny tokenizer's


def _models():
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    teacher = AutoModelForCausalLM.from_config(llama_config(VOCAB, layers=2)).eval()
    student = AutoModelForCausalLM.from_config(llama_config(VOCAB, layers=2, hidden=16))
    student.config.use_cache = teacher.config.use_cache = True
    return teacher, student


def _step_gradients(run, batches, student, with_loss=False):
    from onpolicy_kd.objectives.loss import step_loss
    from onpolicy_kd.training.phases import step_context, student_outputs, teacher_outputs

    student.zero_grad()
    teachers = [teacher_outputs(run, b) for b in batches]
    ctx = step_context(run, batches, teachers)
    for batch, teacher in zip(batches, teachers):
        out = student_outputs(SimpleNamespace(**{**vars(run), "student": student}), batch)
        loss, metrics = step_loss(run.recipe, run.mode, batch, out, teacher, ctx)
        loss.backward()
    grads = {name: p.grad.clone() for name, p in student.named_parameters() if p.grad is not None}
    return (grads, ctx, loss.detach(), metrics) if with_loss else (grads, ctx)


@pytest.mark.parametrize("sections", [
    {"objective": {"mode": "pg", "importance": "sequence", "lm_coef": 0.3}, "rollout": {"alpha": 0.3},
     "penalties": {"frequency": 0.1, "diversity": 0.05, "entropy": 0.05, "entropy_floor": 2.0, "shape_reward": True}},
    {"objective": {"mode": "pg"}},
    {"objective": {"mode": "gkd", "divergence": "jsd", "beta": 0.3}, "hidden": {"weight": 0.5}},
    {"objective": {"mode": "kd"}, "hidden": {"weight": 0.5, "loss": "cosine"}, "penalties": {"diversity": 0.1}},
    {"objective": {"mode": "gkd", "divergence": "forward_kl", "prompt_weight": 0.5}},
    {"objective": {"mode": "kd", "prompt_weight": 2.0}, "penalties": {"entropy": 0.1}},
], ids=["pg-mixed-penalties-lm", "pg", "gkd-hidden", "kd-hidden-diversity", "gkd-prompt", "kd-prompt-logits"])
def test_the_step_gradient_does_not_depend_on_the_split(sections, tiny_tokenizer):
    """The same 8 fixed samples as one micro-batch and as 4 micro-batches of 2: the same gradient (every term is
    divided by the step's global counts; the PG baseline is the step's mean return)."""
    from onpolicy_kd.data.sampler import reference_batch

    run, batch, student, dataset = _step_setup(recipe(**sections), tiny_tokenizer)
    r = run.recipe
    whole, ctx = _step_gradients(run, [batch], student)
    parts = [batch.select(range(i, i + 2)) for i in range(0, 8, 2)]
    if r.objective.lm_coef:
        for i, part in enumerate(parts):
            part.references = reference_batch(dataset, list(range(2 * i, 2 * i + 2)), 0, "cpu")
    split, split_ctx = _step_gradients(run, parts, student)
    assert split_ctx.num_tokens == ctx.num_tokens
    assert split_ctx.pg_baseline == pytest.approx(ctx.pg_baseline, rel=1e-5)  # float32 sums in another order
    assert whole.keys() == split.keys() and len(whole) > 10
    for name in whole:
        torch.testing.assert_close(split[name], whole[name], rtol=1e-4, atol=1e-7, msg=name)
    if r.objective.mode == "pg" and not r.penalties.shape_reward:
        assert ctx.pg_baseline != 0  # the baseline is in play (a per-micro-batch mean would break the equality)


def _step_setup(r, tok, dtype=torch.float32):
    """A run-like namespace, 8 fixed sampled completions (with references for the LM term) and the student."""
    from onpolicy_kd.data.sampler import reference_batch
    from onpolicy_kd.models.attention import relation_setup
    from onpolicy_kd.objectives.hidden import attach_stitching
    from onpolicy_kd.objectives.modes import MODES, forward_plan
    from onpolicy_kd.rollout import rollout

    teacher, student = _models()
    relations = ((), 0)
    if r.hidden.stitched:
        attach_stitching(student, teacher, r.hidden.layers)
    elif r.hidden.weight:
        relations = relation_setup(r.hidden, student, teacher)
    prompts = [tok(text).input_ids[: 3 + i] for i, text in enumerate(["The quick brown fox jumps"] * 4 +
                                                                        ["Hello world! How are you"] * 4)]
    ids, mask = left_pad(prompts, tok.pad_token_id or tok.eos_token_id)
    alpha = r.rollout.alpha
    batch = rollout(student, teacher if alpha else None, ids, mask, tokenizer=tok, max_new_tokens=6, alpha=alpha,
                    generator=torch.Generator().manual_seed(1), rows=list(range(8)), vocab_size=VOCAB)
    dataset = None
    if r.objective.lm_coef:
        rows = [{"prompt_ids": p, "reference_ids": [7, 8, 9][: 1 + i % 3], "reference": "x"} for i, p in enumerate(prompts)]
        dataset = _Rows(rows)
        batch.references = reference_batch(dataset, list(range(8)), 0, "cpu")
    teacher.to(dtype), student.to(dtype)
    accelerator = SimpleNamespace(device=torch.device("cpu"), reduce=lambda t, reduction: t, num_processes=1)
    run = SimpleNamespace(recipe=r, accelerator=accelerator, teacher=teacher, vocab=VOCAB, mode=MODES[r.objective.mode],
                          plan=forward_plan(r, "chunked", relations=relations), student=student, relations=relations,
                          cross=None)
    return run, batch, student, dataset


@pytest.mark.parametrize("sections", [
    {"objective": {"mode": "pg", "lm_coef": 0.3}, "penalties": {"frequency": 0.1, "diversity": 0.05, "entropy": 0.05}},
    {"objective": {"mode": "pg", "importance": "sequence"}, "rollout": {"alpha": 0.3},
     "penalties": {"frequency": 0.1, "entropy": 0.05, "shape_reward": True}},
    {"objective": {"mode": "pg", "single_step": False, "ppo_clip": 0.1}},
    {"objective": {"mode": "gkd", "divergence": "jsd"},
     "penalties": {"frequency": 0.2, "diversity": 0.1, "entropy": 0.1, "entropy_floor": 3.0}},
    {"objective": {"mode": "sft"}, "penalties": {"entropy": 0.1}},
    {"objective": {"mode": "kd", "prompt_weight": 1.0}, "penalties": {"diversity": 0.1}, "hidden": {"weight": 0.5}},
], ids=["pg-penalties-lm", "pg-mixed-shaped", "pg-no-single-step", "gkd-all-penalties", "sft-entropy", "kd-prompt-hidden"])
def test_the_bounded_head_gives_the_full_logit_step(sections, tiny_tokenizer):
    """Every mode and penalty through the memory-bounded head (3 tokens a chunk; the logits never materialised)
    gives the loss, the metrics and the gradient of the full-logit path, in float64 to 1e-10."""
    from onpolicy_kd.objectives.modes import forward_plan

    r = recipe(**sections).model_copy(deep=True)
    r.objective.chunk_size = 3
    run, batch, student, _ = _step_setup(r, tiny_tokenizer, dtype=torch.float64)
    results = {}
    for head in ("torch", "chunked"):
        run.plan = forward_plan(r, head)
        results[head] = _step_gradients(run, [batch], student, with_loss=True)
    (full, _, full_loss, full_metrics), (bounded, _, loss, metrics) = results["torch"], results["chunked"]
    assert not run.plan.student_logits and len(full) > 10 and full.keys() == bounded.keys()
    torch.testing.assert_close(loss, full_loss, rtol=1e-10, atol=1e-12)
    for name in full:
        torch.testing.assert_close(bounded[name], full[name], rtol=1e-9, atol=1e-12, msg=name)
    for key, value in metrics.items():
        assert value == pytest.approx(full_metrics[key], rel=1e-9, abs=1e-12), key
    for name, weight in r.penalties.model_dump().items():  # the loss form is on in every mode, shaped or not
        if name in ("frequency", "diversity", "entropy") and weight:
            assert f"penalty/{name}" in metrics


class _Rows:
    def __init__(self, rows):
        self.rows = rows

    def __getitem__(self, i):
        return self.rows[i]


def test_a_per_micro_batch_baseline_would_depend_on_the_split(tiny_tokenizer):
    """The check above can fail: the old estimator (each micro-batch's own mean return) gives another gradient."""
    from onpolicy_kd.objectives.pg import policy_gradient_loss
    from onpolicy_kd.rollout import rollout

    teacher, student = _models()
    tok = tiny_tokenizer
    prompts = [tok("The quick brown fox jumps").input_ids[: 3 + i] for i in range(8)]
    ids, mask = left_pad(prompts, tok.eos_token_id)
    batch = rollout(student, None, ids, mask, tokenizer=tok, max_new_tokens=6, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        teacher_lp = torch.log_softmax(teacher(input_ids=batch.sequences).logits[:, -7:-1], -1)
    teacher_lp = teacher_lp.gather(-1, batch.completion_ids.unsqueeze(-1)).squeeze(-1)
    logprobs = batch.student_logprobs.clone().requires_grad_()
    n = batch.num_tokens

    def grad(baseline_of):
        total = 0
        for i in range(0, 8, 2):
            s = slice(i, i + 2)
            total = total + policy_gradient_loss(logprobs[s], batch.student_logprobs[s], teacher_lp[s],
                                                 batch.completion_mask[s], baseline=baseline_of(s), num_tokens=n).loss
        return torch.autograd.grad(total, logprobs)[0]

    whole = policy_gradient_loss(logprobs, batch.student_logprobs, teacher_lp, batch.completion_mask, baseline="mean",
                                 num_tokens=n).loss
    reference = torch.autograd.grad(whole, logprobs)[0]
    assert not torch.allclose(grad(lambda s: "mean"), reference, rtol=1e-3)
    from onpolicy_kd.objectives.pg import pg_returns

    future = pg_returns(batch.student_logprobs, teacher_lp, batch.completion_mask, single_step=False).future
    global_mean = float(future.sum()) / n
    torch.testing.assert_close(grad(lambda s: global_mean), reference, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("head", ["chunked", "torch"])
def test_prompt_divergence_against_a_naive_float64_reference(head):
    """objective.prompt_weight: the step loss is the completion divergence plus the weight times the same divergence
    at every position predicting a prompt token, each divided by its own count. The reference runs float64 copies
    of the models on each row alone (no padding) and sums KL(p || q) one position at a time; values and gradients."""
    import copy

    from onpolicy_kd.models.forward import student_forward
    from onpolicy_kd.objectives.loss import step_loss
    from onpolicy_kd.training.phases import step_context, teacher_outputs

    r = recipe(objective={"mode": "gkd", "divergence": "forward_kl", "prompt_weight": 0.7})
    teacher, student = _models()
    prompts, completions = [[5, 9, 11, 4, 7], [3, 8], [12, 13, 14]], [[20, 21, 22], [30], [40, 41]]
    prompt_ids, prompt_mask = left_pad(prompts, 0)
    completion_ids, mask = right_pad(completions, 0)
    batch = Completions(prompt_ids, prompt_mask, completion_ids, mask, source="references", texts=["", "", ""])
    assert batch.num_prompt_tokens == 4 + 1 + 2
    accelerator = SimpleNamespace(device=torch.device("cpu"), reduce=lambda t, reduction: t, num_processes=1)
    run = SimpleNamespace(recipe=r, accelerator=accelerator, teacher=teacher, vocab=VOCAB, mode=MODES["gkd"],
                          plan=forward_plan(r, head), cross=None)
    assert run.plan.prompt and run.plan.chunked == (head == "chunked")
    teacher_out = teacher_outputs(run, batch)
    ctx = step_context(run, [batch], [teacher_out])
    out = student_forward(student, batch, vocab=VOCAB, logits=run.plan.student_logits, hidden=False, prompt=True)
    loss, metrics = step_loss(r, run.mode, batch, out, teacher_out, ctx)
    student.zero_grad()
    loss.backward()
    grads = {name: p.grad for name, p in student.named_parameters()}

    student64, teacher64 = copy.deepcopy(student).double(), copy.deepcopy(teacher).double()
    kl = lambda s, t: (t.softmax(-1) * (t.log_softmax(-1) - s.log_softmax(-1))).sum()  # noqa: E731
    prompt_sum = completion_sum = 0.0
    for p, c in zip(prompts, completions):
        ids = torch.tensor([p + c])
        s_logits, t_logits = student64(ids).logits[0], teacher64(ids).logits[0].detach()
        prompt_sum = prompt_sum + sum(kl(s_logits[j], t_logits[j]) for j in range(len(p) - 1))
        completion_sum = completion_sum + sum(kl(s_logits[j], t_logits[j]) for j in range(len(p) - 1, len(ids[0]) - 1))
    reference = completion_sum / 6 + 0.7 * prompt_sum / 7
    student64.zero_grad()
    reference.backward()
    torch.testing.assert_close(loss.double(), reference.detach(), rtol=1e-5, atol=1e-6)
    assert metrics["train/prompt_forward_kl"] == pytest.approx(prompt_sum.item() / 7, rel=1e-5)
    for name, p in student64.named_parameters():
        torch.testing.assert_close(grads[name].double(), p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_prompt_weight_is_a_divergence_key():
    with pytest.raises(ValueError, match="objective.prompt_weight=0.5 has no effect here"):
        recipe(objective={"mode": "sft", "prompt_weight": 0.5})


# --- the student's prompt, run once: the loss continues from the rollout's prefill -------------------------------


@pytest.mark.parametrize("sections, head", [
    ({"objective": {"mode": "gkd", "divergence": "jsd"},
      "penalties": {"frequency": 0.2, "diversity": 0.1, "entropy": 0.1}}, "chunked"),
    ({"objective": {"mode": "gkd", "divergence": "reverse_kl"}, "rollout": {"alpha": 0.3}}, "torch"),
    ({"objective": {"mode": "pg", "lm_coef": 0.3}, "penalties": {"frequency": 0.1, "entropy": 0.05}}, "chunked"),
    ({"objective": {"mode": "gkd", "divergence": "forward_kl"}, "hidden": {"weight": 0.5}}, "chunked"),
    ({"objective": {"mode": "gkd", "divergence": "reverse_kl"}, "hidden": {"weight": 2.0, "loss": "attention_relation"}},
     "chunked"),
], ids=["gkd-penalties-chunked", "gkd-mixed-torch", "pg-lm-chunked", "gkd-hidden", "gkd-attention-relations"])
def test_the_prompt_kept_from_the_rollout_gives_the_same_step(sections, head, tiny_tokenizer):
    """The loss continuing from the rollout's prompt keys and values (kept with gradient) gives the loss, metrics
    and gradient of the forward over prompt + completion, in float64 to 1e-9; the parameters reach the completion
    through the prompt's keys and values, so a cache without gradient would give another step (checked)."""
    from dataclasses import replace

    from onpolicy_kd.data.sampler import reference_batch
    from onpolicy_kd.rollout import rollout

    r = recipe(**sections)
    tok = tiny_tokenizer
    run, _, student, dataset = _step_setup(r, tok, dtype=torch.float64)
    prompts = [tok(text).input_ids[: 3 + i] for i, text in enumerate(["The quick brown fox jumps"] * 4 +
                                                                        ["Hello world! How are you"] * 4)]
    ids, mask = left_pad(prompts, tok.pad_token_id or tok.eos_token_id)

    def sampled() -> Completions:
        alpha = r.rollout.alpha
        batch = rollout(student, run.teacher if alpha else None, ids, mask, tokenizer=tok, max_new_tokens=6, alpha=alpha,
                        generator=torch.Generator().manual_seed(1), rows=list(range(8)), vocab_size=VOCAB,
                        keep_prompt_graph=True)
        if r.objective.lm_coef:
            batch.references = reference_batch(dataset, list(range(8)), 0, "cpu")
        assert batch.prompt_cache is not None and batch.prompt_cache[0][0].requires_grad
        return batch

    run.plan = forward_plan(r, head, reuse_prompt=True, relations=run.relations)
    batch = sampled()
    whole = replace(batch, prompt_cache=None)  # the same completions, through the forward over prompt + completion
    reused, _, loss, metrics = _step_gradients(run, [batch], student, with_loss=True)
    assert batch.prompt_cache is None  # used once
    full, _, full_loss, full_metrics = _step_gradients(run, [whole], student, with_loss=True)
    assert len(full) > 10 and full.keys() == reused.keys()
    torch.testing.assert_close(loss, full_loss, rtol=1e-10, atol=1e-12)
    for name in full:
        torch.testing.assert_close(reused[name], full[name], rtol=1e-9, atol=1e-12, msg=name)
    for key, value in metrics.items():
        assert value == pytest.approx(full_metrics[key], rel=1e-9, abs=1e-12), key
    if r.hidden.weight:  # (the relations read the projections of the T positions on top of the kept prompt)
        assert metrics[f"train/hidden_{r.hidden.loss}"] > 0

    cut = sampled()
    cut.prompt_cache = [(k.detach(), v.detach()) for k, v in cut.prompt_cache]
    without_path, _ = _step_gradients(run, [cut], student)
    assert any(not torch.allclose(without_path[name], full[name], rtol=1e-4) for name in full)


def _relative_error(a: dict, b: dict) -> float:
    """||a - b|| / ||b|| over all the gradients together."""
    diff = sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in b)
    return (diff / sum(float(b[k].double().pow(2).sum()) for k in b)) ** 0.5


def test_a_bf16_rollout_decodes_in_one_autocast_region_with_the_prompt_graph(tiny_tokenizer):
    """Under train.mixed_precision the student decodes in one autocast region (each weight cast once, not at every
    token): the same completions and log-probs as autocast around each forward (accelerate's wrapper), and the
    prompt kept from it gives the loss's gradient within bfloat16 rounding of the whole forward under autocast,
    where a kept prompt cut from the weights is over 50x further off. The teacher, decoding in lockstep, stays float32."""
    from dataclasses import replace

    from onpolicy_kd.rollout import rollout

    r = recipe(objective={"mode": "gkd", "divergence": "reverse_kl"}, rollout={"alpha": 0.3})
    tok = tiny_tokenizer
    run, _, student, _ = _step_setup(r, tok)
    run.plan = forward_plan(r, "chunked", reuse_prompt=True)
    prompts = [tok(text).input_ids[: 3 + i] for i, text in enumerate(["The quick brown fox jumps"] * 4)]
    ids, mask = left_pad(prompts, tok.pad_token_id or tok.eos_token_id)
    plain_forward = student.forward

    def sampled(autocast=None, per_call=False):
        if per_call:  # what accelerate's prepare does to a model's forward under mixed precision
            student.forward = lambda *a, **k: torch.autocast("cpu", dtype=torch.bfloat16)(plain_forward)(*a, **k)
        try:
            return rollout(student, run.teacher, ids, mask, tokenizer=tok, max_new_tokens=6, alpha=0.3,
                           generator=torch.Generator().manual_seed(3), rows=list(range(4)), vocab_size=VOCAB,
                           keep_prompt_graph=True, autocast=autocast)
        finally:
            student.forward = plain_forward

    batch, per_call = sampled(torch.bfloat16), sampled(per_call=True)
    assert torch.equal(batch.completion_ids, per_call.completion_ids)
    for key in ("student_logprobs", "teacher_logprobs", "sample_logprobs"):
        torch.testing.assert_close(getattr(batch, key), getattr(per_call, key), rtol=0, atol=1e-6, msg=key)
    fp32_teacher = teacher_forward(run.teacher, batch, vocab=VOCAB, logits=True, hidden=False)
    recorded = log_probs(fp32_teacher.logits).gather(-1, batch.completion_ids.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(batch.teacher_logprobs, recorded * batch.completion_mask, rtol=0, atol=1e-5)

    def gradients(b):
        with torch.autocast("cpu", dtype=torch.bfloat16):  # the loss's forward, as under accelerate's wrapper
            return _step_gradients(run, [b], student)[0]

    whole = gradients(replace(batch, prompt_cache=None))
    kept_error = _relative_error(gradients(batch), whole)
    cut = sampled(torch.bfloat16)
    cut.prompt_cache = [(k.detach(), v.detach()) for k, v in cut.prompt_cache]
    assert kept_error < 0.01 and _relative_error(gradients(cut), whole) > 50 * kept_error  # 0.001 and 0.19 here


def test_the_prompt_divergence_of_one_prompt_token_is_logged_as_its_value():
    """The logged prompt divergence is this batch's per-token mean, also when one prompt position is predicted."""
    from onpolicy_kd.objectives.loss import ModelOutputs, StepContext, prompt_divergence_loss

    r = recipe(objective={"mode": "gkd", "divergence": "forward_kl", "prompt_weight": 0.5})
    batch = Completions(torch.tensor([[0, 5, 6]]), torch.tensor([[0, 1, 1]]), torch.tensor([[7]]),
                        torch.tensor([[True]]), source="references", texts=[""])
    assert batch.num_prompt_tokens == 1
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(1, 2, 11, generator=g), torch.randn(1, 2, 11, generator=g)
    metrics = {}
    loss = prompt_divergence_loss(batch, ModelOutputs(prompt=ModelOutputs(logits=s)),
                                  ModelOutputs(prompt=ModelOutputs(logits=t)), r, StepContext(num_tokens=1, prompt_tokens=4),
                                  metrics)
    p, q = torch.log_softmax(t[0, 1], -1), torch.log_softmax(s[0, 1], -1)
    value = (p.exp() * (p - q)).sum()
    torch.testing.assert_close(loss, 0.5 * value / 4)
    assert metrics["train/prompt_forward_kl"] == pytest.approx(value.item(), rel=1e-5)


def _two_completions(lengths: list[int]) -> Completions:
    """Two rows of references after a one-token prompt: random token ids (torch's global generator), `lengths` of
    them valid, padded to 4."""
    return Completions(torch.ones(2, 1, dtype=torch.long), torch.ones(2, 1, dtype=torch.long),
                       torch.randint(10, (2, 4)), completion_mask(torch.tensor(lengths), 4), source="references",
                       texts=["a", "b"])


def test_the_kd_loss_hands_the_recipes_divergence_settings_to_the_divergence():
    """objective.beta and objective.temperature, away from their defaults, reach the divergence the step computes
    (found by mutation testing: a setting left out would fall back to the divergence's default silently)."""
    from onpolicy_kd.objectives.divergences import divergence
    from onpolicy_kd.objectives.loss import ModelOutputs, StepContext, divergence_loss

    torch.manual_seed(3)
    r = recipe(objective={"mode": "kd", "divergence": "jsd", "beta": 0.3, "temperature": 2.0})
    batch = _two_completions([3, 2])
    mask = batch.completion_mask
    s, t = torch.randn(2, 4, 10, dtype=torch.float64), torch.randn(2, 4, 10, dtype=torch.float64)
    loss = divergence_loss(batch, ModelOutputs(logits=s), ModelOutputs(logits=t), r, StepContext(num_tokens=5.0), {})
    torch.testing.assert_close(loss, divergence(s, t, mask, kind="jsd", beta=0.3, temperature=2.0, num_tokens=5.0))


def test_the_kd_loss_on_a_top_k_cache_reads_only_the_completion_positions_on_either_head():
    """A teacher kept as its top-k: the memory-bounded head (hidden states and the head's weight) and full logits
    give the same loss, both over the completion's positions only (padding excluded; found by mutation testing)."""
    from onpolicy_kd.objectives.loss import ModelOutputs, StepContext, divergence_loss

    torch.manual_seed(4)
    r = recipe(objective={"mode": "kd", "divergence": "forward_kl"})
    batch = _two_completions([3, 1])
    hidden, head = torch.randn(2, 4, 6, dtype=torch.float64), torch.randn(10, 6, dtype=torch.float64)
    teacher = torch.log_softmax(torch.randn(2, 4, 10, dtype=torch.float64), -1).topk(3, -1)
    tail = torch.log1p(-teacher.values.exp().sum(-1))
    top = ModelOutputs(topk=TeacherTopK(teacher.indices, teacher.values, tail))
    ctx = StepContext(num_tokens=4.0)
    bounded = divergence_loss(batch, ModelOutputs(hidden=[hidden], head=head), top, r, ctx, {})
    full = divergence_loss(batch, ModelOutputs(logits=hidden @ head.T), top, r, ctx, {})
    torch.testing.assert_close(bounded, full)
    garbage = hidden.clone()
    garbage[1, 1:] = 1e3  # the padded positions of the second row
    torch.testing.assert_close(divergence_loss(batch, ModelOutputs(hidden=[garbage], head=head), top, r, ctx, {}), full)


@pytest.mark.parametrize("teacher_kept_as", ["top_k", "hidden_states"])
def test_the_kd_losss_memory_bounded_paths_take_the_recipes_chunk_size_and_head(teacher_kept_as, monkeypatch):
    """Either memory-bounded way into the kd loss (a top-k cache, or the teacher's hidden states and head) passes
    objective.chunk_size on, and the second the step's head backend: the values are the same at any size and on
    either CPU backend, so a dropped setting (the default instead) shows only in what reaches the chunked function
    (found by mutation testing)."""
    from onpolicy_kd.objectives import loss as L

    seen = []
    for name in ("chunked_topk_divergence", "linear_divergence"):
        real = getattr(L, name)
        monkeypatch.setattr(L, name, lambda *a, _real=real, **k: seen.append((k["chunk_size"], k.get("backend")))
                            or _real(*a, **k))
    r = recipe(objective={"mode": "kd", "divergence": "forward_kl", "chunk_size": 3})
    batch = _two_completions([3, 1])
    g = torch.Generator().manual_seed(5)
    student = L.ModelOutputs(hidden=[torch.randn(2, 4, 6, generator=g)], head=torch.randn(10, 6, generator=g))
    if teacher_kept_as == "top_k":
        top = torch.log_softmax(torch.randn(2, 4, 10, generator=g), -1).topk(3, -1)
        teacher = L.ModelOutputs(topk=TeacherTopK(top.indices, top.values, torch.log1p(-top.values.exp().sum(-1))))
    else:
        teacher = L.ModelOutputs(hidden=[torch.randn(2, 4, 6, generator=g)], head=torch.randn(10, 6, generator=g))
    loss = L.divergence_loss(batch, student, teacher, r, L.StepContext(num_tokens=4.0, head="torch"), {})
    assert torch.isfinite(loss) and seen == [(3, None if teacher_kept_as == "top_k" else "torch")]


def test_step_loss_reads_the_students_terms_at_the_recipes_chunk_size(monkeypatch):
    """The one pass over the student's distribution for the mode's terms (here sft's log-probabilities) runs at
    objective.chunk_size: the values are the same at any size, so a dropped setting (the default 1024 instead) shows
    only in what reaches token_terms (found by mutation testing)."""
    from onpolicy_kd.objectives.loss import ModelOutputs, StepContext, step_loss

    seen = record_token_terms_chunk_sizes(monkeypatch)
    r = recipe(objective={"mode": "sft", "chunk_size": 3})
    batch = _two_completions([3, 1])
    student = ModelOutputs(logits=torch.randn(2, 4, 10, requires_grad=True))
    loss, _ = step_loss(r, MODES["sft"], batch, student, None, StepContext(num_tokens=4.0))
    assert torch.isfinite(loss) and seen == [3]


def test_a_micro_batchs_per_token_mean_of_a_single_token():
    """A term divided by the step's 4 tokens, from a micro-batch holding 1 of them: its own mean is 4x the term."""
    from onpolicy_kd.objectives.loss import StepContext, per_token_mean

    batch = Completions(torch.ones(1, 1, dtype=torch.long), torch.ones(1, 1, dtype=torch.long),
                        torch.zeros(1, 2, dtype=torch.long), completion_mask(torch.tensor([1]), 2),
                        source="references", texts=["a"])
    assert batch.num_tokens == 1
    assert per_token_mean(torch.tensor(0.5), batch, StepContext(num_tokens=4.0)) == pytest.approx(2.0)


def _references_nll(student, refs: Completions) -> tuple[float, int]:
    """The student's summed negative log-likelihood of the references' tokens (float64, one sequence at a time, no
    padding) and how many tokens that is."""
    nll, count = 0.0, 0
    with torch.no_grad():
        for b in range(refs.completion_ids.shape[0]):
            prompt = refs.prompt_ids[b][refs.prompt_mask[b].bool()]
            ref = refs.completion_ids[b][refs.completion_mask[b].bool()]
            logits = student(torch.cat([prompt, ref])[None]).logits[0, len(prompt) - 1:-1, :VOCAB].double()
            nll -= torch.log_softmax(logits, -1).gather(-1, ref[:, None]).sum().item()
            count += len(ref)
    return nll, count


def test_pgs_language_modelling_term_is_added_at_its_coefficient(tiny_tokenizer, monkeypatch):
    """objective.lm_coef adds lm_coef x the student's mean negative log-likelihood of the references (a float64
    sequence-by-sequence reference here), read at objective.chunk_size; at 0 the term is absent even with the
    references' outputs at hand (found by mutation testing: the split-invariance test cannot see a dropped term)."""
    from onpolicy_kd.objectives.loss import step_loss
    from onpolicy_kd.training.phases import step_context, student_outputs, teacher_outputs

    seen = record_token_terms_chunk_sizes(monkeypatch)
    run, batch, student, _ = _step_setup(recipe(objective={"mode": "pg", "lm_coef": 0.3, "chunk_size": 5}),
                                         tiny_tokenizer)
    teacher = teacher_outputs(run, batch)
    ctx = step_context(run, [batch], [teacher])
    out = student_outputs(run, batch)
    with_lm, metrics = step_loss(run.recipe, run.mode, batch, out, teacher, ctx)
    assert len(seen) == 3 and set(seen) == {5}  # every pass: the student's terms, the teacher's, the references'
    without_lm, metrics_0 = step_loss(recipe(objective={"mode": "pg", "chunk_size": 5}), run.mode, batch,
                                      student_outputs(run, batch), teacher, ctx)
    assert "pg/lm_loss" not in metrics_0

    nll, count = _references_nll(student, batch.references)
    assert metrics["pg/lm_loss"] == pytest.approx(nll / count, rel=1e-4)
    assert (with_lm - without_lm).item() == pytest.approx(0.3 * nll / count, rel=1e-4)


def test_pgs_language_modelling_metric_over_a_single_reference_token(tiny_tokenizer):
    """A micro-batch whose one reference holds a single token: pg/lm_loss is that token's negative log-likelihood."""
    from onpolicy_kd.data.sampler import reference_batch
    from onpolicy_kd.objectives.loss import step_loss
    from onpolicy_kd.training.phases import step_context, student_outputs, teacher_outputs

    run, batch, student, dataset = _step_setup(recipe(objective={"mode": "pg", "lm_coef": 0.3}), tiny_tokenizer)
    one = batch.select([0])
    one.references = reference_batch(dataset, [0], 0, "cpu")
    assert one.references.num_tokens == 1
    teacher = teacher_outputs(run, one)
    _, metrics = step_loss(run.recipe, run.mode, one, student_outputs(run, one), teacher,
                           step_context(run, [one], [teacher]))
    assert metrics["pg/lm_loss"] == pytest.approx(_references_nll(student, one.references)[0], rel=1e-4)
