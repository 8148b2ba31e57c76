# The serving image: only what `python -m serving` needs (KServe model server, Feast online reads with
# the production Redis/PostgreSQL drivers, FAISS, the models package, CPU torch). No kfp, dvc,
# great-expectations or plotting. Versions are pinned by images/constraints.txt, the set CI tests.
#
# Build with `make images` (images/build.py); by hand, from the repository root:
#   DOCKER_BUILDKIT=1 docker build -f images/serving.Dockerfile -t <deploy.image_repo>:<tag> .
# KServe mounts the bundle at /mnt/models (STORAGE_URI); the container runs non-root with a
# read-only root filesystem, so it writes only to the /tmp volume the InferenceService gives it.

ARG BASE_IMAGE=python:3.11.13-slim-bookworm@sha256:86adf8dbadc3d6e82ee5dd2c74bec2e1c2467cdad47886280501df722372d2e1

FROM ${BASE_IMAGE} AS build
ARG TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_DEFAULT_TIMEOUT=120
WORKDIR /src
COPY images/constraints.txt images/requirements-serving.txt images/
# torch alone first, without its dependencies (see pipeline.Dockerfile for the wheelhouse and the CA
# secret), then the serving set with torch named again so that pip resolves torch's own dependencies;
# the project itself goes in last, in its own layer (a code change rebuilds only that), without its
# training-only dependencies (so `pip check` runs before it: after it, it would list kfp, dvc,
# great-expectations, ... as missing, on purpose)
# hadolint ignore=SC2086
RUN --mount=type=bind,source=images/wheelhouse,target=/wheelhouse \
    --mount=type=secret,id=pip_ca \
    if [ -s /run/secrets/pip_ca ]; then export PIP_CERT=/run/secrets/pip_ca; fi \
    && python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install --constraint images/constraints.txt --find-links /wheelhouse --no-deps \
        $TORCH_PIP_ARGS torch \
    && /opt/venv/bin/pip install --constraint images/constraints.txt \
        --requirement images/requirements-serving.txt torch \
    && /opt/venv/bin/pip check
COPY pyproject.toml README.md ./
# serving stands on the core and the models only: no step (components/) and no pipeline code
COPY recsys recsys
COPY models models
COPY serving serving
RUN --mount=type=secret,id=pip_ca \
    if [ -s /run/secrets/pip_ca ]; then export PIP_CERT=/run/secrets/pip_ca; fi \
    && /opt/venv/bin/pip install --constraint images/constraints.txt --no-deps .

FROM ${BASE_IMAGE}
RUN groupadd --gid 1000 recsys \
    && useradd --uid 1000 --gid recsys --home-dir /home/recsys --create-home --shell /usr/sbin/nologin recsys
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
# the server reads params.yaml (serving and feast sections) and opens the Feast repo from /app
COPY params.yaml ./
COPY feature_repo/*.py feature_repo/*.yaml feature_repo/
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    FEAST_USAGE=False
USER 1000:1000
EXPOSE 8080
ENTRYPOINT ["python", "-m", "serving"]
CMD ["--model_dir", "/mnt/models", "--http_port", "8080"]
