"""mfattn: deep attention-only transformers as interacting particle systems and their mean-field limit."""

from .params import Params as Params, init_params as init_params

__all__ = ["Params", "init_params"]
__version__ = "0.1.0"
