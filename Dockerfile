# kvserve image: a slim CPU image by default.
#
#   docker build -t kvserve:cpu .
#   docker build -t kvserve:cuda \
#     --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04 \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
#   docker build -t kvserve:cpu-nomodel --build-arg FETCH_MODEL=0 .   # mount models at /models instead
#
# The install steps live in deploy/docker/install.sh so scripts/dockerfile_smoke.sh can run the
# very same steps outside a container.
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS base
# CUDA base images ship no Python; the python:* images do, so there this installs nothing.
# hadolint ignore=DL3008
RUN if ! command -v python3 >/dev/null 2>&1; then \
        apt-get update \
        && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && groupadd --gid 10001 kvserve \
    && useradd --no-log-init --uid 10001 --gid kvserve --home-dir /home/kvserve --create-home kvserve
ENV VENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    KVSERVE_HOME=/models \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

FROM base AS build
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG FETCH_MODEL=1
COPY deploy/docker/install.sh /usr/local/bin/kvserve-install
# torch first, in its own layer: it is by far the largest download and changes least often.
RUN kvserve-install torch
WORKDIR /src
COPY pyproject.toml README.md ./
COPY engine ./engine
COPY service ./service
RUN kvserve-install app /src && kvserve-install model

FROM base AS runtime
# g++ builds kvserve's CPU kernels (paged decode attention, RMSNorm) for the CPU the container runs on, at its
# first start (engine/native.py; cached under $HOME/.cache/kvserve/kernels). Without it decode attention falls
# back to gathering KV blocks for PyTorch's SDPA: slower, and not batch-invariant on every head shape.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /opt/venv /opt/venv
# Root-owned and read-only for the server: weights are never written at run time.
COPY --from=build /models /models
ENV KVSERVE_HOST=0.0.0.0 \
    KVSERVE_PORT=8000 \
    HOME=/home/kvserve
USER 10001:10001
WORKDIR /home/kvserve
EXPOSE 8000
# python, not curl: the slim image has no curl. urlopen raises on a 503, so an unhealthy engine fails.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('KVSERVE_PORT', '8000') + '/health', timeout=4)"]
ENTRYPOINT ["kvserve", "serve"]
