"""Re-run the hostile-user inputs of the issue "Runs that lose nothing, round two" against the real CLI, on the
offline default (recipes/smollm2_news.yaml, SmolLM2-135M-Instruct in ~/.cache/onpolicy_kd/models), and write
benchmarks/results/hostile_list.md: per case what it tries, the command, its exit status, whether a Python
traceback appeared, the first line of the message the user sees, and a verdict computed from the case's
expectation (a regex the output must match and the exit status it must have):

    clean error   non-zero exit, the expected message, no traceback
    ok            exit 0 and the expected warning/notice line (the right outcome for that case)
    accepted      exit 0 where a refusal was expected, or the expected warning is missing
    traceback     a Python traceback on stdout/stderr
    unexpected: . anything else (wrong exit status, another message, a timeout, a check that failed), said

    python scripts/hostile_list.py                 # every case
    python scripts/hostile_list.py --only 6 8a 8e  # these cases (the report then holds only them)
    python scripts/hostile_list.py --fast          # only the dry runs and the instant refusals
    python scripts/hostile_list.py --keep          # keep the temporary folder (each case's stdout/stderr)

Not part of CI (tests/test_faults.py and tests/test_bad_inputs.py check the same guarantees on tiny models): every
case starts the real CLI, which loads the real 135M teacher. Time on the 2-core CPU machine, alone: 5.8 min for the
34 cases (the --fast ones, the dry runs and the refusals that come before any training: ids ending in -dry, 3a,
4b, 4f, 4g, 6, 8a-8f, 9b, ~2 min); the training cases are tiny runs of 10-30 s, case 4c's batch of 50 ~80 s.

Every run writes into a fresh temporary folder (train.output_dir=$TMP/<case>/...), never into outputs/. Real runs
use the tiny run T (the TINY list below): 2 steps, 4-token rollouts, 4 training rows (data.split=train[:4]) and 2
held-out prompts (data.eval_split=train[280:282]: the news recipe's held-out rows come from data.eval_path, the
headlines file, which has 2491 rows, so rows 280-281 exist there; the recipe itself judges on train[:60]).
ONPOLICY_KD_* variables of the calling shell are dropped; a case that needs ONPOLICY_KD_CACHE_DIR sets it to a
temporary root X built from symlinks (X/models -> ~/.cache/onpolicy_kd/models, X/data -> ~/.cache/onpolicy_kd/data,
or only the raw data folders for a cold cache), so no model is copied. The real model folder is never an output
folder: the "output folder is the teacher's folder" cases use X/models/smollm2-135m-instruct or $TMP/teacher,
folders of symlinks to the teacher's files (what `cp -rs` makes), check their file lists before and after, and the
script checks that the real teacher folder's file list is the same after the whole list as before. Runs under the
default root write small tokenised-data and teacher-completion entries into ~/.cache/onpolicy_kd/data, as any run
does (so do the runs under an X whose data/ links there). Cases 3b-dry and 3c first run their command once under
the default root, then again under X, and expect the second to reuse what the first cached.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
REPORT = REPO / "benchmarks" / "results" / "hostile_list.md"
PY = sys.executable
CACHE = Path("~/.cache/onpolicy_kd").expanduser()
TEACHER_DIR = CACHE / "models" / "smollm2-135m-instruct"
RECIPE = "recipes/smollm2_news.yaml"
STAGED = "recipes/smollm2_news_blocks.yaml"
TRAIN = [PY, "-m", "onpolicy_kd.train"]
EVALUATE = [PY, "-m", "onpolicy_kd.evaluate"]
_console_script = Path(PY).parent / "onpolicy-kd"
CLI = [str(_console_script)] if _console_script.is_file() else [PY, "-m", "onpolicy_kd.cli"]
TRACEBACK = "Traceback (most recent call last)"

TINY = ["train.max_steps=2", "rollout.max_new_tokens=4", "eval.max_new_tokens=4", "eval.max_samples=2",
        "eval.batch_size=2", "train.batch_size=1", "logging.live=false", "data.split=train[:4]",
        "data.eval_split=train[280:282]"]


def tiny(*changes: str) -> list[str]:
    """T with some keys changed (or added): tiny("train.batch_size=50")."""
    values = dict(item.split("=", 1) for item in TINY)
    values |= dict(item.split("=", 1) for item in changes)
    return [f"{key}={value}" for key, value in values.items()]


@dataclass
class Case:
    id: str
    tries: str
    cmd: Callable[[Path], list[str]]  # the command, given the case's temporary folder d
    expect: str  # regex searched in stderr + stdout, whitespace collapsed; {dir} = re.escape(d), {pid} = the owner's
    exit: int | str  # an exact status, "nonzero" or "any"
    fast: bool = False  # a dry run or an instant refusal (--fast)
    timeout: float = 240
    forbid: str | None = None  # a regex that must not appear
    env: Callable[[Path], dict[str, str]] | None = None
    setup: Callable[[Path], None] | None = None
    check: Callable[[Path, "Result"], list[str]] | None = None  # problems found after the run
    send: tuple[int, Callable[[Path, str], bool]] | None = None  # (signal, when to send it: f(d, output so far))
    second_after: float | None = None  # start the same command again this many seconds after the first
    max_seconds: float | None = None  # a refusal that must come before any model loads
    warns: bool = False  # exit 0 expected with a warning line: without it the verdict is "accepted"
    show: str | None = None  # a regex picking the line the message column shows (default: the error line)


@dataclass
class Result:
    code: int | None  # None: killed at the timeout
    out: str  # stderr then stdout (the refused run's, for a case started twice)
    seconds: float
    problems: list[str] = field(default_factory=list)
    exit_text: str = ""


# --- case helpers ------------------------------------------------------------------------------------------------

def resolved_recipe(path: str, *overrides: str) -> str:
    """The resolved recipe as a run saves it (final/recipe.yaml, a checkpoint's recipe.yaml)."""
    code = ("import sys; from onpolicy_kd.recipe import load_recipe, recipe_to_yaml; "
            "sys.stdout.write(recipe_to_yaml(load_recipe(sys.argv[1], sys.argv[2:])))")
    return subprocess.run([PY, "-c", code, path, *overrides], cwd=REPO, env=child_env({}), check=True,
                          capture_output=True, text=True).stdout


def fake_checkpoint(folder: Path, recipe_yaml: str, step: int) -> None:
    """What resuming reads before anything loads: trainer_state.json and the recipe the checkpoint was trained with."""
    folder.mkdir(parents=True)
    (folder / "trainer_state.json").write_text(json.dumps({"step": step, "num_processes": 1}))
    (folder / "recipe.yaml").write_text(recipe_yaml)


def finished_run(run: Path) -> None:
    """A folder as a finished run leaves it (metrics.jsonl, a checkpoint, final/ with its recipe and model card)."""
    recipe_yaml = resolved_recipe(RECIPE, *tiny(f"train.output_dir={run}"))
    fake_checkpoint(run / "checkpoints" / "checkpoint-0000002", recipe_yaml, 2)
    (run / "metrics.jsonl").write_text('{"step": 1, "train/loss": 2.0}\n{"step": 2, "train/loss": 1.9}\n')
    (run / "final").mkdir()
    for name in ("config.json", "model.safetensors"):
        (run / "final" / name).write_text("{}")
    (run / "final" / "recipe.yaml").write_text(recipe_yaml)
    (run / "final" / "README.md").write_text("# Distilled student\n")


def cache_root(d: Path, models: str = "link", data: str = "link") -> None:
    """d/cache as a cache root. models: "link" (X/models -> the real models) or "copy" (X/models/<teacher> a folder of
    symlinks to the teacher's files, as `cp -rs` makes). data: "link" (X/data -> the real data cache), "raw" (only the
    raw data files' folders linked: tokenised data and teacher completions start empty) or "none"."""
    root = d / "cache"
    root.mkdir(parents=True)
    if models == "link":
        (root / "models").symlink_to(CACHE / "models")
    else:
        shutil.copytree(TEACHER_DIR, root / "models" / TEACHER_DIR.name, copy_function=os.symlink)
    if data == "link":
        (root / "data").symlink_to(CACHE / "data")
    elif data == "raw":
        (root / "data").mkdir()
        for name in ("news", "news_headlines"):
            (root / "data" / name).symlink_to(CACHE / "data" / name)


def cache_env(d: Path) -> dict[str, str]:
    return {"ONPOLICY_KD_CACHE_DIR": str(d / "cache")}


def listing(folder: Path) -> list[str]:
    """Every file under `folder` with its size and modification time (symlinks as themselves)."""
    if not folder.exists():
        return []
    return sorted(f"{p.relative_to(folder)} {p.lstat().st_size} {p.lstat().st_mtime_ns}" for p in folder.rglob("*"))


def teacher_copy(d: Path) -> None:
    """X = d/cache with X/models/<teacher> a folder of symlinks to the teacher's files, X/data -> the real data."""
    cache_root(d, models="copy")
    (d / "before.json").write_text(json.dumps({"folder": str(d / "cache" / "models"),
                                               "files": listing(d / "cache" / "models")}))


def teacher_outside(d: Path) -> None:
    """d/teacher: a folder of symlinks to the teacher's files, outside any model cache."""
    shutil.copytree(TEACHER_DIR, d / "teacher", copy_function=os.symlink)
    (d / "before.json").write_text(json.dumps({"folder": str(d / "teacher"), "files": listing(d / "teacher")}))


def unchanged(d: Path, result: Result) -> list[str]:
    """The folder the setup listed (a model's files) holds the same files as before."""
    before = json.loads((d / "before.json").read_text())
    changed = sorted(set(before["files"]) ^ set(listing(Path(before["folder"]))))
    return [f"{before['folder']} changed: {', '.join(changed[:5])}"] if changed else []


def no_teacher_entries(d: Path, result: Result) -> list[str]:
    folder = d / "cache" / "data" / "teacher"
    left = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    return [f"teacher-completion cache entries left: {', '.join(left)}"] if left else []


def root_is_not_data_cache(d: Path, result: Result) -> list[str]:
    wrong = [name for name in ("tokenized", "teacher") if (d / "cache" / name).exists()]
    return [f"written to X/{name} (X used as data.cache_dir)" for name in wrong]


def stage_b_logged(d: Path, output: str) -> bool:
    metrics = d / "run" / "metrics.jsonl"
    if not metrics.is_file():
        return False
    for line in metrics.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("stage") == "b" and "train/loss" in record:
            return True
    return False


def steps_add_up(d: Path, result: Result) -> list[str]:
    """Stage a has 2 steps: the run's step is the stage step + 2."""
    found = re.search(r"at step (\d+) \(step (\d+) of stage 2/2 b\)", " ".join(result.out.split()))
    if found and int(found[1]) != int(found[2]) + 2:
        return [f"run step {found[1]} is not stage-b step {found[2]} + 2"]
    return []


def empty_documents(d: Path) -> None:
    values = [None, "", "   "]
    with open(d / "empty_articles.jsonl", "w") as f:
        for i in range(20):
            f.write(json.dumps({"article": values[i % 3], "highlights": f"Greens win seat {i}."}) + "\n")


def push_folder(d: Path) -> None:
    (d / "run" / "final").mkdir(parents=True)
    for name in ("config.json", "README.md", "recipe.yaml", "model.safetensors"):
        (d / "run" / "final" / name).write_text("{}")


def foreign_checkpoint(d: Path) -> None:
    recipe_yaml = resolved_recipe(RECIPE, *tiny(f"train.output_dir={d / 'other'}"))
    fake_checkpoint(d / "other" / "checkpoints" / "checkpoint-0000002", recipe_yaml, 2)


def evaluate_out_file(d: Path) -> None:
    finished_run(d / "run")
    (d / "metrics.json").write_text("{}\n")


STAGES_AB = "stages=[{name: a, max_steps: 2}, {name: b, max_steps: 1000}]"
STAGE_TYPO = "stages=[{name: a, max_steps: 1, zzz: 1}]"
FOREIGN = "train.resume_from={}/other/checkpoints/checkpoint-0000002"
STAGED_SMALL = ["eval.max_samples=2", "eval.max_new_tokens=4", "eval.batch_size=2", "logging.live=false"]
OWN_TEACHER = r"train\.output_dir=.*(is the folder of the model teacher\.name_or_path loads|inside the model cache)"
BOTH_HIT = r"(?=.*│ train │( [^│]* │){4} hit)(?=.*│ eval │( [^│]* │){4} hit)"  # the dry run's data table


def dry_t(d: Path) -> list[str]:
    return [*TRAIN, RECIPE, f"train.output_dir={d}/run", *tiny(), "--dry-run"]


def run_t(d: Path) -> list[str]:
    return [*TRAIN, RECIPE, f"train.output_dir={d}/run", *tiny()]


def primed(command: Callable[[Path], list[str]]) -> Callable[[Path], None]:
    """A setup: X = d/cache (symlinks to the real models and data), and `command` run once first under the default
    cache root, so what it caches exists before the case runs the same command under X (its run folder, if any,
    moved aside)."""
    def setup(d: Path) -> None:
        cache_root(d)
        with open(d / "prime.log", "w") as log:
            subprocess.run(command(d), cwd=REPO, env=child_env({}), stdout=log, stderr=subprocess.STDOUT, timeout=600)
        if (d / "run").exists():
            (d / "run").rename(d / "prime-run")
    return setup


# --- the cases -----------------------------------------------------------------------------------------------------

CASES = [
    Case("1", "two runs into one new folder, the second 1 s after the first: one trains, the other is refused naming "
              "the first's pid",
         run_t, r"is in use by another run \(pid {pid} ", 2, second_after=1.0, timeout=600),
    Case("2a", "staged recipe resumed from a checkpoint of another recipe (smollm2_news's trainer_state.json and "
               "recipe.yaml)",
         lambda d: [*TRAIN, STAGED, FOREIGN.format(d), f"train.output_dir={d}/run", *STAGED_SMALL],
         r"cannot resume .*checkpoint-0000002 with these changes: .*student\..*train\.overwrite=true", "nonzero",
         setup=foreign_checkpoint, timeout=300),
    Case("2a-dry", "2a with --dry-run",
         lambda d: [*TRAIN, STAGED, FOREIGN.format(d), f"train.output_dir={d}/run", *STAGED_SMALL, "--dry-run"],
         r"cannot resume .*checkpoint-0000002 with these changes: .*student\..*train\.overwrite=true", "nonzero",
         setup=foreign_checkpoint, fast=True),
    Case("2b-dry", "train.resume_from=latest into a misspelt (missing) folder, --dry-run: says it found nothing",
         lambda d: [*TRAIN, RECIPE, "train.resume_from=latest", f"train.output_dir={d}/outt", *tiny(), "--dry-run"],
         r"train\.resume_from=latest found no checkpoint in {dir}/outt/checkpoints: starting a new run", 0,
         warns=True, fast=True),
    Case("2c", "2b as a real run (T): the warning at start-up, then it trains",
         lambda d: [*TRAIN, RECIPE, "train.resume_from=latest", f"train.output_dir={d}/outt", *tiny()],
         r"train\.resume_from=latest found no checkpoint in {dir}/outt/checkpoints: starting a new run", 0,
         warns=True),
    Case("2d-dry", "train.resume_from=latest into an empty folder, staged recipe, --dry-run",
         lambda d: [*TRAIN, STAGED, "train.resume_from=latest", f"train.output_dir={d}/empty", *STAGED_SMALL,
                    "--dry-run"],
         r"found no finished stage and no checkpoint under {dir}/empty/stages: starting a new run", 0, warns=True,
         setup=lambda d: (d / "empty").mkdir(), fast=True),
    Case("3a", "ONPOLICY_KD_CACHE_DIR=X (X/models, X/data symlinks), --dry-run: data under X/data, data.cache_dir unset, "
               "nothing in X/tokenized or X/teacher",
         dry_t, r"(?=.*path: {dir}/cache/data/news/lee_background\.jsonl)(?=.*cache_dir: null)(?=.*dry run OK)", 0,
         setup=cache_root, env=cache_env, check=root_is_not_data_cache, show=r"path: .*/data/news/", fast=True),
    Case("3b-dry", "3a after the same dry run under the default root: the tokenised data cached there is reused "
                   "through X (both rows 'hit')",
         dry_t, BOTH_HIT, 0, setup=primed(dry_t), env=cache_env, show=r"│ train │", fast=True),
    Case("3c", "T run under X after the same T run under the default root: the teacher-completion cache is reused "
               "through X",
         run_t, r"teacher completions: read from {dir}/cache/data/teacher/", 0, setup=primed(run_t), env=cache_env,
         check=root_is_not_data_cache, show=r"teacher completions: ", timeout=600),
    Case("4a-dry", "every document null, empty or blank (data.path a 20-row jsonl), --dry-run",
         lambda d: [*TRAIN, RECIPE, f"data.path={d}/empty_articles.jsonl", f"train.output_dir={d}/run", *tiny(),
                    "--dry-run"],
         r"(?=.*empty_articles\.jsonl)(?=.*empty or null)(?=.*'article')", "nonzero", setup=empty_documents,
         fast=True),
    Case("4a", "4a-dry as a real run (T)",
         lambda d: [*TRAIN, RECIPE, f"data.path={d}/empty_articles.jsonl", f"train.output_dir={d}/run", *tiny()],
         r"(?=.*empty_articles\.jsonl)(?=.*empty or null)(?=.*'article')", "nonzero", setup=empty_documents),
    Case("4b", "rollout.temperature=1e-8 objective.temperature=1e-8, --dry-run",
         lambda d: [*TRAIN, RECIPE, "rollout.temperature=1e-8", "objective.temperature=1e-8",
                    f"train.output_dir={d}/run", *tiny(), "--dry-run"],
         r"(?=.*rollout\.temperature=1e-08 is below 0\.05)(?=.*objective\.temperature=1e-08 is below 0\.05).*one-hot",
         "nonzero", fast=True),
    Case("4c-dry", "train.batch_size=50 on 4 training rows, --dry-run: warns that rows repeat",
         lambda d: [*TRAIN, RECIPE, f"train.output_dir={d}/run", *tiny("train.batch_size=50"), "--dry-run"],
         r"a step takes 50 prompts.*training split has 4 rows: each row appears about 12\.5 times", 0, warns=True,
         fast=True),
    Case("4c", "4c-dry as a real run (T, batch 50)",
         lambda d: [*TRAIN, RECIPE, f"train.output_dir={d}/run", *tiny("train.batch_size=50")],
         r"a step takes 50 prompts.*training split has 4 rows: each row appears about 12\.5 times", 0, warns=True,
         timeout=600),
    Case("4d-dry", "train.output_dir = the teacher's own folder (X/models/<teacher>, a symlink copy), --dry-run",
         lambda d: [*TRAIN, RECIPE, f"train.output_dir={d}/cache/models/smollm2-135m-instruct", *tiny(), "--dry-run"],
         OWN_TEACHER, "nonzero", setup=teacher_copy, env=cache_env, check=unchanged, fast=True),
    Case("4d", "4d-dry as a real run (T)",
         lambda d: [*TRAIN, RECIPE, f"train.output_dir={d}/cache/models/smollm2-135m-instruct", *tiny()],
         OWN_TEACHER, "nonzero", setup=teacher_copy, env=cache_env, check=unchanged),
    Case("4e-dry", "train.output_dir inside the model cache (X/models/run), --dry-run",
         lambda d: [*TRAIN, RECIPE, f"train.output_dir={d}/cache/models/run", *tiny(), "--dry-run"],
         r"train\.output_dir=.* is inside the model cache", "nonzero", setup=teacher_copy, env=cache_env,
         check=unchanged, fast=True),
    Case("4e", "4e-dry as a real run (T)",
         lambda d: [*TRAIN, RECIPE, f"train.output_dir={d}/cache/models/run", *tiny()],
         r"train\.output_dir=.* is inside the model cache", "nonzero", setup=teacher_copy, env=cache_env,
         check=unchanged),
    Case("4h-dry", "train.output_dir = the teacher's folder outside any model cache (teacher.name_or_path=$TMP/teacher, "
                   "a symlink copy), --dry-run",
         lambda d: [*TRAIN, RECIPE, f"teacher.name_or_path={d}/teacher", f"train.output_dir={d}/teacher", *tiny(),
                    "--dry-run"],
         r"is the folder of the model teacher\.name_or_path loads", "nonzero", setup=teacher_outside, check=unchanged,
         fast=True),
    Case("4h", "4h-dry as a real run (T)",
         lambda d: [*TRAIN, RECIPE, f"teacher.name_or_path={d}/teacher", f"train.output_dir={d}/teacher", *tiny()],
         r"is the folder of the model teacher\.name_or_path loads", "nonzero", setup=teacher_outside, check=unchanged),
    Case("4f", "optim.lr=.inf, --dry-run",
         lambda d: [*TRAIN, RECIPE, "optim.lr=.inf", f"train.output_dir={d}/run", *tiny(), "--dry-run"],
         r"optim\.lr.*finite number", "nonzero", fast=True),
    Case("4g", "--dry-run into a folder that holds a finished run (metrics.jsonl, checkpoints/, final/)",
         dry_t, r"train\.output_dir={dir}/run already holds a run .*train\.resume_from=latest.*train\.overwrite=true",
         "nonzero", setup=lambda d: finished_run(d / "run"), fast=True),
    Case("5", "staged run (stages a: 2 steps, b: 1000) stopped by SIGTERM after stage b's first logged step",
         lambda d: [*TRAIN, RECIPE, STAGES_AB, f"train.output_dir={d}/run", *tiny("train.max_steps=null")],
         r"stopped by signal 15 at step \d+ \(step \d+ of stage 2/2 b\): checkpoint saved", 143,
         send=(signal.SIGTERM, stage_b_logged), check=steps_add_up, timeout=600),
    Case("6", "evaluate RUN --out FILE where FILE exists: refused before any work",
         lambda d: [*EVALUATE, f"{d}/run", "--out", f"{d}/metrics.json"],
         r"--out {dir}/metrics\.json is a file", "nonzero", setup=evaluate_out_file, max_seconds=45, fast=True),
    Case("7", "Ctrl-C (SIGINT) while the teacher cache is generated (fresh cache root; 40 rows so the progress line "
              "comes mid-way)",
         lambda d: [*TRAIN, RECIPE, f"train.output_dir={d}/run", *tiny("data.split=train[:40]",
                                                                       "rollout.max_new_tokens=8")],
         r"^error: interrupted \(Ctrl-C\)", 130, setup=lambda d: cache_root(d, data="raw"), env=cache_env,
         send=(signal.SIGINT, lambda d, out: "teacher completions for the cache: 10/40" in out),
         check=no_teacher_entries, timeout=600),
    Case("8a", "the recipe path is a directory (recipes)",
         lambda d: [*TRAIN, "recipes"],
         r"the recipe recipes is a directory, not a file; it holds .*smollm2_news\.yaml", "nonzero", fast=True),
    Case("8b", "a stage with an unknown key (zzz): the message lists the valid keys",
         lambda d: [*TRAIN, RECIPE, STAGE_TYPO, f"train.output_dir={d}/run", *tiny("train.max_steps=null"),
                    "--dry-run"],
         r"stages\.0\.zzz: unknown key.*valid keys here: data, epochs, head_init, hidden, max_steps", "nonzero",
         fast=True),
    Case("8c", "data.eval_split=train[5:5] (0 rows), --dry-run: names data.eval_split",
         lambda d: [*TRAIN, RECIPE, f"train.output_dir={d}/run", *tiny("data.eval_split=train[5:5]"), "--dry-run"],
         r"data\.eval_split.*train\[5:5\]", "nonzero", fast=True),
    Case("8d", "override and flag before the recipe: --dry-run objective.beta=0.2 RECIPE objective.divergence=jsd",
         lambda d: [*TRAIN, "--dry-run", "objective.beta=0.2", RECIPE, "objective.divergence=jsd",
                    f"train.output_dir={d}/run", *tiny()],
         r"(?=.*beta: 0\.2)(?=.*dry run OK)", 0, show=r"beta: 0\.2", fast=True),
    Case("8d-beta", "8d without objective.divergence=jsd (the recipe's divergence is forward_kl): the recipe is found "
                    "and beta refused for its divergence, not 'no recipe given'",
         lambda d: [*TRAIN, "--dry-run", "objective.beta=0.2", RECIPE, f"train.output_dir={d}/run", *tiny()],
         r"invalid recipe recipes/smollm2_news\.yaml.*objective\.beta.*divergence=jsd", "nonzero",
         forbid="no recipe given", fast=True),
    Case("8e", "onpolicy-kd prune RECIPE --keep 99: refused before the teacher loads",
         lambda d: [*CLI, "prune", RECIPE, "--keep", "99"],
         r"--keep 99: the teacher has 30 decoder layers; keep 1 to 29", "nonzero", max_seconds=45, fast=True),
    Case("8f", "onpolicy-kd push RUN 'not a/valid/id': says the id is malformed, not that the Hub is unreachable",
         lambda d: [*CLI, "push", f"{d}/run", "not a/valid/id"],
         r"'not a/valid/id' is not a Hub repository id.*OWNER/NAME", "nonzero", forbid=r"(?i)unreachable|cannot reach",
         setup=push_folder, max_seconds=45, fast=True),
    Case("9a", "evaluate recipes/smollm2_news.yaml with a cold cache (raw data linked, no tokenised data or teacher "
               "answers), T's eval keys: works, generating what it needs, or says what is missing",
         lambda d: [*EVALUATE, RECIPE, f"train.output_dir={d}/run", "eval.max_samples=2", "eval.max_new_tokens=4",
                    "eval.batch_size=2", "data.eval_split=train[280:282]"],
         r"predictions and metrics: {dir}/run/eval_initial|^error: ", "any",
         setup=lambda d: cache_root(d, data="raw"), env=cache_env, show="predictions and metrics: ", timeout=600),
    Case("9b", "evaluate recipes/smollm2_news.yaml with a cache root holding only the models: says what is missing",
         lambda d: [*EVALUATE, RECIPE, f"train.output_dir={d}/run", "eval.max_samples=2", "eval.max_new_tokens=4",
                    "eval.batch_size=2", "data.eval_split=train[280:282]"],
         r"(?m)^error: .*lee_background\.jsonl", "nonzero",
         setup=lambda d: cache_root(d, data="none"), env=cache_env, fast=True),
]


# --- running and judging -------------------------------------------------------------------------------------------

case_pid: dict[str, int] = {}  # case id -> pid of the run that owned the folder (a case started twice)


def child_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ONPOLICY_KD_")}
    # COLUMNS: rich wraps no console line (the regexes and the message column read whole lines)
    return env | {"COLUMNS": "1000", "PYTHONUNBUFFERED": "1"} | extra


def start(cmd: list[str], env: dict[str, str], d: Path, name: str) -> subprocess.Popen:
    with open(d / f"{name}.stdout", "w") as out, open(d / f"{name}.stderr", "w") as err:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                start_new_session=True)  # its own group: killed as one at the timeout


def output(d: Path, name: str) -> str:
    return (d / f"{name}.stderr").read_text(errors="replace") + (d / f"{name}.stdout").read_text(errors="replace")


def wait_all(procs: list[subprocess.Popen], deadline: float, on_poll: Callable[[], None] = lambda: None) -> bool:
    """Wait for every process; False if the deadline came first (they are then killed)."""
    while any(p.poll() is None for p in procs):
        if time.time() > deadline:
            for p in procs:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()
            return False
        on_poll()
        time.sleep(0.2)
    return True


def run_case(case: Case, d: Path, timeout: float | None) -> Result:
    """Run one case in its folder `d` (its setup first), with a timeout; the verdict is judged from the Result."""
    d.mkdir(parents=True)
    if case.setup:
        case.setup(d)
    env = child_env(case.env(d) if case.env else {})
    cmd = case.cmd(d)
    started = time.time()
    deadline = started + (timeout or case.timeout)
    problems: list[str] = []
    first = start(cmd, env, d, "a")
    procs = [first]
    if case.second_after is not None:
        time.sleep(case.second_after)
        procs.append(start(cmd, env, d, "b"))
    sent = []

    def maybe_signal() -> None:
        if case.send and not sent and case.send[1](d, output(d, "a")):
            first.send_signal(case.send[0])
            sent.append(time.time())

    finished = wait_all(procs, deadline, maybe_signal)
    seconds = time.time() - started
    if not finished:
        problems.append(f"timed out after {seconds:.0f} s")
    if case.send and not sent:
        problems.append(f"signal {case.send[0]} never sent (its trigger did not happen)")
    if case.max_seconds and seconds > case.max_seconds:
        problems.append(f"took {seconds:.0f} s, a refusal before any model loads should take < {case.max_seconds:.0f}")
    if case.second_after is None:
        code = first.returncode if finished else None
        return Result(code, output(d, "a"), seconds, problems, str(code) if finished else "killed")
    # two runs: judge the one that did not train (refused), and check the other trained
    codes = [p.returncode for p in procs]
    refused = [i for i, c in enumerate(codes) if c != 0]
    if len(refused) != 1:
        problems.append(f"exit statuses {codes}: expected exactly one run refused")
    judged = refused[0] if refused else 1
    owner = 1 - judged
    if codes[owner] != 0:
        problems.append(f"the run that owned the folder exited {codes[owner]}")
    case_pid[case.id] = procs[owner].pid
    return Result(codes[judged], output(d, "ab"[judged]), seconds, problems,
                  f"{codes[judged]} (the other run: {codes[owner]})")


def exit_matches(expected: int | str, code: int | None) -> bool:
    if code is None:
        return False
    if expected == "any":
        return True
    if expected == "nonzero":
        return code != 0
    return code == expected


def verdict(case: Case, d: Path, result: Result) -> str:
    text = " ".join(result.out.split())
    pattern = expectation(case, d)
    matched = re.search(pattern, result.out, re.M) or re.search(pattern, text)
    forbidden = case.forbid and re.search(case.forbid, text)
    problems = result.problems + (case.check(d, result) if case.check else [])
    if TRACEBACK in result.out:
        return "traceback"
    if exit_matches(case.exit, result.code) and matched and not forbidden and not problems:
        return "ok" if result.code == 0 else "clean error"
    if result.code == 0 and case.exit not in (0, "any"):
        return "accepted (exit 0 where a refusal was expected)"
    if result.code == 0 and case.warns and not matched and not problems:
        return f"accepted (no warning matches /{case.expect}/)"
    reasons = list(problems)
    if not exit_matches(case.exit, result.code) and result.code is not None:
        reasons.append(f"exit {result.code}, expected {case.exit}")
    if not matched:
        reasons.append(f"no line matches /{case.expect}/")
    if forbidden:
        reasons.append(f"/{case.forbid}/ appeared")
    return "unexpected: " + "; ".join(reasons)


def expectation(case: Case, d: Path) -> str:
    return case.expect.replace("{dir}", re.escape(str(d))).replace("{pid}", str(case_pid.get(case.id, "")))


def telling_line(case: Case, d: Path, out: str) -> str:
    """The case's `show` line, else the "error:" message (with its indented lines), else the line the expectation
    matched, else the last warning, else the last line."""
    raw = [line for line in out.splitlines() if line.strip()]
    lines = [line.strip() for line in raw]
    errors = [i for i, line in enumerate(lines) if line.startswith("error:")]
    if case.show and any(re.search(case.show, line) for line in lines):
        line = next(line for line in lines if re.search(case.show, line))
    elif errors:
        end = next((i for i in range(errors[0] + 1, len(raw)) if not raw[i].startswith(" ")), len(raw))
        line = " ".join(lines[errors[0]:end])
    else:
        line = (next((l for l in lines if re.search(expectation(case, d), l)), None)
                or next((l for l in reversed(lines) if l.startswith("warning:")), None)
                or (lines[-1] if lines else ""))
    return line if len(line) <= 300 else line[:297] + "..."


def shown(case: Case, d: Path, tmp: Path) -> str:
    """The command as the report shows it: $TMP for the temporary folder, T for the tiny-run overrides."""
    cmd = case.cmd(d)
    tiny_at = [i for i, w in enumerate(cmd) if w in TINY]
    words = list(cmd)
    if len(tiny_at) >= len(TINY) - 3:  # T, some of its keys changed (shown beside it)
        words = [w for w in cmd[:tiny_at[0]] if w not in TINY] + ["T"] + [w for w in cmd[tiny_at[0]:] if w not in TINY]
    env = case.env(d) if case.env else {}
    text = " ".join([*(f"{k}={v}" for k, v in env.items()), shlex.join(words)])
    text = text.replace(str(tmp), "$TMP").replace(PY, "python").replace(str(CLI[0]), "onpolicy-kd")
    text = text.replace("python -m onpolicy_kd.cli", "onpolicy-kd").replace("'T'", "T")
    return text.replace(str(Path.home()), "~")


def cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def label(verdict_text: str) -> str:
    return re.split(r"[:(]", verdict_text)[0].strip()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="+", metavar="ID", help="run only these case ids")
    parser.add_argument("--fast", action="store_true", help="only the dry runs and the instant refusals")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (each case's output)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per case (default: the case's own)")
    args = parser.parse_args()
    unknown = set(args.only or []) - {c.id for c in CASES}
    if unknown:
        parser.error(f"unknown case ids {sorted(unknown)}; known: {' '.join(c.id for c in CASES)}")
    cases = [c for c in CASES if (not args.only or c.id in args.only) and (c.fast or not args.fast)]
    tmp = Path(tempfile.mkdtemp(prefix="hostile_list-"))
    teacher_before = listing(TEACHER_DIR)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip()
    rows, started = [], time.time()
    print(f"{len(cases)} cases; temporary folder {tmp}", flush=True)
    for case in cases:
        d = tmp / case.id
        try:
            result = run_case(case, d, args.timeout)
            judged = verdict(case, d, result)
        except Exception as err:  # noqa: BLE001 - a broken setup is reported, the other cases still run
            result, judged = Result(None, "", 0.0, exit_text="not run"), f"unexpected: the case failed: {err!r}"
        print(f"{case.id:>8}  {judged}  ({result.seconds:.0f} s)", flush=True)
        rows.append((case, d, result, judged))
    total = time.time() - started
    teacher_changed = listing(TEACHER_DIR) != teacher_before

    counts = Counter(label(v) for *_, v in rows)
    count_text = ", ".join(f"{name}: {counts[name]}" for name in ("clean error", "ok", "accepted", "traceback",
                                                                   "unexpected") if counts[name])
    lines = [
        "# Hostile-user inputs, re-run against the CLI",
        "",
        f"- date: {datetime.now().strftime('%Y-%m-%d %H:%M')}; commit {commit}; {len(rows)} cases in {total / 60:.1f} min",
        f"- made by: `python {shlex.join(sys.argv)}`",
        f"- verdicts: {count_text}",
        f"- the real teacher folder {str(TEACHER_DIR).replace(str(Path.home()), '~')}: "
        + ("**CHANGED during the run**" if teacher_changed else "file list unchanged"),
        "",
        "Verdicts: `clean error` non-zero exit, the expected message, no traceback; `ok` exit 0 with the expected "
        "warning/notice; `accepted` exit 0 where a refusal was expected, or the warning missing; `traceback`; "
        "`unexpected: ...` anything else, said. `$TMP` is the run's temporary folder; `T` is the tiny run "
        f"`{' '.join(TINY)}`. Cases and expectations: scripts/hostile_list.py.",
        "",
        "| case | what it tries | command | exit | traceback | message | verdict | s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for case, d, result, judged in rows:
        lines.append("| " + " | ".join([
            case.id, cell(case.tries), f"`{cell(shown(case, d, tmp))}`", result.exit_text,
            "yes" if TRACEBACK in result.out else "no", cell(telling_line(case, d, result.out)), cell(judged),
            f"{result.seconds:.0f}"]) + " |")
    REPORT.write_text("\n".join(lines) + "\n")
    print(f"\n{count_text}\nreport: {REPORT.relative_to(REPO)} ({total / 60:.1f} min)")
    if teacher_changed:
        print(f"WARNING: the teacher folder {TEACHER_DIR} changed during the run")
    if args.keep:
        print(f"kept: {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
