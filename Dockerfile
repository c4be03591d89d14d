# realip-broker container image.
#   podman/docker build -t realip-broker .
#   run: -p 1883:1883 -p 8083:8083; mount your own /etc/realip-broker/broker.yaml to configure.
# BASE_IMAGE must provide python3 (>= 3.11) with venv; scripts/container-smoke.sh builds one
# with debootstrap where no registry is reachable.
ARG BASE_IMAGE=python:3.12-slim
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY broker ./broker
COPY listeners ./listeners
RUN python3 -m venv /opt/realip-broker \
    && /opt/realip-broker/bin/pip install --no-cache-dir . \
    && rm -rf /src

COPY config/broker.yaml /etc/realip-broker/broker.yaml
RUN useradd --uid 10001 --no-log-init --home-dir /var/lib/realip-broker --create-home --shell /usr/sbin/nologin realip

USER realip
# node.data_dir (relative) lands here.
WORKDIR /var/lib/realip-broker
# MQTT, MQTT over WebSocket, and the TLS ports (ssl, wss) for listeners you configure.
EXPOSE 1883 8083 8883 8084
# The broker is PID 1: it handles SIGTERM itself (close listeners, disconnect clients, exit 0).
STOPSIGNAL SIGTERM
ENTRYPOINT ["/opt/realip-broker/bin/realip-broker"]
CMD ["serve", "--config", "/etc/realip-broker/broker.yaml"]
