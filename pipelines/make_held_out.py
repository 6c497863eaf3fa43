"""Writes data/sum_pairs_eval.jsonl: 128 preference pairs over sums that data/sum_pairs.jsonl
does not hold (the held-out set of pipelines/dpo.dsg). Deterministic: run it again and the file is
the same.

    python pipelines/make_held_out.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

DATA = Path(__file__).parent / "data"


def main() -> None:
    seen = {json.loads(line)["prompt"] for line in (DATA / "sum_pairs.jsonl").read_text().splitlines() if line}
    rng = random.Random(20261202)
    rows: list[dict[str, str]] = []
    while len(rows) < 128:
        a, b = rng.randrange(50), rng.randrange(50)
        prompt = f"{a}+{b}="
        if prompt in seen:
            continue
        seen.add(prompt)
        wrong = a + b + rng.choice([-10, -2, -1, 1, 2, 10])  # a near miss, as in sum_pairs.jsonl
        rows.append({"prompt": prompt, "chosen": str(a + b), "rejected": str(wrong if wrong >= 0 else a + b + 1)})
    (DATA / "sum_pairs_eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


if __name__ == "__main__":
    main()
