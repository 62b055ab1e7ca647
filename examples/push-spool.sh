#!/bin/sh
# Push what examples/post-build-hook.sh queued, then empty the queue. Run it from the push
# timer (ExecStart=/etc/nixcache/push-spool.sh /var/lib/static-nix-cache --secret-key ...)
# or cron. Paths garbage-collected since they were built are skipped; if the push fails,
# the paths stay queued for the next run.
#
# Usage: push-spool.sh DEST [nixcache push options...]
# Environment: NIXCACHE_SPOOL (default /var/spool/nixcache), NIXCACHE (default nixcache).
set -eu
[ $# -ge 1 ] || { echo "usage: $0 DEST [nixcache push options...]" >&2; exit 2; }
spool=${NIXCACHE_SPOOL:-/var/spool/nixcache}
nixcache=${NIXCACHE:-nixcache}
dest=$1
shift
[ -s "$spool/queue" ] || exit 0
batch=$spool/batch.$$
# Builds that finish meanwhile queue into a new file.
mv "$spool/queue" "$batch"
# A queued derivation stands for its outputs.
while read -r p; do
  case $p in
    *.drv) [ -e "$p" ] && nix-store --query --outputs "$p" 2>/dev/null || true ;;
    *) echo "$p" ;;
  esac
done < "$batch" | while read -r p; do
  if [ -e "$p" ]; then echo "$p"; fi
done | sort -u > "$batch.live"
if [ -s "$batch.live" ] && ! "$nixcache" push --stdin --dest "$dest" "$@" < "$batch.live"; then
  cat "$batch" >> "$spool/queue"
  rm -f "$batch" "$batch.live"
  exit 1
fi
rm -f "$batch" "$batch.live"
