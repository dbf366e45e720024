"""Attention-relation distillation (MiniLMv2, hidden.loss=attention_relation): the loss against a float64 loop,
the projections read from Llama (grouped-query) and GPT-2 (fused) layers, the recipe's checks, and training."""

from __future__ import annotations

import math

import pytest
import torch

from onpolicy_kd.batch import Completions
from onpolicy_kd.errors import ConfigError
from onpolicy_kd.models.attention import captured_projections, relation_setup
from onpolicy_kd.models.forward import forward_completions
from onpolicy_kd.objectives.relations import attention_relation_loss
from onpolicy_kd.recipe import HiddenConfig
from onpolicy_kd.train import main

from conftest import llama_config
from test_train import metrics_of, recipe_for


def naive_relation_loss(student, teacher, mask, heads, num_tokens):
    """Row by row, head by head, in float64, straight from the definition (objectives/relations.py)."""
    total = torch.zeros((), dtype=torch.float64)
    B, T = mask.shape
    for s_qkv, t_qkv in zip(student, teacher):
        for s_all, t_all in zip(s_qkv, t_qkv):
            for b in range(B):
                for r in range(heads):
                    ds, dt = s_all.shape[-1] // heads, t_all.shape[-1] // heads
                    s_h = s_all[b, :, r * ds : (r + 1) * ds].double()
                    t_h = t_all[b, :, r * dt : (r + 1) * dt].double()
                    for i in range(T):
                        if not mask[b, i]:
                            continue
                        keys = [j for j in range(i + 1) if mask[b, j]]
                        q = torch.softmax(torch.stack([s_h[i] @ s_h[j] / math.sqrt(ds) for j in keys]), 0)
                        p = torch.softmax(torch.stack([t_h[i] @ t_h[j] / math.sqrt(dt) for j in keys]), 0)
                        total = total + (p * (p.log() - q.log())).sum() / (3 * heads)
    return total / (len(student) * num_tokens)


def random_qkv(B, T, widths, generator, requires_grad=False):
    return tuple(torch.randn(B, T, w, generator=generator, dtype=torch.float64, requires_grad=requires_grad)
                 for w in widths)


@pytest.mark.parametrize("heads", [1, 2])
@pytest.mark.parametrize("num_tokens", [None, 23.0])
def test_loss_and_gradient_match_a_float64_loop(heads, num_tokens):
    """Two layer pairs, a narrower student with grouped-query widths, completions of different lengths."""
    g = torch.Generator().manual_seed(0)
    B, T = 3, 6
    lengths = torch.tensor([4, 6, 1])  # completions end at different places; one has a single token
    mask = torch.arange(T)[None] < lengths[:, None]
    student = [random_qkv(B, T, (8, 4, 4), g, requires_grad=True) for _ in range(2)]
    teacher = [random_qkv(B, T, (16, 8, 8), g) for _ in range(2)]
    got = attention_relation_loss(student, teacher, mask, heads=heads, num_tokens=num_tokens)
    want = naive_relation_loss(student, teacher, mask, heads, num_tokens or float(mask.sum()))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    leaves = [a for qkv in student for a in qkv]
    grads = torch.autograd.grad(got, leaves)
    want_grads = torch.autograd.grad(want, leaves)
    for g_got, g_want in zip(grads, want_grads):
        torch.testing.assert_close(g_got, g_want, rtol=1e-9, atol=1e-12)
    # per pair: the two values whose mean is the loss
    per_pair = attention_relation_loss(student, teacher, mask, heads=heads, num_tokens=num_tokens, per_pair=True)
    assert per_pair.shape == (2,) and per_pair.mean().item() == pytest.approx(got.item(), rel=1e-12)


def test_equal_relations_give_zero_whatever_the_width_and_the_teacher_gets_no_gradient():
    """A student whose projections are the teacher's through an orthogonal map per relation head has the same
    relations (dot products are kept): the loss is zero although the widths differ."""
    g = torch.Generator().manual_seed(1)
    base = random_qkv(2, 5, (8, 8, 8), g)
    rotation = torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=torch.float64))[0]
    # 2 relation heads of 4 each: rotate each head's block, then pad with zeros to a width of 12 (6 per head)
    student = tuple(torch.cat([torch.cat([a[..., :4] @ rotation, torch.zeros(2, 5, 2, dtype=torch.float64)], -1),
                               torch.cat([a[..., 4:] @ rotation, torch.zeros(2, 5, 2, dtype=torch.float64)], -1)], -1)
                    * (6 / 4) ** 0.25  # scores scale by c^2 and 1/sqrt(d_r): sqrt(6) for the student, sqrt(4)
                    for a in base)
    student = tuple(a.requires_grad_() for a in student)
    teacher = tuple(a.clone().requires_grad_() for a in base)
    mask = torch.ones(2, 5, dtype=torch.bool)
    loss = attention_relation_loss([student], [teacher], mask, heads=2)
    assert loss.item() == pytest.approx(0.0, abs=1e-12)
    loss.backward()
    assert all(a.grad is None for a in teacher) and all(a.grad is not None for a in student)


def test_nothing_valid_gives_zero_and_half_precision_uses_float32():
    g = torch.Generator().manual_seed(2)
    qkv = random_qkv(2, 4, (8, 8, 8), g)
    assert attention_relation_loss([qkv], [qkv], torch.zeros(2, 4, dtype=torch.bool), heads=2).item() == 0.0
    half = tuple(a.to(torch.bfloat16) for a in qkv)
    other = tuple(a.float() for a in random_qkv(2, 4, (8, 8, 8), g))
    loss = attention_relation_loss([half], [other], torch.ones(2, 4, dtype=torch.bool), heads=2)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(
        attention_relation_loss([tuple(a.double() for a in half)], [other], torch.ones(2, 4, dtype=torch.bool),
                                heads=2).item(), rel=1e-5)


def test_a_divisor_of_one_divides_by_one():
    """num_tokens=1 divides the sum by 1 (the floor of the divisor is 1, no more). (With the count taken from the
    mask, one valid token has one readable key and a KL of 0, so only a given divisor can show it.)"""
    g = torch.Generator().manual_seed(4)
    mask = torch.tensor([[True, True, True]])
    student, teacher = [random_qkv(1, 3, (4, 4, 4), g)], [random_qkv(1, 3, (4, 4, 4), g)]
    got = attention_relation_loss(student, teacher, mask, heads=1, num_tokens=1.0)
    torch.testing.assert_close(got, naive_relation_loss(student, teacher, mask, 1, 1.0), rtol=1e-10, atol=1e-12)
    assert got.item() > 0


def test_relation_log_probs_are_zero_where_a_key_is_not_readable_and_made_on_the_inputs_device():
    from onpolicy_kd.objectives.relations import relation_log_probs

    g = torch.Generator().manual_seed(5)
    states = torch.randn(2, 4, 6, generator=g, dtype=torch.float64)
    mask = torch.tensor([[True, True, True, False], [False, True, True, True]])
    log_rel = relation_log_probs(states, mask, heads=2)
    readable = torch.ones(4, 4, dtype=torch.bool).tril() & mask[:, None, None, :]
    assert (log_rel.masked_select(~readable.expand_as(log_rel)) == 0).all()
    assert (log_rel.masked_select(readable.expand_as(log_rel)) < 0).any()
    on_meta = relation_log_probs(states.to("meta"), mask.to("meta"), heads=2)  # (meta stands in for an accelerator)
    assert on_meta.device.type == "meta" and on_meta.shape == (2, 2, 4, 4)
    with pytest.raises(ValueError, match="^4 relation heads do not divide a projection width of 6$"):
        relation_log_probs(states, mask, heads=4)


def test_the_student_and_teacher_give_as_many_pairs_and_projections():
    g = torch.Generator().manual_seed(6)
    mask = torch.ones(1, 3, dtype=torch.bool)
    qkv = random_qkv(1, 3, (4, 4, 4), g)
    with pytest.raises(ValueError):
        attention_relation_loss([qkv, qkv], [qkv], mask, heads=1)  # two layer pairs against one
    with pytest.raises(ValueError):
        attention_relation_loss([qkv], [qkv[:2]], mask, heads=1)  # query, key, value against two of them


# --- the projections, read from real layouts --------------------------------------------------------------------

def batch_of(tokenizer, T=4):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, len(tokenizer), (2, 3 + T), generator=g)
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1, -1] = False
    return Completions(ids[:, :3], mask[:, :3], ids[:, 3:], mask[:, 3:], source="references", texts=["", ""])


def test_llama_projections_are_the_layers_q_k_v_at_the_positions_the_loss_reads(tiny_tokenizer):
    """Grouped-query Llama: Q is 32 wide, K and V 16; layer l's are its projections of its normed input (the hidden
    state after layer l-1), at the T positions that predict completion tokens."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(llama_config(len(tiny_tokenizer), layers=3)).eval()
    batch = batch_of(tiny_tokenizer)
    T = batch.completion_ids.shape[1]
    with torch.no_grad():
        out = forward_completions(model, batch, hidden=True, relation_layers=[2, 3])
        full = model(input_ids=batch.sequences, attention_mask=batch.attention_mask,
                     position_ids=batch.position_ids, output_hidden_states=True).hidden_states
    for (q, k, v), layer in zip(out.relations, [2, 3]):
        block = model.model.layers[layer - 1]
        x = block.input_layernorm(full[layer - 1])[:, -T - 1 : -1]
        assert q.shape == (2, T, 32) and k.shape == (2, T, 16)
        for got, proj in zip((q, k, v), (block.self_attn.q_proj, block.self_attn.k_proj, block.self_attn.v_proj)):
            torch.testing.assert_close(got, proj(x))


def test_gpt2_fused_projection_is_split_into_q_k_v(tiny_gpt2_dir, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir).eval()
    batch = batch_of(tiny_tokenizer)
    T = batch.completion_ids.shape[1]
    with torch.no_grad():
        out = forward_completions(model, batch, hidden=True, relation_layers=[1])
        full = model(input_ids=batch.sequences, attention_mask=batch.attention_mask,
                     position_ids=batch.position_ids, output_hidden_states=True).hidden_states
    block = model.transformer.h[0]
    want = block.attn.c_attn(block.ln_1(full[0]))[:, -T - 1 : -1].split(32, dim=-1)
    for got, expected in zip(out.relations[0], want):
        torch.testing.assert_close(got, expected)


def test_hooks_are_removed_and_a_projection_that_runs_zero_or_two_times_is_an_error(tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(llama_config(len(tiny_tokenizer), layers=2))
    ids = torch.tensor([[5, 6, 7]])
    with pytest.raises(ConfigError, match=r"never ran the projection modules of layer 1 query, layer 1 key"):
        with captured_projections(model, [1]):
            pass  # no forward
    assert not any(m._forward_hooks for m in model.modules())
    with pytest.raises(ConfigError, match=r"query projection of decoder layer 2 ran twice in one forward pass"):
        with captured_projections(model, [2]):
            model(input_ids=ids)
            model(input_ids=ids)
    assert not any(m._forward_hooks for m in model.modules())
    with pytest.raises(RuntimeError, match="boom"):  # an error inside the forward
        with captured_projections(model, [1, 2]):
            raise RuntimeError("boom")
    assert not any(m._forward_hooks for m in model.modules())


def test_an_unknown_layout_is_named(tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(llama_config(len(tiny_tokenizer), layers=2))
    for block in model.model.layers:
        block.self_attn.query = block.self_attn.q_proj
        del block.self_attn.q_proj
    with pytest.raises(ConfigError, match=r"cannot find the query/key/value projections of decoder layer 1 .*"
                                          r"looked for q_proj, k_proj, v_proj .*self_attn.query"):
        relation_setup(HiddenConfig(weight=1.0, loss="attention_relation"), model, model)


def test_relation_heads_default_to_the_most_heads_16_wide_and_must_divide_every_width(tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    def llama(hidden, layers, heads=4, kv=2):
        config = llama_config(len(tiny_tokenizer), layers=layers, hidden=hidden)
        config.num_attention_heads, config.num_key_value_heads, config.head_dim = heads, kv, hidden // heads
        return AutoModelForCausalLM.from_config(config)

    relations = HiddenConfig(weight=1.0, loss="attention_relation")
    student, teacher = llama(16, 2), llama(32, 3)  # widths: query 16 / 32, key and value 8 / 16
    pairs, heads = relation_setup(relations, student, teacher)
    assert pairs == [(1, 2), (2, 3)] and heads == 1  # the narrowest projection (8) is under 16 wide
    assert relation_setup(HiddenConfig(weight=1.0, loss="attention_relation", relation_heads=4, layers=[[2, 3]]),
                          student, teacher) == ([(2, 3)], 4)  # 4 divides 16, 8, 32, 16
    with pytest.raises(ConfigError, match=r"relation_heads=3 does not divide the projection widths student layer 1 "
                                          r"query 16.*choose a divisor of 8"):
        relation_setup(HiddenConfig(weight=1.0, loss="attention_relation", relation_heads=3), student, teacher)
    # SmolLM2-135M's shape (9 heads, 3 for keys and values, 64 wide): widths 576 and 192 -> 12 heads of 48 and 16
    smol = llama(576, 1, heads=9, kv=3)
    assert relation_setup(relations, smol, smol) == ([(1, 1)], 12)


def test_the_widths_come_from_the_modules_and_a_fused_projection_must_be_equal_thirds(tiny_gpt2_dir, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    from onpolicy_kd.models.attention import projection_widths

    gpt2 = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir)
    assert projection_widths(gpt2, 1) == (32, 32, 32)
    llama = AutoModelForCausalLM.from_config(llama_config(len(tiny_tokenizer), layers=1))
    assert projection_widths(llama, 1) == (32, 16, 16)
    gpt2.config.hidden_size = 40  # as if c_attn were hidden + 2 x head size (multi-query): not thirds of 3 x 40
    with pytest.raises(ConfigError, match=r"fused c_attn of decoder layer 1 .* is 96 wide, not 3 x hidden_size = 120"):
        relation_setup(HiddenConfig(weight=1.0, loss="attention_relation"), gpt2, gpt2)


NARROW_STUDENT = ["student.config_overrides={num_hidden_layers: 2, hidden_size: 16, intermediate_size: 32}",
                  "hidden.weight=1.0", "hidden.loss=attention_relation"]


def test_recipe_checks(tmp_path, far_pair, isolated_cache, capsys):
    """Layer 0 has no attention; gradient checkpointing would drop the loss's gradient; relation_heads needs the
    loss."""
    with pytest.raises(ValueError, match="layer 0 .* has none"):
        HiddenConfig(weight=1.0, loss="attention_relation", layers=[[0, 0]])
    recipe = recipe_for(tmp_path, far_pair, "gkd")
    assert main([str(recipe), "hidden.weight=1.0", "hidden.loss=attention_relation",
                 "student.gradient_checkpointing=true", "--dry-run"]) != 0
    assert "set student.gradient_checkpointing=false" in " ".join(capsys.readouterr().err.split())
    assert main([str(recipe), "hidden.weight=1.0", "hidden.relation_heads=2", "--dry-run"]) != 0
    assert "hidden.relation_heads" in " ".join(capsys.readouterr().err.split())
    assert main([str(recipe), *NARROW_STUDENT, "--dry-run"]) == 0
    assert "attention-relation distillation (weight 1.0): [student, teacher] layer pairs [[1, 2], [2, 3]], 1 relation " \
           "head" in " ".join(capsys.readouterr().out.split())


def test_training_pulls_the_relations_together_with_no_stitching(tmp_path, far_pair, isolated_cache, capsys):
    """gkd with a 16-wide student of a 32-wide teacher on relations alone (mode hidden: no next-token loss): the
    relation KL falls, per layer pair as well, the student carries no stitching, and the run says what it reads."""
    from safetensors.torch import load_file

    recipe = recipe_for(tmp_path, far_pair, "gkd")
    assert main([str(recipe), *NARROW_STUDENT, "objective.mode=hidden", "train.max_steps=20", "optim.lr=1.0e-2",
                 "train.batch_size=8"]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert "loss: no next-token loss + attention relations 1 (layer pairs [[1, 2], [2, 3]], 1 relation head)" \
        in printed
    rows = [r for r in metrics_of(tmp_path / "out") if "train/hidden_attention_relation" in r]
    kl = [r["train/hidden_attention_relation"] for r in rows]
    assert len(kl) == 20 and all(math.isfinite(x) and x >= 0 for x in kl)
    assert sum(kl[-5:]) < 0.7 * sum(kl[:5]), kl
    for row in rows:
        pairs = [row["hidden/attention_relation_layer_1_to_2"], row["hidden/attention_relation_layer_2_to_3"]]
        assert sum(pairs) / 2 == pytest.approx(row["train/hidden_attention_relation"], rel=1e-6)
    final = tmp_path / "out" / "final"
    assert not (final / "stitching.safetensors").exists()
    assert not any("stitching" in key for key in load_file(final / "model.safetensors"))
    # a resume may not switch to a loss with stitching: the checkpoint's student has no projections to restore
    capsys.readouterr()
    assert main([str(recipe), *NARROW_STUDENT, "objective.mode=hidden", "train.max_steps=21", "hidden.loss=mse",
                 "train.resume_from=latest"]) != 0
    said = " ".join(capsys.readouterr().err.split())
    assert "cannot resume" in said and "hidden.loss: 'attention_relation' in the checkpoint, 'mse' now" in said
