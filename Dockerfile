# mj-bridge in a container: `docker build -t mj-bridge .`, then see docs/operations.md
# ("Running in Docker") for the run command with the database volume and the config mount.
# `make docker-test` builds this file and checks the running image (docs/operations.md says what).

# 1. The dependencies, alone in a venv: the runtime list from pyproject.toml at the versions in
#    constraints.txt (the ones CI tests). Only a change to those two files rebuilds this stage.
FROM python:3.11-slim AS deps
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
WORKDIR /src
COPY pyproject.toml constraints.txt ./
RUN python -m venv --without-pip /opt/venv \
    && python -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies'], sep='\n')" > requirements.txt \
    && pip --python /opt/venv/bin/python install -c constraints.txt -r requirements.txt

# 2. The bridge itself, installed on its own (no dependencies) so the final image takes it as a
#    small layer of its own: a code change rebuilds only this.
FROM deps AS code
COPY README.md ./
COPY bridge ./bridge
RUN pip --python /opt/venv/bin/python install --no-deps --target /out/lib . \
    && mv /out/lib/bin /out/bin

# 3. The image: the base, then everything that is not code (cheap to keep cached), then the
#    dependency layer and the small code layer. No pip cache, no build tools.
FROM python:3.11-slim
RUN useradd --system --uid 10001 --user-group --home-dir /data --shell /usr/sbin/nologin bridge \
    && mkdir -p /data /config \
    && chown bridge:bridge /data
# The state database lives on the volume; the rules file is mounted read-only at /config.
# server.listen in that file must be ":8787" (every interface) for the published port to reach it,
# which needs server.auth (docs/security.md).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    BRIDGE_DB=/data/bridge.db \
    BRIDGE_CONFIG=/config/rules.yaml \
    BRIDGE_HEALTHCHECK_URL=http://127.0.0.1:8787/healthz
VOLUME ["/data"]
EXPOSE 8787
WORKDIR /data
USER bridge
HEALTHCHECK --interval=30s --timeout=5s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request; sys.exit(0 if urllib.request.urlopen(os.environ['BRIDGE_HEALTHCHECK_URL'], timeout=4).status == 200 else 1)"]
# docker stop sends SIGTERM: the bridge stops polling, gives in-flight deliveries 7.5 s and the
# server 2 s, and exits 0 within Docker's default 10 s; --stop-timeout 15 leaves room on a slow
# machine.
ENTRYPOINT ["bridge"]
CMD ["run"]

COPY --from=deps /opt/venv /opt/venv
COPY --from=code /out/lib/ /opt/venv/lib/python3.11/site-packages/
COPY --from=code /out/bin/ /opt/venv/bin/
