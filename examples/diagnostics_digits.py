"""Convergence diagnostics on a small MLP (sklearn's digits, full-batch SGD with momentum).

Trains with the nuclear-norm prox, then prints the per-layer report and saves the plot
(rank trajectories, spectra before/after the last prox) and a JSON-lines log.

    python examples/diagnostics_digits.py [--steps 600] [--out runs/diagnostics_digits.png]
"""

from __future__ import annotations

import argparse

import torch
from sklearn.datasets import load_digits

import proxrank


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--lam", type=float, default=0.05)
    parser.add_argument("--out", default="runs/diagnostics_digits.png")
    parser.add_argument("--log", default="runs/diagnostics_digits.jsonl")
    args = parser.parse_args()

    X, y = load_digits(return_X_y=True)
    X, y = torch.tensor(X / 16, dtype=torch.float32), torch.tensor(y)
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 128),
        torch.nn.ReLU(),
        torch.nn.Linear(128, 64),
        torch.nn.ReLU(),
        torch.nn.Linear(64, 10),
    )
    diagnostics = proxrank.Diagnostics(
        rule=proxrank.ConvergenceRule(patience=50, tol=1e-3),
        loggers=[proxrank.JSONLinesLogger(args.log)],
        log_every=50,
    )
    base = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    opt = proxrank.ProxRank(base, model, lam=args.lam, diagnostics=diagnostics)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(X), y)
        loss.backward()
        return loss

    for _ in range(args.steps):
        opt.step(closure)
    diagnostics.close()
    print(opt.report())
    print("plot:", diagnostics.plot(args.out), " log:", args.log)


if __name__ == "__main__":
    main()
