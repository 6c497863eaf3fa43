"""Writes the small Hugging Face GPT-2 models that the language-model pipelines (distill_lm,
dpo, lora_distill, grpo, grpo_rm, onpolicy_distill) load from `tiny/`, so that they run anywhere
without downloading anything. Their vocabulary is dsgraph's byte-level tokenizer's (259 ids).

    python pipelines/make_tiny_models.py              # pipelines/tiny/{teacher,student,policy,reward}
    python pipelines/make_tiny_models.py --teach 300  # and pre-train the teacher on the sums, and
                                                      # the reward model on builtin.sums' scores

With real models, point `hf("...")` at their directories instead and skip this script."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

VOCAB = 259  # dsgraph's byte tokenizer: 256 bytes + pad, start, end
SIZES = {
    "teacher": {"n_embd": 64, "n_layer": 2, "n_head": 4},
    "student": {"n_embd": 32, "n_layer": 1, "n_head": 2},
    "policy": {"n_embd": 32, "n_layer": 2, "n_head": 2},
    "reward": {"n_embd": 32, "n_layer": 1, "n_head": 2},  # a sequence classifier with one output
}


def build(name: str, seed: int):
    from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

    torch.manual_seed(seed)
    # No dropout, as TRL's DPO does by default: the policy and its frozen reference then agree
    # exactly before training (margin 0, loss log 2).
    config = GPT2Config(
        vocab_size=VOCAB,
        n_positions=32,
        bos_token_id=257,
        eos_token_id=258,
        pad_token_id=256,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        **SIZES[name],
    )
    if name == "reward":  # scores the last real token of each sequence (padding is 256)
        config.num_labels = 1
        return GPT2ForSequenceClassification(config)
    return GPT2LMHeadModel(config)


def teach(model, data: Path, steps: int) -> float:
    """A few hundred plain PyTorch steps on prompt/completion data, so that the teacher knows
    something to distil. Returns the last loss."""
    from dsgraph.runtime.builtins import ce, prompt_completion

    records = prompt_completion(str(data), max_length=16).columns
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        index = torch.randint(0, len(records["input_ids"]), (32,), generator=generator)
        logits = model(records["input_ids"][index], attention_mask=records["attention_mask"][index]).logits
        loss = ce(logits, records["labels"][index], shift=True)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return float(loss)


def teach_reward(model, data: Path, steps: int) -> float:
    """Regression onto builtin.sums' score of completions laid out as a generation lays them out
    (left-padded prompt, completion, end token, padding): right answers, other numbers and other
    text, a third each. Returns the last loss."""
    import json
    import random

    from dsgraph.runtime.builtins import sums
    from dsgraph.runtime.tokenizer import ByteTokenizer

    tok, rng = ByteTokenizer(), random.Random(0)
    prompts = [json.loads(line)["prompt"] for line in data.read_text().splitlines() if line.strip()]
    right = {p: str(sum(int(x) for x in p.rstrip("=").split("+"))) for p in prompts}
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        batch = rng.sample(prompts, 32)
        completions = [
            right[p] if i % 3 == 0 else str(rng.randrange(200)) if i % 3 == 1 else rng.choice(["ab", "x=", "?", "4a"])
            for i, p in enumerate(batch)
        ]
        ids = torch.full((32, 14), tok.pad_token_id)
        for row, (p, c) in enumerate(zip(batch, completions, strict=True)):
            head = [tok.bos_token_id, *tok.encode(p)]
            ids[row, 8 - len(head) : 8] = torch.tensor(head)
            tail = [*tok.encode(c), tok.eos_token_id]
            ids[row, 8 : 8 + len(tail)] = torch.tensor(tail)
        target = torch.tensor(sums(batch, completions))
        scores = model(ids, attention_mask=(ids != tok.pad_token_id).long()).logits[:, 0]
        loss = torch.nn.functional.mse_loss(scores, target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return float(loss)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", nargs="?", default=str(Path(__file__).parent / "tiny"))
    parser.add_argument(
        "--teach",
        type=int,
        default=0,
        metavar="STEPS",
        help="pre-train the teacher (and the reward model) this many steps on data/sums.jsonl",
    )
    args = parser.parse_args(argv)
    out = Path(args.out)
    from transformers.utils import logging

    logging.disable_progress_bar()
    for seed, name in enumerate(SIZES):
        model = build(name, seed)
        sums = Path(__file__).parent / "data" / "sums.jsonl"
        if name == "teacher" and args.teach:
            print(f"teacher: loss {teach(model, sums, args.teach):.3f} after {args.teach} steps")
        if name == "reward" and args.teach:
            print(f"reward: loss {teach_reward(model, sums, args.teach):.4f} after {args.teach} steps")
        model.save_pretrained(out / name)
        print(f"wrote {out / name} ({sum(p.numel() for p in model.parameters()):,} parameters)")


if __name__ == "__main__":
    main()
