"""Shared test helpers: float64 NumPy references and random matrix strategies."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st

settings.register_profile("proxrank", max_examples=25, deadline=None, derandomize=True)
settings.load_profile("proxrank")


def ref_svt(Y: np.ndarray, tau: float) -> np.ndarray:
    """Plain float64 reference: U diag(max(s - tau, 0)) V^T."""
    U, s, Vt = np.linalg.svd(np.asarray(Y, dtype=np.float64), full_matrices=False)
    return (U * np.maximum(s - tau, 0.0)) @ Vt


def ref_hard(Y: np.ndarray, tau: float) -> np.ndarray:
    U, s, Vt = np.linalg.svd(np.asarray(Y, dtype=np.float64), full_matrices=False)
    return (U * np.where(s > np.sqrt(2 * tau), s, 0.0)) @ Vt


@st.composite
def matrices(draw, min_side=1, max_side=8, batch=False):
    """A float64 tensor of random shape with a random spectrum (optionally gapped or repeated)."""
    m = draw(st.integers(min_side, max_side))
    n = draw(st.integers(min_side, max_side))
    shape = (draw(st.integers(1, 3)), m, n) if batch else (m, n)
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([1e-2, 1.0, 10.0]))
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(shape, generator=g, dtype=torch.float64)


@pytest.fixture
def one_thread():
    """Run a test on one torch thread: small problems run far faster on one thread than on
    two contended ones (``pytestmark = pytest.mark.usefixtures("one_thread")`` for a file)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def rng():
    return np.random.default_rng(0)
