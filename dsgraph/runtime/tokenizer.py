"""Tokenizers for text data: the built-in byte-level one (`tokenizer = "bytes"`, nothing to
download, for tests and demos) or a Hugging Face tokenizer from a local directory."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TypeAlias

# A conversation: turns {"role": ..., "content": ...}; training reads only the assistant's turns.
Messages: TypeAlias = Sequence[Mapping[str, str]]


class ByteTokenizer:
    """One id per UTF-8 byte (0-255), then padding (256), start (257) and end (258) of text.
    A model that reads it needs a vocabulary of at least 259 (catalogue.BYTE_VOCAB)."""

    vocab_size = 259
    pad_token_id, bos_token_id, eos_token_id = 256, 257, 258

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def encode_chat(self, messages: Messages) -> tuple[list[int], list[int]]:
        """The byte tokenizer's own chat template (it has none from Hugging Face): the start token,
        then each turn as `<|role|>\n` + content + `\n`, then the end token. Labels are the ids on
        each assistant turn's content and its newline (and on the end token after a final
        assistant turn), -100 elsewhere; a model is prompted with `<|assistant|>\n`."""
        ids, labels = [self.bos_token_id], [-100]
        for message in messages:
            head, body = self.encode(f"<|{message['role']}|>\n"), self.encode(message["content"] + "\n")
            trained = message["role"] == "assistant"
            ids += head + body
            labels += [-100] * len(head) + (body if trained else [-100] * len(body))
        last_trained = bool(messages) and messages[-1]["role"] == "assistant"
        return [*ids, self.eos_token_id], [*labels, self.eos_token_id if last_trained else -100]


class HfTokenizer:
    """A tokenizer saved with `save_pretrained`, read from a local directory (never downloaded)."""

    def __init__(self, directory: Path):
        from transformers import AutoTokenizer

        if not directory.is_dir():
            raise FileNotFoundError(f"tokenizer directory {directory} does not exist (nothing is downloaded)")
        self.directory = directory
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

    def encode_chat(self, messages: Messages) -> tuple[list[int], list[int]]:
        """The conversation as the tokenizer's chat template renders it (its own special tokens,
        no others added). Labels are the ids on what each assistant turn adds after the prompt
        that asks for it (`add_generation_prompt`): its content and end-of-turn tokens; -100
        elsewhere. Each piece is tokenized on its own."""
        if not self.inner.chat_template:
            raise ValueError(f"tokenizer {self.directory} has no chat template")

        def render(turns: Messages, prompt: bool = False) -> str:
            text = self.inner.apply_chat_template(list(turns), tokenize=False, add_generation_prompt=prompt)
            return text if isinstance(text, str) else str(text)

        full = render(messages)
        ids: list[int] = []
        labels: list[int] = []
        done = 0
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            head, through = render(messages[:i], prompt=True), render(messages[: i + 1])
            if not (full.startswith(through) and through.startswith(head) and len(head) >= done):
                raise ValueError(
                    f"the chat template of {self.directory} does not render a conversation turn after turn"
                )
            start, end = len(head), len(through)
            _add(ids, labels, self.encode(full[done:start]), False)
            _add(ids, labels, self.encode(full[start:end]), True)
            done = end
        _add(ids, labels, self.encode(full[done:]), False)
        return ids, labels


def _add(ids: list[int], labels: list[int], piece: list[int], trained: bool) -> None:
    ids += piece
    labels += piece if trained else [-100] * len(piece)


Tokenizer: TypeAlias = ByteTokenizer | HfTokenizer


def load_tokenizer(spec: str, base_dir: Path) -> Tokenizer:
    """`"bytes"`, or a directory relative to the .dsg file."""
    return ByteTokenizer() if spec == "bytes" else HfTokenizer(base_dir / spec)
