"""builtin.hf_dataset, in one process: the shipped save_to_disk data set against
builtin.prompt_completion, parquet/JSON/CSV files, column renames, chat labels, raw columns, and
the errors that name the path, the split, the column or the record."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import datasets
import pytest
import torch

from dsgraph.plan import Source, SourceKind
from dsgraph.runtime import builtins, sources
from dsgraph.runtime.tokenizer import ByteTokenizer
from dsgraph.source import Span

PIPELINES = Path(__file__).resolve().parents[1] / "pipelines"
SUMS = [json.loads(line) for line in (PIPELINES / "data" / "sums.jsonl").read_text().splitlines() if line]
SPAN = Span("test.dsg", 1, 1, 1, 2)


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """load_dataset's Arrow cache in tmp_path, not the user's."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


def _jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def _same(got: builtins.TensorRecords, want: builtins.TensorRecords) -> None:
    assert sorted(got.columns) == sorted(want.columns)
    for name, tensor in want.columns.items():
        assert torch.equal(got.columns[name], tensor), name


def test_the_shipped_dataset_gives_what_prompt_completion_gives(tmp_path):
    for split, records in (("train", SUMS[:448]), ("test", SUMS[448:])):
        # As a pipeline names it: relative to the .dsg file's directory.
        args = (("path", "data/sums_hf"), ("split", split), ("max_length", 16))
        got = sources.build(Source(SourceKind.BUILTIN, "hf_dataset", args, SPAN), builtins.DATA, PIPELINES)
        want = builtins.prompt_completion(str(_jsonl(tmp_path / f"{split}.jsonl", records)), max_length=16)
        assert len(got) == len(records)
        _same(got, want)


@pytest.mark.parametrize("suffix", ["parquet", "json", "csv"])
def test_files_read_like_the_jsonl_builtin(tmp_path, suffix):
    records = [*SUMS[:6], {"prompt": "3+4=", "completion": "07"}]  # CSV keeps "07" as text
    path = tmp_path / f"d.{suffix}"
    getattr(datasets.Dataset.from_list(records), f"to_{suffix}")(
        str(path), **({"index": False} if suffix == "csv" else {})
    )
    want = builtins.prompt_completion(str(_jsonl(tmp_path / "d.jsonl", records)), max_length=12)
    _same(builtins.hf_dataset(str(path), max_length=12), want)


def test_a_directory_of_files_has_the_splits_its_file_names_give(tmp_path):
    (tmp_path / "dir").mkdir()
    _jsonl(tmp_path / "dir" / "train.jsonl", SUMS[:5])
    _jsonl(tmp_path / "dir" / "test.jsonl", SUMS[5:8])
    want = builtins.prompt_completion(str(_jsonl(tmp_path / "t.jsonl", SUMS[5:8])))
    _same(builtins.hf_dataset(str(tmp_path / "dir"), split="test"), want)
    assert len(builtins.hf_dataset(str(tmp_path / "dir"))) == 5


def test_columns_rename_the_fields_a_format_reads(tmp_path):
    renamed = [{"question": r["prompt"], "answer": r["completion"], "id": i} for i, r in enumerate(SUMS[:4])]
    datasets.Dataset.from_list(renamed).to_parquet(str(tmp_path / "q.parquet"))
    got = builtins.hf_dataset(str(tmp_path / "q.parquet"), columns={"prompt": "question", "completion": "answer"})
    _same(got, builtins.prompt_completion(str(_jsonl(tmp_path / "q.jsonl", SUMS[:4]))))

    pairs = [{"prompt": "1+1=", "good": "2", "bad": "11"}, {"prompt": "2+2=", "good": "4", "bad": "22"}]
    datasets.DatasetDict(train=datasets.Dataset.from_list(pairs)).save_to_disk(str(tmp_path / "pairs"))
    got = builtins.hf_dataset(
        str(tmp_path / "pairs"), format="preference", columns={"chosen": "good", "rejected": "bad"}, max_length=12
    )
    plain = [{"prompt": p["prompt"], "chosen": p["good"], "rejected": p["bad"]} for p in pairs]
    _same(got, builtins.preference_pairs(str(_jsonl(tmp_path / "p.jsonl", plain)), max_length=12))


def test_chat_labels_only_the_assistant_turns():
    data = builtins.hf_dataset(str(PIPELINES / "data" / "sums_chat.jsonl"), format="chat")
    tok = ByteTokenizer()
    ids, mask, labels = (data.columns[k][0] for k in ("input_ids", "attention_mask", "labels"))
    n = int(mask.sum())
    assert tok.decode(ids[:n].tolist()) == "<|user|>\n24+48=\n<|assistant|>\n72\n<|user|>\n26+2=\n<|assistant|>\n28\n"
    assert ids[0] == tok.bos_token_id and ids[n - 1] == tok.eos_token_id and (ids[n:] == tok.pad_token_id).all()
    trained = labels != -100
    assert labels[trained].tolist() == [*b"72\n", *b"28\n", tok.eos_token_id]
    assert (ids[trained] == labels[trained]).all() and not trained[n:].any()
    assert len(data) == 32


def test_chat_with_a_tokenizers_own_template(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[PAD]", "<|user|>", "<|assistant|>", "<|end|>", "[UNK]", "what", "is", "two", "four", "?"]
    inner = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    inner.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=inner, pad_token="[PAD]", unk_token="[UNK]", additional_special_tokens=words[1:4]
    )
    tok.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
        "{% if add_generation_prompt %}<|assistant|> {% endif %}"
    )
    tok.save_pretrained(tmp_path / "tok")
    turns = [("user", "what is two ?"), ("assistant", "four"), ("user", "what is four ?"), ("assistant", "two")]
    _jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": r, "content": c} for r, c in turns]}])
    args = (("path", "c.jsonl"), ("format", "chat"), ("tokenizer", "tok"), ("max_length", 20))
    data = sources.build(Source(SourceKind.BUILTIN, "hf_dataset", args, SPAN), builtins.DATA, tmp_path)
    #            <|user|> what is two ? <|end|> <|assistant|> four <|end|> (again) ... padding
    assert data.columns["input_ids"][0].tolist() == [1, 5, 6, 7, 9, 3, 2, 8, 3, 1, 5, 6, 8, 9, 3, 2, 7, 3, 0, 0]
    assert data.columns["labels"][0].tolist() == [-100] * 7 + [8, 3] + [-100] * 7 + [7, 3, -100, -100]


def test_raw_gives_the_numeric_columns(tmp_path):
    rows = [{"x": [1.0, 2.0], "y": 1, "ok": True, "name": "a"}, {"x": [3.0, 4.0], "y": 0, "ok": False, "name": "b"}]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "r.parquet"))
    data = builtins.hf_dataset(str(tmp_path / "r.parquet"), format="raw")
    assert sorted(data.columns) == ["ok", "x", "y"]  # "name" is text
    assert data.columns["x"].tolist() == [[1.0, 2.0], [3.0, 4.0]] and data.columns["y"].tolist() == [1, 0]
    renamed = builtins.hf_dataset(str(tmp_path / "r.parquet"), format="raw", columns={"features": "x"})
    assert list(renamed.columns) == ["features"] and torch.equal(renamed.columns["features"], data.columns["x"])
    with pytest.raises(ValueError, match=r"r.parquet \[train\]: column 'name' is not numeric"):
        builtins.hf_dataset(str(tmp_path / "r.parquet"), format="raw", columns={"n": "name"})
    _jsonl(tmp_path / "ragged.jsonl", [{"x": [1, 2]}, {"x": [1, 2]}, {"x": [3]}])
    with pytest.raises(ValueError, match=r"ragged.jsonl \[train\] record 3: column 'x' is empty or of another shape"):
        builtins.hf_dataset(str(tmp_path / "ragged.jsonl"), format="raw")


def test_errors_name_the_path_and_what_is_there(tmp_path):
    shipped = str(PIPELINES / "data" / "sums_hf")
    with pytest.raises(ValueError, match=r"sums_hf has no split 'validation'; its splits: train, test"):
        builtins.hf_dataset(shipped, split="validation")
    with pytest.raises(
        ValueError, match=r"sums_hf \[train\] has no column 'question'; its columns: prompt, completion"
    ):
        builtins.hf_dataset(shipped, columns={"prompt": "question"})
    with pytest.raises(ValueError, match=r"format must be one of prompt_completion, preference, chat, raw, not 'text'"):
        builtins.hf_dataset(shipped, format="text")
    with pytest.raises(
        ValueError, match=r"columns: 'answer' is not a field of this format; it reads prompt, completion"
    ):
        builtins.hf_dataset(shipped, columns={"answer": "completion"})
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        builtins.hf_dataset(str(tmp_path / "missing"))

    bad = [*SUMS[:2], {"prompt": "1+1=", "completion": None}]
    datasets.Dataset.from_list(bad).to_parquet(str(tmp_path / "bad.parquet"))
    with pytest.raises(ValueError, match=r"bad.parquet \[train\] record 3: needs the text field\(s\) completion"):
        builtins.hf_dataset(str(tmp_path / "bad.parquet"))
    _jsonl(tmp_path / "long.jsonl", [*SUMS[:1], {"prompt": "x" * 40, "completion": "y"}])
    with pytest.raises(ValueError, match=r"long.jsonl \[train\] record 2: the prompt alone takes 41 tokens"):
        builtins.hf_dataset(str(tmp_path / "long.jsonl"), max_length=16)

    _jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(ValueError, match=r"chat.jsonl \[train\] record 1: has no assistant turn"):
        builtins.hf_dataset(str(tmp_path / "chat.jsonl"), format="chat")
    _jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant"}]}])
    with pytest.raises(ValueError, match=r"chat.jsonl \[train\] record 1: messages must be a list"):
        builtins.hf_dataset(str(tmp_path / "chat.jsonl"), format="chat")
