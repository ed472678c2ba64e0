# l3spot: the DICOM node (`l3spot serve`) and its workers (`l3spot worker`) in one image.
#
# CPU (default):   docker build -t l3spot .
# CUDA:            docker build -t l3spot:cuda \
#                    --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 \
#                    --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
# The same CLI the tests exercise: `l3spot serve`, `l3spot worker`, `l3spot echo`, `l3spot jobs`
# (console script `l3spot` = `python -m l3spot`; tests/integration/test_integration_node.py).
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DEBIAN_FRONTEND=noninteractive \
    # dcmtk-based peers and Orthanc leave Nagle on otherwise (about 45 ms per C-STORE)
    TCP_NODELAY=1 \
    PATH=/opt/venv/bin:$PATH \
    L3SPOT_CONFIG=/etc/l3spot/config.yaml \
    L3SPOT__NODE__SPOOL_DIR=/var/lib/l3spot/spool

# CUDA base images have no Python: install one (the slim Python image already has it).
RUN if ! command -v python3 >/dev/null 2>&1 || ! python3 -m venv --help >/dev/null 2>&1; then \
        apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 -m venv /opt/venv \
    && pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"

WORKDIR /app
# The runtime packages only: core/ (shared kernel), service/ (the node), worker/ (analysis,
# export, site training and the phantom generator it mixes in) and the l3spot.py CLI root.
# research/ (evaluation, import graph) is development-only and never copied (.dockerignore
# keeps it out of the build context too); `l3spot evaluate` is absent from this image.
COPY pyproject.toml README.md l3spot.py ./
COPY core ./core
COPY service ./service
COPY worker ./worker
RUN pip install . \
    && useradd --system --uid 1000 --home /var/lib/l3spot l3spot \
    && mkdir -p /var/lib/l3spot /etc/l3spot /app/models \
    && chown -R l3spot /var/lib/l3spot
# The shipped weights and their model cards; docker-compose.yml may mount a site's own
# retrained weights over /app/models (deploy/config.yaml points locator.weights there).
COPY models ./models
COPY deploy/config.yaml /etc/l3spot/config.yaml

USER l3spot
VOLUME ["/var/lib/l3spot"]
EXPOSE 11112
HEALTHCHECK --interval=30s --timeout=15s --start-period=30s --retries=3 CMD ["l3spot", "echo"]
ENTRYPOINT ["l3spot"]
CMD ["serve"]
