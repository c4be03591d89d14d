#!/usr/bin/env bash
# Installs the real peers the test suite runs against (Debian packages), if any is missing:
# fail2ban for its fail2ban-regex, which checks examples/fail2ban against a real audit log;
# redis-server for the cluster tests (each starts its own).
# As root it installs them; otherwise it uses sudo when it can, or says what to run.
set -euo pipefail
cd "$(dirname "$0")/.."

# MQTT.js (npm's mqtt@5), an MQTT 5 client of another stack, into .peers/ (never committed).
if [ ! -x .peers/mqttjs/node_modules/.bin/mqtt ] && command -v npm >/dev/null 2>&1; then
    echo "install-peers: installing MQTT.js (npm mqtt@5) into .peers/mqttjs" >&2
    mkdir -p .peers/mqttjs
    npm install --prefix .peers/mqttjs --silent --no-audit --no-fund mqtt@5 >/dev/null 2>&1 \
        || echo "install-peers: npm install mqtt@5 failed; MQTT.js tests will be skipped (fail with REQUIRE_E2E=1)" >&2
fi

packages=(nginx libnginx-mod-stream haproxy mosquitto mosquitto-clients openssl fail2ban redis-server)
missing=0
for binary in nginx haproxy mosquitto mosquitto_pub mosquitto_sub mosquitto_passwd openssl fail2ban-regex redis-server; do
    command -v "$binary" >/dev/null 2>&1 || PATH="$PATH:/usr/sbin" command -v "$binary" >/dev/null 2>&1 || missing=1
done
[ -e /usr/lib/nginx/modules/ngx_stream_module.so ] || missing=1
[ "$missing" = 1 ] || exit 0

if [ "$(id -u)" = 0 ]; then
    sudo=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    sudo=(sudo -n)
else
    echo "install-peers: missing test peers; run as root: apt-get install -y ${packages[*]}" >&2
    echo "install-peers: tests that need them will be skipped (or fail with REQUIRE_E2E=1)" >&2
    exit 0
fi
echo "install-peers: installing ${packages[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -qq
"${sudo[@]}" apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
# Only fail2ban-regex and redis-server (started by the tests) are used: the daemons go again.
"${sudo[@]}" systemctl disable --now fail2ban redis-server >/dev/null 2>&1 || true
