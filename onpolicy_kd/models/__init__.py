"""Models: loading teachers and students (loading.py), their forward pass over a batch's completions
(forward.py), and their placement on devices and processes under accelerate / DeepSpeed (distributed.py)."""
