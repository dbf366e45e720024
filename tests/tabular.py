"""A tabular "language model" small enough to enumerate: sequences of length T over V tokens.

Every prefix (context) has its own row of logits, for the student (a learnable table) and the
teacher (a fixed table), so the sequence-level reverse KL and its exact gradient come from summing
over all V**T sequences.
"""

from __future__ import annotations

import itertools

import torch


class Tabular:
    def __init__(self, vocab: int = 4, length: int = 3, seed: int = 0, scale: float = 1.5):
        self.V, self.T = vocab, length
        n_contexts = sum(vocab**t for t in range(length))
        g = torch.Generator().manual_seed(seed)
        self.student = (torch.randn(n_contexts, vocab, generator=g, dtype=torch.float64) * scale).requires_grad_()
        self.teacher = torch.randn(n_contexts, vocab, generator=g, dtype=torch.float64) * scale

    def context_index(self, prefix_BT: torch.Tensor) -> torch.Tensor:
        """Row of the table for each prefix: offset of its length + its base-V number."""
        t = prefix_BT.shape[1]
        offset = sum(self.V**k for k in range(t))
        number = torch.zeros(prefix_BT.shape[0], dtype=torch.long)
        for k in range(t):
            number = number * self.V + prefix_BT[:, k]
        return offset + number

    def exact_reverse_kl(self) -> torch.Tensor:
        """KL(q(y) || p(y)) summed over every sequence (differentiable in the student table)."""
        seqs = torch.tensor(list(itertools.product(range(self.V), repeat=self.T)))
        log_q = torch.zeros(len(seqs), dtype=torch.float64)
        log_p = torch.zeros(len(seqs), dtype=torch.float64)
        for t in range(self.T):
            rows = self.context_index(seqs[:, :t])
            log_q = log_q + torch.log_softmax(self.student[rows], -1).gather(1, seqs[:, t : t + 1]).squeeze(1)
            log_p = log_p + torch.log_softmax(self.teacher[rows], -1).gather(1, seqs[:, t : t + 1]).squeeze(1)
        return (log_q.exp() * (log_q - log_p)).sum()

    def sample(self, n: int, alpha: float, generator: torch.Generator):
        """n sequences from the per-token mixture alpha p + (1 - alpha) q; returns what a rollout records."""
        seqs = torch.zeros(n, self.T, dtype=torch.long)
        rows_BT = torch.zeros(n, self.T, dtype=torch.long)
        for t in range(self.T):
            rows = self.context_index(seqs[:, :t])
            rows_BT[:, t] = rows
            with torch.no_grad():
                mix = alpha * torch.softmax(self.teacher[rows], -1) + (1 - alpha) * torch.softmax(self.student[rows], -1)
            seqs[:, t] = torch.multinomial(mix, 1, generator=generator).squeeze(1)
        with torch.no_grad():
            q = torch.softmax(self.student[rows_BT], -1)
            p = torch.softmax(self.teacher[rows_BT], -1)
            mix = alpha * p + (1 - alpha) * q
        take = lambda probs: probs.gather(-1, seqs.unsqueeze(-1)).squeeze(-1).log()  # noqa: E731
        return seqs, rows_BT, take(q), take(p), take(mix)
