"""Students that are not transformers models: a plain torch module through the wrapper, the Python API, and a
Distillation file on the command line (the example's nanoGPT, shrunk)."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from onpolicy_kd import distill
from onpolicy_kd.errors import ConfigError, ModelLoadError
from onpolicy_kd.models.loading import load_model
from onpolicy_kd.models.module_lm import MODULE_FILE, ModuleLM
from onpolicy_kd.rollout.engine import rollout
from onpolicy_kd.train import main as train_main

from module_from_file import module_from_file
from test_api import ROWS, recipe_dict
from test_train import metrics_of

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "nanogpt" / "distill.py"


def example_module():
    return module_from_file("nanogpt_example", EXAMPLE)


def tiny_nanogpt(vocab: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return example_module().NanoGPT(vocab, n_layer=2, n_head=2, n_embd=16, block_size=128)


@pytest.fixture
def teacher_and_tokenizer(far_pair):
    teacher_dir, _ = far_pair
    return AutoModelForCausalLM.from_pretrained(teacher_dir), AutoTokenizer.from_pretrained(teacher_dir)


class BiasHead(nn.Module):
    """Logits through a head with a bias, hidden states offered: the bounded head must not be used."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.embed, self.head = nn.Embedding(vocab, 8), nn.Linear(8, vocab)

    def forward(self, input_ids, attention_mask, output_hidden_states=False):
        h = self.embed(input_ids)
        return (self.head(h), (h, h)) if output_hidden_states else self.head(h)


class LogitsOnly(nn.Module):
    """The smallest contract: (input_ids, attention_mask) -> logits, nothing else."""

    def __init__(self, vocab: int, flatten: bool = False) -> None:
        super().__init__()
        self.embed, self.head, self.flatten = nn.Embedding(vocab, 8), nn.Linear(8, vocab, bias=False), flatten

    def forward(self, input_ids, attention_mask):
        logits = self.head(self.embed(input_ids))
        return logits.flatten(0, 1) if self.flatten else {"logits": logits}


def test_the_wrapper_reads_sizes_and_the_head_from_a_probe(tiny_tokenizer):
    module = tiny_nanogpt(len(tiny_tokenizer))
    before = {k: v.clone() for k, v in module.state_dict().items()}
    model = ModuleLM(module)
    assert all(torch.equal(v, before[k]) for k, v in module.state_dict().items())  # never re-initialised
    assert (model.config.vocab_size, model.config.hidden_size, model.config.num_hidden_layers) == (len(tiny_tokenizer), 16, 2)
    assert model.config.max_position_embeddings == 128
    assert model.get_output_embeddings().weight is module.lm_head.weight  # tied head found, exactly linear
    assert model.get_input_embeddings() is module.wte
    ids = torch.randint(0, len(tiny_tokenizer), (2, 7))
    mask = torch.ones_like(ids)
    out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, logits_to_keep=3)
    torch.testing.assert_close(out.logits, module(ids, mask)[:, -3:])
    assert len(out.hidden_states) == 3
    torch.testing.assert_close(out.hidden_states[-1] @ module.lm_head.weight.T, module(ids, mask))

    assert ModuleLM(BiasHead(len(tiny_tokenizer))).get_output_embeddings() is None  # full logits for this one
    no_hidden = ModuleLM(LogitsOnly(len(tiny_tokenizer)))
    assert no_hidden.get_output_embeddings() is None and no_hidden.config.num_hidden_layers == 0
    with pytest.raises(ModelLoadError, match="no output_hidden_states argument"):
        no_hidden(input_ids=ids, attention_mask=mask, output_hidden_states=True)


def test_modules_that_break_the_contract_are_clear_errors(tiny_tokenizer):
    with pytest.raises(ModelLoadError, match=r"returned logits of shape \(2, 10\)"):
        ModuleLM(LogitsOnly(10, flatten=True))
    with pytest.raises(ModelLoadError, match="failed on a \\(1, 2\\) batch"):
        ModuleLM(nn.Linear(3, 3))
    with pytest.raises(ModelLoadError, match="no parameters"):
        ModuleLM(nn.Identity())


def test_decoding_by_full_forwards_is_exact(tiny_tokenizer):
    """The token-history "cache" gives what a naive loop of full forwards gives, sampled or greedy, and a prompt in a
    left-padded batch decodes as it does alone."""
    tok = tiny_tokenizer
    tok.pad_token, tok.padding_side = tok.eos_token, "left"
    module = tiny_nanogpt(len(tok), seed=3).eval()
    model = ModuleLM(module)
    enc = tok(["The quick brown fox jumps", "Hello"], return_tensors="pt", padding=True)
    sampled = rollout(model, None, enc.input_ids, enc.attention_mask, tokenizer=tok, max_new_tokens=6,
                      temperature=1.3, eos_token_ids=[-1], generator=torch.Generator().manual_seed(0))
    ids, mask, logps = enc.input_ids, enc.attention_mask, []
    with torch.no_grad():
        for t in range(6):
            lp = torch.log_softmax(module(ids, mask)[:, -1].double() / 1.3, -1)
            nxt = sampled.completion_ids[:, t]
            logps.append(lp.gather(-1, nxt[:, None]).squeeze(-1))
            ids, mask = torch.cat([ids, nxt[:, None]], 1), torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    torch.testing.assert_close(sampled.student_logprobs.double(), torch.stack(logps, 1), atol=1e-5, rtol=1e-5)

    batch = rollout(model, None, enc.input_ids, enc.attention_mask, tokenizer=tok, max_new_tokens=5, do_sample=False,
                    eos_token_ids=[-1])
    alone = tok(["Hello"], return_tensors="pt")
    single = rollout(model, None, alone.input_ids, alone.attention_mask, tokenizer=tok, max_new_tokens=5,
                     do_sample=False, eos_token_ids=[-1])
    assert torch.equal(batch.completion_ids[1], single.completion_ids[0])


def test_a_plain_module_through_the_api(tmp_path, teacher_and_tokenizer, isolated_cache, capsys):
    teacher, tokenizer = teacher_and_tokenizer
    module = tiny_nanogpt(len(tokenizer))
    result = distill(recipe_dict(tmp_path, train={"max_steps": 30, "batch_size": 4, "seed": 5,
                                                   "output_dir": str(tmp_path / "out")}, optim={"lr": 1e-2}),
                     teacher=teacher, student=module, tokenizer=tokenizer, train_data=ROWS)
    assert result.steps == 30
    assert isinstance(result.student, ModuleLM) and result.student.net is module  # trained in place
    assert result.after["eval/reverse_kl"] < result.before["eval/reverse_kl"] - 0.3
    assert "lm head: chunked" in capsys.readouterr().out  # the tied head is linear: the memory-bounded head is used
    marker = json.loads((result.final_dir / MODULE_FILE).read_text())
    assert marker["distillation"] is None and marker["tied"] == {"lm_head.weight": "wte.weight"}
    with pytest.raises(ModelLoadError, match="given to the Python API"):
        load_model(str(result.final_dir), "student")


def distillation_file(tmp_path: Path, far_pair, body: str = "") -> Path:
    teacher_dir, data = far_pair
    recipe = recipe_dict(tmp_path, teacher={"name_or_path": str(teacher_dir)},
                         data={"path": str(data), "eval_size": 8, "max_prompt_tokens": 40, "max_response_tokens": 12},
                         optim={"lr": 1e-2})
    path = tmp_path / "my_distill.py"
    vocab = len(AutoTokenizer.from_pretrained(teacher_dir))
    path.write_text(textwrap.dedent(f"""
        import importlib.util
        from onpolicy_kd import Distillation

        spec = importlib.util.spec_from_file_location("nanogpt_example", {str(EXAMPLE)!r})
        example = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(example)


        class Tiny(Distillation):
            recipe = {recipe!r}
            overrides = ["train.max_steps=2"]

            def student(self, state_dict=None):
                model = example.NanoGPT({vocab}, n_layer=2, n_head=2, n_embd=16, block_size=128)
                if state_dict is not None:
                    model.load_state_dict(state_dict)
                return model
        """) + textwrap.dedent(body))
    return path


def test_a_distillation_file_on_the_command_line(tmp_path, far_pair, isolated_cache):
    path = distillation_file(tmp_path, far_pair)
    assert train_main([str(path), "--dry-run"]) == 0
    assert train_main([str(path), "train.max_steps=3", "train.save_steps=3"]) == 0
    final = tmp_path / "out" / "final"
    recipe = (final / "recipe.yaml").read_text()
    assert "init: python" in recipe and f"{path}:Tiny" in recipe
    steps = [r for r in metrics_of(tmp_path / "out") if "train/loss" in r]
    assert len(steps) == 3  # the command line's override wins over the class's

    reloaded = load_model(str(final), "student")  # rebuilt by Tiny.student(state_dict=...), tied head restored
    assert isinstance(reloaded, ModuleLM) and reloaded.net.lm_head.weight is reloaded.net.wte.weight
    assert [c.name for c in (tmp_path / "out" / "checkpoints").glob("checkpoint-*")] == ["checkpoint-0000003"]
    from safetensors.torch import load_file
    saved = load_file(str(final / "model.safetensors"))
    for key, value in reloaded.state_dict().items():
        torch.testing.assert_close(value, saved.get(key, saved.get("net.wte.weight")))

    # resume from the checkpoint (the tied head was saved once) and train on
    assert train_main([str(path), "train.max_steps=5", "train.save_steps=3", "train.resume_from=latest"]) == 0
    steps = [r for r in metrics_of(tmp_path / "out") if "train/loss" in r]
    assert [r["step"] for r in steps][-2:] == [4, 5]

    from onpolicy_kd.evaluate import main as evaluate_main
    assert evaluate_main([str(tmp_path / "out"), "eval.max_samples=4"]) == 0
    assert (tmp_path / "out" / "eval" / "metrics.json").is_file()


def test_a_distillation_files_data_and_mistakes(tmp_path, far_pair, isolated_cache, capsys):
    path = distillation_file(tmp_path, far_pair, """
        class Rows(Tiny):
            def dataset(self, split):
                return [{"prompt": f"Question {i}: who won?", "completion": f" Seat {i}."} for i in range(16)] \\
                    if split == "train" else None
        """)
    assert train_main([str(path)]) == 2  # two subclasses, none named
    assert "exactly one subclass of onpolicy_kd.Distillation, found ['Rows', 'Tiny']" in capsys.readouterr().err
    assert train_main([f"{path}:Rows", "train.max_steps=1"]) == 0
    assert "<in-memory dataset>" in (tmp_path / "out" / "final" / "recipe.yaml").read_text()
    from onpolicy_kd.evaluate import main as evaluate_main
    assert evaluate_main([str(tmp_path / "out"), "eval.max_samples=4"]) == 0  # the file's rows again
    predictions = (tmp_path / "out" / "eval" / "predictions.jsonl").read_text()
    assert "Question" in predictions and "Senate" not in predictions
    assert train_main([f"{path}:Nope"]) == 2
    assert "no Distillation subclass named 'Nope'" in capsys.readouterr().err
    assert train_main([f"{path}:Tiny", "student.gradient_checkpointing=true"]) == 2
    assert "apply to transformers models only" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="plain torch module"):
        distill(recipe_dict(tmp_path, student={"gradient_checkpointing": True}), teacher=AutoModelForCausalLM.
                from_pretrained(far_pair[0]), student=tiny_nanogpt(300), tokenizer=AutoTokenizer.from_pretrained(
                    far_pair[0]), train_data=ROWS)


def test_hidden_state_distillation_reads_the_modules_hidden_states(tmp_path, teacher_and_tokenizer, isolated_cache):
    teacher, tokenizer = teacher_and_tokenizer
    result = distill(recipe_dict(tmp_path, hidden={"weight": 0.5}), "train.max_steps=2",
                     teacher=teacher, student=tiny_nanogpt(len(tokenizer)), tokenizer=tokenizer, train_data=ROWS)
    assert result.stitching is not None and len(result.stitching.pairs) >= 1
    losses = [r for r in metrics_of(tmp_path / "out") if "train/loss" in r]
    assert all("train/hidden" in json.dumps(r) for r in losses)
