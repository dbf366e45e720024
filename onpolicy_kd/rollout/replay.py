"""A replay buffer of the student's own samples, so that a step can train on samples an earlier step drew
(DistiLLM's off-policy reuse: sampling is the costliest phase of an on-policy step, a reused batch costs none).

On a step whose completions are the student's (the lambda coin), the step reuses stored samples with probability
`replay.share` (a function of the seed and the step) when the buffer holds enough usable ones; otherwise the
student samples afresh and the new completions are stored. A sample is trained on when it is drawn and at most
`replay.reuse` more times from the buffer; a sample older than `replay.max_age` steps is dropped; beyond
`replay.size` samples the oldest go first. Each reuse logs the samples' mean age in steps (`replay/age`).

The divergences re-read both models on the stored tokens, so a reused sample is exact off-policy data for GKD
(no importance weights: the loss is a divergence at each position, not an expectation over the sampler); the
policy gradient, whose estimator needs the sampler's probabilities, does not reuse.

Under several processes every rank stores its own samples in the same order and picks the same positions (the
choice is seeded by the step, not the rank), so all ranks agree on whether a step reuses. The buffer is saved in
every checkpoint (one file per rank) and restored on resume, so a resumed run reuses what the interrupted one
would have.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass
class Stored:
    row: int  # the training prompt's row
    ids: list[int]  # the completion's tokens, up to and including its EOS
    text: str
    born: int  # the step that sampled it (steps counted from 0 within the run or stage)
    truncated: bool = False  # cut at rollout.max_new_tokens (rollout.truncated handles it again on reuse)
    uses: int = 0  # times it was trained on again from the buffer


class ReplayBuffer:
    def __init__(self, size: int, reuse: int, max_age: int | None) -> None:
        self.size, self.reuse, self.max_age = size, reuse, max_age
        self.items: list[Stored] = []

    def __len__(self) -> int:
        return len(self.items)

    def _drop_old(self, step: int) -> None:
        if self.max_age is not None:
            self.items = [s for s in self.items if step - s.born <= self.max_age]

    def add(self, rows: list[int], completions: list[list[int]], texts: list[str], truncated: list[bool],
            step: int) -> None:
        """Store a fresh batch's samples (their first use is the step that drew them); the oldest go beyond `size`."""
        self.items += [Stored(row, list(ids), text, step, cut)
                       for row, ids, text, cut in zip(rows, completions, texts, truncated)]
        self._drop_old(step)
        self.items = self.items[-self.size:]

    def can_serve(self, count: int, step: int) -> bool:
        self._drop_old(step)
        return len(self.items) >= count

    def take(self, count: int, step: int, seed: int) -> list[Stored]:
        """`count` distinct stored samples, chosen uniformly from (seed, step) only; each counts one more use, and
        those used `reuse` times leave the buffer."""
        self._drop_old(step)
        chosen = sorted(random.Random(f"{seed}-{step}-replay").sample(range(len(self.items)), count))
        taken = [self.items[i] for i in chosen]
        for stored in taken:
            stored.uses += 1
        self.items = [s for s in self.items if s.uses < self.reuse]
        return taken

    def state(self) -> str:
        return json.dumps([asdict(s) for s in self.items])

    def load(self, text: str) -> None:
        self.items = [stored for stored in map(lambda s: Stored(**s), json.loads(text)) if stored.uses < self.reuse]


def replay_coin(seed: int, step: int, share: float) -> bool:
    """True when a student-sample step reuses stored samples: probability `share`, from (seed, step) only."""
    return random.Random(f"{seed}-{step}-reuse").random() < share


def replay_file(checkpoint: Path, rank: int) -> Path:
    return checkpoint / f"replay-{rank}.json"
