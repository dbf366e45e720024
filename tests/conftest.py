"""Tiny models and tokenizers built offline from configs, shared by the tests.

The tokenizer is a byte-level BPE trained in memory on a few sentences (GPT-2 style: EOS
`<|endoftext|>` and no pad token), so tests need no download and exercise the pad == eos case.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import textwrap
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    """Under scripts/mutation.py the quickest tests run first. mutmut names the mutant in MUTANT_UNDER_TEST and runs
    `pytest -x` on the tests that reach the changed function, in no set order, from its mutants/ copy, where
    mutmut-stats.json holds each test's time: the first failure ends the run, so a mutant that a quick test kills
    no longer waits for the tests that train a model. Every other run keeps pytest's order."""
    if "__mutmut_" not in os.environ.get("MUTANT_UNDER_TEST", ""):
        return
    stats = Path("mutmut-stats.json")
    if stats.exists():
        seconds = _test_seconds(str(stats.resolve()), stats.stat().st_mtime)
        items.sort(key=lambda item: seconds.get(item.nodeid, 0.0))


@functools.lru_cache(maxsize=1)
def _test_seconds(path: str, mtime: float) -> dict[str, float]:
    return json.loads(Path(path).read_text())["duration_by_test"]


CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Summary: markets rose today as investors cheered the news.",
    "Instruction: answer the question. Context: the sky is blue. Response: blue.",
    "A bushfire near the town forced hundreds of people from their homes.",
    "The Senate count was finalised and the Greens won a second seat.",
    "Hello world! How are you today? I am fine, thank you.",
] * 20


def train_tokenizer(corpus: list[str], vocab_size: int = 300, chat_template: bool = False):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|user|>", "<|assistant|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    if chat_template:
        fast.chat_template = (
            "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|endoftext|>{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}"
        )
    return fast



def recipe(**sections):
    """A recipe for the loss functions' tests: a stand-in teacher and data (never loaded), the given sections."""
    from onpolicy_kd.recipe import Recipe

    base = {"teacher": {"name_or_path": "t"}, "student": {"init": "config", "config_overrides": {"num_hidden_layers": 1}},
            "data": {"path": "d.jsonl"}}
    return Recipe.model_validate({**base, **sections})

@pytest.fixture(scope="session")
def tiny_tokenizer():
    return train_tokenizer(CORPUS, chat_template=True)


def llama_config(vocab_size: int, layers: int = 4, hidden: int = 32):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False,
        bos_token_id=0, eos_token_id=0, pad_token_id=None,
    )


def tiny_student_and_teacher(tokenizer, layers: int = 2):
    """Two tiny random Llamas over `tokenizer` (student seed 0, teacher seed 1), in eval mode."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    student = AutoModelForCausalLM.from_config(llama_config(len(tokenizer), layers=layers)).eval()
    torch.manual_seed(1)
    teacher = AutoModelForCausalLM.from_config(llama_config(len(tokenizer), layers=layers)).eval()
    return student, teacher


def save_tiny_llama(path: Path, tokenizer, layers: int = 4, hidden: int = 32, seed: int = 0, extra_rows: int = 0) -> Path:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(llama_config(len(tokenizer) + extra_rows, layers, hidden))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama"), tiny_tokenizer, layers=4)


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    from transformers import AutoModelForCausalLM, GPT2Config

    path = tmp_path_factory.mktemp("tiny_gpt2")
    torch.manual_seed(1)
    config = GPT2Config(vocab_size=len(tiny_tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=256,
                        bos_token_id=0, eos_token_id=0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch) -> Path:
    """Point the project's cache (tokenised data, ${cache:...}) at a fresh folder."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("ONPOLICY_KD_CACHE_DIR", str(cache))
    return cache


@pytest.fixture(autouse=True)
def signal_handlers_left_as_found():
    """Every test leaves SIGINT and SIGTERM as it found them: a handler left behind (a run's StopRequested, a
    library's) would swallow a later test's Ctrl-C, and a notebook user's. The test that leaks fails, not a later one."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield
    leaked = {sig.name: signal.getsignal(sig) for sig in saved if signal.getsignal(sig) != saved[sig]}
    for sig, handler in saved.items():
        signal.signal(sig, handler)
    assert not leaked, f"the test left these signal handlers installed: {leaked}"


def record_token_terms_chunk_sizes(monkeypatch) -> list[int]:
    """Every chunk_size token_terms is called with, in order (it still runs): the values are the same at any size,
    so a caller that drops objective.chunk_size (the default 1024 instead) shows only here."""
    from onpolicy_kd.objectives import token_terms as tt

    seen, real = [], tt.token_terms
    monkeypatch.setattr(tt, "token_terms", lambda *a, **k: seen.append(a[4] if len(a) > 4 else k["chunk_size"])
                        or real(*a, **k))
    return seen


def write_recipe(path: Path, body: str) -> Path:
    path.write_text(textwrap.dedent(body).lstrip(), encoding="utf-8")
    return path


@pytest.fixture
def tiny_recipe(tmp_path, tiny_llama_dir, isolated_cache) -> Path:
    """A valid recipe over the tiny Llama and a small CNN/DailyMail-shaped jsonl."""
    import json

    data = tmp_path / "cnn.jsonl"
    with open(data, "w") as f:
        for i in range(20):
            f.write(json.dumps({"article": f"The Senate count was finalised {i} times. " * 3, "highlights": f"Count {i}."}) + "\n")
    return write_recipe(tmp_path / "tiny.yaml", f"""
        teacher:
          name_or_path: {tiny_llama_dir}
        student:
          init: teacher_layers
          layer_stride: 2
        data:
          path: {data}
          eval_size: 4
          max_prompt_tokens: 64
        train:
          max_steps: 2
          batch_size: 2
          output_dir: {tmp_path / "out"}
    """)


@pytest.fixture(scope="session")
def far_pair(tmp_path_factory):
    """A teacher with sharp (peaked) next-token distributions and data with references."""
    root = tmp_path_factory.mktemp("far")
    tok = train_tokenizer(CORPUS, chat_template=True)
    teacher_dir = save_tiny_llama(root / "teacher", tok, layers=3, hidden=32, seed=0)
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
    with torch.no_grad():
        teacher.lm_head.weight *= 20
    teacher.save_pretrained(teacher_dir)
    data = root / "news.jsonl"
    with open(data, "w") as f:
        for i in range(64):
            f.write(json.dumps({"article": f"The Senate count {i} was finalised and the Greens won. " * 2,
                                "highlights": f"Greens win seat {i}."}) + "\n")
    return teacher_dir, data
