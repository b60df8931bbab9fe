# The image `tftrain launch --emit=tfjob` names (--image, default tftrain:latest):
#   docker build -t tftrain:latest .
# With TensorFlow's CUDA libraries, for --task_gpus:
#   docker build --build-arg EXTRAS=gpu -t tftrain:gpu .
# Debian's Fashion-MNIST is inside, so the experiments run without a network.
FROM python:3.11-slim-bookworm

ARG EXTRAS=""

RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
       dataset-fashion-mnist \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/tftrain
COPY pyproject.toml setup.cfg constraints.txt README.md LICENSE ./
COPY tftrain ./tftrain
COPY experiments ./experiments
# The versions tftrain was tested with (constraints.txt), with CUDA's when asked.
RUN pip install --no-cache-dir -c constraints.txt ".${EXTRAS:+[$EXTRAS]}" \
    && tftrain --help >/dev/null

# Pods run as this user (the manifest's securityContext names its uid; its
# fsGroup makes mounted volumes writable for it), never as root.
RUN useradd --create-home --uid 1000 --user-group tftrain
USER 1000:1000

# TensorFlow's gRPC server (TF_CONFIG's port) and tftrain's gradient ring.
EXPOSE 2222 2223
ENTRYPOINT ["tftrain"]
