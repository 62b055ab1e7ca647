#!/bin/sh
# Mirror a nixcache directory to another place (a Pi over ssh, a USB disk) so that a client
# reading the copy never sees a narinfo before its NAR, nor a narinfo whose NAR or
# references are gone:
#   1. everything but narinfos (NARs, listings, debug info, nix-cache-info, the records of
#      what a partial cache leaves to upstreams), adding only;
#   2. the narinfos;
#   3. deletions: narinfos gone from the source, referrers before their references (in
#      layers, as `nixcache gc` removes them), then the NARs and the rest nothing uses.
# The source's lock is held shared throughout, so a push or gc there waits until the copy
# is whole (and this waits for one under way). Times are kept (-a), so `nixcache gc` on
# either side reads the same push record.
#
# Usage: rsync-cache.sh SRC DEST   (SRC a local cache; DEST: /media/usb/nix-cache or
#                                   pi@pi.local:/srv/nix-cache)
# Extra rsync options (e.g. --bwlimit=2m for a slow home link) go in $RSYNC_OPTS.
# Needs rsync, flock (util-linux) and awk.
set -eu
[ $# -eq 2 ] || { echo "usage: $0 SRC DEST" >&2; exit 2; }
src=${1%/}/
dest=${2%/}/
RSYNC_OPTS=${RSYNC_OPTS:-}

# shellcheck disable=SC2086 # RSYNC_OPTS is a list of options
# The lock and temporary files stay behind; .nixcache/ (a partial cache's upstreams records)
# goes with step 1, before the narinfos that rely on it.
r() { rsync -a $RSYNC_OPTS --exclude='/.nixcache.lock' --exclude='.nixcache-tmp-*' "$@"; }

# nixcache takes flock(2) locks on SRC/.nixcache.lock: hold it shared.
if [ -f "${src}.nixcache.lock" ]; then
  exec 9<"${src}.nixcache.lock"
  flock -s 9
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# 1. NARs and everything else a narinfo may point at.
r --exclude='/*.narinfo' "$src" "$dest"
# 2. narinfos, now that what they name is there.
r --include='/*.narinfo' --exclude='*' "$src" "$dest"
# 3a. narinfos gone from the source: fetch the mirror's copies to learn their References,
# then delete them a layer at a time, those no other stale narinfo references first.
r --dry-run --delete --include='/*.narinfo' --exclude='*' --out-format='%o %n' "$src" "$dest" \
  | awk '$1 == "del." && $2 ~ /\.narinfo$/ { print $2 }' > "$work/stale"
if [ -s "$work/stale" ]; then
  mkdir "$work/copies"
  rsync -a --files-from="$work/stale" "$dest" "$work/copies/"
  while [ -s "$work/stale" ]; do
    # A layer: stale narinfos that no remaining stale narinfo references.
    (cd "$work/copies" && awk '
      FNR == 1 { file = FILENAME; stale[file] = 1 }
      /^References: / { for (i = 2; i <= NF; i++) refs[file] = refs[file] " " substr($i, 1, 32) ".narinfo" }
      END {
        for (f in stale) { n = split(refs[f], rs, " "); for (i = 1; i <= n; i++) if (rs[i] != f) referenced[rs[i]] = 1 }
        for (f in stale) if (!(f in referenced)) print f
      }' $(cat "$work/stale")) > "$work/layer"
    [ -s "$work/layer" ] || { echo "$0: a cycle among stale narinfos" >&2; exit 1; }
    r --delete-missing-args --files-from="$work/layer" "$src" "$dest"
    (cd "$work/copies" && xargs rm -f < "$work/layer")
    grep -vxFf "$work/layer" "$work/stale" > "$work/rest" || true
    mv "$work/rest" "$work/stale"
  done
fi
# 3b. then NARs and the rest that nothing uses any more.
r --delete "$src" "$dest"
