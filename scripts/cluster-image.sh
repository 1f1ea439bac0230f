#!/usr/bin/env bash
# Builds the agentreg image without pulling anything: the release binary and the shared
# libraries it links, on an empty (scratch) base. Use it where no registry is reachable;
# elsewhere `docker build -f cluster/Dockerfile .` gives the same layout from public images.
#
#   scripts/cluster-image.sh [TAG]        (default tag: agentreg:latest)
set -euo pipefail
cd "$(dirname "$0")/.."

tag=${1:-agentreg:latest}
cargo build --release --locked --quiet --bin agentreg
bin=target/release/agentreg

ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
root=$ctx/rootfs
mkdir -p "$root/usr/local/bin" "$root/etc/agentreg" "$root/tmp" "$ctx/data"
chmod 1777 "$root/tmp"
cp "$bin" "$root/usr/local/bin/agentreg"
strip "$root/usr/local/bin/agentreg" 2>/dev/null || true

# The dynamic loader and every library the binary needs, at the same paths.
for lib in $(ldd "$bin" | awk '/=>/ && $3 ~ /^\// {print $3} /^\t\/.*ld-linux/ {print $1}'); do
  mkdir -p "$root$(dirname "$lib")"
  cp -L "$lib" "$root$lib"
done
# The loader is looked up through the path recorded in the binary (often a symlink).
interp=$(readelf -l "$bin" | sed -n 's/.*Requesting program interpreter: \(.*\)]/\1/p')
if [ -n "$interp" ] && [ ! -e "$root$interp" ]; then
  mkdir -p "$root$(dirname "$interp")"
  cp -L "$interp" "$root$interp"
fi

cat > "$root/etc/passwd" <<'PASSWD'
root:x:0:0:root:/root:/sbin/nologin
agentreg:x:10001:10001:agentreg:/var/lib/agentreg:/sbin/nologin
PASSWD
cat > "$root/etc/group" <<'GROUP'
root:x:0:
agentreg:x:10001:
GROUP
echo 'hosts: files dns' > "$root/etc/nsswitch.conf"

cat > "$ctx/Dockerfile" <<'DOCKERFILE'
FROM scratch
COPY rootfs/ /
COPY --chown=10001:10001 data/ /var/lib/agentreg/
USER 10001:10001
VOLUME /var/lib/agentreg
EXPOSE 7000/udp 9100/tcp
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/agentreg"]
CMD ["node", "--config", "/etc/agentreg/node.toml"]
DOCKERFILE

docker build --quiet -t "$tag" "$ctx" >/dev/null
echo "built $tag ($(docker image inspect -f '{{.Size}}' "$tag" | awk '{printf "%.1f MB", $1/1e6}'))"
