# patchcore serve on CPU: `docker build -t patchcore .` then
#   docker run --rm -p 8000:8000 -e PATCHCORE_API_KEY=change-me \
#     -v "$PWD/results:/models:ro" -v patchcore-data:/data patchcore
# The install is scripts/install.sh, the script `make install` (CI) runs: a broken install step
# fails CI even where no Docker daemon is available. See docs/deploy.md.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    OMP_WAIT_POLICY=PASSIVE \
    PATCHCORE_OFFLINE=1

WORKDIR /opt/patchcore
COPY pyproject.toml README.md ./
COPY scripts/install.sh scripts/install.sh
COPY src src
# CPU-only torch wheels (no CUDA libraries); pass --build-arg TORCH_INDEX_URL= for PyPI's.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN PATCHCORE_EDITABLE=0 TORCH_INDEX_URL="$TORCH_INDEX_URL" \
        bash scripts/install.sh full - "weights,serve" \
    && useradd --create-home --uid 10001 --shell /usr/sbin/nologin patchcore \
    && mkdir -p /models /data && chown patchcore /data

USER patchcore
# Models are mounted read-only at /models; the review database lives in the /data volume.
VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]
ENTRYPOINT ["patchcore", "serve"]
CMD ["/models", "--host", "0.0.0.0", "--port", "8000", "--db", "/data/reviews.sqlite", "--device", "cpu"]
