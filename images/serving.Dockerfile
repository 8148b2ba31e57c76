# syntax=docker/dockerfile:1
# The serving image: only what `python -m serving` needs (KServe model server, Feast online reads,
# FAISS, the models package, CPU torch). No kfp, dvc, great-expectations or plotting. Versions are
# pinned by images/constraints.txt, the set CI tests.
#
# Build from the repository root (tag = params.yaml pipeline.image_tag; deploy.image_repo):
#   docker build -f images/serving.Dockerfile -t ghcr.io/recsys-kfp/recsys-serving:0.1.0 .
# KServe mounts the bundle at /mnt/models (STORAGE_URI); the container runs non-root with a
# read-only root filesystem, so it writes only to the /tmp volume the InferenceService gives it.

FROM python:3.11.13-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY images/constraints.txt images/requirements-serving.txt images/
COPY pyproject.toml README.md ./
COPY components components
COPY models models
COPY pipelines pipelines
COPY serving serving
# CPU torch first, from the PyTorch CPU index (a fraction of the CUDA build's size), then the serving
# set; the project itself goes in without its training-only dependencies
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir --constraint images/constraints.txt \
        --index-url https://download.pytorch.org/whl/cpu torch \
    && /opt/venv/bin/pip install --no-cache-dir --constraint images/constraints.txt \
        --requirement images/requirements-serving.txt \
    && /opt/venv/bin/pip install --no-cache-dir --constraint images/constraints.txt --no-deps . \
    && /opt/venv/bin/pip check

FROM python:3.11.13-slim-bookworm
RUN groupadd --gid 1000 recsys \
    && useradd --uid 1000 --gid recsys --home-dir /home/recsys --create-home --shell /usr/sbin/nologin recsys
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
# the server reads params.yaml (serving and feast sections) and opens the Feast repo from /app
COPY params.yaml ./
COPY feature_repo feature_repo
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    FEAST_USAGE=False
USER 1000:1000
EXPOSE 8080
ENTRYPOINT ["python", "-m", "serving"]
CMD ["--model_dir", "/mnt/models", "--http_port", "8080"]
