# syntax=docker/dockerfile:1
# Cloud services (sampler, model-registry; with EXTRAS=edge the simulated bins of compose.yaml):
#   docker build -f docker/cloud.Dockerfile -t binloop-cloud:0.1.0 .
#   docker build -f docker/cloud.Dockerfile --build-arg EXTRAS=edge -t binloop-edge-sim:0.1.0 .
# Runs as uid 10001 on a read-only root filesystem; /tmp and the data folders are volumes.
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG EXTRAS=""
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY binloop ./binloop
COPY schemas ./schemas
COPY services ./services
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install ".${EXTRAS:+[${EXTRAS}]}"

FROM ${PYTHON_IMAGE}
# The data folders exist, owned by the service user, so that volumes mounted there
# (named volumes copy the ownership) are writable on a read-only root filesystem.
RUN useradd --uid 10001 --user-group --no-create-home --home-dir /tmp binloop \
    && mkdir -p /data/blobs /data/spool /data/models /data/actuator /data/label-studio/import \
    && chown -R 10001:10001 /data
COPY --from=build /opt/venv /opt/venv
COPY docker/healthcheck.py /opt/binloop/healthcheck.py
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    BINLOOP_HTTP_PORT=8000 \
    BINLOOP_BLOB_ROOT=/data/blobs
USER 10001:10001
WORKDIR /tmp
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "/opt/binloop/healthcheck.py"]
ENTRYPOINT ["binloop", "run"]
