"""onpolicy-kd: on-policy knowledge distillation of causal language models.

`from onpolicy_kd import distill` is the Python API (onpolicy_kd/api.py); `python -m onpolicy_kd.train` the CLI;
`onpolicy_kd.Distillation` the base class of a distillation defined in a Python file (onpolicy_kd/models/distillation_file.py).
"""

__version__ = "0.1.0"
__all__ = ["distill", "distill_file", "Distillation", "TrainResult"]


def __getattr__(name: str):  # lazy: `import onpolicy_kd` stays cheap for the CLI's argument parsing
    if name == "Distillation":
        from onpolicy_kd.models.distillation_file import Distillation

        return Distillation
    if name in __all__:
        from onpolicy_kd import api

        return getattr(api, name)
    raise AttributeError(f"module 'onpolicy_kd' has no attribute {name!r}")
