"""Data: each format auto-detected from a small local file, truncation that keeps the instruction, the cache."""

from __future__ import annotations

import json
import time

import pandas as pd
import pytest

from onpolicy_kd.recipe import DataConfig
from onpolicy_kd.data.loading import load_prompt_data
from onpolicy_kd.errors import DataError
from onpolicy_kd.data.prompts import PromptBuilder, detect_format

ARTICLE = "A bushfire near the town forced hundreds of people from their homes. " * 3


def _jsonl(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


@pytest.fixture
def files(tmp_path):
    n = 12
    out = {
        "cnn": _jsonl(tmp_path / "cnn.jsonl", [{"article": f"{ARTICLE} {i}", "highlights": f"Fire {i}.", "id": str(i)} for i in range(n)]),
        "dolly": tmp_path / "dolly.json",
        "chat": _jsonl(tmp_path / "chat.jsonl", [
            {"messages": [{"role": "user", "content": f"Hello {i}?"}, {"role": "assistant", "content": "I am fine."}]}
            for i in range(n)
        ]),
        "text": tmp_path / "plain.txt",
        "xsum": tmp_path / "xsum.csv",
        "prompt_completion": tmp_path / "pc.parquet",
    }
    out["dolly"].write_text(json.dumps([
        {"instruction": f"Answer the question {i}.", "context": "The sky is blue.", "response": "Blue.", "category": "qa"}
        for i in range(n)
    ]))
    out["text"].write_text("\n".join(f"The quick brown fox jumps over the lazy dog {i} times today." for i in range(n)))
    pd.DataFrame({"document": [ARTICLE] * n, "summary": ["Fire."] * n, "id": range(n)}).to_csv(out["xsum"], index=False)
    pd.DataFrame({"prompt": [f"Say hello {i}" for i in range(n)], "completion": ["Hello."] * n}).to_parquet(out["prompt_completion"])
    return out


EXPECTED = {
    "cnn": ("summarization", {"document": "article", "reference": "highlights"}),
    "xsum": ("summarization", {"document": "document", "reference": "summary"}),
    "dolly": ("instruction", {"instruction": "instruction", "context": "context", "reference": "response"}),
    "prompt_completion": ("instruction", {"instruction": "prompt", "reference": "completion"}),
    "chat": ("chat", {"messages": "messages"}),
    "text": ("text", {"text": "text"}),
}


@pytest.mark.parametrize("kind", list(EXPECTED))
def test_format_auto_detected_from_local_file(kind, files, tiny_tokenizer, isolated_cache):
    cfg = DataConfig(path=str(files[kind]), eval_size=2, max_prompt_tokens=64, text_prompt_tokens=5)
    data = load_prompt_data(cfg, tiny_tokenizer)
    name, columns = EXPECTED[kind]
    assert data.task.name == name and data.task.columns == columns
    assert len(data.train) == 10 and len(data.eval) == 2
    row = data.train[0]
    assert row["prompt_ids"] and len(row["prompt_ids"]) <= 64
    if kind != "text":
        assert row["reference_ids"][-1] == tiny_tokenizer.eos_token_id  # references end with EOS
    else:
        assert row["reference"]  # the continuation of the prefix


def _add_special_tokens(tokenizer, single: str) -> None:
    """Make `tokenizer` put <|endoftext|> around every text as `single` says ("<|endoftext|> $A": a BOS in front, as
    Llama's tokenizer does; "<|endoftext|> $A <|endoftext|>": both sides, as BART's)."""
    from tokenizers import processors

    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=single, special_tokens=[("<|endoftext|>", tokenizer.bos_token_id)])


def test_prompt_texts(files, tiny_tokenizer, isolated_cache):
    cnn = load_prompt_data(DataConfig(path=str(files["cnn"]), eval_size=2), tiny_tokenizer).train[0]
    assert cnn["prompt"].startswith("A bushfire") and cnn["prompt"].endswith("\n\nSummary:")
    assert cnn["reference"].startswith("Fire")
    chat = load_prompt_data(DataConfig(path=str(files["chat"]), eval_size=2), tiny_tokenizer).train[0]
    assert chat["prompt"].startswith("<|user|>Hello") and chat["prompt"].endswith("<|assistant|>")
    assert chat["reference"] == "I am fine."
    dolly = load_prompt_data(DataConfig(path=str(files["dolly"]), eval_size=2), tiny_tokenizer).train[0]
    assert "Answer the question" in dolly["prompt"] and "The sky is blue." in dolly["prompt"]


def test_explicit_columns_and_missing_column(files, tiny_tokenizer, isolated_cache):
    cfg = DataConfig(path=str(files["dolly"]), format="summarization", columns={"document": "context"}, eval_size=2)
    assert load_prompt_data(cfg, tiny_tokenizer).task.columns == {"document": "context"}
    with pytest.raises(DataError, match=r"needs the field\(s\) \['document'\].*data.columns.document="):
        load_prompt_data(DataConfig(path=str(files["dolly"]), format="summarization", eval_size=2), tiny_tokenizer)
    with pytest.raises(DataError, match="column 'body', which the dataset lacks"):
        load_prompt_data(DataConfig(path=str(files["cnn"]), columns={"document": "body"}, eval_size=2), tiny_tokenizer)


def test_undetectable_columns(tmp_path, tiny_tokenizer, isolated_cache):
    path = _jsonl(tmp_path / "odd.jsonl", [{"foo": "a", "bar": "b"}] * 5)
    with pytest.raises(DataError, match="cannot tell the task format from the columns"):
        load_prompt_data(DataConfig(path=str(path), eval_size=1), tiny_tokenizer)


@pytest.mark.parametrize("chat_template", [False, True])
def test_truncation_keeps_the_instruction(tiny_tokenizer, chat_template):
    task = detect_format(["article", "highlights"])
    template = "Summarize the article.\n\n{document}\n\nSummary:"
    builder = PromptBuilder(tiny_tokenizer, task, template=template, chat_template=chat_template, max_prompt_tokens=40)
    row = builder({"article": ARTICLE * 5, "highlights": "Fire."})
    assert row["truncated"] and len(row["prompt_ids"]) == 40
    assert row["prompt"].startswith(("Summarize the article.", "<|user|>Summarize the article."))
    assert row["prompt"].endswith("Summary:<|endoftext|><|assistant|>" if chat_template else "\n\nSummary:")
    assert "A bushfire" in row["prompt"]  # the article's start is kept, its end is cut
    short = builder({"article": "Short.", "highlights": "Fire."})
    assert not short["truncated"] and "Short." in short["prompt"]


def test_truncation_of_a_bare_prompt_keeps_its_end(tiny_tokenizer):
    builder = PromptBuilder(tiny_tokenizer, detect_format(["prompt", "completion"]), max_prompt_tokens=30)
    row = builder({"prompt": "word " * 40 + "Question: what colour is the sky?", "completion": "Blue."})
    assert row["truncated"] and len(row["prompt_ids"]) == 30
    assert row["prompt"].endswith("Question: what colour is the sky?") and row["prompt"].count("word") < 40  # the start was cut


def test_template_too_long_for_budget(tiny_tokenizer):
    builder = PromptBuilder(tiny_tokenizer, detect_format(["article"]), template="x " * 40 + "{document}", max_prompt_tokens=10)
    with pytest.raises(DataError, match="leaves no room for the text.*raise data.max_prompt_tokens"):
        builder({"article": ARTICLE})


def test_template_with_unknown_field(tiny_tokenizer):
    with pytest.raises(DataError, match=r"data.template uses \['body'\]"):
        PromptBuilder(tiny_tokenizer, detect_format(["article"]), template="{body}")
    with pytest.raises(DataError, match=r"^data.truncate_field='reference': a template shows the reference whole, so "
                                        r"it cannot be the field cut to fit; cut one of \['document'\]$"):
        PromptBuilder(tiny_tokenizer, detect_format(["article", "highlights"]), template="{document} Like: {reference}",
                      truncate_field="reference")


def test_chat_drops_oldest_turns_first(tiny_tokenizer):
    builder = PromptBuilder(tiny_tokenizer, detect_format(["messages"]), max_prompt_tokens=30)
    turns = [{"role": "user", "content": f"old question number {i} " * 3} for i in range(6)]
    row = builder({"messages": [*turns, {"role": "user", "content": "Last question?"}, {"role": "assistant", "content": "Yes."}]})
    assert row["truncated"] and len(row["prompt_ids"]) <= 30
    assert row["prompt"].endswith("Last question?<|endoftext|><|assistant|>") and row["reference"] == "Yes."


def test_cache_hit_on_second_load(files, tiny_tokenizer, isolated_cache, monkeypatch):
    cfg = DataConfig(path=str(files["cnn"]), eval_size=2, max_prompt_tokens=48)
    first = load_prompt_data(cfg, tiny_tokenizer)
    assert first.cache_hits == {"train": False, "eval": False}

    def must_not_run(self, row):
        raise AssertionError("tokenised again despite a cache hit")

    monkeypatch.setattr(PromptBuilder, "__call__", must_not_run)
    second = load_prompt_data(cfg, tiny_tokenizer)
    assert second.cache_hits == {"train": True, "eval": True}
    assert second.train["prompt_ids"] == first.train["prompt_ids"]
    assert list((isolated_cache / "data" / "tokenized").glob("*.arrow"))
    # Another length limit is another cache entry: a miss, which must tokenise (and here, fail loudly).
    with pytest.raises(AssertionError, match="tokenised again"):
        load_prompt_data(cfg.model_copy(update={"max_prompt_tokens": 40}), tiny_tokenizer)


def test_eval_holdout_and_slices(files, tiny_tokenizer, isolated_cache):
    held = load_prompt_data(DataConfig(path=str(files["cnn"]), eval_size=0.25), tiny_tokenizer, seed=1)
    assert len(held.eval) == 3 and len(held.train) == 9
    assert not set(held.train["prompt"]) & set(held.eval["prompt"])
    again = load_prompt_data(DataConfig(path=str(files["cnn"]), eval_size=0.25), tiny_tokenizer, seed=1)
    assert again.eval["prompt"] == held.eval["prompt"]  # same seed, same split
    sliced = load_prompt_data(DataConfig(path=str(files["cnn"]), split="train[:8]", eval_split="train[8:10]"), tiny_tokenizer)
    assert len(sliced.train) == 8 and len(sliced.eval) == 2
    with pytest.raises(DataError, match="holds out 12 of only 12 rows"):
        load_prompt_data(DataConfig(path=str(files["cnn"]), eval_size=12), tiny_tokenizer)


def test_unreachable_hub_dataset(tiny_tokenizer, isolated_cache):
    started = time.perf_counter()
    with pytest.raises(DataError, match="(?s)cannot load the dataset 'onpolicy-kd-test/none'.*set data.path to that file"):
        load_prompt_data(DataConfig(path="onpolicy-kd-test/none", name="1.0"), tiny_tokenizer)
    assert time.perf_counter() - started < 30


def test_missing_local_file(tmp_path, tiny_tokenizer):
    with pytest.raises(DataError, match="local path does not exist"):
        load_prompt_data(DataConfig(path=str(tmp_path / "none.jsonl")), tiny_tokenizer)


# --- TRL's dataset formats ------------------------------------------------------------------------------------------

def _user(text):
    return [{"role": "user", "content": text}]


def _assistant(text):
    return [{"role": "assistant", "content": text}]


TRL_ROWS = {  # TRL's formats for language modelling / prompt-completion, a row each (12 rows per file below)
    "standard_prompt_completion": lambda i: {"prompt": f"The sky is {i}", "completion": " blue."},
    "standard_prompt_only": lambda i: {"prompt": f"The sky is {i}"},
    "conversational_prompt_completion": lambda i: {"prompt": _user(f"What color is the sky {i}?"),
                                                   "completion": _assistant("It is blue.")},
    "conversational_prompt_only": lambda i: {"prompt": _user(f"What color is the sky {i}?")},
    "conversational_messages": lambda i: {"messages": _user(f"What color is the sky {i}?") + _assistant("It is blue.")},
    "sharegpt_from_value": lambda i: {"conversations": [{"from": "user", "value": f"What color is the sky {i}?"},
                                                        {"from": "assistant", "value": "It is blue."}]},
}


@pytest.mark.parametrize("kind", list(TRL_ROWS))
def test_trl_dataset_formats(kind, tmp_path, tiny_tokenizer, isolated_cache):
    path = _jsonl(tmp_path / f"{kind}.jsonl", [TRL_ROWS[kind](i) for i in range(12)])
    data = load_prompt_data(DataConfig(path=str(path), split="train[:10]", eval_split="train[10:]"), tiny_tokenizer)
    row = data.train[3]
    if kind.startswith("standard"):  # plain text: the prompt as written, TRL's completion as the reference
        assert data.task.name == "instruction" and row["prompt"] == "The sky is 3"
        assert row["reference"] == (" blue." if kind.endswith("completion") else "")
        return
    # conversational: rendered by the chat template (never as Python text), the assistant turn as the reference
    assert data.task.name == "chat"
    assert row["prompt"] == tiny_tokenizer.apply_chat_template(_user("What color is the sky 3?"), tokenize=False,
                                                               add_generation_prompt=True)
    assert "{'role'" not in row["prompt"] and "'content'" not in row["prompt"]
    assert row["reference"] == ("" if kind == "conversational_prompt_only" else "It is blue.")
    assert row["reference_ids"][-1:] == ([tiny_tokenizer.eos_token_id] if row["reference"] else [])


def test_conversational_data_with_a_text_format_is_an_error(tmp_path, tiny_tokenizer, isolated_cache):
    path = _jsonl(tmp_path / "conv.jsonl", [TRL_ROWS["conversational_prompt_completion"](i) for i in range(6)])
    with pytest.raises(DataError, match="data.format=instruction, but column 'prompt' holds lists of messages.*data.format=chat"):
        load_prompt_data(DataConfig(path=str(path), format="instruction", eval_size=2), tiny_tokenizer)
    with pytest.raises(DataError, match=r"data.columns names the field\(s\) \['question'\], which no format has"):
        load_prompt_data(DataConfig(path=str(path), columns={"question": "prompt"}, eval_size=2), tiny_tokenizer)


def test_conversational_data_needs_a_chat_template(tmp_path, tiny_tokenizer, isolated_cache):
    import copy

    plain = copy.deepcopy(tiny_tokenizer)
    plain.chat_template = None
    path = _jsonl(tmp_path / "conv.jsonl", [TRL_ROWS["conversational_prompt_only"](i) for i in range(6)])
    with pytest.raises(DataError, match="rendered with the tokenizer's chat template.*has none"):
        load_prompt_data(DataConfig(path=str(path), eval_size=2), plain)


# --- the prompt builder's formats, exactly (found by mutation testing: scripts/mutation.py) -----------------------


def _render(*messages: tuple[str, str]) -> str:
    """The tiny tokenizer's chat template by hand (tests/conftest.py), with the generation prompt."""
    return "".join(f"<|{role}|>{content}<|endoftext|>" for role, content in messages) + "<|assistant|>"


def test_a_conversation_that_fits_is_rendered_whole_with_its_system_message(tiny_tokenizer):
    conversation = [("system", "Be brief."), ("user", "Hello world!"), ("assistant", "I am fine."),
                    ("user", "How are you today?")]
    expected = _render(*conversation)
    length = len(tiny_tokenizer(expected, add_special_tokens=False).input_ids)
    builder = PromptBuilder(tiny_tokenizer, detect_format(["messages"]), max_prompt_tokens=length)  # exactly fits
    row = builder({"messages": [{"role": r, "content": c} for r, c in conversation]
                   + [{"role": "assistant", "content": "Thank you."}]})
    assert row["prompt"] == expected and not row["truncated"]
    assert row["reference"] == "Thank you." and row["references"] == ["Thank you."]
    unanswered = builder({"messages": [{"role": r, "content": c} for r, c in conversation]})
    assert unanswered["prompt"] == expected and unanswered["references"] == [] and unanswered["reference"] == ""


def test_a_long_conversation_loses_its_oldest_turns_but_not_its_system_message(tiny_tokenizer):
    conversation = [("system", "Be brief."), ("user", "Hello world! " * 4), ("assistant", "I am fine. " * 4),
                    ("user", "How are you today?")]
    kept = _render(("system", "Be brief."), ("user", "How are you today?"))
    builder = PromptBuilder(tiny_tokenizer, detect_format(["messages"]),
                            max_prompt_tokens=len(tiny_tokenizer(kept, add_special_tokens=False).input_ids))
    row = builder({"messages": [{"role": r, "content": c} for r, c in conversation]})
    assert row["prompt"] == kept and row["truncated"]


def test_one_long_message_keeps_its_start(tiny_tokenizer):
    conversational = {"prompt": [{"role": "user", "content": "Hello world! How are you today? " * 5}],
                      "completion": [{"role": "assistant", "content": "Fine."}]}
    builder = PromptBuilder(tiny_tokenizer, detect_format(["prompt", "completion"], example=conversational),
                            max_prompt_tokens=12)
    row = builder(conversational)
    assert row["truncated"] and len(row["prompt_ids"]) == 12
    assert row["prompt"].startswith("<|user|>Hello world") and row["prompt"].endswith("<|endoftext|><|assistant|>")
    assert row["reference"] == "Fine."


def test_a_system_message_and_one_long_question_keep_both(tiny_tokenizer):
    """Only older turns are dropped: with a system message and one question, the question's own text is cut."""
    builder = PromptBuilder(tiny_tokenizer, detect_format(["messages"]), max_prompt_tokens=30)
    row = builder({"messages": [{"role": "system", "content": "Be brief."},
                                {"role": "user", "content": "Hello world! How are you today? " * 5}]})
    assert row["truncated"] and len(row["prompt_ids"]) == 30
    assert row["prompt"].startswith("<|system|>Be brief.<|endoftext|><|user|>Hello")


def test_a_chat_row_that_is_not_a_conversation_says_what_is_wrong(tiny_tokenizer):
    builder = PromptBuilder(tiny_tokenizer, detect_format(["messages"]))
    with pytest.raises(DataError, match="^a chat row has no message before the assistant's answer$"):
        builder({"messages": [{"role": "assistant", "content": "Hi."}]})
    bad = [{"role": "user", "content": "a"}, {"role": "assistant", "content": 3}, {"role": "user", "content": "third"}]
    with pytest.raises(DataError, match="need string 'role' and 'content' \\(or 'from' and 'value'\\); got") as error:
        builder({"messages": bad})
    assert "'content': 3" in str(error.value) and "third" not in str(error.value)  # the first two messages shown


def test_a_system_prompt_comes_first_in_a_templated_chat_prompt(tiny_tokenizer):
    builder = PromptBuilder(tiny_tokenizer, detect_format(["article", "highlights"]), template="Sum up: {document}",
                            chat_template=True, system_prompt="Be brief.")
    row = builder({"article": "Fire.", "highlights": "A fire."})
    assert row["prompt"] == _render(("system", "Be brief."), ("user", "Sum up: Fire."))


def test_plain_text_rows_split_into_a_prompt_and_its_continuation(tiny_tokenizer):
    """The text format: the first text_prompt_tokens tokens (within max_prompt_tokens, counting the BOS the
    tokenizer adds) are the prompt, the rest the reference; never 'truncated'."""
    from conftest import CORPUS, train_tokenizer

    with_bos = train_tokenizer(CORPUS)
    bos = with_bos.bos_token_id
    _add_special_tokens(with_bos, "<|endoftext|> $A")
    text = "Hello world! How are you today? I am fine, thank you."
    ids = with_bos(text, add_special_tokens=False).input_ids
    builder = PromptBuilder(with_bos, detect_format(["text"]), text_prompt_tokens=64, max_prompt_tokens=6)
    row = builder({"text": text})
    assert row["prompt_ids"] == [bos] + ids[:5] and not row["truncated"]
    assert row["reference"] == with_bos.decode(ids[5:])
    whole = PromptBuilder(with_bos, detect_format(["text"]), text_prompt_tokens=64, max_prompt_tokens=100)({"text": text})
    assert whole["prompt_ids"] == [bos] + ids and whole["references"] == [] and whole["reference"] == ""
    # an encoder's input keeps the special tokens on both sides, within the same limit
    _add_special_tokens(with_bos, "<|endoftext|> $A <|endoftext|>")
    encoder = PromptBuilder(with_bos, detect_format(["text"]), text_prompt_tokens=64, max_prompt_tokens=6,
                            encoder_decoder=True)({"text": text})
    assert encoder["prompt_ids"] == [bos] + ids[:4] + [bos]


def test_a_template_field_that_is_not_text_is_named_but_a_list_of_references_is_read(tiny_tokenizer):
    """PromptBuilder (load_prompt_data's, and the Python API's) refuses a list or dict where the template wants
    text, naming the column, the field and the start of the value; the reference column may hold a list of texts
    (several human references); an empty optional field renders as empty text, not as 'None'."""
    builder = PromptBuilder(tiny_tokenizer, detect_format(["instruction", "context", "response"]), max_prompt_tokens=64)
    assert builder.task.template == "{instruction}\n\n{context}\n\n"
    messages = [{"role": "user", "content": f"question number {i}"} for i in range(4)]
    with pytest.raises(DataError) as error:
        builder({"instruction": messages, "context": "", "response": "A."})
    assert str(error.value) == (
        f"column 'instruction' (instruction format, field instruction) holds lists, not text: {str(messages)[:80]}; "
        "use data.format=chat for lists of messages, or map the field to a text column with data.columns")
    several = builder({"instruction": "Name a colour.", "context": "", "response": ["Blue.", "Red."]})
    assert several["references"] == ["Blue.", "Red."] and several["reference"] == "Blue."
    missing = builder({"instruction": "Name a colour.", "context": None, "response": "Blue."})
    assert missing["prompt"] == several["prompt"] == "Name a colour.\n\n\n\n"


def test_a_template_may_show_the_first_reference(tiny_tokenizer):
    """A `{reference}` slot in data.template (an example answer in the prompt) shows the row's first reference, or
    nothing when the row has none."""
    builder = PromptBuilder(tiny_tokenizer, detect_format(["article", "highlights"]), template="{document} Like: {reference}.",
                            max_prompt_tokens=64)
    assert builder({"article": "Fire.", "highlights": ["Blaze.", "Smoke."]})["prompt"] == "Fire. Like: Blaze.."
    assert builder({"article": "Fire.", "highlights": None})["prompt"] == "Fire. Like: ."


def test_a_tokenizers_bos_starts_a_plain_prompt_but_not_one_a_chat_template_wrote():
    """With a tokenizer that starts every text with BOS, a templated prompt starts with it; a prompt the chat
    template renders (chat data, or data.chat_template on other data) starts as the template writes it, with no BOS
    put in front by the tokenizer (a template writes its own where the model wants one)."""
    from conftest import CORPUS, train_tokenizer

    with_bos = train_tokenizer(CORPUS, chat_template=True)
    bos, user = with_bos.bos_token_id, with_bos.convert_tokens_to_ids("<|user|>")
    _add_special_tokens(with_bos, "<|endoftext|> $A")
    news = detect_format(["article", "highlights"])
    row = {"article": "Fire.", "highlights": "A fire."}
    plain = PromptBuilder(with_bos, news, max_prompt_tokens=64)(row)["prompt_ids"]
    assert plain[:1] == [bos] and plain[1:2] != [bos]
    assert PromptBuilder(with_bos, news, chat_template=True, max_prompt_tokens=64)(row)["prompt_ids"][0] == user
    chat = PromptBuilder(with_bos, detect_format(["messages"]), max_prompt_tokens=64)(
        {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]})
    assert chat["prompt_ids"][0] == user


def test_the_prompt_budget_counts_the_template_on_both_sides_and_one_token_of_text_is_enough(tiny_tokenizer):
    """max_prompt_tokens minus the template's tokens before and after the text is what the text may use: one token
    is a prompt (cut to it), none is an error that says how many tokens the template takes."""
    template = "Read this: {document} Now write the summary:"
    before, after = (len(tiny_tokenizer(text, add_special_tokens=False).input_ids)
                     for text in ("Read this: ", " Now write the summary:"))
    news = detect_format(["article", "highlights"])
    row = PromptBuilder(tiny_tokenizer, news, template=template, max_prompt_tokens=before + after + 1)(
        {"article": ARTICLE, "highlights": "Fire."})
    assert row["truncated"] and len(row["prompt_ids"]) == before + after + 1
    with pytest.raises(DataError, match=rf"^data.max_prompt_tokens={before + after} leaves no room for the text: the "
                                        rf"template and instruction alone take {before + after} tokens; raise"):
        PromptBuilder(tiny_tokenizer, news, template=template, max_prompt_tokens=before + after)(
            {"article": ARTICLE, "highlights": "Fire."})


def test_an_encoder_decoders_reference_starts_as_the_tokenizer_starts_a_text():
    """A decoder target starts with the tokenizer's leading special tokens (BART's <s>) and ends with EOS; a
    decoder-only model's reference is its text and EOS."""
    from conftest import CORPUS, train_tokenizer

    tok = train_tokenizer(CORPUS)
    bos, eos = tok.bos_token_id, tok.eos_token_id
    _add_special_tokens(tok, "<|endoftext|> $A <|endoftext|>")
    row = {"article": "Fire.", "highlights": "A fire."}
    text_ids = tok("A fire.", add_special_tokens=False).input_ids
    news = detect_format(["article", "highlights"])
    assert PromptBuilder(tok, news, max_prompt_tokens=64, encoder_decoder=True)(row)["reference_ids"] == [bos, *text_ids, eos]
    assert PromptBuilder(tok, news, max_prompt_tokens=64)(row)["reference_ids"] == [*text_ids, eos]
