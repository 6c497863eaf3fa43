"""Writes the small Hugging Face GPT-2 models that pipelines/distill_lm.dsg, dpo.dsg and
lora_distill.dsg load from `tiny/`, so that they run anywhere without downloading anything.
Their vocabulary is dsgraph's byte-level tokenizer's (259 ids).

    python pipelines/make_tiny_models.py                      # pipelines/tiny/{teacher,student,policy}
    python pipelines/make_tiny_models.py --teach 300          # and pre-train the teacher on the sums

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
}


def build(name: str, seed: int):
    from transformers import GPT2Config, GPT2LMHeadModel

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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", nargs="?", default=str(Path(__file__).parent / "tiny"))
    parser.add_argument(
        "--teach", type=int, default=0, metavar="STEPS", help="pre-train the teacher this many steps on data/sums.jsonl"
    )
    args = parser.parse_args(argv)
    out = Path(args.out)
    from transformers.utils import logging

    logging.disable_progress_bar()
    for seed, name in enumerate(SIZES):
        model = build(name, seed)
        if name == "teacher" and args.teach:
            print(
                f"teacher: loss {teach(model, Path(__file__).parent / 'data' / 'sums.jsonl', args.teach):.3f} "
                f"after {args.teach} steps"
            )
        model.save_pretrained(out / name)
        print(f"wrote {out / name} ({sum(p.numel() for p in model.parameters()):,} parameters)")


if __name__ == "__main__":
    main()
