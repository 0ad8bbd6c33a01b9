"""``resnet-client``: send every image under a folder to a running server's ``/predict`` or
``/embed``, with bounded concurrency, retries and resume (docs/client.md).

Imports only the standard library, httpx, tqdm and numpy, never the service's own modules
(onnxruntime, FastAPI), so it runs wherever the package is installed, next to no model.
"""

from service.client.cli import main

__all__ = ["main"]
