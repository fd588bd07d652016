# bitmoji-serve: the gRPC classifier server.
#
#   docker build -t bitmoji-serve .                                  # CPU (default)
#   docker build --build-arg TORCH_VARIANT=cu130 -t bitmoji-serve:cuda .   # CUDA (run with --gpus all)
#   docker run -p 50051:50051 -p 9464:9464 -v "$PWD/runs/cnn:/models:ro" bitmoji-serve
#
# The model file is not baked in: mount it at /models/model.pt (or build a
# thin image FROM this one that COPYs it there). A TorchScript file is code:
# serve only files you trust.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
# cpu: small CPU-only torch wheels; cu130: PyTorch's CUDA 13.0 wheels (they carry the CUDA runtime).
ARG TORCH_VARIANT=cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# Dependencies first, so code changes do not re-download torch.
RUN pip install --index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}" torch==2.14.1 torchvision==0.29.1
COPY pyproject.toml setup.py README.md ./
# The server and what it imports; no trainer/ (setup.py installs only the packages whose folders are here).
COPY proto ./proto
COPY core ./core
COPY server ./server
COPY client ./client
# The versions are pinned in pyproject.toml.
# hadolint ignore=DL3013
RUN pip install ".[serve,tracing]"

FROM ${PYTHON_IMAGE} AS runtime
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    BITMOJI_MODEL=/models/model.pt \
    BITMOJI_HOST=0.0.0.0 \
    BITMOJI_PORT=50051 \
    BITMOJI_METRICS_HOST=0.0.0.0 \
    BITMOJI_METRICS_PORT=9464
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin bitmoji
USER 10001
EXPOSE 50051 9464
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["bitmoji-client", "--target", "127.0.0.1:50051", "--timeout", "2", "health"]
ENTRYPOINT ["bitmoji-serve"]
