#!/usr/bin/env bash
# Builds the container image with Debian's podman (no Docker engine, no image registry here),
# from a base image made by debootstrap, starts it, round-trips a message over TCP and
# WebSocket, stops it with SIGTERM and checks it exits 0. Not part of CI; run as root.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
base_image=localhost/realip-base:bookworm
image=localhost/realip-broker:smoke
name=realip-smoke-$$
started=$(date +%s)

need=()
for tool in podman runc debootstrap; do command -v "$tool" >/dev/null 2>&1 || need+=("$tool"); done
if [ ${#need[@]} -gt 0 ]; then
    echo "smoke: installing ${need[*]}" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman runc debootstrap >/dev/null
fi

if ! podman image exists "$base_image"; then
    mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
    mirror=${mirror:-$(awk '/^deb / {print $2; exit}' /etc/apt/sources.list)}
    rootfs=$(mktemp -d)
    echo "smoke: debootstrap bookworm from $mirror" >&2
    debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
        bookworm "$rootfs" "$mirror" >/dev/null
    tar -C "$rootfs" -c . | podman import - "$base_image" >/dev/null
    rm -rf "$rootfs"
fi

echo "smoke: building $image" >&2
podman build --runtime runc --build-arg BASE_IMAGE="$base_image" \
    -v /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro \
    -t "$image" . >/dev/null

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
tcp_port=$(free_port); ws_port=$(free_port)
workdir=$(mktemp -d)
chmod 755 "$workdir"
cat > "$workdir/broker.yaml" <<YAML
listeners:
  tcp: {default: {bind: "127.0.0.1:$tcp_port"}}
  ws: {default: {bind: "127.0.0.1:$ws_port"}}
YAML
chmod 644 "$workdir/broker.yaml"
cleanup() { podman rm -f "$name" >/dev/null 2>&1 || true; rm -rf "$workdir"; }
trap cleanup EXIT

podman run -d --name "$name" --runtime runc --network=host \
    --ulimit nofile=20000:20000 --ulimit nproc=32768:32768 \
    -v "$workdir/broker.yaml:/etc/realip-broker/broker.yaml:ro" "$image" >/dev/null

for _ in $(seq 1 100); do
    podman logs "$name" 2>&1 | grep -q "realip-broker ready" && break
    sleep 0.1
done
podman logs "$name" 2>&1 | grep "realip-broker ready" >&2 || { podman logs "$name"; exit 1; }

python=python3
[ -x "$repo/.venv/bin/python" ] && python=$repo/.venv/bin/python
"$python" - "$tcp_port" "$ws_port" <<'PY'
import sys, threading
import paho.mqtt.client as mqtt

def round_trip(transport: str, port: int) -> None:
    got = threading.Event()
    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"smoke-sub-{transport}", transport=transport)
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"smoke-pub-{transport}", transport=transport)
    subscribed = threading.Event()
    sub.on_subscribe = lambda *a: subscribed.set()
    sub.on_message = lambda c, u, m: got.set() if m.payload == b"hello" else None
    sub.on_connect = lambda c, u, f, r, p: c.subscribe("smoke/t", 1)
    sub.connect("127.0.0.1", port); sub.loop_start()
    assert subscribed.wait(10), f"{transport}: no SUBACK"
    pub.connect("127.0.0.1", port); pub.loop_start()
    pub.publish("smoke/t", b"hello", qos=1).wait_for_publish(10)
    assert got.wait(10), f"{transport}: message not delivered"
    for c in (sub, pub):
        c.disconnect(); c.loop_stop()
    print(f"smoke: {transport} round trip ok")

round_trip("tcp", int(sys.argv[1]))
round_trip("websockets", int(sys.argv[2]))
PY

stop_started=$(date +%s.%N)
podman stop -t 10 "$name" >/dev/null
stop_done=$(date +%s.%N)
code=$(podman inspect -f '{{.State.ExitCode}}' "$name")
echo "smoke: SIGTERM -> exit code $code in $(python3 -c "print(round($stop_done-$stop_started,2))")s" >&2
[ "$code" = 0 ] || { podman logs "$name"; exit 1; }
echo "smoke: passed in $(( $(date +%s) - started ))s" >&2
