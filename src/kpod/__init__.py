"""kpod: keypoint-based progressive chain-of-thought distillation (Feng et al., ICML 2024).

The Python API (:mod:`kpod.api`) is importable from here; heavy modules load on first use, so
``import kpod`` stays cheap.
"""

from kpod.errors import KpodError

__version__ = "0.1.0"

_API = {
    "load_config": "kpod.api",
    "run": "kpod.api",
    "RunResult": "kpod.api",
    "load_examples": "kpod.data.loaders",
    "load_weights": "kpod.weighting.weights",
    "TokenWeights": "kpod.weighting.weights",
    "train_weighting": "kpod.weighting.train",
    "data_step": "kpod.pipeline",
    "weights_step": "kpod.pipeline",
    "schedule_step": "kpod.pipeline",
    "distill_student": "kpod.pipeline",
    "evaluate_model": "kpod.evaluate",
    "load_model": "kpod.models",
}

__all__ = ["KpodError", "__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        import importlib

        module = importlib.import_module(_API[name])
        return getattr(module, "evaluate" if name == "evaluate_model" else name)
    raise AttributeError(f"module 'kpod' has no attribute '{name}'")
