"""proxrank: low-rank training for PyTorch.

Wrap the optimizer you already use; after every base step proxrank applies a proximal step
that pushes each weight matrix toward low rank (singular value thresholding)::

    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    opt = proxrank.ProxRank(opt, model, lam=1e-3)

The top level holds what a training script calls; the records and extension points stay in
their modules (``proxrank.metrics``, ``proxrank.backends``, ``proxrank.prox``,
``proxrank.selection``, ``proxrank.records``, ``proxrank.diagnostics``, ``proxrank.factorize``).
"""

from . import functional, recovery
from .backends import Backend
from .budget import allocate_ranks
from .compress import compress
from .diagnostics import ConvergenceRule, CSVLogger, Diagnostics, JSONLinesLogger, TensorBoardLogger
from .factorize import factorize, load_factorized
from .metrics import ActivationMetric, FisherMetric, Metric
from .optimizer import ProxRank
from .schedules import Ramp, Schedule

__version__ = "0.3.0"

__all__ = [
    "ActivationMetric",
    "Backend",
    "CSVLogger",
    "ConvergenceRule",
    "Diagnostics",
    "FisherMetric",
    "JSONLinesLogger",
    "Metric",
    "ProxRank",
    "Ramp",
    "Schedule",
    "TensorBoardLogger",
    "__version__",
    "allocate_ranks",
    "compress",
    "factorize",
    "functional",
    "load_factorized",
    "recovery",
]
