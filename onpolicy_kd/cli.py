"""The `onpolicy-kd` command: `onpolicy-kd train RECIPE [overrides] [--dry-run]`, `onpolicy-kd assets`,
`onpolicy-kd prune RECIPE --keep N`, `onpolicy-kd push RUN_DIR REPO_ID`."""

from __future__ import annotations

import sys
from typing import Sequence

COMMANDS = {
    "train": ("onpolicy_kd.train", "train (or --dry-run check) a recipe"),
    "evaluate": ("onpolicy_kd.evaluate", "evaluate run folders or recipes: ROUGE, KL, perplexity, plots, --compare"),
    "assets": ("onpolicy_kd.assets", "install and convert the offline default teacher and news data"),
    "prune": ("onpolicy_kd.prune", "which of the teacher's layers a layer-dropped student should keep, measured"),
    "push": ("onpolicy_kd.push", "push a finished run's student (final/: weights, model card, recipe) to the Hub"),
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        lines = "\n".join(f"  {name:<9} {help_}" for name, (_, help_) in COMMANDS.items())
        print(f"usage: onpolicy-kd COMMAND [ARGS]\n\ncommands:\n{lines}", file=sys.stderr)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    module = __import__(COMMANDS[argv[0]][0], fromlist=["main"])
    return module.main(argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
