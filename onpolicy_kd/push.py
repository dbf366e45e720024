"""`onpolicy-kd push RUN_DIR REPO_ID [--private]`: push a finished run's exported student (its `final/`: weights,
tokenizer, model card with the held-out metrics, the resolved recipe) to the Hugging Face Hub. Runs trained with
`train.push_to_hub: true` do this themselves; this command is for runs trained offline."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from onpolicy_kd.console import console, print_error
from onpolicy_kd.errors import UserError
from onpolicy_kd.training.publish import final_folder, push_folder


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="onpolicy-kd push", description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", help="a run's output folder (its final/ is pushed) or an exported final/ folder")
    parser.add_argument("repo_id", help="the Hub model repository, e.g. me/smollm2-student")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    args = parser.parse_args(argv)
    try:
        url = push_folder(args.run_dir, args.repo_id, private=args.private)
    except UserError as err:
        print_error(err)
        return err.exit_code
    console.print(f"pushed {final_folder(args.run_dir)} to {url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
