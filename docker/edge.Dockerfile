# syntax=docker/dockerfile:1
# The bin's services on a Jetson (arm64, JetPack 6 / L4T r36): frame-ingestor, edge-inferencer,
# actuator, uploader, from the `edge` extra. One image, the service is the argument:
#   docker buildx build --platform linux/arm64 -f docker/edge.Dockerfile -t binloop-edge:0.1.0 .
#   docker run --runtime nvidia binloop-edge:0.1.0 edge-inferencer
# L4T r36 is Ubuntu 22.04, whose own Python is 3.10; binloop needs 3.11, from deadsnakes.
# The base image brings CUDA, cuDNN and TensorRT (trtexec builds the engine on the device).
ARG L4T_IMAGE=nvcr.io/nvidia/l4t-jetpack:r36.4.0

FROM ${L4T_IMAGE} AS build
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN apt-get update \
    && apt-get install -y --no-install-recommends software-properties-common=0.99.* \
    && add-apt-repository -y ppa:deadsnakes/ppa \
    && apt-get install -y --no-install-recommends python3.11=3.11.* python3.11-venv=3.11.* \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY binloop ./binloop
COPY schemas ./schemas
COPY services ./services
RUN python3.11 -m venv /opt/venv && /opt/venv/bin/pip install ".[edge]"

FROM ${L4T_IMAGE}
ENV DEBIAN_FRONTEND=noninteractive
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN apt-get update \
    && apt-get install -y --no-install-recommends software-properties-common=0.99.* \
    && add-apt-repository -y ppa:deadsnakes/ppa \
    && apt-get install -y --no-install-recommends python3.11=3.11.* \
    && apt-get purge -y software-properties-common \
    && apt-get autoremove -y \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --uid 10001 --user-group --no-create-home --home-dir /tmp \
        --groups video binloop \
    && mkdir -p /data/blobs /data/spool /data/models /data/actuator \
    && chown -R 10001:10001 /data
COPY --from=build /opt/venv /opt/venv
COPY docker/healthcheck.py /opt/binloop/healthcheck.py
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    BINLOOP_HTTP_PORT=8000 \
    BINLOOP_BLOB_ROOT=/data/blobs \
    BINLOOP_SPOOL_ROOT=/data/spool \
    BINLOOP_MODEL_CACHE=/data/models \
    BINLOOP_STATE_DIR=/data/actuator
# The video group opens the camera (/dev/video*); GPIO access is granted by the gpio group
# that the device's udev rules create, added at run time (--group-add gpio).
USER 10001:10001
WORKDIR /tmp
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "/opt/binloop/healthcheck.py"]
ENTRYPOINT ["binloop", "run"]
