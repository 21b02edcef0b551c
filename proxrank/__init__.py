"""proxrank: low-rank training for PyTorch.

Wrap the optimizer you already use; after every base step proxrank applies a proximal step
that pushes each weight matrix toward low rank (singular value thresholding)::

    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    opt = proxrank.ProxRank(opt, model, lam=1e-3)
"""

from . import functional
from .backends import (
    AutoBackend,
    Backend,
    ExactBackend,
    GramBackend,
    SubspaceBackend,
    SVDResult,
)
from .optimizer import ProxRank
from .prox import HardThreshold, ProxMap, SoftThreshold
from .selection import DEFAULT_MODULE_TYPES, Target, select_targets

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_MODULE_TYPES",
    "AutoBackend",
    "Backend",
    "ExactBackend",
    "GramBackend",
    "HardThreshold",
    "ProxMap",
    "ProxRank",
    "SVDResult",
    "SoftThreshold",
    "SubspaceBackend",
    "Target",
    "__version__",
    "functional",
    "select_targets",
]
