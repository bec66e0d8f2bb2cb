"""mfattn: deep attention-only transformers as interacting particle systems and their mean-field limit.

The public API is small and functional:

* :class:`Params`, :func:`init_params` -- projection matrices ``(T, P, d, k)`` (layers x heads, or grid
  times x parameter particles);
* :func:`forward`, :func:`adjoint`, :func:`param_grad`, :func:`loss_and_grad` -- the discrete model and
  its hand-derived backward pass;
* :func:`velocity`, :func:`adjoint_field`, :func:`grad_map` -- the three kernels ``F``, ``G``, ``g``
  shared by the discrete model and the mean-field limit;
* :class:`Attention` -- the kernel (softmax, unnormalised, L2, sigmoid, Sinkhorn; causal masking), the
  normalised residual and the depth and logit scalings, accepted as ``attention=`` by every entry point;
* :mod:`mfattn.losses` -- losses with their Lions derivatives;
* :mod:`mfattn.optim` -- AdamW and blockwise AdamW as Optax transforms, the optimizer flow map;
* :mod:`mfattn.tasks` -- bounded data tasks (teacher-student, denoising, in-context regression);
* :mod:`mfattn.train` -- a jitted training step and a resumable training loop;
* :mod:`mfattn.limit` -- the mean-field limit: parameter ensembles on a depth grid, the forward-backward
  McKean-Vlasov ODE in Diffrax, ensemble training and the coupled discrete parameters;
* :mod:`mfattn.gaussian` -- the Gaussian closures of the limit (softmax and L2; mean and covariance ODEs);
* :mod:`mfattn.metrics` -- discrepancies and their supremum over inputs; clustering diagnostics (diameter,
  clusters, aligned pairs, Wasserstein-2);
* :mod:`mfattn.phase` -- the clustering phase diagram over (time, beta) on the sphere (``mfattn phase``).
"""

from . import gaussian as gaussian
from . import limit as limit
from . import losses as losses
from . import metrics as metrics
from . import optim as optim
from . import phase as phase
from . import sharding as sharding
from . import tasks as tasks
from . import train as train
from .adjoint import adjoint_field as adjoint_field
from .adjoint import grad_map as grad_map
from .attention import Attention as Attention
from .attention import attention as attention
from .attention import velocity as velocity
from .params import Params as Params
from .params import init_params as init_params
from .particles import (
    adjoint as adjoint,
)
from .particles import (
    forward as forward,
)
from .particles import (
    grad_scale as grad_scale,
)
from .particles import (
    loss_and_grad as loss_and_grad,
)
from .particles import (
    param_grad as param_grad,
)
from .particles import (
    value_and_grad_map as value_and_grad_map,
)

__all__ = [
    "Attention",
    "Params",
    "init_params",
    "forward",
    "adjoint",
    "param_grad",
    "loss_and_grad",
    "value_and_grad_map",
    "grad_scale",
    "attention",
    "velocity",
    "adjoint_field",
    "grad_map",
    "losses",
    "metrics",
    "phase",
    "gaussian",
    "limit",
    "optim",
    "sharding",
    "tasks",
    "train",
]
__version__ = "0.1.0"
