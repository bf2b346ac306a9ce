# sse-fanout worker and producer image: `docker build -t sse-fanout .`
# Runs `python -m service serve` (the HTTP worker); `python -m service producer` runs the
# demo producer alone. Every setting comes from the packaged defaults (config/service.toml)
# or an SSE_<KEY> variable.

# --- build: the pinned dependencies, then the package itself, into a virtualenv ---
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml constraints.txt ./
# The dependency list lives in pyproject.toml only; constraints.txt pins each to the version CI
# tests. A layer of its own: rebuilt only when one of these two files changes.
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > requirements.txt \
 && /opt/venv/bin/pip install --constraint constraints.txt --requirement requirements.txt
COPY README.md LICENSE ./
COPY service ./service
COPY config ./config
COPY web ./web
# The package, with config/service.toml and web/ inside it as package data; PIP_CONSTRAINT
# pins the build backend as well.
RUN PIP_CONSTRAINT=/src/constraints.txt /opt/venv/bin/pip install --no-deps . \
 && /opt/venv/bin/pip uninstall --yes pip setuptools

# --- runtime: the virtualenv alone: no source tree, no compilers, no pip, not root ---
FROM python:3.11-slim
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin sse
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    SSE_HOST=0.0.0.0 \
    SSE_PORT=8080
WORKDIR /tmp
USER 10001
EXPOSE 8080
# Liveness of the HTTP worker; the compose file gives the producer a check of its own.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('SSE_PORT', '8080'), timeout=2)"
# SIGTERM starts the graceful drain (docker stop / compose down); see drain_timeout_s.
STOPSIGNAL SIGTERM
CMD ["python", "-m", "service", "serve"]
