"""The sklearn digits workload shared by the benchmarks: standardised 8x8 images (75% train,
25% test, stratified) and a ReLU MLP ``64 -> hidden -> hidden -> 10``.

Scripts in this folder import it as a sibling (``from digits import ...``)."""

from __future__ import annotations

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn


def data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_train, y_train, x_test, y_test)``, features standardised with the training
    statistics."""
    X, y = load_digits(return_X_y=True)
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.25, random_state=seed, stratify=y)
    mean, std = Xtr.mean(0), Xtr.std(0) + 1e-6
    f = lambda a: torch.tensor((a - mean) / std, dtype=torch.float32)  # noqa: E731
    return f(Xtr), torch.tensor(ytr), f(Xte), torch.tensor(yte)


def mlp(hidden: int, seed: int = 0) -> nn.Sequential:
    """The MLP, initialised from ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(64, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, 10),
    )


def linears(model: nn.Module) -> list[nn.Linear]:
    """The MLP's Linear layers, in order."""
    return [m for m in model if isinstance(m, nn.Linear)]
