"""Datasets: load from the Hub or local files, hold out an eval split, tokenise once and cache.

- `data.path` is a Hub dataset name (with `data.name` for its config) or a local file (json, jsonl,
  csv, parquet, txt) or folder; splits accept datasets' slicing syntax (`train[:280]`).
- Without `data.eval_split`, `data.eval_size` rows (int) or a fraction are held out with the run's
  seed, so train and eval never overlap and the split is the same on every rank and every resume.
- With `data.eval_path`, the held-out prompts come from another file or Hub dataset (e.g. articles with
  human-written references beside training articles without them): the same task format and template, its
  own columns (`data.eval_columns`, default `data.columns`), `data.eval_split` choosing its rows.
- The tokenised rows are written to `<cache_dir>/tokenized/<key>-<part>.arrow`, where the key hashes
  the raw data's fingerprint, the tokenizer (its whole vocabulary and chat template), the template
  and every length limit: change any of them and the cache misses; change nothing and it hits.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import datasets
from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from onpolicy_kd.recipe import DataConfig, cache_root
from onpolicy_kd.errors import DataError
from onpolicy_kd.hub import expand_path, hub_reachable, looks_like_local_path
from onpolicy_kd.data.prompts import PromptBuilder, TaskFormat, detect_format

LOCAL_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
CACHE_VERSION = 3  # bump when PromptBuilder's output changes for the same inputs


@dataclass
class PromptData:
    train: Dataset  # columns: prompt_ids, reference_ids, prompt, reference, references, truncated
    eval: Dataset
    task: TaskFormat
    cache_hits: dict[str, bool] = field(default_factory=dict)


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    """Make datasets and huggingface_hub use only their caches (no retries against a dead Hub)."""
    from huggingface_hub import constants

    saved = datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE = saved


def data_cache_dir(cfg: DataConfig) -> Path:
    """Where tokenised data and the teacher's cached completions go: data.cache_dir, else the cache root's data/."""
    return Path(expand_path(cfg.cache_dir)) if cfg.cache_dir else cache_root() / "data"


def check_data_path(cfg: DataConfig) -> None:
    """A local data.path that does not exist, found before anything slow (model loading) starts."""
    if looks_like_local_path(cfg.path) and not Path(expand_path(cfg.path)).exists():
        raise DataError(f"data.path: local path does not exist: {expand_path(cfg.path)}")


def check_text_file(path: Path) -> None:
    """An empty file, bytes that are not UTF-8, or (JSON Lines) a line that is not JSON: the file and line named,
    rather than the datasets builder's traceback."""
    if path.stat().st_size == 0:
        raise DataError(f"data.path={path} is empty; point data.path at a file with rows")
    if path.suffix not in (".jsonl", ".json", ".csv", ".txt") or path.stat().st_size > 2**30:
        return  # parquet and arrow are binary; very large files are left to the builder
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(f"data.path={path}, line {number}: not UTF-8 text (byte {err.start}: "
                                f"{raw[err.start:err.start + 1]!r}); re-save the file as UTF-8") from None
            if path.suffix == ".jsonl" and line.strip():
                try:
                    json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"data.path={path}, line {number}: not a JSON object ({err.msg}, column "
                                    f"{err.colno}); fix or remove that line") from None


def load_split(cfg: DataConfig, split: str, key: str = "data.split") -> Dataset:
    """One split of the raw dataset, from local files or the Hub (`key`: the recipe key that chose the split)."""
    if looks_like_local_path(cfg.path):
        path = Path(expand_path(cfg.path))
        if not path.exists():
            raise DataError(f"data.path: local path does not exist: {path}")
        # datasets keys its cache by the file's path: the resolved one, so a file reached through a symlinked
        # cache root (ONPOLICY_KD_CACHE_DIR) reuses what the same file's earlier runs tokenised
        path = path.parent.resolve() / path.name  # (the file's own name kept: a blob store's target has no suffix)
        if path.is_dir():
            builder, files = str(path), None
        else:
            if path.suffix not in LOCAL_BUILDERS:
                raise DataError(f"data.path: unsupported file type {path.suffix!r}; use one of {sorted(LOCAL_BUILDERS)}")
            builder, files = LOCAL_BUILDERS[path.suffix], str(path)
        if path.is_file():
            check_text_file(path)
        try:
            return datasets.load_dataset(builder, data_files=files, split=split)
        except (ValueError, KeyError) as err:  # a split that does not exist, or a slice with no rows in it
            raise DataError(f"{key}={split!r} of {path}: {err}; choose rows the file has (a local file is one split, "
                            f"'train'), e.g. {key}=train[:50]") from None
        except datasets.exceptions.DatasetGenerationError as err:
            cause = err.__cause__ or err.__context__ or err
            raise DataError(f"data.path={path} cannot be read as {path.suffix[1:]}: {cause}; fix or remove the "
                            f"offending rows") from None
    offline = not hub_reachable()
    try:
        with _hub_offline() if offline else contextlib.nullcontext():
            return datasets.load_dataset(cfg.path, cfg.name, split=split)
    except (ConnectionError, OSError, FileNotFoundError, ValueError) as err:
        if offline:
            raise DataError(
                f"cannot load the dataset '{cfg.path}' (data.path): it is not a local path, not in the datasets "
                f"cache, and the Hub is unreachable from this machine.\n"
                f"  Save it where the Hub is reachable, e.g. load_dataset('{cfg.path}', {cfg.name!r}, split='{split}')"
                f".to_json('/data/{cfg.path.split('/')[-1]}.jsonl'), then set data.path to that file"
            ) from None
        raise DataError(f"cannot load the dataset '{cfg.path}' (data.path, {key}={split!r}): {err}") from None


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    for extra in (type(tokenizer).__name__, tokenizer.bos_token, tokenizer.eos_token, getattr(tokenizer, "chat_template", None)):
        digest.update(repr(extra).encode())
    return digest.hexdigest()[:16]


def _cache_key(cfg: DataConfig, raw: Dataset, tokenizer_fp: str, task: TaskFormat, encoder_decoder: bool) -> str:
    parts = {
        **({"encoder_decoder": True} if encoder_decoder else {}),  # (absent otherwise: older caches stay valid)
        "version": CACHE_VERSION,
        "data": raw._fingerprint,
        "tokenizer": tokenizer_fp,
        "task": [task.name, task.columns],
        "recipe": cfg.model_dump(include={
            "template", "chat_template", "system_prompt", "truncate_field", "max_prompt_tokens",
            "max_response_tokens", "text_prompt_tokens",
        }),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _tokenize(raw: Dataset, builder: PromptBuilder, cache_file: Path, key: str, num_proc: int | None) -> tuple[Dataset, bool]:
    hit = cache_file.exists()
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    encoded = raw.map(
        builder,
        remove_columns=raw.column_names,
        cache_file_name=str(cache_file),
        load_from_cache_file=True,
        new_fingerprint=key,
        num_proc=num_proc if not hit else None,
        desc=f"tokenising {cache_file.stem}",
    )
    return encoded, hit


def load_prompt_data(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, seed: int = 0, *,
                     train: Dataset | None = None, eval_: Dataset | None = None,
                     encoder_decoder: bool = False) -> PromptData:
    """Train and eval prompts for a recipe, tokenised with `tokenizer` (cached); `encoder_decoder`: the prompts are
    an encoder-decoder model's encoder inputs (data/prompts.py).

    `train` / `eval_` (the Python API) replace the splits the recipe would load; without `eval_`, the held-out
    rows come from `train` as usual.
    """
    train = load_split(cfg, cfg.split) if train is None else train
    eval_source = cfg.model_copy(update={"path": cfg.eval_path, "name": None}) if cfg.eval_path else cfg
    if eval_ is None and cfg.held_out_split:
        eval_ = load_split(eval_source, cfg.held_out_split, "data.eval_split")
    elif eval_ is None:
        n_eval = cfg.eval_size if isinstance(cfg.eval_size, int) else max(1, round(cfg.eval_size * len(train)))
        if n_eval >= len(train):
            raise DataError(f"data.eval_size={cfg.eval_size} holds out {n_eval} of only {len(train)} rows; lower it")
        parts = train.train_test_split(test_size=n_eval, seed=seed, shuffle=True)
        train, eval_ = parts["train"], parts["test"]
    if cfg.max_samples:
        train = train.select(range(min(cfg.max_samples, len(train))))
    if len(train) == 0:
        raise DataError(f"data.split={cfg.split!r} of {cfg.path} has no rows")

    if len(eval_) == 0:
        raise DataError(f"the held-out split {cfg.held_out_split!r} of {cfg.eval_path or cfg.path} has no rows "
                        f"(data.eval_split); choose rows that exist, e.g. train[:50]")
    task = detect_format(train.column_names, cfg.format, cfg.columns, example=train[0])
    # a separate held-out file is the same task (format and template) with columns of its own
    eval_task = task if not cfg.eval_path else _eval_format(eval_, task, cfg)
    check_has_text(train, task, f"data.split={cfg.split!r} of {cfg.path}")
    held_out = f"data.eval_split={cfg.held_out_split!r}" if cfg.held_out_split else f"data.eval_size={cfg.eval_size}"
    check_has_text(eval_, eval_task, f"the held-out rows ({held_out}) of {cfg.eval_path or cfg.path}")
    cache_dir = data_cache_dir(cfg)
    tokenizer_fp = tokenizer_fingerprint(tokenizer)
    out: dict[str, Dataset] = {}
    hits: dict[str, bool] = {}
    for name, raw, raw_task in (("train", train, task), ("eval", eval_, eval_task)):
        builder = PromptBuilder(
            tokenizer, raw_task, template=cfg.template, truncate_field=cfg.truncate_field,
            chat_template=cfg.chat_template, system_prompt=cfg.system_prompt, max_prompt_tokens=cfg.max_prompt_tokens,
            max_response_tokens=cfg.max_response_tokens, text_prompt_tokens=cfg.text_prompt_tokens,
            encoder_decoder=encoder_decoder,
        )
        key = _cache_key(cfg, raw, tokenizer_fp, raw_task, encoder_decoder)
        out[name], hits[name] = _tokenize(raw, builder, cache_dir / "tokenized" / f"{key}-{name}.arrow", key, cfg.num_proc)
    return PromptData(train=out["train"], eval=out["eval"], task=task, cache_hits=hits)


def _has_text(value: Any) -> bool:
    return bool(value) and (not isinstance(value, str) or bool(value.strip()))


def check_has_text(raw: Dataset, task: TaskFormat, where: str) -> None:
    """At least one row has its prompt's text (document, instruction, messages, text): with none, every prompt would
    be the template alone ("Summary:"), which trains and evaluates on nothing. Read until the first row that has
    text, so a normal split costs one small batch."""
    fields = {name: column for name, column in task.columns.items() if name not in ("reference", "completion")}
    for batch in raw.select_columns(sorted(set(fields.values()))).iter(batch_size=64):
        if any(_has_text(value) for values in batch.values() for value in values):
            return
    named = ", ".join(f"{name} (column {column!r})" for name, column in fields.items())
    example = f"data.columns.{next(iter(fields))}=<column>"
    raise DataError(f"{where}: every row's {named} is empty or null, so every prompt would be the template alone; "
                    f"point data.columns at the column that holds the text (e.g. {example}), or fix the data")


def _eval_format(eval_: Dataset, task: TaskFormat, cfg: DataConfig) -> TaskFormat:
    """The task format of data.eval_path's rows: the training data's format, their own columns."""
    columns = cfg.eval_columns if cfg.eval_columns is not None else cfg.columns
    try:
        return detect_format(eval_.column_names, task.name, columns, example=eval_[0])
    except DataError as err:
        raise DataError(f"data.eval_path={cfg.eval_path}: {err} (data.eval_columns maps its columns when they "
                        f"differ from the training data's)") from None


def length_stats(dataset: Dataset, column: str = "prompt_ids") -> dict[str, Any]:
    lengths = [len(ids) for ids in dataset[column]]
    if not lengths:
        return {"rows": 0}
    return {
        "rows": len(lengths),
        "min": min(lengths),
        "mean": round(statistics.fmean(lengths), 1),
        "max": max(lengths),
        "truncated": int(sum(dataset["truncated"])) if "truncated" in dataset.column_names else 0,
    }
