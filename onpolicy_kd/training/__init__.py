"""Training: the loop (loop.py) and the phases of a step (phases.py), optimizers (optim.py), checkpoints
(checkpoint.py) and the console / metrics monitor (monitor.py)."""
