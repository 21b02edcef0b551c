"""A character-level GPT-2 trained with the Hugging Face ``Trainer`` and ProxRank, then factorized.

The model is built from a config (random init, no download) and trained on the license texts
every Debian system ships (``/usr/share/common-licenses``). ProxRank selects GPT-2's attention
and MLP weights (transformers' ``Conv1D``; the stacked ``c_attn`` per q/k/v block) by default;
the ``lm_head``, tied to the token embedding, is left out with a warning.

With ``--budget 0.3`` it runs the README's recommended recipe for a chosen size instead of a
constant ``lam``: the ranks that keep 30% of each matrix's parameters, reached by a cubic
hard-threshold ramp over the first 15% of the steps and held to the end, with
``tau_lr="cumulative"`` (the base optimizer updates a latent copy of each matrix; the weights
are its projections).

Run: .venv/bin/python examples/gpt2_trainer.py [--steps 300] [--budget 0.3] [--quick]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
import transformers
from transformers import GPT2Config, GPT2LMHeadModel

import proxrank


class Chars(torch.utils.data.Dataset):
    """Windows of ``length`` characters (bytes) of ``text``, as GPT-2 inputs and labels."""

    def __init__(self, text: bytes, length: int, count: int, seed: int) -> None:
        self.data = torch.tensor(list(text), dtype=torch.long)
        g = torch.Generator().manual_seed(seed)
        self.starts = torch.randint(0, len(self.data) - length - 1, (count,), generator=g)
        self.length = length

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.data[self.starts[i] : self.starts[i] + self.length]
        return {"input_ids": ids, "labels": ids}


def license_text(limit: int | None = None) -> bytes:
    folder = Path("/usr/share/common-licenses")
    text = b"".join(p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file())
    return text[:limit] if limit else text


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lam", type=float, default=1.0)
    ap.add_argument("--budget", type=float, default=None, help="budget of the size recipe")
    ap.add_argument("--quick", action="store_true", help="a tiny model and a few steps")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    size = (
        dict(n_layer=1, n_embd=32, n_head=2)
        if args.quick
        else dict(n_layer=4, n_embd=256, n_head=4)
    )
    steps = 6 if args.quick else args.steps
    model = GPT2LMHeadModel(GPT2Config(vocab_size=256, n_positions=128, **size))
    text = license_text(20_000 if args.quick else None)
    split = int(0.9 * len(text))
    train = Chars(text[:split], 64, 16 * steps, seed=0)
    held_out = Chars(text[split:], 64, 64, seed=1)

    # the two added lines: wrap the optimizer, hand it to the Trainer
    base = torch.optim.AdamW(model.parameters(), lr=1e-3)
    if args.budget is None:
        opt = proxrank.ProxRank(base, model, lam=args.lam)
    else:  # the size recipe: say where to end up, ramp there early, keep a latent copy
        schedule = proxrank.Schedule(
            budget=args.budget, allocation="uniform", threshold="hard",
            ramp_end=round(0.15 * steps),
        )  # fmt: skip
        opt = proxrank.ProxRank(base, model, schedule=schedule, tau_lr="cumulative")
    print(opt.describe())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20))

    with tempfile.TemporaryDirectory() as out:
        trainer = transformers.Trainer(
            model=model,
            args=transformers.TrainingArguments(
                output_dir=out,
                max_steps=steps,
                per_device_train_batch_size=16,
                per_device_eval_batch_size=16,
                logging_steps=max(1, steps // 10),
                report_to=[],
                save_strategy="no",
                use_cpu=True,
            ),
            train_dataset=train,
            eval_dataset=held_out,
            optimizers=(opt, sched),
        )
        trainer.train()
        dense_loss = trainer.evaluate()["eval_loss"]
        small, summary = proxrank.factorize(model)
        trainer.model = small
        small_loss = trainer.evaluate()["eval_loss"]
    print(summary)
    print(f"held-out loss: {dense_loss:.3f} (trained), {small_loss:.3f} (factorized)")
    return {
        "dense_loss": dense_loss,
        "factorized_loss": small_loss,
        "compression": summary.compression,
    }


if __name__ == "__main__":
    main()
