from kpod.errors import KpodError

__version__ = "0.1.0"
__all__ = ["KpodError", "__version__"]
