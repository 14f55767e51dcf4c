r"""The paper's analysis tools (section 4 and appendix C).

* :func:`sharpness`, :func:`ascent_perturbation`:
  :math:`\max_{\|\epsilon\| \le \rho} L(w + \epsilon) - L(w)` by projected
  gradient ascent (C.6), reusing the core's ascent direction.
* :func:`m_sharpness`: the mean sharpness over disjoint groups of m examples (4.1).
* :func:`hessian_top_eigenvalues`, :func:`hessian_spectral_density`,
  :func:`lanczos`: the Hessian spectrum by Lanczos (4.2), lambda_max and
  lambda_max / lambda_5.
* :func:`filter_normalized_direction`, :func:`loss_landscape_1d`,
  :func:`loss_landscape_2d`: Figure 1's landscapes (Li et al., 2017).
* :mod:`sam_optax.analysis.plots`: matplotlib helpers.
"""

from sam_optax.analysis._hessian import hessian_spectral_density
from sam_optax.analysis._hessian import hessian_top_eigenvalues
from sam_optax.analysis._hessian import hvp_fn
from sam_optax.analysis._hessian import lanczos
from sam_optax.analysis._landscape import filter_normalized_direction
from sam_optax.analysis._landscape import loss_landscape_1d
from sam_optax.analysis._landscape import loss_landscape_2d
from sam_optax.analysis._sharpness import ascent_perturbation
from sam_optax.analysis._sharpness import m_sharpness
from sam_optax.analysis._sharpness import sharpness

__all__ = [
    "ascent_perturbation",
    "filter_normalized_direction",
    "hessian_spectral_density",
    "hessian_top_eigenvalues",
    "hvp_fn",
    "lanczos",
    "loss_landscape_1d",
    "loss_landscape_2d",
    "m_sharpness",
    "sharpness",
]
