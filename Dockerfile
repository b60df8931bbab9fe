# The image `tftrain launch --emit=tfjob` names (--image, default tftrain:latest):
#   docker build -t tftrain:latest .
# Debian's Fashion-MNIST is inside, so the experiments run without a network.
FROM python:3.11-slim-bookworm

RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
       dataset-fashion-mnist \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/tftrain
COPY pyproject.toml setup.cfg README.md ./
COPY tftrain ./tftrain
COPY experiments ./experiments
RUN pip install --no-cache-dir . && tftrain --help >/dev/null

# TensorFlow's gRPC server (TF_CONFIG's port) and tftrain's gradient ring.
EXPOSE 2222 2223
ENTRYPOINT ["tftrain"]
