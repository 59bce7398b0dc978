# syntax=docker/dockerfile:1
# The MergeSearch operator: `mergesearch operator` with the `operator` extra only (kopf, Optuna, SQLAlchemy,
# psycopg2, prometheus-client). No torch: the operator validates plans and manifests without it.
# Build from the repository root (images/operator.Dockerfile.dockerignore keeps the context small):
#   docker build -f images/operator.Dockerfile -t ghcr.io/mergesearch/operator:0.1.0 .
# Runs as uid/gid 65532 (the chart's podSecurityContext) on a read-only root filesystem; it writes only /tmp.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/mergesearch
WORKDIR /src
COPY pyproject.toml README.md ./
COPY operator ./operator
COPY trial_runner ./trial_runner
RUN /opt/mergesearch/bin/pip install '.[operator,report]' \
    && /opt/mergesearch/bin/python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is not None)" \
    && /opt/mergesearch/bin/mergesearch operator --help > /dev/null

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="mergesearch-operator" \
      org.opencontainers.image.description="Kubernetes operator that searches merges of fine-tuned LLMs" \
      org.opencontainers.image.source="https://github.com/mergesearch/mergesearch" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --gid 65532 mergesearch \
    && useradd --uid 65532 --gid 65532 --home-dir /tmp --no-create-home --shell /usr/sbin/nologin mergesearch
COPY --from=build /opt/mergesearch /opt/mergesearch
ENV PATH=/opt/mergesearch/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp
USER 65532:65532
EXPOSE 9090 8081
ENTRYPOINT ["mergesearch", "operator"]
