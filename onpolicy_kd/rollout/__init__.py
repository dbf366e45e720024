"""Rollouts: completions sampled from the student, the teacher or a mixture of both, token by token."""

from onpolicy_kd.rollout.engine import rollout

__all__ = ["rollout"]
