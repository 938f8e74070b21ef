# mj-bridge in a container: `docker build -t mj-bridge .`, then see docs/operations.md
# ("Running in Docker") for the run command with the database volume and the config mount.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY bridge ./bridge
RUN pip install . \
    && rm -rf /src \
    && useradd --system --uid 10001 --user-group --home-dir /data --shell /usr/sbin/nologin bridge \
    && mkdir -p /data /config \
    && chown bridge:bridge /data

# The state database lives on the volume; the rules file is mounted read-only at /config.
# server.listen in that file must be ":8787" (every interface) for the published port to reach it,
# which needs server.auth (docs/security.md).
ENV BRIDGE_DB=/data/bridge.db \
    BRIDGE_CONFIG=/config/rules.yaml \
    BRIDGE_HEALTHCHECK_URL=http://127.0.0.1:8787/healthz
VOLUME ["/data"]
EXPOSE 8787
WORKDIR /data
USER bridge

HEALTHCHECK --interval=30s --timeout=5s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request; sys.exit(0 if urllib.request.urlopen(os.environ['BRIDGE_HEALTHCHECK_URL'], timeout=4).status == 200 else 1)"]

# SIGTERM (docker stop) stops polling, gives in-flight deliveries 7.5 s and the server 2 s, and
# exits 0 within Docker's default 10 s; --stop-timeout 15 leaves room on a slow machine.
STOPSIGNAL SIGTERM
ENTRYPOINT ["bridge"]
CMD ["run"]
