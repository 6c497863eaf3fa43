"""Tokenizers for text data: the built-in byte-level one (`tokenizer = "bytes"`, nothing to
download, for tests and demos) or a Hugging Face tokenizer from a local directory."""

from __future__ import annotations

from pathlib import Path
from typing import TypeAlias


class ByteTokenizer:
    """One id per UTF-8 byte (0-255), then padding (256), start (257) and end (258) of text.
    A model that reads it needs a vocabulary of at least 259 (catalogue.BYTE_VOCAB)."""

    vocab_size = 259
    pad_token_id, bos_token_id, eos_token_id = 256, 257, 258

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class HfTokenizer:
    """A tokenizer saved with `save_pretrained`, read from a local directory (never downloaded)."""

    def __init__(self, directory: Path):
        from transformers import AutoTokenizer

        if not directory.is_dir():
            raise FileNotFoundError(f"tokenizer directory {directory} does not exist (nothing is downloaded)")
        self.inner = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
        self.vocab_size = len(self.inner)
        self.bos_token_id = self.inner.bos_token_id
        self.eos_token_id = self.inner.eos_token_id
        pad = self.inner.pad_token_id
        self.pad_token_id = pad if pad is not None else (self.eos_token_id if self.eos_token_id is not None else 0)

    def encode(self, text: str) -> list[int]:
        return self.inner.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return self.inner.decode(ids)


Tokenizer: TypeAlias = ByteTokenizer | HfTokenizer


def load_tokenizer(spec: str, base_dir: Path) -> Tokenizer:
    """`"bytes"`, or a directory relative to the .dsg file."""
    return ByteTokenizer() if spec == "bytes" else HfTokenizer(base_dir / spec)
