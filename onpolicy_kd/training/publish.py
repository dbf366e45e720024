"""Publishing a run's exported student to the Hugging Face Hub (`train.push_to_hub`, `onpolicy-kd push`).

What goes up is the run's `final/` folder as `export_final` wrote it: the weights, the tokenizer, the model card
(README.md, with the held-out metrics before and after) and the resolved recipe (recipe.yaml; a staged run adds
staged_recipe.yaml). With `train.push_to_hub` the run checks at start-up, before anything loads, that the Hub
is reachable and a token is there: an offline machine is told to train without it and push later with
`onpolicy-kd push RUN_DIR REPO_ID` from a machine that reaches the Hub.
"""

from __future__ import annotations

from pathlib import Path

from onpolicy_kd.errors import UserError
from onpolicy_kd.hub import hub_reachable

REQUIRED_FILES = ("config.json", "README.md", "recipe.yaml")


def check_repo_id(repo_id: str, what: str) -> None:
    """A well-formed Hub repository id, checked before the network is asked anything (a malformed id is not an
    unreachable Hub)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise UserError(f"{what}: {repo_id!r} is not a Hub repository id; write NAME or OWNER/NAME (letters, digits, "
                        f"'-', '_' and '.', not starting or ending with '-' or '.', no '--' or '..', at most 96 "
                        f"characters), e.g. me/smollm2-student") from None


def check_can_push(repo_id: str, run_dir: str | Path, during_training: bool = True) -> None:
    """The repository id is well-formed, the Hub answers and a token is available; otherwise a UserError that says
    how to push later."""
    from huggingface_hub import get_token

    check_repo_id(repo_id, "train.hub_model_id" if during_training else "onpolicy-kd push REPO_ID")
    what = "train.push_to_hub" if during_training else f"pushing to {repo_id}"
    later = (f"train with train.push_to_hub=false and push the result later, from a machine that reaches the Hub: "
             f"onpolicy-kd push {run_dir} {repo_id}") if during_training else "run it where the Hub is reachable"
    if not hub_reachable():
        raise UserError(f"{what} needs the Hugging Face Hub, which is unreachable from this machine (or "
                        f"HF_HUB_OFFLINE is set); {later}")
    if get_token() is None:
        raise UserError(f"{what} needs a Hugging Face token: log in with `hf auth login` or set HF_TOKEN; or {later}")


def final_folder(run_dir: str | Path) -> Path:
    """A run folder's `final/` (or the folder itself when it is an exported student)."""
    run_dir = Path(run_dir)
    folder = run_dir / "final" if (run_dir / "final").is_dir() else run_dir
    missing = [name for name in REQUIRED_FILES if not (folder / name).is_file()]
    weights = list(folder.glob("*.safetensors"))
    if missing or not weights:
        raise UserError(f"{folder} is not an exported student (missing {missing + ([] if weights else ['*.safetensors'])}); "
                        f"give a run folder whose training finished (it writes final/), or its final/ folder")
    return folder


def push_folder(run_dir: str | Path, repo_id: str, *, private: bool = False) -> str:
    """Create `repo_id` (if needed) and upload the exported student; returns the commit's URL."""
    from huggingface_hub import HfApi

    folder = final_folder(run_dir)
    check_can_push(repo_id, run_dir, during_training=False)
    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        commit = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                                   commit_message=f"onpolicy-kd: distilled student from {Path(run_dir).name}")
    except (OSError, ValueError) as err:  # huggingface_hub's HTTP errors are OSErrors
        raise UserError(f"pushing {folder} to {repo_id} failed: {err}; the run's files are intact: push them again "
                        f"with `onpolicy-kd push {run_dir} {repo_id}`") from None
    return str(getattr(commit, "commit_url", commit))
