"""Gradient attributions and their stability (docs/attribution.md)."""
from .methods import (attribute, input_x_gradient, integrated_gradients, saliency, smoothgrad,
                      token_attributions)
from .stability import (attribution_spectra, attribution_stability, cosine_similarity, max_sensitivity, perturb,
                        relative_l2, spearman, spectral_link, topk_overlap)

__all__ = [
    "saliency", "input_x_gradient", "integrated_gradients", "smoothgrad", "attribute", "token_attributions",
    "perturb", "relative_l2", "cosine_similarity", "topk_overlap", "spearman", "max_sensitivity",
    "attribution_stability", "spectral_link", "attribution_spectra",
]
from .routing import RoutingReport, routing_stability  # noqa: E402
__all__ += ["routing_stability", "RoutingReport"]
