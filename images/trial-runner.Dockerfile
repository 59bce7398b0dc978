# syntax=docker/dockerfile:1
# The trial runner: `mergesearch-trial` with the `runner`, `vllm` and `lm-eval` extras (torch, transformers, the merge
# engine, vLLM for CUDA). The operator starts one pod per trial run from this image.
# Build from the repository root (images/trial-runner.Dockerfile.dockerignore keeps the context small):
#   docker build -f images/trial-runner.Dockerfile -t ghcr.io/mergesearch/trial-runner:0.1.0 .
# torch and vLLM wheels bring their own CUDA libraries (CUDA 13 for the vLLM that torch 2.13.0 resolves
# to: GPU nodes need an R580 driver or newer); the CUDA base image brings the rest of the user-space stack.
# Python comes from the deadsnakes PPA, as in vLLM's own image. Runs as uid/gid 1000, the operator's
# default trial uid (MERGESEARCH_TRIAL_UID).
ARG CUDA_IMAGE=nvidia/cuda:13.1.1-base-ubuntu22.04
ARG PYTHON_VERSION=3.11

FROM ${CUDA_IMAGE} AS python
ARG PYTHON_VERSION
ARG DEBIAN_FRONTEND=noninteractive
# Triton (under vLLM and torch.compile) builds small launcher modules at run time: it needs a C compiler
# and Python's headers, so they stay in the final image.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends software-properties-common gpg-agent \
    && add-apt-repository -y ppa:deadsnakes/ppa \
    && apt-get install -y --no-install-recommends \
        "python${PYTHON_VERSION}" "python${PYTHON_VERSION}-venv" "python${PYTHON_VERSION}-dev" \
        gcc libc6-dev ca-certificates \
    && apt-get purge -y --auto-remove software-properties-common gpg-agent \
    && rm -rf /var/lib/apt/lists/*

FROM python AS build
ARG PYTHON_VERSION
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN "python${PYTHON_VERSION}" -m venv /opt/mergesearch
WORKDIR /src
COPY pyproject.toml README.md ./
COPY operator ./operator
COPY trial_runner ./trial_runner
RUN /opt/mergesearch/bin/pip install '.[runner,vllm,lm-eval]' \
    && /opt/mergesearch/bin/mergesearch-trial --help > /dev/null \
    && /opt/mergesearch/bin/mergesearch worker --help > /dev/null

FROM python
LABEL org.opencontainers.image.title="mergesearch-trial-runner" \
      org.opencontainers.image.description="Merges fine-tuned LLMs from S3 and evaluates them with vLLM (one MergeSearch trial run)" \
      org.opencontainers.image.source="https://github.com/mergesearch/mergesearch" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --gid 1000 mergesearch \
    && useradd --uid 1000 --gid 1000 --create-home --home-dir /home/mergesearch --shell /usr/sbin/nologin mergesearch \
    && mkdir -p /var/cache/mergesearch /scratch \
    && chown 1000:1000 /var/cache/mergesearch /scratch
COPY --from=build /opt/mergesearch /opt/mergesearch
# Weights come from S3 only: no model hub, no usage reports.
ENV PATH=/opt/mergesearch/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    VLLM_NO_USAGE_STATS=1 \
    DO_NOT_TRACK=1
USER 1000:1000
WORKDIR /home/mergesearch
ENTRYPOINT ["mergesearch-trial"]
CMD ["--help"]
