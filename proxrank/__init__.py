"""proxrank: low-rank training for PyTorch.

Wrap the optimizer you already use; after every base step proxrank applies a proximal step
that pushes each weight matrix toward low rank (singular value thresholding)::

    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    opt = proxrank.ProxRank(opt, model, lam=1e-3)
"""

from . import functional, recovery
from .backends import (
    AutoBackend,
    Backend,
    ExactBackend,
    GramBackend,
    SubspaceBackend,
    SVDResult,
)
from .budget import Allocation, allocate_ranks
from .compress import LayerCompression, compress
from .diagnostics import (
    ConvergenceRule,
    CSVLogger,
    Diagnostics,
    JSONLinesLogger,
    LayerDiagnostics,
    ModelDiagnostics,
    TensorBoardLogger,
)
from .factorize import Factorized, FactorizeSummary, LayerSummary, factorize
from .metrics import (
    ActivationMetric,
    AdamMetric,
    EuclideanMetric,
    FisherMetric,
    Metric,
    TwoSidedMetric,
    Weighting,
    weighted_prox,
    weighted_truncate,
)
from .optimizer import ProxRank
from .prox import HardThreshold, ProxMap, SoftThreshold
from .schedules import Ramp, Schedule
from .selection import DEFAULT_MODULE_TYPES, Target, select_targets

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_MODULE_TYPES",
    "ActivationMetric",
    "AdamMetric",
    "Allocation",
    "AutoBackend",
    "Backend",
    "CSVLogger",
    "ConvergenceRule",
    "Diagnostics",
    "EuclideanMetric",
    "ExactBackend",
    "FactorizeSummary",
    "Factorized",
    "FisherMetric",
    "GramBackend",
    "HardThreshold",
    "JSONLinesLogger",
    "LayerCompression",
    "LayerDiagnostics",
    "LayerSummary",
    "Metric",
    "ModelDiagnostics",
    "ProxMap",
    "ProxRank",
    "Ramp",
    "SVDResult",
    "Schedule",
    "SoftThreshold",
    "SubspaceBackend",
    "Target",
    "TensorBoardLogger",
    "TwoSidedMetric",
    "Weighting",
    "__version__",
    "allocate_ranks",
    "compress",
    "factorize",
    "functional",
    "recovery",
    "select_targets",
    "weighted_prox",
    "weighted_truncate",
]
