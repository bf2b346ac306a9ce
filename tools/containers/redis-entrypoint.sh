#!/bin/sh
# Entry point of the redis stand-in image. The official image's redis-server runs with
# protected mode off (it is reached over the container network, with no password by
# default); Debian's defaults to on, so it is switched off here. Arguments given to the
# container come after it and win.
if [ "$1" = redis-server ]; then
    shift
    case "$1" in
        "" | -*) exec redis-server --protected-mode no "$@" ;;
        *) config=$1; shift; exec redis-server "$config" --protected-mode no "$@" ;;
    esac
fi
exec "$@"
