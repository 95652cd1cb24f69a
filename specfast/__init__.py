"""specfast: fast, certified spectral linear algebra on neural-network weights.

Drop-in ops (see docs/metrics.md for every definition and guarantee):
    spectral_norm, svdvals, svd_lowrank, stable_rank, spectral_entropy, effective_rank,
    condition_number, gram_matvec, frobenius_norm_sq
"""
from ._native import build_info
from . import ops  # registers the torch.library ops  # noqa: F401
from .linalg import (
    ConditionInfo,
    EntropyInfo,
    SpectralInfo,
    condition_number,
    effective_rank,
    frobenius_norm_sq,
    gram_matvec,
    spectral_entropy,
    spectral_norm,
    stable_rank,
    svd_lowrank,
    svdvals,
)

from .auditor import audit, compare  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "build_info", "gram_matvec", "spectral_norm", "svdvals", "svd_lowrank", "stable_rank",
    "spectral_entropy", "effective_rank", "condition_number", "frobenius_norm_sq",
    "SpectralInfo", "EntropyInfo", "ConditionInfo", "audit", "compare",
]
