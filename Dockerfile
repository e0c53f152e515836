# syntax=docker/dockerfile:1
# aiproxy container image: the wheel is built in the first stage; the final stage holds
# only a virtual environment with the wheel and its runtime dependencies.
#
#   docker build -t aiproxy .
#   docker run --rm -p 8080:8080 --read-only --tmpfs /tmp -e TARGET_URL=https://ai.megallm.io aiproxy

ARG PYTHON_IMAGE=python:3.11-slim

# --- Stage 1: build the aiproxy wheel ------------------------------------------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY aiproxy ./aiproxy
COPY twisted ./twisted
RUN pip wheel --no-deps --wheel-dir /wheels .

# --- Stage 2: the runtime ------------------------------------------------------------
FROM ${PYTHON_IMAGE}
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/aiproxy \
    PATH=/opt/aiproxy/bin:$PATH

# The wheel and its dependencies go into a venv (pip compiles the .pyc files at install
# time, too), and the unprivileged user the image runs as is made.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    python -m venv /opt/aiproxy \
    && /opt/aiproxy/bin/pip install /wheels/aiproxy-*.whl \
    && groupadd --gid 1000 aiproxy \
    && useradd --uid 1000 --gid 1000 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin aiproxy \
    && mkdir /app && chown 1000:1000 /app

# Twisted's plugin cache (twisted/plugins/dropin.cache) is written now, as root, and
# dated a whole second after the newest plugin file: a layer keeps whole seconds only,
# and Twisted rewrites a cache no newer than a plugin file at every start. So nothing
# under site-packages is written at run time: the image runs as UID 1000 and works with
# a read-only root filesystem.
RUN /opt/aiproxy/bin/python -m aiproxy.run.plugin_cache

# aiproxy reads an optional .env from its working directory; /app is empty.
WORKDIR /app

# Settings are read from the environment (see README: Settings). Without --port,
# aiproxy listens on tcp:$PORT:interface=$HOST.
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOST=0.0.0.0 \
    PORT=8080 \
    GRACEFUL_TIMEOUT=30

USER 1000:1000
EXPOSE 8080

# SIGTERM starts the graceful drain (up to GRACEFUL_TIMEOUT seconds): give the
# container longer than that to stop (docker stop -t 40, compose stop_grace_period).
STOPSIGNAL SIGTERM

# No curl in the image: the venv's Python asks /api/health (200 when serving, 503 while
# draining) and exits 1 on anything but 200, an error or a timeout included.
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 \
    CMD ["/opt/aiproxy/bin/python", "-c", "import os, sys, urllib.request as r; o = r.build_opener(r.ProxyHandler({})); sys.exit(0 if o.open('http://127.0.0.1:' + os.environ.get('PORT', '8080') + '/api/health', timeout=4).status == 200 else 1)"]

# Arguments after the image name are aiproxy options, e.g. --max-retries=5.
# twist logs JSON lines when stdout is not a terminal (docker run without -t).
ENTRYPOINT ["/opt/aiproxy/bin/twist", "aiproxy"]
CMD []
