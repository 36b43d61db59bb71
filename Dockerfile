# osad's images: one shared base stage, then one image per service (each deployable alone).
# Build from the repository root, naming the service as the target:
#   docker build --target detector -t osad-detector .      (collector, featurizer, detector, alerter)
# docker-compose.yml builds each service's target. Every image is Debian 12 with its Python 3.11.
FROM debian:bookworm-slim AS base
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 DEBIAN_FRONTEND=noninteractive
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv && useradd --system --uid 10001 osad \
    && mkdir -p /var/lib/osad && chown osad /var/lib/osad
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /opt/osad
COPY pyproject.toml README.md ./
# every part: osad installs as one namespace (osad.schemas, osad.runtime, ...)
COPY osad osad
COPY schemas schemas
COPY runtime runtime
COPY core core
COPY collector collector
COPY featurizer featurizer
COPY detector detector
COPY alerter alerter
RUN pip install .
ENV OSAD_METRICS_PORT=9400
EXPOSE 9400
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:9400/healthz', timeout=2).status == 200 else 1)"

# eBPF per-process samples. Runs as root with named capabilities and the host's pid namespace (see
# docker-compose.yml). bcc comes from the distribution (python3-bpfcc), not PyPI; it compiles the BPF
# programs at start against the HOST's kernel headers, mounted read-only at /lib/modules and /usr/src.
FROM base AS collector
RUN apt-get update && apt-get install -y --no-install-recommends python3-bpfcc bpfcc-tools \
    && rm -rf /var/lib/apt/lists/* \
    && echo /usr/lib/python3/dist-packages > "$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/zz_debian_dist_packages.pth"
ENTRYPOINT ["osad", "collect"]

# Samples -> SignatureWindows.
FROM base AS featurizer
USER osad
ENV OSAD_STATE_DIR=/var/lib/osad/featurizer
ENTRYPOINT ["osad", "featurizer"]

# SignatureWindows -> Scores (MSCRED, compressed sensing). torch from PyPI bundles CUDA on Linux
# x86_64, so one image runs on CPU hosts and, with a GPU reservation (detector-gpu in
# docker-compose.yml), on NVIDIA GPUs.
FROM base AS detector
ARG TORCH_SPEC="torch>=2.4,<2.14"
RUN pip install "${TORCH_SPEC}" && pip install ".[detector]" \
    && mkdir -p /var/lib/osad/models && chown -R osad /var/lib/osad
USER osad
HEALTHCHECK --interval=15s --timeout=3s --start-period=120s CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:9400/healthz', timeout=2).status == 200 else 1)"
ENTRYPOINT ["osad", "detect"]

# Scores -> Anomalies (thresholds, incidents, root cause, storage).
FROM base AS alerter
USER osad
ENTRYPOINT ["osad", "alert"]
