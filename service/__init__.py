"""The serving side: FastAPI + ONNX Runtime with dynamic batching (never imports torch)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("resnet-serve")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
