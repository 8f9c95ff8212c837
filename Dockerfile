# syntax=docker/dockerfile:1
# rose, CPU image: every role (gateway, formatter, scheduler, worker on CPU, or the
# whole local mesh with `run`) from one image; the `rose` subcommand picks the role.
#
#   docker build -t rose:cpu .
#   docker run --rm -p 8000:8000 rose:cpu                 # whole mesh, tiny model
#   docker run --rm rose:cpu formatter --help            # one role
#
# No secrets are baked in: API keys come at run time (ROSE_API_KEYS_FILE / ROSE_API_KEYS).

ARG PYTHON_IMAGE=python:3.11-slim
FROM ${PYTHON_IMAGE} AS build
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# The CPU build of torch first, so no dependency pulls a multi-GB CUDA build.
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY services ./services
COPY kernels ./kernels
COPY bench ./bench
RUN pip install . && pip check
# The o200k vocabulary and the tiny default checkpoint, made offline at build time.
RUN rose setup --home /var/lib/rose

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="rose" \
      org.opencontainers.image.description="gpt-oss serving engine (CPU image: all roles)"
# tini: PID 1 that forwards SIGTERM so services drain; redis-server: only for `rose run`.
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini redis-server \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --user-group --home-dir /var/lib/rose --shell /usr/sbin/nologin rose
COPY --from=build /opt/venv /opt/venv
COPY --from=build --chown=10001:10001 /var/lib/rose /var/lib/rose
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    ROSE_HOME=/var/lib/rose \
    ROSE_HOST=0.0.0.0
WORKDIR /var/lib/rose
USER 10001:10001
EXPOSE 8000 5600 5601 5610
# Role found from the running `rose <subcommand>`; see services/healthcheck.py for what it checks.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-m", "services.healthcheck", "--role", "auto"]
ENTRYPOINT ["tini", "--", "rose"]
CMD ["run"]
