"""Remakes the shipped Hugging Face data sets from data/sums.jsonl (prompt/completion sums):

- data/sums_hf/: a `DatasetDict.save_to_disk` directory, split "train" (the first 448 records)
  and "test" (the last 64), columns prompt and completion, for
  `builtin.hf_dataset(path = "data/sums_hf", split = "test")`;
- data/sums_chat.jsonl: the first 64 sums as 32 two-exchange conversations
  (`{"messages": [{"role": "user", ...}, {"role": "assistant", ...}, ...]}`), for
  `builtin.hf_dataset(path = "data/sums_chat.jsonl", format = "chat")`.

Deterministic: the records keep their order (no shuffling), so running it again writes the same
bytes. Needs only `datasets`; nothing is downloaded.

    .venv/bin/python pipelines/make_sums_dataset.py
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from datasets import Dataset, DatasetDict  # type: ignore[import-untyped]

DATA = Path(__file__).resolve().parent / "data"
TRAIN = 448  # the rest of the 512 records is the test split


def main() -> None:
    records = [json.loads(line) for line in (DATA / "sums.jsonl").read_text(encoding="utf-8").splitlines() if line]
    assert len(records) == 512, len(records)

    target = DATA / "sums_hf"
    shutil.rmtree(target, ignore_errors=True)  # save_to_disk would keep files of an older layout
    splits = DatasetDict(train=Dataset.from_list(records[:TRAIN]), test=Dataset.from_list(records[TRAIN:]))
    splits.save_to_disk(str(target))

    with open(DATA / "sums_chat.jsonl", "w", encoding="utf-8") as out:
        for first, second in zip(records[0:64:2], records[1:64:2], strict=True):
            messages = [
                {"role": "user", "content": first["prompt"]},
                {"role": "assistant", "content": first["completion"]},
                {"role": "user", "content": second["prompt"]},
                {"role": "assistant", "content": second["completion"]},
            ]
            out.write(json.dumps({"messages": messages}) + "\n")

    size = sum(f.stat().st_size for f in target.rglob("*") if f.is_file())
    print(f"{target}: {size} bytes; {DATA / 'sums_chat.jsonl'}")


if __name__ == "__main__":
    main()
