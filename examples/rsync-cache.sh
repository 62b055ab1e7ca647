#!/bin/sh
# Mirror a nixcache directory to another place (a Pi over ssh, a USB disk) so that a client
# reading the copy never sees a narinfo before its NAR, nor a narinfo whose NAR or
# references are gone:
#   1. everything but narinfos (NARs, listings, debug info, nix-cache-info), adding only;
#   2. the narinfos;
#   3. deletions: narinfos first, then the NARs they used.
# Times are kept (-a), so `nixcache gc` on either side reads the same push record.
#
# Usage: rsync-cache.sh SRC DEST   (DEST: /media/usb/nix-cache or pi@pi.local:/srv/nix-cache)
# Extra rsync options (e.g. --bwlimit=2m for a slow home link) go in $RSYNC_OPTS.
set -eu
[ $# -eq 2 ] || { echo "usage: $0 SRC DEST" >&2; exit 2; }
src=${1%/}/
dest=${2%/}/
# shellcheck disable=SC2086 # RSYNC_OPTS is a list of options
r() { rsync -a $RSYNC_OPTS --exclude='/.nixcache*' --exclude='.nixcache-tmp-*' "$@"; }
RSYNC_OPTS=${RSYNC_OPTS:-}

# 1. NARs and everything else a narinfo may point at.
r --exclude='/*.narinfo' "$src" "$dest"
# 2. narinfos, now that what they name is there.
r --include='/*.narinfo' --exclude='*' "$src" "$dest"
# 3a. narinfos gone from the source (excluded files are not deleted).
r --delete --include='/*.narinfo' --exclude='*' "$src" "$dest"
# 3b. then NARs and the rest that nothing uses any more.
r --delete "$src" "$dest"
