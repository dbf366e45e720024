"""Metrics and the console: `metrics.jsonl`, the trackers of logging.report_to, and a rich live display on the
main process.

Each logged step is one flat JSON object in `<output_dir>/metrics.jsonl` with slash keys
(`train/loss`, `eval/reverse_kl`, `time/rollout_s`, ...) and `step`. The console shows a progress bar
with ETA and the latest value of every metric (`logging.live: false` prints plain lines instead);
other processes print nothing.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from rich.console import Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from onpolicy_kd.console import console
from onpolicy_kd.evaluation.report import samples_table

SHOWN = ("train/loss", "train/reverse_kl", "eval/reverse_kl", "eval/cross_loss", "eval/greedy/rougeL_ref",
         "eval/sampled/rougeL_ref", "eval/greedy/accuracy", "eval/sampled/accuracy", "eval/greedy/rougeL_teacher", "eval/greedy/distinct1",
         "eval/greedy/repetition", "train/entropy", "rollout/mean_len", "data/mean_len", "optim/lr", "optim/grad_norm",
         "perf/tokens_per_s", "time/rollout_s", "time/teacher_s", "time/student_s", "time/optimizer_s")


def on_console(key: str) -> bool:
    """The console shows the SHOWN metrics and any other step metric; of the held-out evaluation's many figures
    (all in metrics.jsonl) only the SHOWN ones."""
    return key in SHOWN or ("/" in key and not key.startswith("eval/"))


class Monitor:
    def __init__(self, output_dir: str | Path, total: float, completed: float, *, enabled: bool, live: bool,
                 accelerator=None, trackers: bool = False, stage=None, by_time: bool = False):
        """The progress bar counts steps (`total` = max_steps), or with `by_time` seconds of training
        (`total` = train.max_time). `stage` (a staged run's Stage): metrics go to the run's metrics.jsonl with a
        `stage` key and steps counted over the whole run; the progress bar names the stage."""
        self.enabled = enabled
        self.path = stage.metrics_file if stage is not None else Path(output_dir) / "metrics.jsonl"
        self.step_offset = stage.step_offset if stage is not None else 0
        self.stage = {"stage": stage.name} if stage is not None else {}
        self.label = f"stage {stage.index + 1}/{stage.count} {stage.name}" if stage is not None else "distilling"
        label = self.label + (" (seconds of training)" if by_time else "")
        self.latest: dict[str, float] = {}
        self.accelerator = accelerator if trackers else None  # logging.report_to: accelerator.log to the trackers
        self.live_mode = live and enabled and console.is_terminal
        self.progress = Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                 TextColumn("eta"), TimeRemainingColumn(), console=console)
        self.task = self.progress.add_task("train", total=round(total), completed=round(completed))
        self.live: Live | None = None
        self.started = time.perf_counter()
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def __enter__(self) -> "Monitor":
        if self.live_mode:
            self.live = Live(self._render(), console=console, refresh_per_second=2, transient=False)
            self.live.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.live is not None:
            self.live.update(self._render())
            self.live.__exit__(*exc)

    def _render(self) -> Group:
        table = Table(show_header=False, box=None, pad_edge=False)
        shown = [k for k in SHOWN if k in self.latest] + sorted(k for k in self.latest if k not in SHOWN and on_console(k))
        for i in range(0, len(shown), 3):
            cells = []
            for key in shown[i : i + 3]:
                cells += [Text(key, style="cyan"), Text(f"{self.latest[key]:.4g}")]
            table.add_row(*cells)
        return Group(self.progress, table)

    def log(self, step: int, metrics: dict[str, float], advance: bool = True, completed: float | None = None) -> None:
        if not self.enabled:
            return
        self.latest.update(metrics)
        self.record(step, metrics)
        if self.accelerator is not None:
            self.accelerator.log(metrics, step=self.step_offset + step)
        if advance:
            self.progress.update(self.task, completed=round(step if completed is None else completed))
        if self.live is not None:
            self.live.update(self._render())
        else:
            keys = [k for k in SHOWN if k in metrics] or sorted(metrics)[:6]
            console.print(f"step {self.step_offset + step}: " + "  ".join(f"{k}={metrics[k]:.4g}" for k in keys), highlight=False)

    def record(self, step: int, entry: dict[str, Any]) -> None:
        """One record in metrics.jsonl: a step's metrics (`log`), or e.g. how the run runs."""
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": self.step_offset + step, **self.stage, **entry}) + "\n")

    def print(self, *renderables: Any) -> None:
        if self.enabled:
            (self.live.console if self.live is not None else console).print(*renderables, soft_wrap=True)

    def samples(self, step: int, predictions: list[dict]) -> None:
        """A table of sample completions: prompt (its end), reference, teacher, student."""
        self.print(samples_table(predictions, f"samples at step {step}", count=len(predictions)))
