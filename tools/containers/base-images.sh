#!/usr/bin/env bash
# Make the base images the Dockerfile and docker-compose.yml name, from Debian packages, for
# machines that reach Debian's archive but no container registry. Each is a debootstrapped
# root file system imported into podman under the registry's name, so `podman build
# --pull=never` and compose find it locally:
#
#   docker.io/library/python:3.11-slim   Debian 12 minbase + python3 (3.11), venv, pip
#   docker.io/library/redis:7-alpine     Debian 12 minbase + redis-server (7.0); also tagged redis:7
#   docker.io/library/nginx:1.28-alpine  Debian sid minbase + nginx (Debian 12's 1.22 predates
#                                        `server ... resolve`), wget for the health check, and a
#                                        DNS forwarder on 127.0.0.11 (see nginx-entrypoint.sh)
#
# They stand in for the official images only as far as this project uses them. An image is
# rebuilt only when this folder changes (a label records the recipe's digest); debootstrap's
# downloads are kept in the cache directory, so a rebuild fetches nothing it already has.
#
# Usage (root): tools/containers/base-images.sh        cache: $SSE_CONTAINER_CACHE or
#               /var/cache/sse-fanout/containers
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache=${SSE_CONTAINER_CACHE:-/var/cache/sse-fanout/containers}
export CONTAINERS_CONF=${CONTAINERS_CONF:-$here/containers.conf}
mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
mirror=${mirror:-http://deb.debian.org/debian}
label=org.sse-fanout.base-recipe
# The machine's own extra CA certificates (a TLS-inspecting proxy's, say) go into the python
# image, so pip inside `podman build` trusts what pip on the host trusts.
extra_cas=(/usr/local/share/ca-certificates/*.crt)
[ -e "${extra_cas[0]}" ] || extra_cas=()
recipe=$(cat "$here"/base-images.sh "$here"/nginx-entrypoint.sh "$here"/redis-entrypoint.sh \
         ${extra_cas[@]+"${extra_cas[@]}"} | sha256sum | cut -c1-16)

current() {  # current IMAGE: is IMAGE present and made by this recipe?
    [ "$(podman image inspect --format "{{ index .Labels \"$label\" }}" "$1" 2>/dev/null)" = "$recipe" ]
}

mkdir -p "$cache/debs"
# One maker at a time per machine: runs from several checkouts share the cache and the images.
exec 9>"$cache/lock"
flock 9
work=$(mktemp -d "$cache/rootfs.XXXXXX")
trap 'rm -rf --one-file-system "$work"' EXIT

rootfs() {  # rootfs NAME SUITE PACKAGES: a minbase root file system with PACKAGES
    local dir=$work/$1
    echo "base-images: debootstrap $2 with $3" >&2
    debootstrap --variant=minbase --cache-dir="$cache/debs" --include="$3" "$2" "$dir" "$mirror" \
        >"$work/$1.log" 2>&1 || { tail -20 "$work/$1.log" >&2; exit 1; }
    echo "$dir"
}

slim() {  # drop what an image does not need: package lists, caches, docs
    rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin "$1"/var/cache/apt/archives/*.deb \
           "$1"/usr/share/doc/* "$1"/usr/share/man/* "$1"/usr/share/locale/* "$1"/var/log/*.log
    : >"$1/etc/resolv.conf"
}

import() {  # import DIR IMAGE CHANGES...: DIR as IMAGE, labelled with the recipe
    local dir=$1 image=$2; shift 2
    local changes=(--change "LABEL $label=$recipe")
    for change in "$@"; do changes+=(--change "$change"); done
    tar -C "$dir" -c . | podman import --quiet "${changes[@]}" - "$image" >/dev/null
    echo "base-images: made $image" >&2
}

if ! current docker.io/library/python:3.11-slim; then
    dir=$(rootfs python bookworm python3,python3-venv,python3-pip,python-is-python3,ca-certificates)
    if [ ${#extra_cas[@]} -gt 0 ]; then
        cp "${extra_cas[@]}" "$dir/usr/local/share/ca-certificates/"
        chroot "$dir" update-ca-certificates >/dev/null
        printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' >"$dir/etc/pip.conf"
    fi
    # The official image's interpreter lives in /usr/local/bin.
    ln -sf /usr/bin/python3 "$dir/usr/local/bin/python3"
    ln -sf /usr/bin/python3 "$dir/usr/local/bin/python"
    slim "$dir"
    import "$dir" docker.io/library/python:3.11-slim \
        'ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin' \
        'ENV LANG=C.UTF-8' 'CMD ["python3"]'
fi

if ! current docker.io/library/redis:7-alpine || ! current docker.io/library/redis:7; then
    dir=$(rootfs redis bookworm redis-server)
    install -m 755 "$here/redis-entrypoint.sh" "$dir/usr/local/bin/docker-entrypoint.sh"
    mkdir -p "$dir/data"
    slim "$dir"
    import "$dir" docker.io/library/redis:7-alpine 'WORKDIR /data' 'EXPOSE 6379' \
        'VOLUME /data' 'ENTRYPOINT ["docker-entrypoint.sh"]' 'CMD ["redis-server"]'
    podman tag docker.io/library/redis:7-alpine docker.io/library/redis:7
fi

if ! current docker.io/library/nginx:1.28-alpine; then
    dir=$(rootfs nginx sid nginx,dnsmasq-base,wget)
    install -m 755 "$here/nginx-entrypoint.sh" "$dir/docker-entrypoint.sh"
    ln -sf /dev/stdout "$dir/var/log/nginx/access.log"
    ln -sf /dev/stderr "$dir/var/log/nginx/error.log"
    slim "$dir"
    import "$dir" docker.io/library/nginx:1.28-alpine 'EXPOSE 80' 'STOPSIGNAL SIGQUIT' \
        'ENTRYPOINT ["/docker-entrypoint.sh"]' 'CMD ["nginx", "-g", "daemon off;"]'
fi
