# fingrpo: an image that runs the pipeline (`dvc repro`), CPU by default.
#
#   docker build -t fingrpo .
#   docker run --rm -v "$PWD/reports:/app/reports" -v "$PWD/models:/app/models" fingrpo          # dvc repro
#   docker run --rm fingrpo fingrpo train --set train.max_steps=2                               # one stage
#   docker run --rm fingrpo python -m pytest -q -m "not slow"                                    # the tests
#
# The install is the Makefile's `make install`, run as is, after one extra first step: torch==2.13.0
# from the PyTorch CPU index. Outside the build machine the plain pin resolves to the multi-GB CUDA
# build; with the +cpu wheel already in the venv, the Makefile's own `torch==2.13.0` step is satisfied
# (PEP 440: ==2.13.0 matches 2.13.0+cpu) and its remaining steps run unchanged.
#
# Build args:
#   TORCH_INDEX_URL  where torch comes from. GPU: --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
#                    (the CUDA wheels bring their own CUDA runtime; run with `docker run --gpus all`).
#   BASE_IMAGE       the base. Any Debian-like image with python3.11 + venv, e.g. a CUDA base
#                    --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04 (add python3.11 there).
#
# Data: data/ (DVC-tracked, git-ignored) is copied from the build context when present; otherwise
# mount a DVC remote and run `dvc pull` first. DVC runs without git inside the image (core.no_scm).
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    MLFLOW_DISABLE_TELEMETRY=true \
    DVC_NO_ANALYTICS=1 \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    TOKENIZERS_PARALLELISM=false

# make runs the Makefile's install; git lets DVC and MLflow read commit ids when .git is mounted.
RUN apt-get update \
    && apt-get install -y --no-install-recommends make git \
    && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 1000 fingrpo
WORKDIR /app
RUN chown fingrpo:fingrpo /app
USER fingrpo
ENV PATH=/app/.venv/bin:$PATH \
    PREFECT_HOME=/app/.prefect \
    FINGRPO_CACHE=/home/fingrpo/.cache/fingrpo

# Install layer: only what the install reads, so code edits do not reinstall the stack.
COPY --chown=fingrpo:fingrpo Makefile pyproject.toml constraints.txt README.md ./
COPY --chown=fingrpo:fingrpo fingrpo ./fingrpo
RUN python3 -m venv .venv \
    && .venv/bin/pip install -q --index-url "${TORCH_INDEX_URL}" torch==2.13.0 \
    && make install

# The project (code, params, pipeline, data pointer, and data/ when the context has it).
COPY --chown=fingrpo:fingrpo . .
RUN dvc config --local core.no_scm true

CMD ["dvc", "repro"]
