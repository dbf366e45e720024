"""Evaluation: text and KL metrics (metrics.py), the held-out evaluation itself, used by training and by the
`evaluate` command (heldout.py), its reports (report.py) and the training curves (plots.py)."""
