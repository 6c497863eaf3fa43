"""Text data and Hugging Face sources, in one process: the byte tokenizer, a tokenizer saved to a
local directory, prompt/completion and preference JSONL, and the AutoModel class chosen from a
saved config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dsgraph.plan import Source, SourceKind
from dsgraph.runtime import builtins, sources
from dsgraph.source import Span
from dsgraph.runtime.tokenizer import ByteTokenizer, load_tokenizer


SPAN = Span("test.dsg", 1, 1, 1, 2)


def _jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_prompt_completion_labels_only_the_completion(tmp_path):
    data = _jsonl(
        tmp_path / "d.jsonl", [{"prompt": "2+2=", "completion": "4"}, {"prompt": "héllo ", "completion": "wörld"}]
    )
    columns = builtins.prompt_completion(str(data), "bytes", 16).columns
    tok = ByteTokenizer()
    ids, mask, labels = columns["input_ids"], columns["attention_mask"], columns["labels"]
    assert ids.shape == mask.shape == labels.shape == (2, 16)
    assert ids[0, 0] == tok.bos_token_id
    n = int(mask[0].sum())
    assert tok.decode(ids[0, 1:n].tolist()) == "2+2=4" and ids[0, n - 1] == tok.eos_token_id
    assert (ids[0, n:] == tok.pad_token_id).all() and (labels[0, n:] == -100).all()
    assert (labels[0, :5] == -100).all()  # start + "2+2="
    assert labels[0, 5:n].tolist() == ids[0, 5:n].tolist()  # "4" + end
    assert tok.decode(ids[1, 1 : int(mask[1].sum())].tolist()) == "héllo wörld"  # UTF-8 bytes


def test_preference_pairs_share_the_prompt(tmp_path):
    data = _jsonl(tmp_path / "p.jsonl", [{"prompt": "1+1=", "chosen": "2", "rejected": "11"}])
    columns = builtins.preference_pairs(str(data), "bytes", 12).columns
    assert sorted(columns) == sorted(
        f"{side}_{k}" for side in ("chosen", "rejected") for k in ("input_ids", "attention_mask", "labels")
    )
    assert columns["chosen_input_ids"][0, :5].tolist() == columns["rejected_input_ids"][0, :5].tolist()
    assert int((columns["chosen_labels"] != -100).sum()) == 2  # "2" + end
    assert int((columns["rejected_labels"] != -100).sum()) == 3  # "11" + end


def test_bad_records_name_the_file_and_line(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n')
    with pytest.raises(ValueError, match=r"d.jsonl:2: needs the text field\(s\) completion"):
        builtins.prompt_completion(str(data))
    data.write_text('{"prompt": "' + "x" * 40 + '", "completion": "b"}\n')
    with pytest.raises(ValueError, match="the prompt alone takes 41 tokens, max_length is 16"):
        builtins.prompt_completion(str(data), max_length=16)


def _save_word_tokenizer(directory: Path) -> None:
    """A tokenizer built from scratch (nothing downloaded) and saved like any Hugging Face one."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[BOS]": 1, "[EOS]": 2, "[UNK]": 3, "what": 4, "is": 5, "two": 6, "four": 7, "?": 8}
    inner = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    inner.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=inner, pad_token="[PAD]", bos_token="[BOS]", eos_token="[EOS]", unk_token="[UNK]"
    ).save_pretrained(directory)


def test_a_tokenizer_from_a_local_directory(tmp_path):
    _save_word_tokenizer(tmp_path / "tok")
    tok = load_tokenizer("tok", tmp_path)
    assert tok.encode("what is two ?") == [4, 5, 6, 8] and tok.pad_token_id == 0
    _jsonl(tmp_path / "d.jsonl", [{"prompt": "what is two", "completion": "four"}])
    # As a pipeline names it: relative to the .dsg file's directory.
    source = Source(
        SourceKind.BUILTIN, "prompt_completion", (("path", "d.jsonl"), ("tokenizer", "tok"), ("max_length", 8)), SPAN
    )
    dataset = sources.build(source, builtins.DATA, tmp_path)
    assert dataset.columns["input_ids"][0].tolist() == [1, 4, 5, 6, 7, 2, 0, 0]
    assert dataset.columns["labels"][0].tolist() == [-100, -100, -100, -100, 7, 2, -100, -100]
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        load_tokenizer("missing", tmp_path)


def test_the_model_class_comes_from_the_saved_config_or_the_file(tmp_path):
    from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

    config = GPT2Config(vocab_size=32, n_positions=8, n_embd=8, n_layer=1, n_head=2, num_labels=3, pad_token_id=0)
    GPT2ForSequenceClassification(config).save_pretrained(tmp_path / "cls")
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "lm")

    def hf(*args: tuple[str, object]) -> object:
        return sources.build(Source(SourceKind.HF, "x", args, SPAN), {}, tmp_path)

    assert type(hf(("0", "cls"))).__name__ == "GPT2ForSequenceClassification"
    assert type(hf(("0", "lm"))).__name__ == "GPT2LMHeadModel"
    assert type(hf(("0", "cls"), ("task", "model"))).__name__ == "GPT2Model"
    model = hf(
        ("config", {"model_type": "gpt2", "vocab_size": 32, "n_positions": 8, "n_embd": 8, "n_layer": 1, "n_head": 2})
    )
    assert type(model).__name__ == "GPT2LMHeadModel"
    with torch.no_grad():
        assert hf(("0", "cls"))(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3)
