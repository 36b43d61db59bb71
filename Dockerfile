# osad's images: one shared base stage, then one image per service (each deployable alone).
# Build from the repository root, naming the service as the target:
#   docker build --target detector -t osad-detector .      (collector, featurizer, detector, alerter)
#   docker build --target detector --build-arg TORCH_VARIANT=cuda -t osad-detector:cuda .   (NVIDIA GPUs)
# docker-compose.yml builds each service's target. Every image is Debian 12 with its Python 3.11.
# The stages are ordered so that Docker's classic builder, which runs every stage before the target,
# never installs another service's packages for nothing: detector (torch) comes last.
# Sizes and how the images are tested: docs/deploy.md.
FROM debian:bookworm-slim AS base
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 DEBIAN_FRONTEND=noninteractive
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv && useradd --system --uid 10001 osad \
    && mkdir -p /var/lib/osad && chown osad /var/lib/osad
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /opt/osad
# the dependencies first (their layer is reused while only osad's code changes), then osad itself
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt && pip install -r /tmp/requirements.txt && rm /tmp/requirements.txt
# every part: osad installs as one namespace (osad.schemas, osad.runtime, ...)
COPY README.md ./
COPY osad osad
COPY schemas schemas
COPY runtime runtime
COPY core core
COPY collector collector
COPY featurizer featurizer
COPY detector detector
COPY alerter alerter
RUN pip install --no-deps .
# /metrics and /healthz. The healthcheck follows the configured port (OSAD_METRICS_PORT, or the port the
# service really bound, which it writes to OSAD_METRICS_PORT_FILE: see --metrics-port-span).
ENV OSAD_METRICS_PORT=9400 OSAD_METRICS_PORT_FILE=/tmp/osad-metrics.port
EXPOSE 9400
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 CMD ["python", "-m", "osad.healthcheck"]

# Samples -> SignatureWindows.
FROM base AS featurizer
USER osad
ENV OSAD_STATE_DIR=/var/lib/osad/featurizer
ENTRYPOINT ["osad", "featurizer"]

# Scores -> Anomalies (thresholds, incidents, root cause, storage: SQLite or PostgreSQL).
FROM base AS alerter
USER osad
ENTRYPOINT ["osad", "alert"]

# eBPF per-process samples. Runs as root with named capabilities (SYS_ADMIN, SYS_PTRACE; never
# privileged) and the host's pid namespace (see docker-compose.yml, docs/deploy.md). bcc comes from the
# distribution (python3-bpfcc), not PyPI; it compiles the BPF programs at start against the HOST's kernel
# headers, mounted read-only at /lib/modules and /usr/src.
FROM base AS collector
RUN apt-get update && apt-get install -y --no-install-recommends python3-bpfcc bpfcc-tools \
    && rm -rf /var/lib/apt/lists/* \
    && echo /usr/lib/python3/dist-packages > "$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/zz_debian_dist_packages.pth"
ENTRYPOINT ["osad", "collect"]

# SignatureWindows -> Scores (MSCRED, compressed sensing).
# TORCH_VARIANT=cpu (default): PyTorch's CPU build, from TORCH_CPU_INDEX (PyTorch's CPU wheel index;
#   empty: only PyPI and pip's find-links, where a machine without access to PyTorch's index keeps the
#   CPU wheel). TORCH_VARIANT=cuda: PyPI's build, which bundles CUDA (several GB; run with a GPU
#   reservation, the detector-gpu service of docker-compose.yml).
FROM base AS detector
ARG TORCH_VARIANT=cpu
ARG TORCH_VERSION=2.13.0
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
RUN case "$TORCH_VARIANT" in \
      cpu)  pip install ${TORCH_CPU_INDEX:+--extra-index-url "$TORCH_CPU_INDEX"} "torch==${TORCH_VERSION}" \
            && python -c "import torch, sys; v = torch.__version__; print('torch', v); sys.exit(0 if '+cpu' in v or torch.version.cuda is None else 'TORCH_VARIANT=cpu installed a CUDA build: ' + v)" ;; \
      cuda) pip install "torch==${TORCH_VERSION}" ;; \
      *)    echo "TORCH_VARIANT must be cpu or cuda, not '$TORCH_VARIANT'" >&2; exit 2 ;; \
    esac \
    && pip install ".[detector]" \
    && mkdir -p /var/lib/osad/models /var/lib/osad/detector && chown -R osad /var/lib/osad
USER osad
ENV OSAD_STATE_DIR=/var/lib/osad/detector
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s --retries=3 CMD ["python", "-m", "osad.healthcheck"]
ENTRYPOINT ["osad", "detect"]
