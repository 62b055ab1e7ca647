#!/bin/sh
# Push what examples/post-build-hook.sh queued. Run by nixcache-spool.service (started by
# nixcache-spool.path when the queue changes, and hourly by nixcache-spool.timer), or cron.
#
# It never drops a queued path it did not push: the queue is moved into a batch, and the
# batch is removed only after the push succeeded. A failed push keeps the batch for the next
# run (with what is queued meanwhile) and exits non-zero; a killed run leaves it too. Only
# paths garbage-collected since they were built are dropped, with a line saying how many.
# A queued .drv stands for its outputs: nixcache reads the Nix database itself
# (--include-outputs), so this works as the units' unprivileged user, with no daemon.
#
# Usage: push-spool.sh DEST [nixcache push options...]
# Environment: NIXCACHE_SPOOL (default /var/spool/nixcache), NIXCACHE (default nixcache).
set -eu
[ $# -ge 1 ] || { echo "usage: $0 DEST [nixcache push options...]" >&2; exit 2; }
spool=${NIXCACHE_SPOOL:-/var/spool/nixcache}
nixcache=${NIXCACHE:-nixcache}
dest=$1
shift
if [ ! -d "$spool" ]; then
  echo "push-spool.sh: the spool $spool does not exist: make it, writable by this user, and point the post-build hook at it (NIXCACHE_SPOOL)" >&2
  exit 1
fi
# One drain at a time: a second one would push the same batch.
exec 9>>"$spool/.lock"
if ! flock -n 9; then
  echo "push-spool.sh: another drain of $spool is running; it pushes what is queued" >&2
  exit 0
fi
batch=$spool/batch
# A run killed while taking the queue left it here: it joins the batch first.
if [ -e "$spool/queue.taken" ]; then
  cat "$spool/queue.taken" >> "$batch"
  rm -f "$spool/queue.taken"
fi
# Builds that finish meanwhile queue into a new file.
if [ -e "$spool/queue" ]; then
  mv "$spool/queue" "$spool/queue.taken"
  cat "$spool/queue.taken" >> "$batch"
  rm -f "$spool/queue.taken"
fi
[ -s "$batch" ] || { rm -f "$batch"; exit 0; }
live=$spool/batch.live
: > "$live"
gone=0
while IFS= read -r p; do
  case $p in '' | '#'*) continue ;; esac
  if [ -e "$p" ]; then echo "$p" >> "$live"; else gone=$((gone + 1)); fi
done < "$batch"
if [ "$gone" -gt 0 ]; then
  echo "push-spool.sh: not pushed, no longer in the store (garbage-collected since they were built): $gone of the queued paths" >&2
fi
if [ -s "$live" ]; then
  if ! sort -u "$live" | "$nixcache" push --stdin --include-outputs --dest "$dest" "$@"; then
    rm -f "$live"
    echo "push-spool.sh: the push failed; the batch stays in $batch for the next run ($(wc -l < "$batch") lines)" >&2
    exit 1
  fi
fi
rm -f "$live" "$batch"
