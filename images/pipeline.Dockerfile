# The pipeline image (CPU) and, built from the same file, the training image (CUDA): every Kubeflow task
# runs in one of them. Only the torch build differs, chosen by TORCH_PIP_ARGS:
#   pipeline  (default)  --index-url https://download.pytorch.org/whl/cpu    CPU torch, ~1 GB smaller
#   training             --index-url https://pypi.org/simple                 PyPI's Linux wheel: CUDA runtime
#                                                                             as wheels; the node needs only
#                                                                             the NVIDIA driver + toolkit
# Versions are pinned by images/constraints.txt, the set CI tests; the production Feast drivers (Redis
# online store, PostgreSQL SQL registry) come with the `production` extra.
#
# Build with `make images` (images/build.py): it picks the tags from params.yaml, passes the CA bundle
# as a BuildKit secret (never a layer) and, where no registry can be reached, a locally made base.
# By hand, from the repository root:
#   DOCKER_BUILDKIT=1 docker build -f images/pipeline.Dockerfile -t <pipeline.image_repo>:<tag> .

ARG BASE_IMAGE=python:3.11.13-slim-bookworm@sha256:86adf8dbadc3d6e82ee5dd2c74bec2e1c2467cdad47886280501df722372d2e1

FROM ${BASE_IMAGE} AS build
ARG TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_DEFAULT_TIMEOUT=120
WORKDIR /src
COPY images/constraints.txt images/constraints.txt
COPY pyproject.toml ./
# The dependencies first, into a layer that only pyproject.toml and the constraints invalidate: the
# project is installed here without its sources (an empty package), so a code change rebuilds only the
# last, seconds-long layer. torch goes in alone first, without its dependencies, from TORCH_PIP_ARGS's
# source; the project's install then resolves torch's dependencies with the rest. images/wheelhouse:
# wheels the build may take instead of an index (make images puts the CPU torch wheel there on machines
# without the PyTorch index); pip_ca: an optional CA bundle for a TLS-intercepting proxy, mounted for
# the RUN only.
# hadolint ignore=SC2086
RUN --mount=type=bind,source=images/wheelhouse,target=/wheelhouse \
    --mount=type=secret,id=pip_ca \
    if [ -s /run/secrets/pip_ca ]; then export PIP_CERT=/run/secrets/pip_ca; fi \
    && python3 -m venv /opt/venv \
    && touch README.md \
    && /opt/venv/bin/pip install --constraint images/constraints.txt --find-links /wheelhouse --no-deps \
        $TORCH_PIP_ARGS torch \
    && /opt/venv/bin/pip install --constraint images/constraints.txt ".[production]"
COPY README.md ./
COPY recsys recsys
COPY sources sources
COPY components components
COPY models models
COPY pipelines pipelines
COPY serving serving
RUN --mount=type=secret,id=pip_ca \
    if [ -s /run/secrets/pip_ca ]; then export PIP_CERT=/run/secrets/pip_ca; fi \
    && /opt/venv/bin/pip install --constraint images/constraints.txt --no-deps --force-reinstall . \
    && /opt/venv/bin/pip check

FROM ${BASE_IMAGE}
RUN groupadd --gid 1000 recsys \
    && useradd --uid 1000 --gid recsys --home-dir /home/recsys --create-home --shell /usr/sbin/nologin recsys
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
# the step code runs from /app: params.yaml (defaults; the pipeline passes its own) and the Feast repo
COPY params.yaml ./
COPY feature_repo/*.py feature_repo/*.yaml feature_repo/
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MPLCONFIGDIR=/tmp/matplotlib \
    FEAST_USAGE=False \
    GX_ANALYTICS_ENABLED=False \
    DVC_NO_ANALYTICS=1
USER 1000:1000
CMD ["python", "-m", "pipelines", "--help"]
