# digit-recognition: one image for data, training, evaluation, prediction and serving.
#   docker build -t digit-recognition .
#   docker run --rm -v "$PWD/data:/app/data" -v "$PWD/runs:/app/runs" digit-recognition                  # the pipeline
#   docker run --rm -v "$PWD/photos:/images:ro" -v "$PWD/runs:/app/runs" digit-recognition digit-predict /images
#   docker run -d -p 8000:8000 -v "$PWD/runs:/app/runs" digit-recognition digit-serve   # the champion on :8000
# Volumes: /app/data (raw MNIST), /app/dataset_cleaned, /app/training_results, /app/runs (the MLflow store),
# /app/feedback (corrections). Host folders mounted there (docker creates missing ones as root) are given to the
# runtime user `digits` (uid 1000) by the entrypoint, which then drops root (setpriv, as the postgres image's gosu);
# `docker run --user UID:GID` runs as that user instead, with folders it can write.
# Build arguments: BASE_IMAGE (a Python 3.11 image with pip and venv), TORCH_INDEX (where torch and torchvision come
# from; empty: the default package index, as pip is configured, e.g. PIP_INDEX_URL / PIP_FIND_LINKS).
#   docker build --build-arg TORCH_INDEX= --build-arg BASE_IMAGE=my-python:3.11 -t digit-recognition .
ARG BASE_IMAGE=python:3.11-slim

# One stage: nothing is compiled, so a second stage would only copy the virtual environment (most of the image,
# bench/results/docker_image.md) into a layer of its own: twice the space on the building host for the same image.
FROM ${BASE_IMAGE}
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG PIP_INDEX_URL
ARG PIP_FIND_LINKS
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 MPLBACKEND=Agg \
    MLFLOW_TRACKING_URI=sqlite:////app/runs/mlflow.db \
    DIGIT_SERVE_HOST=0.0.0.0
WORKDIR /app
RUN python -m venv /opt/venv
# PyTorch's CPU wheels keep the image small (the default wheels bundle CUDA); the same step as `make setup TORCH_INDEX=...`,
# at the versions the tests passed on (constraints.txt), in a layer of its own that later builds reuse.
COPY constraints.txt ./
RUN python -m pip install --quiet -c constraints.txt torch torchvision ${TORCH_INDEX:+--index-url "$TORCH_INDEX"}
# The package's dependencies in a layer of their own, installed from pyproject.toml with a stand-in of the package (its
# __init__.py, which holds the version, and an empty README): a change to the code or the README then reinstalls the
# package alone, not MLflow, papermill and the rest.
COPY pyproject.toml settings.ini /tmp/src/
COPY digit_recognition/__init__.py /tmp/src/digit_recognition/
RUN touch /tmp/src/README.md
RUN python -m pip install --quiet -c constraints.txt '/tmp/src[train,serve]'
# The package (it carries the notebooks papermill runs), installed over the stand-in from a folder that is then
# removed, and a non-root user.
COPY README.md /tmp/src/
COPY digit_recognition/ /tmp/src/digit_recognition/
RUN python -m pip install --quiet --no-deps --force-reinstall /tmp/src && rm -rf /tmp/src constraints.txt
RUN useradd --create-home --uid 1000 digits
COPY --chown=digits:digits settings.ini ./
COPY --chmod=755 docker/entrypoint.sh /usr/local/bin/digit-entrypoint
# The folders are the user's, and writable by any uid (`--user`) in an image of its own.
RUN mkdir -p data dataset_cleaned training_results runs feedback && chown -R digits:digits /app \
    && chmod 0777 data dataset_cleaned training_results runs feedback
# No USER: the entrypoint starts as root only to give mounted folders to `digits`, then runs every command as it.
VOLUME ["/app/data", "/app/dataset_cleaned", "/app/training_results", "/app/runs", "/app/feedback"]
# digit-serve listens on 0.0.0.0:8000 in the container (DIGIT_SERVE_HOST above; publish it with -p HOST_PORT:8000).
EXPOSE 8000
# A HEALTHCHECK applies to every container of the image, and most of them (the pipeline, digit-predict) run no server:
# `digit-entrypoint healthcheck` reads the command the container was started with (/proc/1/cmdline, which names it
# with or without `docker run --init`); for digit-serve it asks http://127.0.0.1:PORT/health (its --port, else
# DIGIT_SERVE_PORT, else 8000) with Python's urllib (the slim image has no curl), for any other command it passes.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 CMD ["digit-entrypoint", "healthcheck"]
ENTRYPOINT ["digit-entrypoint"]
CMD ["digit-pipeline"]
