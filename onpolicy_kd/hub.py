"""Is the Hugging Face Hub reachable, and what to tell the user when it is not.

transformers and datasets retry an unreachable Hub for about a minute per file before failing with
a generic message. We ask once, with a short timeout, and when the Hub cannot be reached load only
from local caches, so a missing model or dataset fails in seconds with instructions.
"""

from __future__ import annotations

import functools
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from huggingface_hub import constants


@functools.cache
def hub_reachable(timeout_s: float = 3.0) -> bool:
    """True when a TCP connection to the Hub endpoint succeeds (False when offline mode is set)."""
    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "huggingface.co", port), timeout=timeout_s):
            return True
    except OSError:
        return False


def expand_path(path: str) -> str:
    return os.path.expandvars(os.path.expanduser(path))


def looks_like_local_path(name: str) -> bool:
    """A Hub id is `name` or `org/name`; anything else (absolute, ./, ~, a file suffix) is a path."""
    return (
        name.startswith(("/", ".", "~", "$"))
        or name.count("/") > 1
        or Path(name).suffix in {".gguf", ".json", ".jsonl", ".csv", ".parquet", ".txt", ".arrow"}
        or Path(expand_path(name)).exists()
    )
