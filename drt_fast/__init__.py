"""drt-fast: certify and train robust ensembles with randomized smoothing (DRT, ICLR 2022)."""
import importlib

from .errors import DrtFastError, InvalidArgument, InvalidArgumentType, NonFiniteLogitsError

__version__ = "0.1.0"

# Public names and the module that defines each; imported on first use so that
# `import drt_fast` stays cheap (no scipy, no models) for the CLI's start-up.
_LAZY = {
    "Ensemble": "ensemble",
    "SmoothedClassifier": "smoothing",
    "Certificate": "smoothing",
    "load_ensemble": "checkpoint",
    "load_checkpoint": "checkpoint",
    "save_ensemble": "checkpoint",
    "cuda_available": "ops",
    "ops": "ops",
    "models": "models",
    "data": "data",
    "stats": "stats",
    "train": "train",
}

__all__ = ["DrtFastError", "InvalidArgument", "InvalidArgumentType", "NonFiniteLogitsError", "__version__", *_LAZY]


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'drt_fast' has no attribute {name!r}")
    mod = importlib.import_module(f".{module}", __name__)
    value = mod if name == module else getattr(mod, name)
    globals()[name] = value
    return value
