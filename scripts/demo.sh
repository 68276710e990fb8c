#!/usr/bin/env bash
# The main job on a built-in sample: build a small GPT disk with an ext4 partition, back it up
# into an image, change a file on the disk, back it up again (only the changed chunks move),
# mount the backup, loop-mount the partition from it and read the file back. Needs root (loop
# devices, mount) and /dev/fuse. Everything lives in demo-work/ and is cleaned up on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
DISKRSYNC="$PWD/.venv/bin/diskrsync"
WORK="$PWD/demo-work"
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

cleanup() {
    set +e
    mountpoint -q "$WORK/files" && umount "$WORK/files"
    [ -n "${LOOP_RW:-}" ] && losetup -d "$LOOP_RW" 2>/dev/null
    mountpoint -q "$WORK/edit" && umount "$WORK/edit"
    [ -n "${LOOP_RO:-}" ] && losetup -d "$LOOP_RO" 2>/dev/null
    mountpoint -q "$WORK/mnt" && "$DISKRSYNC" umount "$WORK/mnt"
}
trap cleanup EXIT

rm -rf "$WORK"
mkdir -p "$WORK/content" "$WORK/mnt" "$WORK/files" "$WORK/edit"

step "Building a 256 MiB sample disk: GPT, one ext4 partition with some files"
seq 1 200000 > "$WORK/content/numbers.txt"
head -c 20M /dev/urandom > "$WORK/content/random.bin"
echo "hello from the first backup" > "$WORK/content/note.txt"
truncate -s 256M "$WORK/disk.img"
sgdisk -o -n 1:2048:0 -c 1:data -t 1:8300 "$WORK/disk.img" >/dev/null
START=$((2048 * 512))
SIZE=$(( $(stat -c %s "$WORK/disk.img") - START - 34 * 512 ))
truncate -s "$SIZE" "$WORK/part.img"
mkfs.ext4 -q -F -L data -d "$WORK/content" "$WORK/part.img"
dd if="$WORK/part.img" of="$WORK/disk.img" bs=1M seek="$START" oflag=seek_bytes \
    conv=notrunc,sparse status=none
rm "$WORK/part.img"

step "First backup: diskrsync push disk.img backup.spgz"
"$DISKRSYNC" push "$WORK/disk.img" "$WORK/backup.spgz"

step "Changing one file on the disk"
LOOP_RW=$(losetup -f --show -o "$START" --sizelimit "$SIZE" "$WORK/disk.img")
mount "$LOOP_RW" "$WORK/edit"
echo "hello from the second backup, $(date -u)" > "$WORK/edit/note.txt"
umount "$WORK/edit"
losetup -d "$LOOP_RW"; LOOP_RW=""

step "Second backup: only the changed chunks travel"
"$DISKRSYNC" push "$WORK/disk.img" "$WORK/backup.spgz"
"$DISKRSYNC" info "$WORK/backup.spgz"

step "Mounting the backup: diskrsync mount backup.spgz mnt"
"$DISKRSYNC" mount "$WORK/backup.spgz" "$WORK/mnt"
ls -l "$WORK/mnt" "$WORK/mnt/partitions" "$WORK/mnt/generations"

step "Loop-mounting partition 1 from the backup and reading the file"
LOOP_RO=$(losetup -f --show -r "$WORK/mnt/partitions/p1")
mount -o ro "$LOOP_RO" "$WORK/files"
echo "note.txt in the backup says: $(cat "$WORK/files/note.txt")"
cmp "$WORK/files/random.bin" "$WORK/content/random.bin"
echo "random.bin in the backup is identical to the original"
umount "$WORK/files"
losetup -d "$LOOP_RO"; LOOP_RO=""
"$DISKRSYNC" umount "$WORK/mnt"

step "Verifying the backup"
"$DISKRSYNC" verify "$WORK/backup.spgz"
echo
echo "Done. The sample disk and its backup are in demo-work/ (make clean removes them)."
