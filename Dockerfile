# One image for every Python service of Sluice; docker-compose.yml picks the command:
#   python -m manager | gateway | repository | runtimes.scikit | runtimes.spark |
#   runtimes.triton | runtimes.triton.register
# Models are not baked in: the repository mounts ./models/store and ./models/triton
# (trained by ./build.sh). The sidecars use envoy/Dockerfile, not this image.
FROM python:3.11-slim-bookworm

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONPATH=/app

# Java for the Spark runtime when a model needs real Spark (pyspark, local mode)
RUN apt-get update \
 && apt-get install -y --no-install-recommends openjdk-17-jre-headless \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /app

# Dependencies first, in their own layer: rebuilt only when pyproject.toml changes.
# (The code itself runs from /app through PYTHONPATH.)
COPY pyproject.toml README.md ./
RUN mkdir -p sluice manager gateway runtimes repository proto \
 && pip install . "grpcio-tools>=1.66,<2"

COPY . .
RUN python -m grpc_tools.protoc -Iproto --python_out=. --grpc_python_out=. --pyi_out=. proto/sluice/v1/*.proto \
 && : >sluice/v1/__init__.py \
 && useradd --system --home-dir /app --shell /usr/sbin/nologin sluice \
 && mkdir -p /data /bootstrap && chown sluice /data /bootstrap

USER sluice
CMD ["python", "-m", "manager"]
