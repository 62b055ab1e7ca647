#!/bin/sh
# Nix post-build-hook: queue the paths a build made for the next push, and return at once.
# Nix runs the hook after every build and waits for it, and a hook that fails fails the
# build: so this only appends to a spool file and always succeeds, saying so in the build's
# log when it cannot. The push happens later: examples/push-spool.sh, run by
# examples/systemd/nixcache-spool.path.
#
# Install: scripts/install puts it in /usr/local/libexec/nixcache; in /etc/nix/nix.conf,
#   post-build-hook = /usr/local/libexec/nixcache/post-build-hook
# The spool is $NIXCACHE_SPOOL, default /var/spool/nixcache (made by the spool unit, or
# by hand: writable by the builds' user, root on a single-user or daemon install, and by
# the units' user).
spool=${NIXCACHE_SPOOL:-/var/spool/nixcache}
# The outputs, and the derivation: Nix 2.8 passes an empty OUT_PATHS, and push-spool.sh
# pushes the outputs of a queued .drv.
# shellcheck disable=SC2086 # OUT_PATHS is a space-separated list
if ! printf '%s\n' $OUT_PATHS ${DRV_PATH:-} >> "$spool/queue" 2>/dev/null; then
  echo "post-build-hook: cannot queue ${DRV_PATH:-$OUT_PATHS} in $spool/queue (is $spool there, writable by $(id -un)?): this build will not be pushed" >&2
fi
exit 0
