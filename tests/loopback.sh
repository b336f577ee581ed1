#!/usr/bin/env bash
# Runs a command (`make test` runs the test suite) in a network namespace that holds only `lo`.
#
# Why: servers started by the tests must be reachable from this machine alone, and some bind
# every interface whatever they are told. torchrun's c10d rendezvous store listens on *:port
# even with --rdzv_endpoint 127.0.0.1:port, and a Ray worker node binds all interfaces
# (tests/conftest.py LoopbackNetwork). In here there is nothing but loopback to bind.
# Root enters a plain network namespace; another user one inside a user namespace it owns
# (unshare --map-root-user). Where neither can be made (a container without the right), the
# command runs as it is with a warning, and under CI=true that is an error.
set -euo pipefail
[ $# -gt 0 ] || { echo "usage: tests/loopback.sh COMMAND [ARG...]" >&2; exit 2; }
if [ "${PVEN_LOOPBACK_ONLY:-}" = 1 ]; then exec "$@"; fi   # already inside
user=()
[ "$(id -u)" -eq 0 ] || user=(--map-root-user)
if ! unshare --net "${user[@]}" -- ip link set lo up 2>/dev/null; then
  msg="tests/loopback.sh: cannot make a loopback-only network namespace (unshare --net ${user[*]} + ip link set lo up)"
  if [ "${CI:-}" = true ]; then echo "$msg; CI=true requires it" >&2; exit 1; fi
  echo "$msg; running the command on this machine's network instead" >&2
  exec "$@"
fi
export PVEN_LOOPBACK_ONLY=1
# 127.0.0.2 beside 127.0.0.1: glibc's getaddrinfo(AI_ADDRCONFIG) counts every IPv4 address but
# 127.0.0.1 itself, and with none it resolves nothing at all (slurmd then cannot bind its port).
exec unshare --net "${user[@]}" -- sh -c 'ip link set lo up && ip addr add 127.0.0.2/32 dev lo && exec "$@"' sh "$@"
