#!/bin/sh
# Nix post-build-hook: queue the paths a build made for the next push, and return at once.
# Nix runs the hook after every build and waits for it, and a hook that fails fails the
# build: so this only appends to a spool file and always succeeds. The push happens later,
# from the timer: examples/push-spool.sh.
#
# Install: in /etc/nix/nix.conf,  post-build-hook = /etc/nixcache/post-build-hook.sh
# The spool is $NIXCACHE_SPOOL, default /var/spool/nixcache (make it, writable by the
# builds' user: root on a single-user or daemon install).
spool=${NIXCACHE_SPOOL:-/var/spool/nixcache}
# The outputs, and the derivation: Nix 2.8 passes an empty OUT_PATHS, and push-spool.sh
# pushes the outputs of a queued .drv.
# shellcheck disable=SC2086 # OUT_PATHS is a space-separated list
printf '%s\n' $OUT_PATHS ${DRV_PATH:-} >> "$spool/queue" 2>/dev/null || true
exit 0
