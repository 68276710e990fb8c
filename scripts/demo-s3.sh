#!/usr/bin/env bash
# The object-storage demo: start a private S3 service (OpenStack Swift with s3api, as the
# tests do), push a sample disk into a deduplicating repository in it, push a clone of the
# disk as a second disk (which costs almost nothing), mount a disk from the bucket with a
# local blob cache, restore one file from a loop-mounted partition, then copy the disk to a
# local repository (the offsite copy) and verify it. Needs root (loop devices, mount),
# /dev/fuse and Swift (scripts/setup.sh installs it). Everything lives in demo-work-s3/.
set -euo pipefail
cd "$(dirname "$0")/.."
DISKRSYNC="$PWD/.venv/bin/diskrsync"
WORK="$PWD/demo-work-s3"
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

cleanup() {
    set +e
    mountpoint -q "$WORK/files" && umount "$WORK/files"
    [ -n "${LOOP_RO:-}" ] && losetup -d "$LOOP_RO" 2>/dev/null
    mountpoint -q "$WORK/mnt" && "$DISKRSYNC" umount "$WORK/mnt"
    [ -n "${SWIFT_PID:-}" ] && kill "$SWIFT_PID" 2>/dev/null && wait "$SWIFT_PID" 2>/dev/null
}
trap cleanup EXIT

rm -rf "$WORK"
mkdir -p "$WORK/content" "$WORK/mnt" "$WORK/files" "$WORK/swift"

step "Starting a private S3 service (OpenStack Swift + s3api on 127.0.0.1)"
# tests/support/swift.py's server, kept up until this script ends (SIGTERM stops it cleanly)
PYTHONSAFEPATH=1 "$PWD/.venv/bin/python" - "$WORK/swift" > "$WORK/endpoint" <<'PY' &
import signal, sys
from pathlib import Path
sys.path.insert(0, "tests")
from support.swift import SwiftServer
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
with SwiftServer(Path(sys.argv[1])) as srv:
    srv.new_bucket("backups")
    print(srv.endpoint, flush=True)
    signal.pause()
PY
SWIFT_PID=$!
for _ in $(seq 1 300); do [ -s "$WORK/endpoint" ] && break; sleep 0.1; done
[ -s "$WORK/endpoint" ] || { echo "Swift did not start (see $WORK/swift/log)"; exit 1; }
# the way every AWS tool is pointed at a service: credentials, region and endpoint
export AWS_ENDPOINT_URL="$(cat "$WORK/endpoint")" AWS_ACCESS_KEY_ID=test:tester \
    AWS_SECRET_ACCESS_KEY=testing AWS_DEFAULT_REGION=us-east-1
echo "S3 endpoint $AWS_ENDPOINT_URL, bucket 'backups'"

step "Building a 256 MiB sample disk: GPT, one ext4 partition with some files"
seq 1 200000 > "$WORK/content/numbers.txt"
head -c 20M /dev/urandom > "$WORK/content/random.bin"
echo "hello from the object store" > "$WORK/content/note.txt"
truncate -s 256M "$WORK/disk.img"
sgdisk -o -n 1:2048:0 -c 1:data -t 1:8300 "$WORK/disk.img" >/dev/null
mkfs.ext4 -q -F -L data -d "$WORK/content" -E offset=1048576 "$WORK/disk.img" 200M

step "Pushing it into the repository s3://backups/fleet as disk vm1"
"$DISKRSYNC" push "$WORK/disk.img" "s3://backups/fleet#vm1"

step "A clone of it as disk vm2: stores only the block that differs"
cp --sparse=always "$WORK/disk.img" "$WORK/clone.img"
echo "the clone differs in one block" | dd of="$WORK/clone.img" bs=1 seek=$((200 << 20)) \
    conv=notrunc status=none
"$DISKRSYNC" push "$WORK/clone.img" "s3://backups/fleet#vm2"
"$DISKRSYNC" info s3://backups/fleet

step "Mounting vm1 from the bucket, blobs cached in cache/"
"$DISKRSYNC" mount "s3://backups/fleet#vm1" "$WORK/mnt" --cache-dir "$WORK/cache"
ls -l "$WORK/mnt" "$WORK/mnt/partitions"

step "Restoring one file from a loop-mounted partition of the mount"
LOOP_RO=$(losetup -f --show -r "$WORK/mnt/partitions/p1")
mount -o ro "$LOOP_RO" "$WORK/files"
cp "$WORK/files/note.txt" "$WORK/note-restored.txt"
echo "note.txt restored from S3 says: $(cat "$WORK/note-restored.txt")"
cmp "$WORK/files/random.bin" "$WORK/content/random.bin"
echo "random.bin in the backup is identical to the original"
umount "$WORK/files"
losetup -d "$LOOP_RO"; LOOP_RO=""
"$DISKRSYNC" umount "$WORK/mnt"
echo "blob cache: $(du -sh "$WORK/cache" | cut -f1)"

step "The offsite copy: vm1 with its generations into a local repository, then verify"
"$DISKRSYNC" copy "s3://backups/fleet#vm1" "repo:$WORK/offsite#vm1"
"$DISKRSYNC" verify "repo:$WORK/offsite"
"$DISKRSYNC" verify s3://backups/fleet
echo
echo "Done. The sample disks and the local repository are in demo-work-s3/."
