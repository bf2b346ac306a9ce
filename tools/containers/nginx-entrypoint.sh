#!/bin/sh
# Entry point of the nginx stand-in image. config/nginx.conf names Docker's embedded DNS,
# 127.0.0.11, as its resolver; podman's network DNS answers on the address in
# /etc/resolv.conf instead. A forwarder on 127.0.0.11 bridges the two.
upstream=$(awk '/^nameserver/ {print $2; exit}' /etc/resolv.conf)
dnsmasq --listen-address=127.0.0.11 --bind-interfaces --no-resolv --no-hosts \
    --server="$upstream" --cache-size=0 --user=root --pid-file=/run/dnsmasq.pid \
    || echo "nginx-entrypoint: no DNS forwarder on 127.0.0.11" >&2
exec "$@"
