# syntax=docker/dockerfile:1
# The trainer (GPU node): the `train` extra, whose Linux x86_64 torch wheel carries the CUDA
# runtime and cuDNN as pip packages; the NVIDIA container runtime injects the driver.
#   docker build -f docker/trainer.Dockerfile -t binloop-trainer:0.1.0 .
#   docker run --gpus all binloop-trainer:0.1.0
# (A CUDA base image would ship a second copy of those libraries next to torch's.)
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY binloop ./binloop
COPY schemas ./schemas
COPY services ./services
RUN python -m venv /opt/venv && /opt/venv/bin/pip install ".[train]"

FROM ${PYTHON_IMAGE}
# The data folders exist, owned by the service user, so that volumes mounted there
# (named volumes copy the ownership) are writable on a read-only root filesystem.
RUN useradd --uid 10001 --user-group --no-create-home --home-dir /tmp binloop \
    && mkdir -p /data/blobs /data/spool /data/models /data/label-studio/import \
    && chown -R 10001:10001 /data
COPY --from=build /opt/venv /opt/venv
COPY docker/healthcheck.py /opt/binloop/healthcheck.py
# The fixed evaluation set every candidate is scored on travels with the image.
COPY data/demo/eval /opt/binloop/eval
# Caches go to /tmp: the root filesystem is read-only.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    MPLCONFIGDIR=/tmp/matplotlib \
    TORCH_HOME=/tmp/torch \
    XDG_CACHE_HOME=/tmp/cache \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    BINLOOP_HTTP_PORT=8000 \
    BINLOOP_BLOB_ROOT=/data/blobs \
    BINLOOP_EVAL_DIR=/opt/binloop/eval
USER 10001:10001
WORKDIR /tmp
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "/opt/binloop/healthcheck.py"]
ENTRYPOINT ["binloop", "run"]
CMD ["trainer"]
