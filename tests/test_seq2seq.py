"""Encoder-decoder teachers and students (T5, BART): the rollout against a naive float64 loop of full forwards,
the encoder input padding, masks at the decoder's EOS, the memory-bounded head against full logits, training in
kd, seqkd, sft and on-policy gkd (loss and held-out KL fall), the export reloaded, and the clear errors."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from tokenizers.processors import TemplateProcessing
from transformers import AutoModelForSeq2SeqLM, BartConfig, T5Config

from conftest import CORPUS, train_tokenizer, write_recipe
from onpolicy_kd import distill
from onpolicy_kd.batch import left_pad
from onpolicy_kd.data.prompts import PromptBuilder, detect_format
from onpolicy_kd.errors import ConfigError
from onpolicy_kd.models.forward import student_forward, teacher_forward
from onpolicy_kd.models.loading import load_model, logits_are_linear, prepare_tokenizer_for_generation
from onpolicy_kd.models.seq2seq import encoder_inputs
from onpolicy_kd.objectives.loss import StepContext, divergence_loss
from onpolicy_kd.recipe import Recipe
from onpolicy_kd.rollout import rollout

from test_train import metrics_of


def t5_tokenizer():
    """The tests' byte-level BPE made T5-like: a pad token of its own (the decoder's start) and </s>-style EOS
    appended to every encoded text."""
    tok = train_tokenizer(CORPUS)
    tok.pad_token = "<|user|>"
    tok._tokenizer.post_processor = TemplateProcessing(
        single="$A <|endoftext|>", special_tokens=[("<|endoftext|>", tok.eos_token_id)])
    prepare_tokenizer_for_generation(tok)
    return tok


def t5(tok, seed: int, layers: int = 2, d_model: int = 32, scaled: bool = False, untied: bool = False):
    """A tiny T5. transformers ties its head to the embeddings always and reads `tie_word_embeddings` as whether to
    scale the decoder output by d_model^-0.5 (original T5) or not (v1.1, Flan-T5); `untied` gives the head a weight
    of its own."""
    torch.manual_seed(seed)
    config = T5Config(vocab_size=len(tok), d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=layers,
                      num_decoder_layers=layers, num_heads=4, decoder_start_token_id=tok.pad_token_id,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=scaled,
                      dropout_rate=0.0)
    model = AutoModelForSeq2SeqLM.from_config(config).eval()
    if untied:
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach() * 1.5)
        assert model.lm_head.weight is not model.shared.weight
    return model


def bart(tok, seed: int):
    torch.manual_seed(seed)
    config = BartConfig(vocab_size=len(tok), d_model=32, encoder_layers=2, decoder_layers=2,
                        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                        max_position_embeddings=128, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                        bos_token_id=tok.eos_token_id, decoder_start_token_id=tok.eos_token_id, forced_eos_token_id=None)
    model = AutoModelForSeq2SeqLM.from_config(config).eval()
    with torch.no_grad():
        model.final_logits_bias.normal_()  # a head that is more than its matrix
    return model


@pytest.fixture(scope="module")
def tok():
    return t5_tokenizer()


PROMPTS = ["The quick brown fox jumps over the lazy dog.", "Hello world!", "The Senate count was finalised."]


def naive_logprobs(model, prompt: list[int], completion: list[int], temperature: float) -> torch.Tensor:
    """(T, V) float64 log-probs of each completion token's distribution: one full forward per step, one prompt
    alone (no padding, no cache)."""
    model = copy.deepcopy(model).double()
    start = model.config.decoder_start_token_id
    rows = []
    for t in range(len(completion)):
        out = model(input_ids=torch.tensor([prompt]), decoder_input_ids=torch.tensor([[start] + completion[:t]]))
        rows.append(torch.log_softmax(out.logits[0, -1] / temperature, -1))
    return torch.stack(rows)


@pytest.mark.parametrize("kind", ["t5", "bart"])
@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_rollout_equals_a_naive_loop_of_full_forwards(tok, kind, alpha):
    """Sampled log-probs of student, teacher and the mixture, for prompts of different lengths in one padded batch,
    equal those of a float64 loop that runs each prompt alone with a full forward per step."""
    build = t5 if kind == "t5" else bart
    student, teacher = build(tok, 0), build(tok, 1)
    prompts = [tok(p).input_ids for p in PROMPTS]
    ids, mask = left_pad(prompts, tok.pad_token_id)
    batch = rollout(student, teacher if alpha else None, ids, mask, tokenizer=tok, max_new_tokens=7, temperature=1.3,
                    alpha=alpha, generator=torch.Generator().manual_seed(0))
    for b, prompt in enumerate(prompts):
        n = int(batch.lengths[b])
        completion = batch.completion_ids[b, :n].tolist()
        q = naive_logprobs(student, prompt, completion, 1.3)
        taken = torch.arange(n), torch.tensor(completion)
        torch.testing.assert_close(batch.student_logprobs[b, :n].double(), q[taken], rtol=1e-4, atol=1e-4)
        if alpha:
            p = naive_logprobs(teacher, prompt, completion, 1.3)
            torch.testing.assert_close(batch.teacher_logprobs[b, :n].double(), p[taken], rtol=1e-4, atol=1e-4)
            mixture = torch.logaddexp(p + math.log(alpha), q + math.log(1 - alpha))
            torch.testing.assert_close(batch.sample_logprobs[b, :n].double(), mixture[taken], rtol=1e-4, atol=1e-4)


def test_rows_end_at_the_decoders_eos(tok):
    """A row's completion mask covers its tokens up to and including its first EOS, padding after it; rows that
    never meet EOS run to max_new_tokens."""
    model = t5(tok, 0)
    def likely_eos(module, inputs, logits):  # EOS a little below the top token: likely, not certain, each step
        return logits.scatter(-1, torch.full_like(logits[..., :1], tok.eos_token_id, dtype=torch.long),
                              logits.amax(-1, keepdim=True) - 1.0)

    model.lm_head.register_forward_hook(likely_eos)
    prompts = [tok(p).input_ids for p in PROMPTS * 4]
    ids, mask = left_pad(prompts, tok.pad_token_id)
    batch = rollout(model, None, ids, mask, tokenizer=tok, max_new_tokens=12,
                    generator=torch.Generator().manual_seed(3))
    ended_early = 0
    for b in range(len(prompts)):
        row = batch.completion_ids[b].tolist()
        n = int(batch.lengths[b])
        first_eos = next((i for i, t in enumerate(row[:n]) if t == tok.eos_token_id), None)
        if first_eos is None:
            assert n == batch.completion_ids.shape[1] == 12 or n == batch.decode_steps
        else:
            assert n == first_eos + 1
            ended_early += n < batch.completion_ids.shape[1]
        assert all(t == tok.pad_token_id for t in row[n:])
        assert batch.completion_mask[b].tolist() == [True] * n + [False] * (len(row) - n)
    assert ended_early >= 2  # the test saw rows stop at EOS


def test_encoder_input_is_the_prompt_without_its_padding(tok):
    """BART's learned positions: a prompt's teacher-forced logits are the same alone and in a padded batch."""
    model = bart(tok, 0)
    prompts = [tok(p).input_ids for p in PROMPTS]
    ids, mask = left_pad(prompts, tok.pad_token_id)
    moved, moved_mask = encoder_inputs(ids, mask)
    for b, p in enumerate(prompts):
        assert moved[b, : len(p)].tolist() == p and moved_mask[b].tolist() == [1] * len(p) + [0] * (ids.shape[1] - len(p))
    batch = rollout(model, None, ids, mask, tokenizer=tok, max_new_tokens=5, generator=torch.Generator().manual_seed(1))
    together = teacher_forward(model, batch, vocab=len(tok), logits=True, hidden=False).logits
    alone = teacher_forward(model, batch.select([1]), vocab=len(tok), logits=True, hidden=False).logits
    n = int(batch.lengths[1])
    torch.testing.assert_close(together[1, :n], alone[0, :n], rtol=1e-5, atol=1e-5)


def test_prompts_are_encoder_inputs_with_the_tokenizers_special_tokens(tok):
    """An encoder's input ends as the tokenizer ends a text (here with EOS, as T5's does); a decoder-only prompt
    does not (the model writes on from its last token); references end with EOS in both."""
    row = {"article": "The Senate count was finalised. " * 10, "highlights": "Count done."}
    task = detect_format(list(row))
    for encoder_decoder in (True, False):
        built = PromptBuilder(tok, task, max_prompt_tokens=20, encoder_decoder=encoder_decoder)(row)
        assert len(built["prompt_ids"]) == 20 and built["truncated"]
        assert (built["prompt_ids"][-1] == tok.eos_token_id) == encoder_decoder
        assert built["reference_ids"][-1] == tok.eos_token_id


def test_bounded_head_equals_full_logits_values_and_gradients(tok):
    """T5's head reads the decoder output, scaled by d_model^-0.5 in the original T5: with and without that scaling,
    and with a head tied to the embeddings or not, the chunked divergence from what the head reads equals the
    divergence of the full logits, and so do the student's gradients. BART's head adds a bias: the probe says its
    logits are not linear, so the losses read full logits."""
    variants = [{}, {"scaled": True}, {"untied": True}]
    assert all(logits_are_linear(t5(tok, 0, **variant)) for variant in variants)
    assert logits_are_linear(t5(tok, 0).to(torch.bfloat16))  # the probe's tolerance follows the precision
    assert not logits_are_linear(bart(tok, 0))
    for variant in variants:
        student, teacher = t5(tok, 0, **variant), t5(tok, 1)
        prompts = [tok(p).input_ids for p in PROMPTS]
        batch = rollout(student, None, *left_pad(prompts, tok.pad_token_id), tokenizer=tok, max_new_tokens=6,
                        generator=torch.Generator().manual_seed(2))
        recipe = Recipe.model_validate({"teacher": {"name_or_path": "t"}, "data": {"path": "d.jsonl"}, "student": {
                                        "init": "config", "config_overrides": {"num_layers": 1}},
                                        "objective": {"divergence": "jsd", "chunk_size": 4}})
        values, grads = [], []
        for logits in (True, False):
            student.zero_grad()
            s = student_forward(student, batch, vocab=len(tok), logits=logits, hidden=False)
            t = teacher_forward(teacher, batch, vocab=len(tok), logits=logits, hidden=False)
            ctx = StepContext(num_tokens=batch.num_tokens, head="torch" if logits else "chunked")
            loss = divergence_loss(batch, s, t, recipe, ctx, {})
            loss.backward()
            values.append(loss.detach())
            grads.append(torch.cat([p.grad.flatten() for p in student.parameters() if p.grad is not None]))
        torch.testing.assert_close(values[0], values[1], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)
        assert student.get_output_embeddings().__class__.__name__ == "Linear"  # the head is back


@pytest.fixture(scope="module")
def t5_pair(tmp_path_factory):
    """A sharp tiny T5 teacher saved with its tokenizer, and news-shaped data with references."""
    root = tmp_path_factory.mktemp("t5")
    tok = t5_tokenizer()
    teacher = t5(tok, 0, layers=2)
    with torch.no_grad():
        teacher.lm_head.weight *= 30
    teacher.save_pretrained(root / "teacher")
    tok.save_pretrained(root / "teacher")
    data = root / "news.jsonl"
    with open(data, "w") as f:
        for i in range(48):
            f.write(json.dumps({"article": f"The Senate count {i} was finalised and the Greens won. " * 2,
                                "highlights": f"Greens win seat {i}."}) + "\n")
    return root / "teacher", data


SMALLER = "config_overrides: {num_layers: 1, num_decoder_layers: 1}"


def t5_recipe(tmp_path: Path, t5_pair, mode: str, student: str = f"init: config\n          {SMALLER}") -> Path:
    teacher_dir, data = t5_pair
    return write_recipe(tmp_path / f"{mode}.yaml", f"""
        teacher:
          name_or_path: {teacher_dir}
        student:
          {student}
        data:
          path: {data}
          eval_size: 8
          max_prompt_tokens: 40
          max_response_tokens: 12
        rollout:
          max_new_tokens: 10
        objective:
          mode: {mode}
        optim:
          lr: 1.0e-2
        train:
          max_steps: 16
          batch_size: 8
          seed: 5
          output_dir: {tmp_path / "out"}
        eval:
          max_samples: 8
          max_new_tokens: 10
          eval_steps: 8
        logging:
          live: false
    """)


@pytest.mark.parametrize("mode, overrides", [
    ("kd", ["objective.divergence=forward_kl"]),
    ("seqkd", []),
    ("sft", []),
    ("gkd", ["objective.lmbda=1.0", "objective.divergence=reverse_kl", "objective.backend=chunked"]),
    ("gkd", ["objective.lmbda=0.5", "objective.divergence=jsd", "rollout.alpha=0.3", "objective.backend=torch"]),
    ("pg", ["penalties.frequency=1.0", "penalties.diversity=0.1", "penalties.entropy=0.1"]),
])
def test_t5_pair_trains_in_every_mode(tmp_path, t5_pair, isolated_cache, mode, overrides):
    """The loss falls and the held-out KL(q || p) on the student's own samples falls (sft: its cross-entropy on
    the references falls; the random teacher does not write them); the export reloads as an encoder-decoder model
    with the same outputs."""
    result = distill(t5_recipe(tmp_path, t5_pair, mode), *overrides)
    rows = metrics_of(tmp_path / "out")
    evals = [r["eval/reverse_kl"] for r in rows if "eval/reverse_kl" in r]
    assert len(evals) == 3
    print(mode, overrides, evals, [r.get("eval/greedy/rougeL_teacher") for r in rows if "eval/reverse_kl" in r])
    if mode != "sft":  # (sft fits the references, which this random teacher does not write)
        assert evals[-1] < 0.5 * evals[0], evals
    divergence = [o.split("=")[1] for o in overrides if o.startswith("objective.divergence=")]
    key = {"seqkd": "train/ce", "sft": "train/ce", "pg": "pg/reward"}.get(mode) or f"train/{divergence[0]}"
    losses = [r[key] * (-1 if key == "pg/reward" else 1) for r in rows if key in r]
    assert sum(losses[-4:]) < sum(losses[:4]), losses
    reloaded = load_model(str(result.final_dir), "student").eval()
    assert reloaded.config.is_encoder_decoder
    ids = torch.tensor([[5, 6, 7, 0]])
    decoder = torch.tensor([[reloaded.config.decoder_start_token_id, 9]])
    torch.testing.assert_close(reloaded(input_ids=ids, decoder_input_ids=decoder).logits,
                               result.student.eval()(input_ids=ids, decoder_input_ids=decoder).logits)


def test_keys_that_need_a_decoder_only_model_are_errors(tmp_path, t5_pair, tiny_llama_dir, isolated_cache):
    with pytest.raises(ConfigError, match=r"student.init=teacher_layers: not available for encoder-decoder models"):
        distill(t5_recipe(tmp_path, t5_pair, "gkd", student="init: teacher_layers\n          layer_stride: 2"))
    path = t5_recipe(tmp_path, t5_pair, "gkd")
    for overrides, expected in [
        (["hidden.weight=1.0", "hidden.layers=[[1,2]]"], "hidden.weight > 0"),
        (["objective.prompt_weight=0.5"], "objective.prompt_weight"),
        (["train.trainable=[layers 1-1]"], "train.trainable with decoder layers or other"),
    ]:
        with pytest.raises(ConfigError, match=expected.replace(".", r"\.").replace("(", r"\(").replace(")", r"\)")):
            distill(path, *overrides)
    distill(path, "train.trainable=[embeddings, head]", "train.max_steps=2",  # parts without layer ranges work
            f"train.output_dir={tmp_path / 'parts'}")
    with pytest.raises(ConfigError, match="the teacher is an encoder-decoder model and the student a decoder-only"):
        distill(t5_recipe(tmp_path, t5_pair, "gkd", student=f"name_or_path: {tiny_llama_dir}"))


def test_a_t5_run_resumes_evaluates_and_trains_lora_adapters(tmp_path, t5_pair, isolated_cache):
    """seqkd on the teacher's cached completions, stopped and resumed, then the `evaluate` command on the run; a
    LoRA student of a pretrained T5 folder (peft's seq2seq task) trains its adapters only."""
    from onpolicy_kd.evaluate import main as evaluate_main

    path = t5_recipe(tmp_path, t5_pair, "seqkd")
    cached = ["teacher_text.cache=true", "train.save_steps=4"]
    distill(path, *cached, "train.max_steps=4")
    result = distill(path, *cached, "train.max_steps=8", "train.resume_from=latest")
    steps = [r["step"] for r in metrics_of(tmp_path / "out") if "train/loss" in r]
    assert steps == list(range(1, 9)), steps
    assert evaluate_main([str(tmp_path / "out"), "eval.max_samples=4", "eval.full=true"]) == 0
    summary = json.loads((tmp_path / "out" / "eval" / "metrics.json").read_text())
    assert summary["reverse_kl_samples"] >= 0 and summary["ppl_student"] > 1 and "forward_kl_refs" in summary

    (tmp_path / "lora").mkdir()
    lora = t5_recipe(tmp_path / "lora", t5_pair, "gkd", student=f"name_or_path: {result.final_dir}")
    before = load_model(str(result.final_dir), "student").state_dict()
    trained = distill(lora, "student.lora={r: 4, target_modules: [q, v]}", "train.max_steps=4")
    exported = load_model(str(trained.final_dir), "student").state_dict()
    changed = [k for k in before if not torch.equal(before[k], exported[k])]
    assert changed and all(k.endswith((".q.weight", ".v.weight")) for k in changed), changed  # adapters merged


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ddp_2proc", "zero3_2proc"])
def test_a_t5_pair_under_two_processes(name, tmp_path, t5_pair, isolated_cache):
    """On-policy gkd on the T5 pair under 2-process DDP (the chunked head: the lm_head swapped for one forward inside
    DDP) and ZeRO-3 (sharded weights gathered for decoding): both ranks train, the export reloads."""
    from test_distributed_train import LAUNCHES, launch

    config, processes, env_extra, _ = LAUNCHES[name]
    run = launch(config, processes, env_extra, t5_recipe(tmp_path, t5_pair, "gkd"), "train.max_steps=3",
                 "train.batch_size=2", "eval.max_samples=4", "eval.eval_steps=0", "objective.lmbda=1.0")
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    assert "lm head: chunked" in run.stdout
    state = json.loads(next((tmp_path / "out" / "checkpoints").iterdir()).joinpath("trainer_state.json").read_text())
    assert state["num_processes"] == 2 and state["step"] == 3
    assert load_model(str(tmp_path / "out" / "final"), "student").config.is_encoder_decoder
