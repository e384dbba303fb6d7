# syntax=docker/dockerfile:1
# Image of channels-bots -- bots: the Matrix bridge fed by Redis chatbot/*; serves only /healthz, /readyz, /metrics.
# Build context is the repository root, so that libs/common is in reach:
#   docker build -f deploy/bots.Dockerfile -t loomio-channels-bots .
ARG PYTHON_IMAGE=python:3.12-slim-bookworm

# Build stage: a virtual environment holding only channels-common and this
# service with their dependencies (wheels; nothing compiled at run time).
# Two steps, because hash-checked installs refuse local directories: first
# exactly the locked dependencies (locks/bots.txt, `make lock`), then our two
# packages without dependencies of their own; `pip check` proves the lock
# covers what they require.
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
COPY locks/bots.txt /src/locks/bots.txt
RUN /opt/venv/bin/pip install --no-deps --require-hashes --only-binary :all: -r /src/locks/bots.txt
COPY libs/common /src/libs/common
COPY services/bots /src/services/bots
RUN /opt/venv/bin/pip install --no-deps --no-build-isolation "/src/libs/common[sentry]" /src/services/bots \
    && /opt/venv/bin/pip check

# Run stage: the same slim base, the venv, and an unprivileged user. The
# root filesystem may be mounted read-only (no bytecode is written).
FROM ${PYTHON_IMAGE}
RUN useradd --system --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin channels
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    RAILS_ENV=production
USER 10001:10001
EXPOSE 5002
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 \
    CMD ["channels-healthcheck", "--port", "5002", "--path", "/healthz"]
ENTRYPOINT ["channels-bots"]
