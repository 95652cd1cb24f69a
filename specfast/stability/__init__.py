"""The matrix-spectral stability framework (docs/stability.md): spectra of the input Jacobian, the
parameter Jacobian, the empirical NTK and the loss Hessian, matrix-free; the bounds they give; the
Global Matrix Stability Index."""
from .analysis import StabilityReport, analyze, default_loss
from .krylov import EigResult, Quadrature, TraceEstimate, eigsh, hutchpp, slq
from .layers import ProductForm, linear_region_radius, product_form
from .operators import InputJacobian, LossHessian, ModelFunction, ParameterJacobian, StabilityError

__all__ = ["analyze", "StabilityReport", "StabilityError", "default_loss", "eigsh", "hutchpp", "slq",
           "EigResult", "Quadrature", "TraceEstimate", "InputJacobian", "ParameterJacobian", "LossHessian",
           "ModelFunction", "ProductForm", "product_form", "linear_region_radius"]
