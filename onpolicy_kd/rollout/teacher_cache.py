"""Teacher completions of a prompt set, generated once with the rollout engine and cached with `datasets`.

Sequence-level KD (mode `seqkd`, `gkd` with `seq_kd`, `distillm2`) trains on the teacher's completions of the
training prompts. Sampling the teacher afresh at every step costs a whole teacher decode per step; with
`teacher_text.cache: true` each prompt's completion is generated once, with the recipe's teacher_text settings
(greedy or sampled; a sampled row is seeded from the run's seed and its batch), stored in `teacher/<key>` of
the data cache (`data.cache_dir`) with `Dataset.save_to_disk`, and read back by later runs in seconds.

The key covers what the completions depend on: the teacher (its config, and the names, sizes and
modification times of its weight files), the set of prompts (their token ids), the sampling settings and,
when sampling, the seed. The prompts are generated in one canonical order (sorted by their token ids) and
handed back in the caller's, so a run with another seed, which shuffles the same training prompts
differently, reads the same entry (for greedy completions; sampled ones are drawn again for a new seed).
A cache entry is written to a temporary folder and renamed into place, so a killed run never leaves half
of one; an entry that cannot be read is a clear error that names it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Sequence

import datasets
import torch
from datasets import Dataset

from onpolicy_kd.batch import Completions, left_pad, right_pad
from onpolicy_kd.errors import DataError
from onpolicy_kd.models.forward import forward_completions
from onpolicy_kd.objectives.divergences import log_probs
from onpolicy_kd.rollout.engine import rollout

COLUMNS = ("teacher_ids", "teacher_text")


def teacher_fingerprint(teacher: torch.nn.Module) -> str:
    """The teacher's config, its quantisation, and, when it was loaded from a folder, its weight files' names, sizes
    and times (else a digest of its weights)."""
    config = teacher.config.to_json_string(use_diff=False)
    name = str(getattr(teacher, "name_or_path", "") or getattr(teacher.config, "_name_or_path", ""))
    source = Path(name) if name else None  # (a teacher built in memory has no name: not the working directory)
    files, where = [], str(source) if source is not None else "."
    if source is not None and source.is_dir():
        for path in sorted(source.glob("*")):
            if path.suffix in (".safetensors", ".bin", ".gguf", ".pt"):
                stat = path.stat()
                files.append((path.name, stat.st_size, int(stat.st_mtime)))
        # the same teacher reached through a symlinked cache root keeps its key: the resolved folder, also as the
        # config's _name_or_path (a folder named by its resolved path, as the recipes' ${cache:...} name it, keeps
        # the key it had; a relative or symlinked name gets the resolved folder's key)
        where = str(source.resolve())
        config = config.replace(json.dumps(str(source)), json.dumps(where))
    parts = [config, where, files]
    if not files:  # a teacher built in memory (the Python API, tests): its weights themselves tell it apart
        parts.append(_weights_digest(teacher))
    quantization = getattr(teacher, "kd_quantization", None)  # a quantised teacher writes other summaries
    if quantization:  # (only then: the caches of full-precision teachers keep their keys)
        parts.append(quantization)
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def _weights_digest(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


def cache_key(teacher: torch.nn.Module, prompts: Dataset, settings: dict[str, Any]) -> str:
    digest = hashlib.sha256()
    digest.update(teacher_fingerprint(teacher).encode())
    digest.update(json.dumps(settings, sort_keys=True).encode())
    for ids in prompts["prompt_ids"]:
        digest.update(json.dumps(ids).encode())
    return digest.hexdigest()[:20]


@torch.no_grad()
def generate_teacher_completions(teacher, tokenizer, prompts: Dataset, settings: dict[str, Any], *, batch_size: int,
                                 seed: int, device: torch.device, vocab: int,
                                 progress: Callable[[int, int], None] | None = None) -> Dataset:
    """The teacher's completion of every prompt (row-aligned): token ids (up to and including EOS) and text."""
    ids_out, texts = [], []
    pad = tokenizer.pad_token_id
    for index, start in enumerate(range(0, len(prompts), batch_size)):
        rows = list(range(start, min(start + batch_size, len(prompts))))
        prompt_ids, prompt_mask = left_pad([prompts[r]["prompt_ids"] for r in rows], pad, device)
        generator = torch.Generator(device=device).manual_seed(seed * 1_000_003 + index)
        batch = rollout(teacher, None, prompt_ids, prompt_mask, tokenizer=tokenizer, generator=generator,
                        vocab_size=vocab, source="teacher", all_finished=lambda done: done, **settings)
        for b in range(len(rows)):
            ids_out.append(batch.completion_ids[b][batch.completion_mask[b]].tolist())
            texts.append(batch.texts[b])
        if progress is not None:
            progress(len(ids_out), len(prompts))
    return Dataset.from_dict({"teacher_ids": ids_out, "teacher_text": texts})


def canonical_order(prompts: Dataset) -> tuple[list[int], list[int]]:
    """(the rows sorted by their prompt ids: the order a cache entry is made in, the canonical position of each of
    the caller's rows: `.select(back)` hands an entry back in the caller's order)."""
    order = sorted(range(len(prompts)), key=lambda row: prompts[row]["prompt_ids"])
    return order, sorted(range(len(order)), key=order.__getitem__)


def cached_teacher_completions(teacher, tokenizer, prompts: Dataset, settings: dict[str, Any], *,
                               cache_dir: Path | None, batch_size: int, seed: int, device: torch.device, vocab: int,
                               progress: Callable[[int, int], None] | None = None) -> tuple[Dataset, bool, Path | None]:
    """(the completions in the order of `prompts`, whether they came from the cache, the cache entry's folder).
    With `cache_dir` None they are generated (in the same canonical order, so the same completions) and not kept."""
    order, back = canonical_order(prompts)
    prompts = prompts.select(order)
    common = dict(batch_size=batch_size, seed=seed, device=device, vocab=vocab, progress=progress)
    if cache_dir is None:
        return generate_teacher_completions(teacher, tokenizer, prompts, settings, **common).select(back), False, None
    key = cache_key(teacher, prompts, {**settings, "seed": seed} if settings.get("do_sample", True) else settings)
    folder = Path(cache_dir) / "teacher" / key
    found, hit = _read_or_generate(teacher, tokenizer, prompts, settings, folder, **common)
    return found.select(back), hit, folder


def _read_or_generate(teacher, tokenizer, prompts: Dataset, settings: dict[str, Any], folder: Path, *, batch_size: int,
                      seed: int, device: torch.device, vocab: int,
                      progress: Callable[[int, int], None] | None) -> tuple[Dataset, bool]:
    return read_or_make(folder, COLUMNS, len(prompts), "teacher-completion", lambda: generate_teacher_completions(
        teacher, tokenizer, prompts, settings, batch_size=batch_size, seed=seed, device=device, vocab=vocab,
        progress=progress))


def read_or_make(folder: Path, columns: Sequence[str], rows: int, what: str,
                 make: Callable[[], Dataset]) -> tuple[Dataset, bool]:
    """(the dataset saved in `folder`, True), or (`make()`, saved there first, False). Written to a temporary folder
    and renamed into place; an entry that cannot be read, or has other columns or another row count, is an error
    that names the folder."""
    if folder.is_dir():
        try:
            found = datasets.load_from_disk(str(folder))
        except Exception as err:  # noqa: BLE001 - any unreadable entry gets the same advice
            raise DataError(f"the {what} cache {folder} cannot be read ({type(err).__name__}: {err}); "
                            f"delete that folder to generate it again") from None
        if list(found.column_names) != list(columns) or len(found) != rows:
            raise DataError(f"the {what} cache {folder} does not match its {rows} prompts "
                            f"(columns {found.column_names}, {len(found)} rows); delete that folder to generate it again")
        return found, True
    made = make()
    tmp = folder.with_name(f".tmp-{folder.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        made.save_to_disk(str(tmp))
    except BaseException:  # a Ctrl-C or a full disk while writing: no half-written folder is left behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    os.replace(tmp, folder)
    return datasets.load_from_disk(str(folder)), False


# --- the teacher's top-k log-probabilities over its cached text (teacher_text.topk) -----------------------------

TOPK_COLUMNS = ("topk_ids", "topk_logprobs", "tail_logprob")


@torch.no_grad()
def teacher_topk(teacher, prompts: Dataset, completions: Sequence[Sequence[int]], *, k: int, temperature: float,
                 batch_size: int, device: torch.device, vocab: int, pad_id: int,
                 progress: Callable[[int, int], None] | None = None) -> Dataset:
    """Per prompt (row-aligned), at each position of its completion: the teacher's k most likely next tokens, their
    log-probabilities at `temperature` and the log of the probability left to the other tokens (-inf when k is
    the whole vocabulary), from one teacher-forced forward. Log-probabilities in float32 (the tail from the
    logits themselves, not 1 minus a sum of rounded top-k values)."""
    k = min(k, vocab)
    ids_out, logprobs_out, tails_out = [], [], []
    for start in range(0, len(prompts), batch_size):
        rows = list(range(start, min(start + batch_size, len(prompts))))
        prompt_ids, prompt_mask = left_pad([prompts[r]["prompt_ids"] for r in rows], pad_id, device)
        completion_ids, mask = right_pad([completions[r] for r in rows], pad_id, device)
        batch = Completions(prompt_ids, prompt_mask, completion_ids, mask, source="teacher", texts=[""] * len(rows))
        logits = forward_completions(teacher, batch, vocab=vocab).logits
        for b, length in enumerate(mask.sum(1).tolist()):  # a row at a time: two (T, V) float32 copies, not (B, T, V)
            logprobs = log_probs(logits[b, :length], temperature)
            top, ids = logprobs.topk(k, dim=-1)
            tail = (logprobs.scatter_(-1, ids, float("-inf")).logsumexp(-1) if k < vocab
                    else torch.full(top.shape[:-1], float("-inf"), device=top.device))
            ids_out.append(ids.int().cpu().numpy())
            logprobs_out.append(top.float().cpu().numpy())
            tails_out.append(tail.float().cpu().numpy())
        if progress is not None:
            progress(len(ids_out), len(prompts))
    features = datasets.Features({"topk_ids": datasets.Array2D((None, k), "int32"),
                                  "topk_logprobs": datasets.Array2D((None, k), "float32"),
                                  "tail_logprob": datasets.Sequence(datasets.Value("float32"))})
    return Dataset.from_dict({"topk_ids": ids_out, "topk_logprobs": logprobs_out, "tail_logprob": tails_out},
                             features=features)


def cached_teacher_topk(teacher, prompts: Dataset, completions: Sequence[Sequence[int]], completions_folder: Path | None,
                        *, k: int, temperature: float, batch_size: int, device: torch.device, vocab: int, pad_id: int,
                        progress: Callable[[int, int], None] | None = None) -> tuple[Dataset, bool]:
    """`teacher_topk` of the cached completions (in the order of `prompts`), kept beside their cache entry as
    `<entry>-top<k>-t<temperature>` (the completions' key already covers the teacher, the prompts and the decoding),
    and read back by later runs; made and not kept when the completions are not cached (`completions_folder` None)."""
    order, back = canonical_order(prompts)  # the completions' order
    canonical = prompts.select(order)

    def make() -> Dataset:
        return teacher_topk(teacher, canonical, [completions[r] for r in order], k=k, temperature=temperature,
                            batch_size=batch_size, device=device, vocab=vocab, pad_id=pad_id, progress=progress)

    if completions_folder is None:
        return make().select(back), False
    # named after the completions themselves too: completions generated again (their entry deleted) get a new one
    digest = hashlib.sha256(json.dumps([list(completions[r]) for r in order]).encode()).hexdigest()[:10]
    folder = completions_folder.with_name(f"{completions_folder.name}-top{min(k, vocab)}-t{temperature:g}-{digest}")
    found, hit = read_or_make(folder, TOPK_COLUMNS, len(prompts), "teacher top-k", make)
    lengths = [len(tail) for tail in found["tail_logprob"]]
    if lengths != [len(completions[r]) for r in order]:
        raise DataError(f"the teacher top-k cache {folder} does not match the lengths of the completions it was made "
                        f"for; delete that folder to make it again")
    return found.select(back), hit
