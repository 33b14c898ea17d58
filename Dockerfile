# One image per role, built from the one distribution with that role's extras:
#   docker build --build-arg EXTRAS=edge  -t binloop-edge .
#   docker build --build-arg EXTRAS=train -t binloop-trainer .
#   docker build --build-arg EXTRAS=label -t binloop-cloud .
FROM python:3.11-slim AS build
ARG EXTRAS=label
WORKDIR /src
COPY pyproject.toml README.md ./
COPY binloop ./binloop
COPY schemas ./schemas
COPY services ./services
RUN pip install --no-cache-dir --prefix=/install ".[${EXTRAS}]"

FROM python:3.11-slim
RUN useradd --uid 10001 --create-home binloop \
    && apt-get update && apt-get install -y --no-install-recommends libgl1 libglib2.0-0 \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /install /usr/local
COPY data/demo/eval /opt/binloop/eval
USER 10001
WORKDIR /home/binloop
ENV BINLOOP_HTTP_PORT=8000
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz')"
ENTRYPOINT ["binloop", "run"]
