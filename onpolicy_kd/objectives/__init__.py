"""The math: divergences, the policy gradient, penalties, hidden-state loss (pure tensor functions), the loss of
a micro-batch assembled from them (loss.py) and the table of modes (modes.py). Nothing here runs a model."""
