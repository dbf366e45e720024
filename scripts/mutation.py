"""Mutation testing of the math and the batch: which small changes to the code does no test notice?

    .venv/bin/pip install -e '.[mutation]'
    .venv/bin/python scripts/mutation.py             # run what has no verdict yet, write benchmarks/results/mutation.md
    .venv/bin/python scripts/mutation.py --recheck   # also run the survivors again (after adding tests)
    .venv/bin/python scripts/mutation.py --report    # only rewrite the report from the last run's mutants/

The scope (SCOPE below): everything in `onpolicy_kd/objectives/` and `batch.py`, the sampling and mixture
functions of `rollout/engine.py` and the prompt building and truncation of `data/prompts.py`. `[tool.mutmut]` in
pyproject.toml says which files mutmut mutates and which fast in-process test files run (each mutant runs only the
tests that call the function it changes). mutmut keeps its work in `mutants/` (git-ignored) and resets the verdicts
of a function whose code changed; a survivor keeps its verdict while its function is unchanged, so after adding
tests run `--recheck`. Not part of CI: the ~4,700 mutants in scope take hours on two cores (each runs `pytest -x`
on the tests that reach its function; a survivor runs them all, up to ~4 minutes). tests/conftest.py orders those
tests quickest first under mutmut, so a mutant a quick test kills stops there: the slowest mutants (those of the
step loss, the sampler and the prompt builder, whose tests include training runs) went from 1.4-2.8 to ~7.5 a
minute. Run it alone on the machine (the timeouts are relative to the tests' own times). Names or globs as
arguments run only those mutants.

The verdicts outlive `mutants/`: every run (and `--report`) writes them, with mutmut's hash of each function, to
benchmarks/results/mutation_verdicts.json.gz, and a run on a machine without `mutants/` starts from that record, so
a run stopped part way (or a fresh clone) goes on where the last one stopped. mutmut itself drops the verdicts of a
function whose hash changed. A killed run keeps every verdict mutmut saved before it died: `--report` records them.

A surviving mutant, or one no selected test reaches, needs a test that kills it, or an entry in EQUIVALENT saying
why no test can: the run exits 1 while one has neither.
"""

from __future__ import annotations

import argparse
import collections
import fnmatch
import gzip
import importlib.metadata
import json
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REPORT = ROOT / "benchmarks" / "results" / "mutation.md"
VERDICTS = ROOT / "benchmarks" / "results" / "mutation_verdicts.json.gz"
MUTMUT = [sys.executable, "-m", "mutmut"]

# the mutants in scope (fnmatch globs of mutmut's names): the math, the batch, sampling and prompt building
SCOPE = [
    "onpolicy_kd.objectives.*",
    "onpolicy_kd.batch.*",
    *(f"onpolicy_kd.rollout.engine.{f}__mutmut_*"
      for f in ("x_filter_logprobs", "x_mixture_logprobs", "x__draw", "x_rollout", "xǁ_Recordsǁadd", "x__completions",
                "xǁ_StopStringsǁupdate")),
    *(f"onpolicy_kd.data.prompts.xǁPromptBuilderǁ{f}__mutmut_*"
      for f in ("_ids", "_fit", "_wrap_chat", "_reference_ids", "_templated", "_messages", "_chat", "_text", "__call__")),
]
# a mutant of an unchanging small function, run first: mutmut makes (and for changed functions resets) the mutants
# when a run starts, so a run of it lets the script see which mutants exist before choosing what to run
FIRST = "onpolicy_kd.batch.x_left_pad__mutmut_1"
UNKILLED = ("survived", "no tests")

# mutant name -> why it behaves exactly as the original (the reason a test cannot kill it).
_CPU_INDEX = ("an index tensor made on the CPU: PyTorch moves CPU indices to the indexed tensor's device, so the "
              "values are the same on any device (at the cost of a copy)")
_CPU_SCALAR = "a 0-dim CPU tensor combines with a tensor on any device: the same value"
_INT_POSITIONS = ("positions 1..T as int64 instead of floats: true division gives the same values (T is far below "
                  "2^24, so the float positions are exact too)")
_TWO_D = "the rows are (N, V): dim +1 is dim -1"
_FALSY = "None is falsy where the code only tests the value's truth"
_SENTINEL = "the rendered text holds the sentinel exactly once, so any split at it gives the same two parts"
_CHUNKS = "the chunk size decides how many rows one pass holds, not the values"
_UNSQUEEZE_1D = "unsqueeze of a 1-D tensor: +1 and -1 are the same new last dimension"
_ASSERT_MESSAGE = ("the message of an internal assertion (token_terms is called with a teacher whenever this term is "
                   "asked for); no user input reaches it")
_NO_COMPLETION_COLUMN = "a row without a completion column: row.get of None, '' or any other absent name is None"
_SORT_DIM = "Tensor.sort sorts along the last dimension unless told otherwise"
_MINUS_INF = "float() reads '-INF' as it reads '-inf'"
_INT_IDS = "torch.tensor of a non-empty list of Python ints is int64 anyway (the EOS pair is always in the list)"
_TOKEN_COLUMN = "the tokens' log-probs are (T, 1) after the gather: dim +1 is dim -1"
_SPAN_SQUEEZE = ("squeeze(-2) of (T, 1) leaves it (T, 1) (or makes (1,) of (1, 1)); a span's sum over (n, 1) is its "
                 "sum over (n,)")
_NONE_INDEX = "x[None] adds a leading dimension of 1: the same values, and reduce_tokens sums and counts them the same"
EQUIVALENT: dict[str, str] = {
    "onpolicy_kd.batch.x_concatenate__mutmut_5": "the batches are made the same way (the function's precondition: one "
    "rollout's pieces), so the fields taken from the first (source, temperature, alpha) are equal in all of them",
    "onpolicy_kd.batch.x_concatenate__mutmut_53": "torch.cat's dim defaults to 0",
    "onpolicy_kd.batch.x_concatenate__mutmut_84": _FALSY + " (right=None pads on the left, as False does)",
    "onpolicy_kd.batch.x_concatenate__mutmut_93": _FALSY + " (right=None pads on the left, as False does)",
    "onpolicy_kd.batch.xǁCompletionsǁselect__mutmut_3": "torch.as_tensor of a list of ints is int64 anyway (an empty "
    "index never reaches it: select of no rows fails earlier, at the width of no rows)",
    "onpolicy_kd.batch.xǁCompletionsǁselect__mutmut_6": "torch.as_tensor of a list of ints is int64 anyway",
    "onpolicy_kd.batch.xǁCompletionsǁselect__mutmut_4": _CPU_INDEX,
    "onpolicy_kd.batch.xǁCompletionsǁselect__mutmut_7": _CPU_INDEX,
    "onpolicy_kd.objectives.divergences.x_divergence__mutmut_39": _CPU_INDEX,
    "onpolicy_kd.objectives.divergences.x_divergence__mutmut_42": _CPU_INDEX,
    "onpolicy_kd.objectives.penalties.x__at_every_position__mutmut_15": _CPU_INDEX,
    "onpolicy_kd.objectives.penalties.x__at_every_position__mutmut_17": _CPU_INDEX,
    "onpolicy_kd.objectives.penalties.x__mean_pairwise_distance__mutmut_44": "ordered pairs i != j come in twos: "
    "the count is 0 (total 0 either way) or at least 2",
    "onpolicy_kd.objectives.penalties.x__mean_pairwise_distance__mutmut_46": "ordered pairs i != j come in twos: "
    "> 0 and > 1 select the same sequences",
    "onpolicy_kd.objectives.penalties.x__positions__mutmut_5": _INT_POSITIONS,
    "onpolicy_kd.objectives.penalties.x__positions__mutmut_9": _INT_POSITIONS,
    "onpolicy_kd.objectives.penalties.x_frequency_loss__mutmut_4": _INT_POSITIONS,
    "onpolicy_kd.objectives.penalties.x_frequency_loss__mutmut_6": _INT_POSITIONS,
    "onpolicy_kd.objectives.penalties.x_diversity_loss__mutmut_23": _CPU_SCALAR,
    "onpolicy_kd.objectives.penalties.x_diversity_loss__mutmut_25": _CPU_SCALAR,
    "onpolicy_kd.objectives.token_terms.x_expected_embedding__mutmut_3": _TWO_D,
    "onpolicy_kd.objectives.token_terms.x_expected_embedding__mutmut_9": "embeddings are (V, H): dim +1 is dim -1",
    "onpolicy_kd.objectives.token_terms.x_reverse_kl_to_teacher__mutmut_13": _UNSQUEEZE_1D,
    "onpolicy_kd.objectives.token_terms.x_reverse_kl_to_teacher__mutmut_3": _ASSERT_MESSAGE,
    "onpolicy_kd.objectives.token_terms.x_reverse_kl_to_teacher__mutmut_5": _ASSERT_MESSAGE,
    "onpolicy_kd.objectives.loss.x_teacher_token_logprobs__mutmut_1": _CHUNKS + " (a default chunk size)",
    "onpolicy_kd.data.prompts.xǁPromptBuilderǁ_wrap_chat__mutmut_18": _FALSY + " (apply_chat_template's tokenize)",
    "onpolicy_kd.data.prompts.xǁPromptBuilderǁ_chat__mutmut_24": _FALSY + " (apply_chat_template's tokenize)",
    "onpolicy_kd.data.prompts.xǁPromptBuilderǁ_chat__mutmut_3": _FALSY + " (no answer: no reference either way)",
    "onpolicy_kd.data.prompts.xǁPromptBuilderǁ_chat__mutmut_19": _FALSY + " (None or cut_body is cut_body)",
    "onpolicy_kd.data.prompts.xǁPromptBuilderǁ_chat__mutmut_63": _SENTINEL,
    "onpolicy_kd.data.prompts.xǁPromptBuilderǁ_chat__mutmut_64": _SENTINEL,
    "onpolicy_kd.data.prompts.xǁPromptBuilderǁ_chat__mutmut_65": _SENTINEL,
    "onpolicy_kd.data.prompts.xǁPromptBuilderǁ_messages__mutmut_20": _NO_COMPLETION_COLUMN,
    "onpolicy_kd.data.prompts.xǁPromptBuilderǁ_messages__mutmut_22": _NO_COMPLETION_COLUMN,
    "onpolicy_kd.data.prompts.xǁPromptBuilderǁ_messages__mutmut_25": _NO_COMPLETION_COLUMN,
    **{f"onpolicy_kd.objectives.pg.x_policy_gradient_loss__mutmut_{n}": "the zero single-step term is only logged "
       "(.item()) when there is no single-step KL, never added to the loss: its dtype and device do not show"
       for n in (99, 100, 102, 103)},
    "onpolicy_kd.objectives.pg.x_pg_returns__mutmut_104": "a bool mask's cumsum counts in int64, and the division "
    "by it is a true division: the same numbers of terms",
    "onpolicy_kd.objectives.token_terms.x_sampled_logprob__mutmut_11": _TWO_D,
    "onpolicy_kd.objectives.token_terms.x_sampled_logprob__mutmut_14": _UNSQUEEZE_1D,
    "onpolicy_kd.objectives.token_terms.x__apply__mutmut_17": "the row values are (N, k): dim +1 is dim -1",
    "onpolicy_kd.objectives.token_terms.x__apply__mutmut_3": "Rows(None) only stores None; only a term that reads the "
    "teacher would touch it, and token_terms is given a teacher whenever such a term is asked for",
    "onpolicy_kd.objectives.token_terms.xǁ_ChunkedRowsǁbackward__mutmut_7": "a zero gradient for hidden states that "
    "need none is dropped by autograd: memory, not values",
    "onpolicy_kd.objectives.token_terms.xǁ_ChunkedRowsǁbackward__mutmut_39": "backward runs only when some input needs "
    "a gradient, so the list of inputs is never empty",
    "onpolicy_kd.objectives.token_terms.xǁ_ChunkedRowsǁbackward__mutmut_47": "forward returns the values in their own "
    "(math) dtype, so the incoming gradient already has it",
    "onpolicy_kd.rollout.engine.xǁ_StopStringsǁupdate__mutmut_15": "batch_decode's skip_special_tokens defaults to "
    "False",
    "onpolicy_kd.objectives.penalties.x_truncation_loss__mutmut_10": "log-probs are (B, T): dim +1 is dim -1",
    "onpolicy_kd.objectives.penalties.x_truncation_loss__mutmut_19": "a bool tensor times a float tensor is that float "
    "tensor's dtype: the cast changes nothing",
    "onpolicy_kd.data.prompts.xǁPromptBuilderǁ_chat__mutmut_70": _FALSY + " (keep_end=None keeps the start, as False "
    "does)",
    "onpolicy_kd.data.prompts.xǁPromptBuilderǁ_text__mutmut_18": "decoding no tokens gives '', which is no reference, "
    "as None is",
    # the cross-tokenizer math (objectives/cross_tokenizer.py): (N, V) rows, 1-D token ids
    **{f"onpolicy_kd.objectives.cross_tokenizer.x_uld_distance__mutmut_{n}": _TWO_D for n in (8, 10, 19, 28, 35, 43, 48)},
    **{f"onpolicy_kd.objectives.cross_tokenizer.x_uld_distance__mutmut_{n}": _SORT_DIM for n in (33, 41)},
    "onpolicy_kd.objectives.cross_tokenizer.x_aligned_spans__mutmut_12": "inside `while S[i] != T[j]` the two ends "
    "are never equal, so <= is <",
    "onpolicy_kd.objectives.cross_tokenizer.x__byte_decoder__mutmut_37": "the extra value 256 gets the character "
    "chr(256), which the first byte outside the printable ranges (0) then takes over: the same table",
    **{f"onpolicy_kd.objectives.cross_tokenizer.x__vocabulary_bytes__mutmut_{n}": "told nothing, token_bytes asks "
       "is_byte_level itself: the same answer, once per entry instead of once" for n in (16, 19)},
    **{f"onpolicy_kd.objectives.cross_tokenizer.x_shared_vocabulary__mutmut_{n}": _INT_IDS for n in (23, 25, 27, 29)},
    **{f"onpolicy_kd.objectives.cross_tokenizer.x_shared_buckets__mutmut_{n}": _TWO_D
       for n in (6, 9, 19, 25, 38, 43, 50, 64, 67)},
    **{f"onpolicy_kd.objectives.cross_tokenizer.x_shared_buckets__mutmut_{n}": _MINUS_INF for n in (24, 42)},
    "onpolicy_kd.objectives.cross_tokenizer.x_shared_buckets__mutmut_8": "with every token shared, the logsumexp of "
    "nothing but -inf is -inf too, and index_fill's backward gives those positions a zero gradient (checked: the six "
    "divergences, values and gradients, one side or both sides fully shared)",
    **{f"onpolicy_kd.objectives.cross_tokenizer.x_shared_buckets__mutmut_{n}": "the rest buckets of two fully shared "
       "vocabularies hold probability 0 on both sides, and each divergence gives 0 and no gradient for a pair of zero "
       "entries: keeping them changes nothing (checked as for mutant 8)" for n in (63, 66)},
    "onpolicy_kd.objectives.cross_tokenizer.x_span_binary_kl__mutmut_16": "the teacher's log(1 - P_t) is read only "
    "where P_t < 1 (torch.where takes 0 at P_t = 1, and the teacher has no gradient); the clamp changes it only for "
    "P_t within 1e-12 of 1, where its weight 1 - P_t is below 1e-12 (a change below 1e-10 of the KL)",
    "onpolicy_kd.objectives.cross_tokenizer.x_span_binary_kl__mutmut_38": "at P_t = 1 the clamp keeps log(1 - P_t) "
    "finite, so (1 - P_t) * (...) is 0, what torch.where would take",
    **{f"onpolicy_kd.objectives.cross_tokenizer.x_spans_loss__mutmut_{n}": _CPU_INDEX for n in (38, 40, 43, 45)},
    **{f"onpolicy_kd.objectives.cross_tokenizer.x_spans_loss__mutmut_{n}": _TWO_D for n in (69, 82)},
    **{f"onpolicy_kd.objectives.cross_tokenizer.x_spans_loss__mutmut_{n}": _UNSQUEEZE_1D for n in (72, 85)},
    **{f"onpolicy_kd.objectives.cross_tokenizer.x_spans_loss__mutmut_{n}": _TOKEN_COLUMN for n in (74, 87)},
    **{f"onpolicy_kd.objectives.cross_tokenizer.x_spans_loss__mutmut_{n}": _SPAN_SQUEEZE for n in (75, 88)},
    "onpolicy_kd.objectives.divergences.x_divergence__mutmut_36": _NONE_INDEX,
    **{f"onpolicy_kd.batch.x_right_pad__mutmut_{n}": "torch.tensor of Python ints is int64 anyway" for n in (5, 7)},
    **{f"onpolicy_kd.batch.x_right_pad__mutmut_{n}": "torch.full infers int64 from an int fill value (the pad id)"
       for n in (11, 14)},
    **{f"onpolicy_kd.objectives.divergences.x_topk_buckets__mutmut_{n}": _TWO_D for n in (6, 10, 13, 26, 31, 43, 49)},
    "onpolicy_kd.objectives.divergences.x_topk_buckets__mutmut_30": _MINUS_INF,
    "onpolicy_kd.objectives.divergences.x_topk_buckets__mutmut_37": "the teacher's tail is (N,): " + _UNSQUEEZE_1D,
    "onpolicy_kd.objectives.divergences.x_topk_buckets__mutmut_12": "at k = V both tails are -inf: a pair of "
    "zero-probability buckets adds nothing to any divergence or its gradient (the k = V tests compare values and "
    "gradients with the dense run)",
    "onpolicy_kd.objectives.divergences.x_chunked_topk_divergence__mutmut_4": _CHUNKS + " (a default chunk size)",
    "onpolicy_kd.objectives.divergences.xǁ_ChunkedDivergenceǁbackward__mutmut_18": "autograd casts the gradient a "
    "Function returns to its input's dtype, so a head's float32 gradient reaches a bfloat16 head as bfloat16 either "
    "way",
    "onpolicy_kd.objectives.divergences.x_chunked_divergence__mutmut_4": _CHUNKS + " (a default chunk size)",
    **{f"onpolicy_kd.objectives.divergences.xǁ_ChunkedDivergenceǁforward__mutmut_{n}": "with no rows the head's "
       "gradient is all zeros: zeros in the head's dtype instead of float32 are the same zeros after the backward's "
       "scaling and cast to the head's dtype" for n in (77, 79)},
    "onpolicy_kd.objectives.divergences.xǁ_ChunkedDivergenceǁforward__mutmut_84": _FALSY + " (ctx.consumed)",
    "onpolicy_kd.objectives.loss.x_step_loss__mutmut_90": "token_terms already returns zeros at the references' "
    "masked positions and the denominator is the step's lm_tokens, not the mask's count: the mask only re-zeroes "
    "zeros",
    **{f"onpolicy_kd.objectives.loss.x_step_loss__mutmut_{n}": "the message of an internal assertion (the forward "
       "plan reads attention relations whenever hidden.relations is set); no user input reaches it"
       for n in (113, 114)},
    "onpolicy_kd.objectives.loss.x_step_loss__mutmut_82": "cross_entropy_terms does not read the recipe (the "
    "log-probabilities of the references' tokens whatever the settings)",
    "onpolicy_kd.objectives.divergences.xǁ_ChunkedDivergenceǁforward__mutmut_83": "the backward's cast to the "
    "head's dtype skipped (.to(None)): autograd casts the gradient a Function returns to its input's dtype, so a "
    "bfloat16 head gets a bfloat16 gradient either way",
    "onpolicy_kd.objectives.divergences.x_linear_divergence__mutmut_6": _CHUNKS + " (a default chunk size)",
    **{f"onpolicy_kd.objectives.divergences.x_linear_divergence__mutmut_{n}": "chunked_divergence's vocab_size "
       "defaults to the same min(Vs, Vt)" for n in (39, 51)},
    "onpolicy_kd.objectives.divergences.x_linear_divergence__mutmut_112": "the torch backend's rows are the valid "
    "ones already, and divergence's own default for num_tokens=None is the count of its rows: `count`",
    **{f"onpolicy_kd.objectives.divergences.x_topk_divergence__mutmut_{n}": _CPU_INDEX for n in (41, 44)},
    **{f"onpolicy_kd.objectives.modes.x_steps_run_teacher__mutmut_{n}": "the clause changes only where the "
       "student is sampled with rollout.alpha 0, and there the first clause is already true: forward_plan leaves the "
       "teacher's forward out only for pg with alpha > 0, and reads_only_cached_teacher needs a run without student "
       "samples (the recipe refuses alpha > 0 where no step samples the student, so `or` adds no other case)"
       for n in (7, 9)},
    "onpolicy_kd.objectives.token_terms.x_reverse_kl_to_teacher__mutmut_4": _ASSERT_MESSAGE,
    "onpolicy_kd.objectives.token_terms.x_entropy__mutmut_8": _TWO_D,
    **{f"onpolicy_kd.objectives.token_terms.x_previous_probability__mutmut_{n}": "the rows are (n, T) earlier "
       "tokens: dim +1 is dim -1" for n in (46, 59)},
    **{f"onpolicy_kd.objectives.loss.x_penalty_loss__mutmut_{n}": _CPU_SCALAR for n in (4, 6)},
    "onpolicy_kd.objectives.token_terms.xǁ_ChunkedRowsǁforward__mutmut_37": "with no valid rows nothing is "
    "scattered: a (1, width) block of zeros broadcasts into no position, as a (0, width) one does",
    "onpolicy_kd.objectives.token_terms.xǁ_ChunkedRowsǁbackward__mutmut_54": "the gradient with respect to "
    "`weight` (the head detached) is already in the head's dtype, so the first chunk's cast to it and a cast to None "
    "are both no-ops",
    "onpolicy_kd.objectives.token_terms.x_token_terms__mutmut_1": _CHUNKS + " (a default chunk size)",
    "onpolicy_kd.objectives.token_terms.x_token_terms__mutmut_9": "nonzero() of a 1-D mask is (n, 1): dim +1 is dim -1",
    "onpolicy_kd.objectives.token_terms.x_token_terms__mutmut_88": _TWO_D,
    "onpolicy_kd.objectives.token_terms.x_token_terms__mutmut_102": "squeeze(-1) changes only a last dimension of "
    "size 1, so a wider term's (B, T, w) column keeps its shape (a width of 1 is a per-token scalar; embedding terms "
    "are as wide as the input embeddings)",
    "onpolicy_kd.objectives.hidden.xǁStitchingǁ__init____mutmut_7": _FALSY + " (nn.Linear's bias)",
    **{f"onpolicy_kd.objectives.hidden.x_hidden_state_loss__mutmut_{n}": "the valid rows are (n, D): dim +1 is dim -1"
       for n in (34, 47)},
    "onpolicy_kd.objectives.hidden.x_hidden_state_loss__mutmut_45": "cosine_similarity's dim defaults to 1, which is "
    "dim -1 of the (n, D) valid rows",
    "onpolicy_kd.objectives.hidden.x_hidden_state_loss__mutmut_46": "cosine_similarity's eps defaults to 1e-8",
    "onpolicy_kd.objectives.relations.x_relation_log_probs__mutmut_34": "the scores are (B, R, T, d): dim 2 is dim -2",
    "onpolicy_kd.objectives.relations.x_relation_log_probs__mutmut_37": "the heads divide W (checked above), so "
    "W / heads is W // heads",
    "onpolicy_kd.objectives.modes.x_lambda_coin__mutmut_2": "`<=` for `<` differs only when the uniform draw equals "
    "lmbda exactly, a chance of about 2^-53 per step",
    **{f"onpolicy_kd.data.prompts.xǁPromptBuilderǁ_templated__mutmut_{n}": "a reference column's text in `values` "
       "is replaced in the template by the first reference (the `reference` key written after it), and the truncated "
       "field is never the reference (__post_init__ refuses it)" for n in (19, 20)},
    **{f"onpolicy_kd.data.prompts.xǁPromptBuilderǁ_templated__mutmut_{n}": _SENTINEL for n in (37, 38, 39)},
    "onpolicy_kd.data.prompts.xǁPromptBuilderǁ_templated__mutmut_21": "an assertion for the type checker: "
    "__post_init__ sets both the template and the truncated field for the summarization and instruction formats, the "
    "only ones _templated serves",
}


def in_scope(mutant: str) -> bool:
    return any(fnmatch.fnmatchcase(mutant, pattern) for pattern in SCOPE)


def results() -> dict[str, str]:
    """{mutant name: status} of every mutant in scope (killed, survived, no tests, timeout, not checked, ...)."""
    out = subprocess.run([*MUTMUT, "results", "--all", "true"], cwd=ROOT, capture_output=True, text=True, check=True)
    found = {}
    for line in out.stdout.splitlines():
        match = re.fullmatch(r"\s+(\S+): (.+)", line)
        if match and in_scope(match.group(1)):
            found[match.group(1)] = match.group(2).strip()
    return found


def _meta_paths(root: Path) -> dict[str, Path]:
    """{source file: its mutmut meta file} for the files mutmut mutates ([tool.mutmut] only_mutate)."""
    import tomllib

    config = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["mutmut"]
    sources = sorted({str(p.relative_to(root)) for pattern in config["only_mutate"] for p in root.glob(pattern)
                      if p.suffix == ".py"})
    return {source: root / "mutants" / (source + ".meta") for source in sources}


def save_verdicts(root: Path = ROOT, record: Path = VERDICTS, version: str | None = None) -> int:
    """Write the verdicts of the in-scope mutants in mutants/ (and mutmut's function hashes) to the record.

    Files with no meta file in mutants/ keep what the record held. Returns how many verdicts the record holds."""
    version = version or importlib.metadata.version("mutmut")
    old = load_verdicts(record, version)
    files = {}
    for source, meta_path in _meta_paths(root).items():
        if not meta_path.exists():
            if source in old:
                files[source] = old[source]
            continue
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        files[source] = {
            "hash_by_function_name": meta["hash_by_function_name"],
            "exit_code_by_key": {name: code for name, code in sorted(meta["exit_code_by_key"].items())
                                 if code is not None and in_scope(name)},
        }
    text = json.dumps({"mutmut": version, "files": files}, indent=0, sort_keys=True)
    record.write_bytes(gzip.compress(text.encode("utf-8"), mtime=0))
    return sum(len(f["exit_code_by_key"]) for f in files.values())


def load_verdicts(record: Path = VERDICTS, version: str | None = None) -> dict[str, dict]:
    """{source file: {hash_by_function_name, exit_code_by_key}} from the record; empty when there is none, or when
    another mutmut version made it (its names and hashes need not match this one's)."""
    if not record.exists():
        return {}
    data = json.loads(gzip.decompress(record.read_bytes()))
    version = version or importlib.metadata.version("mutmut")
    if data["mutmut"] != version:  # (read on restore and on save: the message fits both)
        print(f"{record.name} was made by mutmut {data['mutmut']}, not this {version}: its verdicts are not used")
        return {}
    return data["files"]


def restore_verdicts(root: Path = ROOT, record: Path = VERDICTS, version: str | None = None) -> int:
    """Seed mutants/ with the recorded verdicts where it has no meta file yet (a fresh clone, another machine).

    mutmut reads the meta file when it makes a file's mutants and keeps each verdict whose function's hash is
    unchanged, so the run skips them. Returns how many verdicts were restored."""
    files = load_verdicts(record, version)
    restored = 0
    for source, meta_path in _meta_paths(root).items():
        if source not in files or meta_path.exists():
            continue
        meta_path.parent.mkdir(parents=True, exist_ok=True)
        meta_path.write_text(json.dumps({
            "exit_code_by_key": files[source]["exit_code_by_key"],
            "hash_by_function_name": files[source]["hash_by_function_name"],
            "type_check_error_by_key": {}, "durations_by_key": {}, "estimated_durations_by_key": {},
        }), encoding="utf-8")
        restored += len(files[source]["exit_code_by_key"])
    return restored


def mutmut_run(names: list[str], max_children: int) -> None:
    # (named mutants are run even when they have a verdict: that is how --recheck runs survivors again)
    subprocess.run([*MUTMUT, "run", "--max-children", str(max_children), *names], cwd=ROOT, check=True)


def module_of(mutant: str) -> str:
    """onpolicy_kd.objectives.pg.x_pg_returns__mutmut_12 -> onpolicy_kd/objectives/pg.py"""
    dotted = mutant.split("__mutmut_")[0].rsplit(".", 1)[0]
    return dotted.replace(".", "/") + ".py"


def diff_of(mutant: str) -> str:
    out = subprocess.run([*MUTMUT, "show", mutant], cwd=ROOT, capture_output=True, text=True)
    return "\n".join(line for line in out.stdout.splitlines()[1:] if line.startswith(("-", "+"))
                     and not line.startswith(("---", "+++")))


def write_report(statuses: dict[str, str], seconds: float | None, ran: int, command: str) -> list[str]:
    by_file: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for mutant, status in statuses.items():
        by_file[module_of(mutant)][status] += 1
    columns = sorted({s for counts in by_file.values() for s in counts})
    survivors = sorted(m for m, s in statuses.items() if s in UNKILLED)
    unexplained = [m for m in survivors if m not in EQUIVALENT]
    lines = [
        "# Mutation testing",
        "",
        f"Made by `{command}` (scripts/mutation.py; what is mutated and which tests run: `[tool.mutmut]` in "
        "pyproject.toml). The verdicts are kept across runs and machines in `mutation_verdicts.json.gz` beside this "
        "file, so the counts below add up every run so far"
        # the time of one invocation only: a resumed or rechecking run covers a part of the mutants
        + (f"; the last invocation ran {ran} mutants in {seconds / 60:.0f} min on this machine" if seconds else "")
        + ".",
        "",
        "| file | " + " | ".join(columns) + " | total |",
        "|---|" + "---|" * (len(columns) + 1),
    ]
    for path, counts in sorted(by_file.items()):
        lines.append(f"| {path} | " + " | ".join(str(counts[c]) for c in columns) + f" | {sum(counts.values())} |")
    total = collections.Counter(statuses.values())
    lines.append("| **all** | " + " | ".join(str(total[c]) for c in columns) + f" | {len(statuses)} |")
    lines += ["", f"Survivors (survived or no test reaches them): {len(survivors)}, of which equivalent to the original: "
              f"{len(survivors) - len(unexplained)}, not yet killed: {len(unexplained)}.", "",
              "In scope: " + ", ".join(f"`{p}`" for p in SCOPE) + "; engine.py's and prompts.py's other functions "
              "(the decoding cache, format detection) are mutated by mutmut but not run or counted.", ""]
    if survivors:
        lines += ["## Survivors", ""]
        for mutant in survivors:
            why = EQUIVALENT.get(mutant, "**not killed: needs a test**")
            lines += [f"- `{mutant}`: {why}", "", "  ```diff"]
            lines += ["  " + line for line in diff_of(mutant).splitlines()]
            lines += ["  ```", ""]
    REPORT.write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")
    return unexplained


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--report", action="store_true", help="only rewrite the report from mutants/")
    parser.add_argument("--max-children", type=int, default=2)
    parser.add_argument("--recheck", action="store_true", help="also run the survivors again")
    parser.add_argument("mutants", nargs="*", help="mutant names or globs to run (default: those in scope without a "
                        "verdict)")
    args = parser.parse_args()
    seconds, ran = None, 0
    if not args.report:
        restored = restore_verdicts()
        if restored:
            print(f"{restored} verdicts restored from {VERDICTS.relative_to(ROOT)}")
        start = time.perf_counter()
        try:
            mutmut_run([FIRST], args.max_children)
            statuses = results()
            wanted = ("not checked", *UNKILLED) if args.recheck else ("not checked",)
            names = args.mutants or [m for m, status in statuses.items() if status in wanted]
            if names:
                mutmut_run(names, args.max_children)
            # the first mutant, and every mutant the names or globs match
            ran = len({FIRST} | {m for m in statuses if any(fnmatch.fnmatchcase(m, n) for n in names)})
        finally:  # a stopped run keeps what it decided
            print(f"{save_verdicts()} verdicts in {VERDICTS.relative_to(ROOT)}")
        seconds = time.perf_counter() - start
    else:
        save_verdicts()
    statuses = results()
    stale = sorted(set(EQUIVALENT) - set(statuses))
    if stale:
        print("EQUIVALENT names mutants that no longer exist (the code changed): " + ", ".join(stale))
    command = "python scripts/mutation.py" + (" --report" if args.report else "")
    unexplained = write_report(statuses, seconds, ran, command)
    print(f"{len(statuses)} mutants; report in {REPORT.relative_to(ROOT)}")
    for mutant in unexplained:
        print(f"survived: {mutant}")
    return 1 if unexplained or stale else 0


if __name__ == "__main__":
    sys.exit(main())
