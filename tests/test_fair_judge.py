"""The fair judge: each new held-out measure against a hand computation on small inputs, the teacher's cached
answers, held-out data with human references from another file, and the generated arithmetic task."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from onpolicy_kd.evaluation import metrics as M
from onpolicy_kd.evaluation.heldout import mean_over_samples, teacher_metrics, text_metrics
from onpolicy_kd.evaluation.teacher_answers import Answer
from onpolicy_kd.evaluation.uncertainty import difference, seed_prompt_bootstrap, standard_error

EOS = 0


# --- ROUGE against several references ----------------------------------------------------------------------------

def f_measure(lcs: int, candidate_words: int, reference_words: int) -> float:
    p, r = lcs / candidate_words, lcs / reference_words
    return 2 * p * r / (p + r) if lcs else 0.0


def test_multi_reference_rouge_takes_the_best_matching_reference():
    # "the cat sat" vs "a cat sat down": LCS "cat sat" (2 of 3 and 2 of 4 words); vs "the dog": LCS "the" (1 of 3, 1 of 2)
    candidate, refs = "The cat sat.", ["A cat sat down", "the dog"]
    assert math.isclose(M.rouge(candidate, refs[0])["rougeL"], f_measure(2, 3, 4))
    assert math.isclose(M.rouge(candidate, refs[1])["rougeL"], f_measure(1, 3, 2))
    assert math.isclose(M.rouge(candidate, refs)["rougeL"], 4 / 7)  # the first reference's F, the larger
    assert math.isclose(M.rouge(candidate, list(reversed(refs)))["rougeL"], 4 / 7)  # whatever the order
    # ROUGE-2: "cat sat" is the one shared bigram with the first (1 of 2 and 1 of 3 bigrams), none with the second
    assert math.isclose(M.rouge(candidate, refs)["rouge2"], f_measure(1, 2, 3))
    with pytest.raises(ValueError, match="at least one target"):
        M.rouge(candidate, [])


def test_rouge_with_several_targets_reads_the_targets_as_references():
    """rouge-score's score_multi takes (targets, prediction); swapped, the candidate would be the reference."""
    candidate, refs = "a b c d", ["a b", "c d e f g h"]
    # as references: "a b" gives P 2/4, R 2/2 -> 2/3; "c d e f g h" gives P 2/4, R 2/6 -> 0.4: the best is 2/3
    assert math.isclose(M.rouge(candidate, refs)["rougeL"], 2 / 3)


# --- the share cut at the length limit -----------------------------------------------------------------------------

def test_was_cut_only_at_the_limit_without_an_end():
    assert M.was_cut([5, 6, 7, 8], 4, [EOS])  # the limit reached, the last token not an end
    assert not M.was_cut([5, 6, 7, EOS], 4, [EOS])  # ended exactly at the limit
    assert not M.was_cut([5, EOS], 4, [EOS])  # ended early
    assert not M.was_cut([5, 6, 7], 4, [EOS])  # shorter (a stop string ended it)
    assert M.was_cut([5, 6, 7, 9], 4, [EOS, 9]) is False  # any of several end tokens


def test_truncated_share_is_the_mean_of_cut_completions():
    answers = [Answer([5, 6, 7], "x"), Answer([5, EOS], "y"), Answer([5, 6, 8], "z")]  # limit 3: two cut
    per = [text_metrics(a, references=[], teacher=None, teacher_samples=[], gold=None, pattern=None,
                        max_new_tokens=3, eos_ids=[EOS]) for a in answers]
    assert [m["truncated"] for m in per] == [1.0, 0.0, 1.0]
    assert mean_over_samples(per)["truncated"] == 2 / 3


# --- final answers and exact match ---------------------------------------------------------------------------------

PATTERN = r"Answer: (-?[0-9]+)"


@pytest.mark.parametrize("text, answer", [
    ("12 + 3 = 15\nAnswer: 15", "15"),
    ("Answer: 7\n... Answer: 9", "9"),  # the last answer counts
    ("Answer: -4", "-4"),
    ("Answer: 42 apples", "42"),
    ("Answer:  42", None),  # the pattern says one space
    ("12 + 3 = 15", None),  # no answer line
    ("Answer: fifteen", None),  # not a number
    ("Answer: ", None),
    ("", None),
])
def test_final_answer_extraction(text, answer):
    assert M.final_answer(text, PATTERN) == answer


def test_exact_match_counts_a_missing_answer_as_wrong():
    assert M.exact_match("1 + 1 = 2\nAnswer: 2", "2", PATTERN) == 1.0
    assert M.exact_match("1 + 1 = 3\nAnswer: 3", "2", PATTERN) == 0.0
    assert M.exact_match("1 + 1 = 2", "2", PATTERN) == 0.0  # cut before its answer
    assert M.exact_match("Answer: 20", "2", PATTERN) == 0.0  # not a prefix match
    assert M.final_answer("x", re.compile("Answer: ([0-9]+)|none")) is None  # a match whose group is empty


def test_answer_pattern_needs_one_group():
    from pydantic import ValidationError

    from onpolicy_kd.recipe import EvalConfig

    assert EvalConfig(answer_pattern=PATTERN).answer_pattern == PATTERN
    with pytest.raises(ValidationError, match="exactly one"):
        EvalConfig(answer_pattern=r"Answer: [0-9]+")
    with pytest.raises(ValidationError, match="exactly one"):
        EvalConfig(answer_pattern=r"(Answer): ([0-9]+)")
    with pytest.raises(ValidationError, match="not a regular expression"):
        EvalConfig(answer_pattern=r"Answer: ([0-9]+")


# --- one completion's metrics, sampled averaging, the teacher's own ---------------------------------------------

def test_text_metrics_by_hand():
    answer = Answer([5, 6, 5, EOS], "the cat sat\nAnswer: 3")
    m = text_metrics(answer, references=["the cat sat on it", "dogs"], teacher="a cat", teacher_samples=["cat sat", "x"],
                     gold="3", pattern=re.compile(PATTERN), max_new_tokens=8, eos_ids=[EOS])
    words = 5  # the, cat, sat, answer, 3
    assert math.isclose(m["rougeL_ref"], f_measure(3, words, 5))
    assert math.isclose(m["rougeL_teacher"], f_measure(1, words, 2))
    assert math.isclose(m["rougeL_teacher_samples"], f_measure(2, words, 2))
    assert m["accuracy"] == 1.0 and m["length"] == 4 and m["truncated"] == 0.0
    assert m["distinct1"] == 3 / 4 and m["repetition"] == 1 / 4
    bare = text_metrics(answer, references=[], teacher=None, teacher_samples=[], gold=None, pattern=None,
                        max_new_tokens=8, eos_ids=[EOS])
    assert not {"rougeL_ref", "rouge2_ref", "rougeL_teacher", "rougeL_teacher_samples", "accuracy"} & set(bare)


def test_a_prompts_sampled_figure_is_the_mean_over_its_samples():
    per_sample = [{"accuracy": 1.0, "length": 4}, {"accuracy": 0.0, "length": 6}, {"accuracy": 1.0, "length": 8}]
    assert mean_over_samples(per_sample) == {"accuracy": 2 / 3, "length": 6.0}


def test_teacher_samples_are_compared_with_the_other_samples_only():
    common = dict(pattern=None, max_new_tokens=10, eos_ids=[EOS])
    greedy = Answer([1, 2], "red fox")
    samples = [Answer([1], "red fox"), Answer([2], "blue sky")]
    m = teacher_metrics(greedy, samples, ["red fox runs"], None, common)
    assert "teacher/greedy/rougeL_teacher" not in m  # the greedy answer against itself: left out
    assert m["teacher/greedy/rougeL_teacher_samples"] == 1.0  # sample 1 equals it
    # sample 1 vs the others = "blue sky": 0; sample 2 vs "red fox": 0 -> mean 0 (never against itself)
    assert m["teacher/sampled/rougeL_teacher_samples"] == 0.0
    assert m["teacher/sampled/rougeL_teacher"] == 0.5  # (1 + 0) / 2 against the greedy answer
    assert math.isclose(m["teacher/greedy/rougeL_ref"], f_measure(2, 2, 3))


# --- uncertainty -------------------------------------------------------------------------------------------------

def test_standard_error_by_hand():
    assert math.isclose(standard_error([1.0, 2.0, 3.0, 4.0]), math.sqrt(5 / 3) / 2)  # sd sqrt(5/3), n 4
    assert math.isnan(standard_error([1.0])) and math.isnan(standard_error([1.0, math.inf]))
    assert standard_error([3, 3, 3]) == 0.0  # (ints: token counts)


def test_bootstrap_over_prompts_matches_its_exact_spread():
    # one seed, two prompts a and b: the resampled mean is a, (a+b)/2 or b with probabilities 1/4, 1/2, 1/4,
    # whose standard deviation is |a - b| / (2 sqrt 2)
    est = seed_prompt_bootstrap([[0.2, 0.6]], draws=20000)
    assert math.isclose(est.mean, 0.4)
    assert math.isclose(est.se, 0.4 / (2 * math.sqrt(2)), rel_tol=0.03)
    assert est.low == pytest.approx(0.2) and est.high == pytest.approx(0.6)


def test_bootstrap_over_seeds_and_a_constant_table():
    assert seed_prompt_bootstrap([[0.5, 0.5], [0.5, 0.5]]).se == 0.0
    # two seeds whose every prompt agrees: only the seeds vary, a and b as above
    est = seed_prompt_bootstrap([[0.1, 0.1, 0.1], [0.3, 0.3, 0.3]], draws=20000)
    assert math.isclose(est.se, 0.2 / (2 * math.sqrt(2)), rel_tol=0.03)


def test_weighted_bootstrap_is_a_token_level_mean():
    # prompt KLs 1.0 over 1 token and 4.0 over 3 tokens: the set's KL is (1 + 12) / 4, not the mean 2.5
    est = seed_prompt_bootstrap([[1.0, 4.0]], weights=[[1, 3]], draws=4000)
    assert math.isclose(est.mean, 13 / 4)
    assert est.low == pytest.approx(1.0) and est.high == pytest.approx(4.0)  # the draws of one prompt twice
    with pytest.raises(ValueError, match="weights of shape"):
        seed_prompt_bootstrap([[1.0, 4.0]], weights=[[1, 3, 1]])


def test_paired_difference_removes_the_prompts_difficulty():
    # b = a - 0.1 on every prompt, the prompts themselves very different: the difference is exactly 0.1
    a = [[0.9, 0.1, 0.5], [0.9, 0.1, 0.5]]
    b = [[0.8, 0.0, 0.4], [0.8, 0.0, 0.4]]
    d = difference(a, b)
    assert math.isclose(d.mean, 0.1) and d.se < 1e-12 and d.excludes_zero
    assert not difference(a, a).excludes_zero
    with pytest.raises(ValueError, match="same prompts"):
        difference(a, [[0.1, 0.2]])


# --- held-out data with references from another file ----------------------------------------------------------

def test_eval_path_reads_its_own_columns_and_several_references(tmp_path, tiny_tokenizer, isolated_cache):
    from onpolicy_kd.data.loading import load_prompt_data
    from onpolicy_kd.recipe import DataConfig

    train, held_out = tmp_path / "train.jsonl", tmp_path / "refs.jsonl"
    train.write_text("".join(json.dumps({"article": f"The Senate met {i} times."}) + "\n" for i in range(6)))
    held_out.write_text(json.dumps({"article": "Fires forced hundreds out.", "headline": ["Fires", "Hundreds flee"]})
                        + "\n" + json.dumps({"article": "Markets rose.", "headline": "Markets up"}) + "\n")
    cfg = DataConfig(path=str(train), eval_path=str(held_out), max_prompt_tokens=32)
    assert cfg.held_out_split == "train"
    data = load_prompt_data(cfg, tiny_tokenizer)
    assert len(data.train) == 6 and len(data.eval) == 2  # nothing held out of the training file
    assert data.eval["references"] == [["Fires", "Hundreds flee"], ["Markets up"]]
    assert data.eval["reference"] == ["Fires", "Markets up"]  # the first trains / scores perplexity
    assert all(ids for ids in data.eval["reference_ids"]) and data.train["references"] == [[]] * 6
    renamed = tmp_path / "renamed.jsonl"
    renamed.write_text(json.dumps({"body": "Fires forced hundreds out.", "title": "Fires"}) + "\n")
    cfg = DataConfig(path=str(train), eval_path=str(renamed), eval_columns={"document": "body", "reference": "title"},
                     max_prompt_tokens=32)
    assert load_prompt_data(cfg, tiny_tokenizer).eval["reference"] == ["Fires"]
    from onpolicy_kd.errors import DataError

    with pytest.raises(DataError, match="data.eval_path=.*data.eval_columns"):
        load_prompt_data(DataConfig(path=str(train), eval_path=str(renamed), max_prompt_tokens=32), tiny_tokenizer)
    with pytest.raises(DataError, match=r"data.eval_split='train\[5:5\]' of .*refs.jsonl.*"
                                        r"choose rows the file has.*data.eval_split=train\[:50\]"):
        load_prompt_data(DataConfig(path=str(train), eval_path=str(held_out), eval_split="train[5:5]",
                                    max_prompt_tokens=32), tiny_tokenizer)


def test_eval_columns_and_eval_size_are_errors_where_they_do_nothing(tiny_recipe):
    from onpolicy_kd.errors import ConfigError
    from onpolicy_kd.recipe import load_recipe

    with pytest.raises(ConfigError, match="data.eval_columns"):
        load_recipe(tiny_recipe, ["data.eval_columns={document: body}"])
    with pytest.raises(ConfigError, match="data.eval_size"):
        load_recipe(tiny_recipe, ["data.eval_path=x.jsonl"])  # tiny_recipe sets eval_size


# --- the teacher's answers, cached -------------------------------------------------------------------------------

def test_teacher_answers_are_cached_and_sampled_per_seed(tmp_path, tiny_tokenizer):
    from datasets import Dataset

    from conftest import tiny_student_and_teacher
    from onpolicy_kd.evaluation.teacher_answers import teacher_answers
    from onpolicy_kd.recipe import EvalConfig

    import copy

    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.pad_token = tokenizer.eos_token  # as the model loader sets it for tokenizers without one
    _, teacher = tiny_student_and_teacher(tokenizer)
    prompts = Dataset.from_dict({"prompt_ids": [tokenizer(t).input_ids for t in ("The Senate", "Hello world",
                                                                                 "A bushfire")]})
    cfg = EvalConfig(max_samples=3, batch_size=2, max_new_tokens=6, samples_per_prompt=2, seed=7)
    common = dict(device=torch.device("cpu"), vocab=len(tokenizer), cache_dir=tmp_path)
    first = teacher_answers(teacher, tokenizer, prompts, cfg, **common)
    again = teacher_answers(teacher, tokenizer, prompts, cfg, **common)
    assert first.hits == 0 and again.hits == 3 and len(first.folders) == 3  # greedy + 2 sample sets
    assert again.greedy == first.greedy and again.samples == first.samples
    assert len(first) == 3 and all(len(s) == 2 for s in first.samples)
    direct = teacher_answers(teacher, tokenizer, prompts, cfg, **{**common, "cache_dir": None})
    assert direct.greedy == first.greedy and direct.samples == first.samples and direct.folders == []
    other_seed = teacher_answers(teacher, tokenizer, prompts, cfg.model_copy(update={"seed": 8}), **common)
    assert other_seed.greedy == first.greedy and other_seed.samples != first.samples
    # the k-th sample set is drawn with seed eval.seed + k: seed 8's first is seed 7's second, read from the cache
    assert [s[0] for s in other_seed.samples] == [s[1] for s in first.samples]
    assert other_seed.hits == 2  # that set and the greedy answers (which do not depend on the seed)


# --- the arithmetic task -----------------------------------------------------------------------------------------

def test_arithmetic_generator_is_deterministic_and_correct(tmp_path):
    from onpolicy_kd.data import arithmetic

    assert arithmetic.problems(50, seed=3) == arithmetic.problems(50, seed=3)
    assert arithmetic.problems(50, seed=3) != arithmetic.problems(50, seed=4)
    for item in arithmetic.problems(200, seed=3):
        numbers = re.findall(r"[+-]? ?[0-9]+", item["question"].removeprefix("Compute ").split(".")[0])
        total = sum(int(n.replace(" ", "")) for n in numbers)  # the expression, evaluated independently
        lines = item["answer"].split("\n")
        assert arithmetic.STEPS_MIN <= len(lines) - 1 <= arithmetic.STEPS_MAX
        for line in lines[:-1]:  # each written step is right, and starts from the line before's result
            left, result = line.split(" = ")
            assert eval(left) == int(result) >= 0  # noqa: S307 - our own generated digits and + / -
        assert M.final_answer(item["answer"], arithmetic.ANSWER_PATTERN) == str(total)
    folder = arithmetic.write_arithmetic(tmp_path / "arith")
    train = [json.loads(line) for line in open(folder / "train.jsonl")]
    held_out = [json.loads(line) for line in open(folder / "eval.jsonl")]
    assert len(train) == arithmetic.TRAIN_ROWS and len(held_out) == arithmetic.EVAL_ROWS
    assert not {r["question"] for r in train} & {r["question"] for r in held_out}
    assert (folder / "train.jsonl").read_bytes() == (arithmetic.write_arithmetic(tmp_path / "again") / "train.jsonl").read_bytes()


# --- the news headline pairs -------------------------------------------------------------------------------------

def test_headline_pairs_keep_clean_rows_in_a_fixed_order():
    import csv
    import io

    from onpolicy_kd.assets import headline_pairs

    long = " ".join(["word"] * 160)
    rows = [("http://www.bbc.co.uk/news/1", "Ministers agree a new budget today", long),
            ("http://www.cnn.com/2", "Too short", long),  # a 2-word headline
            ("http://tass.com/3", "Rain falls on the capital again", "few words"),  # a short article
            ("http://www.dw.com/4", 'Damaged "?headline of the day', long),
            ("http://www.dw.com/5", "Clean headline with damaged text", 'Start "?damaged ' + long),
            ("http://tass.com/6", "Press review: three stories in one", long),
            ("http://www.rte.ie/7", "Ministers agree a new budget today", long)]  # a repeated headline
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["article_id", "publish_date", "article_source_link", "title", "subtitle", "text"])
    for i, (link, title, text) in enumerate(rows):
        writer.writerow([i, "2017/2/7", link, title, "", "- " + text])
    pairs = headline_pairs(out.getvalue())
    assert [p["headline"] for p in pairs] == ["Ministers agree a new budget today"]
    assert pairs[0]["source"] == "bbc.co.uk" and pairs[0]["article"].startswith("word")  # the stray dash gone
