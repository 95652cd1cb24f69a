"""Training-time spectral tools (docs/regularizers.md).

* ``spectral_norm``: drop-in for ``torch.nn.utils.parametrizations.spectral_norm`` (same state_dict,
  same values step for step, fewer passes over W; per-matrix σ for expert stacks; fp32 vectors for
  bf16/fp16 weights).
* ``WeightSpectralPenalty``, ``SpectralEntropyPenalty``: penalties on the weight spectra.
* ``jacobian_spectral_penalty``, ``jacobian_frobenius_penalty``: penalties on the input Jacobian.
"""
from .parametrizations import spectral_norm
from .regularizers import (
    SpectralEntropyPenalty,
    WeightSpectralPenalty,
    jacobian_frobenius_penalty,
    jacobian_spectral_penalty,
)

__all__ = ["spectral_norm", "WeightSpectralPenalty", "SpectralEntropyPenalty", "jacobian_spectral_penalty",
           "jacobian_frobenius_penalty"]
