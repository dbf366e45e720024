"""Task formats: which columns hold what, the prompt template, and truncation that keeps the instruction.

A dataset row becomes a prompt (token ids ending where the model should start writing; for an
encoder-decoder model, the encoder's input with the special tokens its tokenizer puts around a text)
and an optional reference completion (token ids ending with EOS: a decoder-only model's continuation,
an encoder-decoder model's decoder target). Formats, auto-detected from the columns
unless `data.format` names one, with `data.columns` to map fields to other column names:

| format | fields (first matching column) | default template | cut to fit |
|---|---|---|---|
| summarization | document (article, document), reference (highlights, summary, headline) | document + "Summary:" | document (keeps its start) |
| instruction | instruction (instruction, prompt, question), context (context, input), reference (response, output, completion, answer) | instruction [+ context] | context, else instruction (keeps its end) |
| chat | messages (messages, conversations): list of {role, content}; or TRL's conversational prompt [+ completion]: lists of messages | the tokenizer's chat template | oldest turns, then the last user turn |
| text | text (text, content) | the first `text_prompt_tokens` tokens | - |

TRL's dataset formats map onto these: standard `prompt`/`completion` (strings) and prompt-only are
`instruction` (the prompt used as written); conversational `prompt`/`completion` (lists of messages),
prompt-only and `messages` are `chat`, rendered with the tokenizer's chat template, and ShareGPT-style
`conversations` with `from`/`value` keys are converted by TRL's own `maybe_convert_to_chatml`. Whether a
`prompt` column is conversational is read from the first row with TRL's `is_conversational`.

Truncation cuts only the long field, so the instruction around it ("Summary:", the question) always
survives: the template is split around that field, the fixed parts are tokenised whole and the
field gets the remaining token budget.

A reference column may hold a list of strings (several human references per prompt, as XSum-style
evaluation sets have): the first is the reference a mode trains on or scores perplexity on, and the
evaluation's ROUGE takes the best-matching one (`references` keeps them all).
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from transformers import PreTrainedTokenizerBase

from onpolicy_kd.errors import DataError

FIELD_CANDIDATES: dict[str, dict[str, tuple[str, ...]]] = {
    "chat": {"messages": ("messages", "conversations", "conversation")},
    "summarization": {"document": ("article", "document"), "reference": ("highlights", "summary", "headline")},
    "instruction": {
        "instruction": ("instruction", "prompt", "question"),
        "context": ("context", "input"),
        "reference": ("response", "output", "completion", "answer"),
    },
    "text": {"text": ("text", "content")},
}
REQUIRED = {"chat": ("messages",), "summarization": ("document",), "instruction": ("instruction",), "text": ("text",)}
DETECTION_ORDER = ("chat", "summarization", "instruction", "text")
SENTINEL = "\uE000ONPOLICY_KD_FIELD\uE000"  # private-use characters: never in real text


@dataclass(frozen=True)
class TaskFormat:
    name: str
    columns: dict[str, str]  # task field -> dataset column
    template: str | None  # None for chat and text
    truncate_field: str | None
    keep_end: bool = False  # when cutting, keep the field's end instead of its start


def detect_format(column_names: Sequence[str], fmt: str = "auto", columns: dict[str, str] | None = None,
                  example: dict[str, Any] | None = None) -> TaskFormat:
    """Pick the task format and the column of each field; explicit `columns` win over detection. `example` (the
    first row) tells a conversational `prompt` column (TRL's format: a list of messages) from a plain one."""
    columns = dict(columns or {})
    for column in columns.values():
        if column not in column_names:
            raise DataError(f"data.columns maps to column {column!r}, which the dataset lacks; its columns: {list(column_names)}")
    known = {f for fields in FIELD_CANDIDATES.values() for f in fields} | {"prompt", "completion"}
    unknown = sorted(set(columns) - known)
    if unknown:
        raise DataError(f"data.columns names the field(s) {unknown}, which no format has; the fields are {sorted(known)}")
    conversational = conversational_prompt(column_names, columns, example)
    if conversational is not None:
        if fmt not in ("auto", "chat"):
            raise DataError(
                f"data.format={fmt}, but column {conversational['prompt']!r} holds lists of messages (TRL's "
                f"conversational format), which a {fmt} template would paste in as Python text; use data.format=chat "
                f"(or auto): the messages go through the tokenizer's chat template")
        return TaskFormat("chat", conversational, None, None)
    candidates = DETECTION_ORDER if fmt == "auto" else (fmt,)
    for name in candidates:
        mapping = {f: c for f, c in columns.items() if f in FIELD_CANDIDATES[name]}
        for task_field, options in FIELD_CANDIDATES[name].items():
            if task_field not in mapping:
                found = next((c for c in options if c in column_names), None)
                if found:
                    mapping[task_field] = found
        if all(f in mapping for f in REQUIRED[name]):
            return _with_defaults(name, mapping)
    if fmt != "auto":
        missing = [f for f in REQUIRED[fmt] if f not in columns]
        raise DataError(
            f"data.format={fmt} needs the field(s) {missing} (looked for columns "
            f"{[FIELD_CANDIDATES[fmt][f] for f in missing]}); the dataset has {list(column_names)}. "
            f"Map them with data.columns, e.g. data.columns.{missing[0]}=<column>"
        )
    raise DataError(
        f"cannot tell the task format from the columns {list(column_names)}: the formats known are "
        f"summarization (article/highlights, document/summary), instruction (instruction/context/response; TRL's "
        f"standard prompt/completion and prompt-only), chat (messages or conversations; TRL's conversational "
        f"prompt/completion) and text (text). Set data.format and map columns with data.columns, e.g. "
        f"data.columns.document=body"
    )


def conversational_prompt(column_names: Sequence[str], columns: dict[str, str],
                          example: dict[str, Any] | None) -> dict[str, str] | None:
    """{'prompt': column[, 'completion': column]} when the prompt column holds TRL-style lists of messages."""
    from trl.data_utils import is_conversational

    if example is None or "messages" in columns:
        return None
    prompt = columns.get("prompt") or columns.get("instruction") or ("prompt" if "prompt" in column_names else None)
    if prompt is None or not is_conversational({"prompt": example.get(prompt)}):
        return None
    completion = columns.get("completion") or columns.get("reference") or (
        "completion" if "completion" in column_names else None)
    return {"prompt": prompt, **({"completion": completion} if completion else {})}


def _with_defaults(name: str, mapping: dict[str, str]) -> TaskFormat:
    if name == "summarization":
        return TaskFormat(name, mapping, "{document}\n\nSummary:", "document")
    if name == "instruction":
        if "context" in mapping:
            return TaskFormat(name, mapping, "{instruction}\n\n{context}\n\n", "context")
        return TaskFormat(name, mapping, "{instruction}", "instruction", keep_end=True)
    return TaskFormat(name, mapping, None, None)


@dataclass
class PromptBuilder:
    """Turns one row into prompt and reference token ids under the length limits of the recipe."""

    tokenizer: PreTrainedTokenizerBase
    task: TaskFormat
    template: str | None = None
    truncate_field: str | None = None
    chat_template: bool = False
    system_prompt: str | None = None
    max_prompt_tokens: int = 512
    max_response_tokens: int = 256
    text_prompt_tokens: int = 64
    encoder_decoder: bool = False  # the prompt is an encoder's whole input (T5, BART), not a decoder's prefix
    _before: list[int] = field(init=False, default_factory=list)  # special tokens the prompt starts with
    _after: list[int] = field(init=False, default_factory=list)  # and ends with

    def __post_init__(self) -> None:
        self.template = self.template or self.task.template
        self.truncate_field = self.truncate_field or self.task.truncate_field
        self._before, self._after = self._special_tokens()
        if self.task.name in ("summarization", "instruction"):
            slots = [f for _, f, _, _ in string.Formatter().parse(self.template or "") if f]
            unknown = [f for f in slots if f not in FIELD_CANDIDATES[self.task.name]]
            if unknown:
                raise DataError(
                    f"data.template uses {unknown}, which the {self.task.name} format does not have; "
                    f"use {sorted(FIELD_CANDIDATES[self.task.name])}"
                )
            if self.truncate_field not in slots:
                raise DataError(f"data.truncate_field={self.truncate_field!r} is not a slot of data.template {self.template!r}")
            if self.truncate_field == "reference":  # (a row may hold several references; the template shows the first)
                raise DataError(f"data.truncate_field='reference': a template shows the reference whole, so it cannot "
                                f"be the field cut to fit; cut one of {sorted(set(slots) - {'reference'})}")
        if self.chat_template and not getattr(self.tokenizer, "chat_template", None):
            raise DataError(f"data.chat_template=true but tokenizer {self.tokenizer.name_or_path!r} has no chat template")
        if self.task.name == "chat" and not getattr(self.tokenizer, "chat_template", None):
            raise DataError(f"the data is conversational (chat format, columns {sorted(self.task.columns.values())}), "
                            f"which is rendered with the tokenizer's chat template, and tokenizer "
                            f"{self.tokenizer.name_or_path!r} has none: use a tokenizer that has one, or give the data "
                            f"as plain prompt/completion text")

    # -- pieces ------------------------------------------------------------------------------
    def _special_tokens(self) -> tuple[list[int], list[int]]:
        """The special tokens the tokenizer puts around a text: a decoder-only prompt keeps the leading BOS only (it
        must end where the model writes on); an encoder's input gets both sides, as the model was trained (T5
        ends it with </s>, BART wraps it in <s> .. </s>)."""
        plain, wrapped = self._ids("a"), self.tokenizer("a").input_ids
        if not self.encoder_decoder:
            bos = self.tokenizer.bos_token_id
            return ([bos] if bos is not None and wrapped[:1] == [bos] else []), []
        start = next((i for i in range(len(wrapped)) if wrapped[i : i + len(plain)] == plain), None)
        return ([], []) if start is None else (wrapped[:start], wrapped[start + len(plain):])

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def _wrap_chat(self, user_text: str) -> str:
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        messages.append({"role": "user", "content": user_text})
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def _fit(self, prefix: str, body: str, suffix: str, keep_end: bool) -> tuple[list[int], bool]:
        """prefix + body + suffix as ids, cutting only the body to respect max_prompt_tokens."""
        # a chat template writes its own BOS (as text) when the model wants one
        templated = self.chat_template or self.task.name == "chat"
        head = ([] if templated else self._before) + self._ids(prefix)
        tail = self._ids(suffix) + self._after
        budget = self.max_prompt_tokens - len(head) - len(tail)
        if budget < 1:
            raise DataError(
                f"data.max_prompt_tokens={self.max_prompt_tokens} leaves no room for the text: the template "
                f"and instruction alone take {len(head) + len(tail)} tokens; raise data.max_prompt_tokens"
            )
        body_ids = self._ids(body)
        cut = len(body_ids) > budget
        if cut:
            body_ids = body_ids[-budget:] if keep_end else body_ids[:budget]
        return head + body_ids + tail, cut

    def _reference_ids(self, reference: str | None) -> list[int]:
        """The reference ending with EOS; a decoder target also starts as the tokenizer starts a text (BART's
        decoder was trained on `<s> .. </s>`; T5's adds nothing in front)."""
        if not reference:
            return []
        ids = (self._before if self.encoder_decoder else []) + self._ids(reference) + [self.tokenizer.eos_token_id]
        return ids[: self.max_response_tokens]

    # -- formats -----------------------------------------------------------------------------
    def _templated(self, row: dict[str, Any]) -> tuple[list[int], bool, list[str]]:
        references = self._references(row)
        for task_field, column in self.task.columns.items():
            if task_field != "reference" and isinstance(row.get(column), (list, dict)):
                raise DataError(f"column {column!r} ({self.task.name} format, field {task_field}) holds "
                                f"{type(row[column]).__name__}s, not text: {str(row[column])[:80]}; use data.format=chat "
                                f"for lists of messages, or map the field to a text column with data.columns")
        values = {f: ("" if row.get(c) is None else str(row[c])) for f, c in self.task.columns.items()
                  if f != "reference"}
        assert self.template is not None and self.truncate_field is not None
        text = self.template.format(**{**values, "reference": references[0] if references else "",
                                       self.truncate_field: SENTINEL})
        if self.chat_template:
            text = self._wrap_chat(text)
        prefix, suffix = text.split(SENTINEL, 1)
        ids, cut = self._fit(prefix, values[self.truncate_field], suffix, self.task.keep_end)
        return ids, cut, references

    def _references(self, row: dict[str, Any]) -> list[str]:
        """The row's reference(s): a text, or a list of texts (empty ones dropped)."""
        column = self.task.columns.get("reference")
        value = row.get(column) if column else None
        if value is None:
            return []
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) or v is None for v in value):
            return [v for v in value if v]
        if isinstance(value, (list, tuple, dict)):
            raise DataError(f"column {column!r} ({self.task.name} format, field reference) holds "
                            f"{type(value).__name__}s that are not texts: {str(value)[:80]}; give a text or a list of "
                            f"texts (several references), or map the field to another column with data.columns")
        return [str(value)] if str(value) else []

    def _messages(self, row: dict[str, Any]) -> list[dict[str, str]]:
        """The row's conversation as [{role, content}]: a messages column, or TRL's prompt [+ completion]."""
        from trl.data_utils import maybe_convert_to_chatml

        columns = self.task.columns
        if "messages" in columns:
            messages = list(row[columns["messages"]] or [])
        else:
            messages = list(row[columns["prompt"]] or []) + list(row.get(columns.get("completion", "")) or [])
        messages = maybe_convert_to_chatml({"messages": [dict(m) for m in messages]})["messages"]  # from/value -> role/content
        if any(not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str) for m in messages):
            raise DataError(f"a chat row's messages need string 'role' and 'content' (or 'from' and 'value'); got "
                            f"{messages[:2]!r}")
        return [{"role": m["role"], "content": m["content"]} for m in messages]

    def _chat(self, row: dict[str, Any]) -> tuple[list[int], bool, list[str]]:
        messages = self._messages(row)
        reference = None
        if messages and messages[-1]["role"] == "assistant":
            reference = messages.pop()["content"]
        if not messages:
            raise DataError("a chat row has no message before the assistant's answer")
        cut = False
        render = lambda ms: self.tokenizer.apply_chat_template(ms, tokenize=False, add_generation_prompt=True)  # noqa: E731
        # Drop the oldest non-system turns while the conversation is too long; keep the last one.
        first = 1 if messages[0]["role"] == "system" else 0
        while len(messages) - first > 1 and len(self._ids(render(messages))) > self.max_prompt_tokens:
            del messages[first]
            cut = True
        last = messages[-1]
        text = render(messages[:-1] + [{**last, "content": SENTINEL}])
        prefix, suffix = text.split(SENTINEL, 1)
        ids, cut_body = self._fit(prefix, last["content"], suffix, keep_end=False)
        return ids, cut or cut_body, [reference] if reference else []

    def _text(self, row: dict[str, Any]) -> tuple[list[int], bool, list[str]]:
        ids = self._ids(str(row[self.task.columns["text"]]))
        n_prompt = min(self.text_prompt_tokens, self.max_prompt_tokens - len(self._before) - len(self._after))
        prompt, rest = self._before + ids[:n_prompt] + self._after, ids[n_prompt:]
        reference = self.tokenizer.decode(rest[: self.max_response_tokens]) if rest else None
        return prompt, False, [reference] if reference else []

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        encode: Callable[[dict[str, Any]], tuple[list[int], bool, list[str]]] = {
            "chat": self._chat, "text": self._text,
        }.get(self.task.name, self._templated)
        prompt_ids, truncated, references = encode(row)
        return {
            "prompt_ids": prompt_ids,
            "reference_ids": self._reference_ids(references[0] if references else None),
            "prompt": self.tokenizer.decode(prompt_ids),
            "reference": references[0] if references else "",
            "references": references,
            "truncated": truncated,
        }
