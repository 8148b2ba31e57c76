# syntax=docker/dockerfile:1
# The pipeline/training image: every task of the Kubeflow pipeline runs in it, the GPU training tasks
# included. torch comes from PyPI, whose Linux x86_64 wheel is the CUDA build (CUDA runtime libraries as
# wheels), so the node needs only the NVIDIA driver and container toolkit; on a CPU node the same image
# trains on CPU. Versions are pinned by images/constraints.txt, the set CI tests.
#
# Build from the repository root (tag = params.yaml pipeline.image_tag):
#   docker build -f images/pipeline.Dockerfile -t ghcr.io/recsys-kfp/recsys-pipeline:0.1.0 .

FROM python:3.11.13-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY images/constraints.txt images/constraints.txt
COPY pyproject.toml README.md ./
COPY components components
COPY models models
COPY pipelines pipelines
COPY serving serving
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir --constraint images/constraints.txt . \
    && /opt/venv/bin/pip check

FROM python:3.11.13-slim-bookworm
RUN groupadd --gid 1000 recsys \
    && useradd --uid 1000 --gid recsys --home-dir /home/recsys --create-home --shell /usr/sbin/nologin recsys
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
# the step code runs from /app: params.yaml (defaults; the pipeline passes its own) and the Feast repo
COPY params.yaml ./
COPY feature_repo feature_repo
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    FEAST_USAGE=False \
    GX_ANALYTICS_ENABLED=False \
    DVC_NO_ANALYTICS=1
USER 1000:1000
CMD ["python", "-m", "pipelines", "--help"]
