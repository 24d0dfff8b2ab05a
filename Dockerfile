# One image for all three services; the command picks which one runs:
#   docker run IMAGE serve-inference | serve-reward | serve-trainer   (any `rlhf-online` subcommand works)
#
# Build (from the repository root):
#   CPU nodes:  docker build -t ghcr.io/rlhf-online/rlhf-online:0.1.0 .
#   GPU nodes:  docker build --build-arg TORCH_VARIANT=cuda -t ghcr.io/rlhf-online/rlhf-online-cuda:0.1.0 .
# The CUDA variant installs PyPI's default Linux torch wheel, which bundles the CUDA runtime (CUDA 13 for
# torch 2.15), so the slim base works on a GPU node whose NVIDIA driver supports it. For an older driver pick
# the PyTorch index of a CUDA version it supports: --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cuXYZ
# (and TORCH_VERSION, if that index lacks the default).
# Linted by hadolint in CI (tests/test_dockerfile.py); no Docker engine runs on the project's CI machines.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- build: a virtual environment with the project, its dependencies and the generated gRPC stubs ----
FROM ${PYTHON_IMAGE} AS build
ARG TORCH_VARIANT=cpu
ARG TORCH_VERSION=2.15.0
ARG TORCH_INDEX_URL=""
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv
WORKDIR /src

# 1. torch first, from the index of the chosen variant (the CPU wheels are a fraction of the CUDA ones).
RUN case "${TORCH_VARIANT}" in \
      cpu) index="${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}" ;; \
      cuda) index="${TORCH_INDEX_URL:-https://pypi.org/simple}" ;; \
      *) echo "TORCH_VARIANT must be cpu or cuda, not '${TORCH_VARIANT}'" >&2; exit 1 ;; \
    esac \
    && pip install --index-url "${index}" "torch==${TORCH_VERSION}"

# 2. The dependencies (and grpcio-tools, the `codegen` extra) in their own layer, rebuilt only when
#    pyproject.toml changes.
COPY pyproject.toml ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
print('\n'.join(p['dependencies'] + p['optional-dependencies']['codegen']))" > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt

# 3. The project: compile the protos into rlhf_online/proto, then install it (the stubs go into the wheel);
#    `python -P` imports the installed copy, not the one in /src, to prove the stubs were packaged.
COPY . .
RUN python -m rlhf_online.codegen \
    && pip install --no-deps . \
    && pip uninstall -y grpcio-tools \
    && python -P -c "from rlhf_online.proto.rlhf.v1 import admin_pb2_grpc, chat_pb2_grpc, events_pb2" \
    && rlhf-online --help

# ---- runtime: the virtual environment on a clean slim base, run as an unprivileged user ----
FROM ${PYTHON_IMAGE} AS runtime
ARG TORCH_VARIANT=cpu
LABEL org.opencontainers.image.title="rlhf-online" \
      org.opencontainers.image.description="Online RLHF: gRPC policy serving, reward learning from live ratings, PPO with hot swap" \
      org.opencontainers.image.licenses="Apache-2.0" \
      io.rlhf-online.torch-variant="${TORCH_VARIANT}"
RUN groupadd --system --gid 10001 rlhf \
    && useradd --system --uid 10001 --gid rlhf --home-dir /home/rlhf --create-home --shell /usr/sbin/nologin rlhf
COPY --from=build /opt/venv /opt/venv
# Caches point at /tmp so the root filesystem can be mounted read-only (Kubernetes mounts an emptyDir there).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HOME=/tmp/huggingface \
    MPLCONFIGDIR=/tmp/matplotlib \
    XDG_CACHE_HOME=/tmp/cache \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
WORKDIR /home/rlhf
USER 10001:10001
EXPOSE 50051 9101
ENTRYPOINT ["rlhf-online"]
CMD ["--help"]
