# syntax=docker/dockerfile:1.7
# One image for every phase of the GSM8K post-training pipeline: `python -m app <command>`.
#
#   docker build -t gsm8k-posttrain:dev .                    # CUDA image (default target "gpu")
#   docker build --target cpu -t gsm8k-posttrain:cpu-dev .   # CPU debug image for laptops
#
# Python packages come from the hash-pinned locks in images/ (regenerate with
# `python images/lock.py gpu|cpu`); the app itself is installed without dependencies,
# so the lock is the whole environment. docs/KUBERNETES.md says how to build and push.

ARG CUDA_BASE=nvidia/cuda:13.0.2-base-ubuntu24.04
ARG CPU_BASE=python:3.11-slim-bookworm

# -----------------------------------------------------------------------------------------
# CPU debug image: the same app and training stack on PyTorch's CPU wheels, no vLLM.
FROM ${CPU_BASE} AS cpu

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# gcc: torch.compile and Triton-free kernels still build small C extensions at run time.
# Versions come with the base image's Debian release; the Python stack is what is pinned.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    VIRTUAL_ENV=/opt/venv \
    PIP_DISABLE_PIP_VERSION_CHECK=1

COPY images/requirements-cpu.lock /tmp/requirements.lock
RUN pip install --no-cache-dir --no-deps --require-hashes \
        --extra-index-url https://download.pytorch.org/whl/cpu \
        -r /tmp/requirements.lock \
    && rm /tmp/requirements.lock

# The app, installed as a package (pyproject.toml); its dependencies are the lock's.
COPY pyproject.toml /tmp/src/
COPY app /tmp/src/app
ARG GIT_SHA=unknown
RUN pip install --no-cache-dir --no-deps --no-build-isolation /tmp/src \
    && rm -rf /tmp/src

# A fixed non-root UID/GID (1000): the Kubernetes Jobs run as runAsUser 1000 with a
# read-only root filesystem, and mount a writable volume on each of these paths.
RUN groupadd --gid 1000 app \
    && useradd --uid 1000 --gid 1000 --home-dir /home/app --create-home --shell /usr/sbin/nologin app \
    && mkdir -p /cache /scratch \
    && chown 1000:1000 /cache /scratch

ENV HOME=/home/app \
    HF_HOME=/cache/huggingface \
    TRITON_CACHE_DIR=/cache/triton \
    VLLM_CACHE_ROOT=/cache/vllm \
    TORCHINDUCTOR_CACHE_DIR=/cache/torchinductor \
    XDG_CACHE_HOME=/cache/xdg \
    NUMBA_CACHE_DIR=/cache/numba \
    PIPELINE_CACHE=/cache/pipeline \
    PIPELINE_WORKDIR=/scratch \
    APP_GIT_SHA=${GIT_SHA} \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    VLLM_NO_USAGE_STATS=1 \
    DO_NOT_TRACK=1

VOLUME ["/cache", "/scratch"]
WORKDIR /home/app
USER 1000:1000
ENTRYPOINT ["python", "-m", "app"]
CMD ["--help"]

# -----------------------------------------------------------------------------------------
# CUDA image (the default target): vLLM 0.33, torch 2.14 on CUDA 13 wheels, TRL, PEFT,
# accelerate, Liger kernels. The CUDA libraries come from the wheels; the base image
# brings the CUDA forward-compatibility libraries and the NVIDIA container runtime's env.
FROM ${CUDA_BASE} AS gpu

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# python3.12-dev + gcc: Triton and FlashInfer compile small launchers at run time.
# Ubuntu's point releases replace these packages; the base image tag fixes the release
# and the Python stack, which is what decides behaviour, is pinned by hash.
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        python3.12 python3.12-venv python3.12-dev gcc g++ libc6-dev libnuma1 ca-certificates \
    && rm -rf /var/lib/apt/lists/*

RUN python3.12 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    VIRTUAL_ENV=/opt/venv \
    PIP_DISABLE_PIP_VERSION_CHECK=1

COPY images/requirements-gpu.lock /tmp/requirements.lock
RUN pip install --no-cache-dir --no-deps --require-hashes -r /tmp/requirements.lock \
    && rm /tmp/requirements.lock

COPY pyproject.toml /tmp/src/
COPY app /tmp/src/app
ARG GIT_SHA=unknown
RUN pip install --no-cache-dir --no-deps --no-build-isolation /tmp/src \
    && rm -rf /tmp/src

# Ubuntu 24.04 images ship a user "ubuntu" with UID 1000; the Jobs expect UID 1000 = app.
RUN if id ubuntu >/dev/null 2>&1; then userdel --remove ubuntu; fi \
    && groupadd --gid 1000 app \
    && useradd --uid 1000 --gid 1000 --home-dir /home/app --create-home --shell /usr/sbin/nologin app \
    && mkdir -p /cache /scratch \
    && chown 1000:1000 /cache /scratch

ENV HOME=/home/app \
    HF_HOME=/cache/huggingface \
    TRITON_CACHE_DIR=/cache/triton \
    VLLM_CACHE_ROOT=/cache/vllm \
    TORCHINDUCTOR_CACHE_DIR=/cache/torchinductor \
    XDG_CACHE_HOME=/cache/xdg \
    NUMBA_CACHE_DIR=/cache/numba \
    PIPELINE_CACHE=/cache/pipeline \
    PIPELINE_WORKDIR=/scratch \
    APP_GIT_SHA=${GIT_SHA} \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    VLLM_NO_USAGE_STATS=1 \
    DO_NOT_TRACK=1

LABEL org.opencontainers.image.title="gsm8k-posttrain" \
      org.opencontainers.image.description="GSM8K post-training pipeline: SFT, rollouts, preferences, DPO, eval" \
      org.opencontainers.image.revision="${GIT_SHA}"

VOLUME ["/cache", "/scratch"]
WORKDIR /home/app
USER 1000:1000
ENTRYPOINT ["python", "-m", "app"]
CMD ["--help"]
