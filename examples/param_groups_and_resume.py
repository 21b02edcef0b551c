"""Per-layer strength, an LR scheduler, and checkpoint / resume with ProxRank.

Run: .venv/bin/python examples/param_groups_and_resume.py
"""

from __future__ import annotations

import io

import torch
from torch import nn

import proxrank


def build():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 128), nn.GELU(), nn.Linear(128, 10)
    )
    base = torch.optim.AdamW(
        [
            {"params": model[:4].parameters(), "lam": 10.0},  # hidden layers: strong prox
            {"params": model[4].parameters(), "lam": 0.0},  # classifier: left dense
        ],
        lr=3e-3,
    )
    opt = proxrank.ProxRank(base, model, lam=10.0, prox="soft")
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=200)
    return model, opt, sched


def train(model, opt, sched, steps, data):
    x, y = data
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return float(loss.detach())


def main():
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    data = torch.tensor(X / 16.0, dtype=torch.float32), torch.tensor(y)

    model, opt, sched = build()
    train(model, opt, sched, 100, data)
    buf = io.BytesIO()  # a checkpoint, as you would write it to disk
    torch.save(
        {"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}, buf
    )

    buf.seek(0)
    ckpt = torch.load(buf, weights_only=False)
    model, opt, sched = build()
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    sched.load_state_dict(ckpt["sched"])
    loss = train(model, opt, sched, 100, data)

    acc = float((model(data[0]).argmax(1) == data[1]).float().mean())
    ranks = [int(torch.linalg.matrix_rank(m.weight)) for m in model[::2]]
    print(f"steps {opt.step_count}  loss {loss:.3f}  train accuracy {acc:.3f}")
    print(f"ranks {ranks}  (full: [64, 128, 10]; the classifier had lam = 0)")


if __name__ == "__main__":
    main()
