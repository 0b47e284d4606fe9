"""Built-in methods. Importing this package registers each of them by name."""

from methods import adapter, bct, cpe_clip, er, independent, oca, procrustes, stationary, xbt  # noqa: F401
from methods.base import Method, StepContext, create_method, list_methods, register

__all__ = ["Method", "StepContext", "create_method", "list_methods", "register"]
