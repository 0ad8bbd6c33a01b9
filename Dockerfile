# resnet-serve images. Needs BuildKit (the default builder since Docker 23).
#
#   docker build -t resnet-serve:gpu .                 # CUDA + cuDNN + onnxruntime-gpu (default)
#   docker build -t resnet-serve:cpu --target cpu .    # python:3.11-slim + onnxruntime
#
# Bake torchvision ResNets into the image at build time (needs internet for the weights):
#
#   docker build -t resnet-serve:gpu --build-arg MODELS_FROM=export \
#       --build-arg EXPORT_TORCHVISION="resnet50:IMAGENET1K_V2 resnet18:IMAGENET1K_V1" .
#
# Every dependency comes from pyproject.toml (`.`, `.[gpu]`, `.[export]`): nothing is
# named here that the project does not declare (tests/deploy/test_dockerfile.py checks).
# Configuration is environment variables only (RESNET_SERVE_*); the models baked into
# /models are replaced by mounting a directory there.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
# Its CUDA major version must match the one onnxruntime-gpu was built for (CUDA 13 and
# cuDNN 9 for onnxruntime-gpu 1.31 on PyPI); the gpu-build stage fails clearly if not.
ARG CUDA_IMAGE=nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04
# Where /models comes from: "repo" (models/ as committed) or "export" (models/ plus the
# torchvision exports named in EXPORT_TORCHVISION). BuildKit builds only the stage used,
# so the default build never installs torch.
ARG MODELS_FROM=repo


# ---------------------------------------------------------------------------------------
# export: the torch side (pyproject's `export` extra). Usable on its own as a tool image:
#   docker build --target export -t resnet-serve:export .
#   docker run --rm -v "$PWD/models:/models" resnet-serve:export resnet50 \
#       --weights IMAGENET1K_V2 --out /models --name resnet50
FROM ${PYTHON_IMAGE} AS export
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# CPU wheels of torch/torchvision: the versions pinned in pyproject.toml, without the
# gigabytes of CUDA libraries that exporting does not need (pip still takes everything else,
# and torch too when this index lacks the pinned version, from PyPI).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    TORCH_HOME=/tmp/torch
WORKDIR /src
COPY pyproject.toml README.md ./
COPY service/ service/
COPY export/ export/
# DL3013 wants `pip install NAME==VERSION`: ".[export]" is this project, whose versions
# pyproject.toml sets (torch and torchvision pinned exactly).
# hadolint ignore=DL3013
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --extra-index-url "$TORCH_INDEX_URL" ".[export]"
ENTRYPOINT ["python", "-m", "export"]


# ---------------------------------------------------------------------------------------
# The model repository baked into the runtime images.
FROM scratch AS models-repo
COPY models/ /models/

FROM export AS models-export
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# Space- or comma-separated ARCH:WEIGHTS pairs, e.g. "resnet50:IMAGENET1K_V2".
ARG EXPORT_TORCHVISION=""
COPY models/ /models/
RUN if [ -z "$EXPORT_TORCHVISION" ]; then \
        echo "MODELS_FROM=export needs --build-arg EXPORT_TORCHVISION='ARCH:WEIGHTS ...'" >&2; \
        exit 1; \
    fi; \
    for spec in $(echo "$EXPORT_TORCHVISION" | tr ',' ' '); do \
        arch="${spec%%:*}"; weights="${spec#*:}"; \
        python -m export "$arch" --weights "$weights" --out /models --name "$arch"; \
    done

# DL3006 wants a tag on FROM: this names a stage of this file, chosen by MODELS_FROM.
# hadolint ignore=DL3006
FROM models-${MODELS_FROM} AS models


# ---------------------------------------------------------------------------------------
# cpu: python:3.11-slim with onnxruntime (the base dependencies).
FROM ${PYTHON_IMAGE} AS cpu-build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python -m venv /opt/venv
COPY pyproject.toml README.md ./
COPY service/ service/
RUN --mount=type=cache,target=/root/.cache/pip \
    /opt/venv/bin/pip install .

FROM ${PYTHON_IMAGE} AS cpu
RUN useradd --system --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin resnet
COPY --from=cpu-build /opt/venv /opt/venv
COPY --from=models /models /models
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    RESNET_SERVE_MODELS_DIR=/models \
    RESNET_SERVE_HOST=0.0.0.0 \
    RESNET_SERVE_PORT=8000
EXPOSE 8000
USER 10001:10001
# No curl in slim images: the standard library does the request. A non-2xx answer
# (503 while models load) raises, which exits non-zero.
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('RESNET_SERVE_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["python", "-m", "service"]


# ---------------------------------------------------------------------------------------
# gpu (default target): CUDA + cuDNN runtime with onnxruntime-gpu instead of onnxruntime.
FROM ${CUDA_IMAGE} AS gpu-build
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# DL3008 wants apt versions pinned: Ubuntu drops superseded versions from its archive, so
# pins break rebuilds; the base image tag fixes the release, and with it Python's minor.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python3 -m venv /opt/venv
COPY pyproject.toml README.md ./
COPY service/ service/
# onnxruntime (a base dependency) and onnxruntime-gpu (the `gpu` extra) install the same
# `onnxruntime` package directory, so the CPU wheel is removed and the GPU wheel, at the
# version pip resolved, reinstalled over the files the removal took with it.
RUN --mount=type=cache,target=/root/.cache/pip \
    /opt/venv/bin/pip install ".[gpu]" \
    && ort_version="$(/opt/venv/bin/pip show onnxruntime-gpu | sed -n 's/^Version: //p')" \
    && /opt/venv/bin/pip uninstall -y onnxruntime \
    && /opt/venv/bin/pip install --no-deps --force-reinstall "onnxruntime-gpu==${ort_version}"
# Fail here, not at the first request, if CUDA_IMAGE lacks a library the CUDA provider
# links (libcuda.so.1 is the driver's, mounted by the NVIDIA container toolkit at run time)
# or the cuDNN 9 it loads at session creation.
RUN missing="$(ldd /opt/venv/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime_providers_cuda.so \
        | grep 'not found' | grep -v 'libcuda\.so\.1' || true)"; \
    cudnn="$(ldconfig -p | grep 'libcudnn\.so\.9' || true)"; \
    if [ -n "$missing" ] || [ -z "$cudnn" ]; then \
        echo "onnxruntime-gpu needs CUDA libraries that CUDA_IMAGE lacks:" >&2; \
        echo "${missing:-libcudnn.so.9 (use a -cudnn-runtime tag)}" >&2; \
        exit 1; \
    fi

FROM ${CUDA_IMAGE} AS gpu
# DL3008: see gpu-build.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin resnet
COPY --from=gpu-build /opt/venv /opt/venv
COPY --from=models /models /models
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    RESNET_SERVE_MODELS_DIR=/models \
    RESNET_SERVE_HOST=0.0.0.0 \
    RESNET_SERVE_PORT=8000
EXPOSE 8000
USER 10001:10001
# See the cpu stage.
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('RESNET_SERVE_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["python", "-m", "service"]
