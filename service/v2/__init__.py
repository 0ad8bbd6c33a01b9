"""The Open Inference Protocol (KServe v2 / Triton HTTP): schemas, tensor codec, inference.

The routes are in ``service/routes/v2.py``; requests join the same batchers as /predict.
"""
