"""Builders shared by several test files: `from helpers import gpt2_tokenizer` (pytest puts tests/ on
sys.path; so does running a test file as a script, as the torchrun workers of test_train_ddp.py do)."""

from __future__ import annotations

from pathlib import Path

GPT2_BPE = Path(__file__).parent / "assets" / "gpt2-bpe"


def gpt2_tokenizer():
    """The real GPT-2 BPE tokenizer (50,257 tokens) from the files in tests/assets/gpt2-bpe."""
    from transformers import GPT2TokenizerFast

    tok = GPT2TokenizerFast(vocab=str(GPT2_BPE / "vocab.json"), merges=str(GPT2_BPE / "merges.txt"))
    assert len(tok) > 50000  # the empty-tokenizer trap of transformers 5 (see offline-assets.md)
    return tok


def tree_digest(root) -> dict[str, str]:
    """{relative path: sha256} of every file under root (folders as "dir"): equal before and after
    means nothing under root was written, removed or added."""
    import hashlib

    root = Path(root)
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = "dir" if p.is_dir() and not p.is_symlink() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out
