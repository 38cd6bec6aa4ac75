#!/bin/sh
# Run a command in a network namespace that has nothing but loopback, where this user may
# make one (root with unshare and ip); else run it as it is. The tests start servers
# (Prefect, Ray, S3) that only this machine may reach, and Ray binds its ports to every
# interface whatever address it is given: in the namespace no other interface exists.
if [ "$(id -u)" = 0 ] && command -v ip >/dev/null && unshare -n true 2>/dev/null; then
    exec unshare -n sh -c 'ip link set lo up && exec "$@"' sh "$@"
fi
echo "isolated.sh: no network namespace here; running with the machine's network" >&2
exec "$@"
