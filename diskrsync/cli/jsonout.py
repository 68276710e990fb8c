"""``--json``: the one schema every command's object follows, the printer, and a validator.

The schema is data (``COMMANDS``, ``ENVELOPE``, ``ERROR``): ``scripts/docgen.py json`` makes
docs/json.md from it, and tests/test_json.py checks each command's real output against it
with ``check``, so the documented fields and the printed ones cannot drift apart. A field a
command prints but the schema does not list fails that test.

Compatibility: within one ``version``, fields are only added (a reader must ignore unknown
ones); a field removed, renamed or changed in meaning raises ``VERSION``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from diskrsync.base.errors import EXIT_CODES

#: Raised when a field is removed, renamed or changes meaning (adding one does not).
VERSION = 1

#: The most entries a list that grows with the disk holds (``differing_ranges``,
#: ``read_errors``, ``bad_chunks`` ...): the first ``CAP``, in order; ``NAME_total`` counts all.
CAP = 1000


@dataclass(frozen=True)
class Field:
    """One member of an object.

    ``type`` is ``integer``, ``number``, ``string``, ``boolean``, ``range`` (``[offset,
    length]``, two integers), ``object`` (with ``fields``; without: free-form), ``array of T``
    or ``T or null``."""

    name: str
    type: str
    doc: str
    fields: tuple[Field, ...] = ()
    optional: bool = False  # may be absent (see its doc for when)


def _capped(name: str, type_: str, doc: str, fields: tuple[Field, ...] = ()) -> tuple[Field, ...]:
    return (Field(name, f"array of {type_}", f"{doc} (the first {CAP})", fields),
            Field(f"{name}_total", "integer", f"how many `{name}` there are in all"))


def _timing(what: str) -> tuple[Field, ...]:
    return (Field("started", "number", f"when the {what} started (Unix time, seconds)"),
            Field("duration", "number", f"how long the {what} took (seconds)"))


ENVELOPE: tuple[Field, ...] = (
    Field("version", "integer", f"the schema version, {VERSION} (see Compatibility)"),
    Field("command", "string or null", "the command (`push`, `info` ...); null when the "
                                       "command line could not be parsed"),
)

ERROR = Field("error", "object", "present only when the command failed: nothing else "
              "but the envelope is printed then", (
                  Field("category", "string", "who is at fault: `usage`, `local`, `busy`, "
                        "`peer`, `data`, `interrupted`, `terminated` or `error`"),
                  Field("exit_code", "integer", "the command's exit status (the table below)"),
                  Field("message", "string", "the one-line message also printed on stderr"),
              ))

# measured where this process is the source: absent in a pull and a --legacy push
_PHASES = (
    Field("connect", "number", "opening both ends until the target is ready (SSH included)",
          optional=True),
    Field("compare", "number", "reading, hashing and comparing SRC against the target, "
                               "sending what differs as it is found", optional=True),
    Field("drain", "number", "waiting for the last chunks to be sent and stored",
          optional=True),
    Field("commit", "number", "the target checking the root and committing", optional=True),
)

# what the target end reports (an older diskrsync serve or a Go one reports nothing)
_TARGET = (
    Field("path", "string", "the file or device written", optional=True),
    Field("chunks_written", "integer", "chunks the target stored (0 in a dry run)",
          optional=True),
    Field("commit_seconds", "number", "how long the target's commit took (fsyncs "
                                      "included)", optional=True),
)

COMMANDS: dict[str, tuple[Field, ...]] = {
    "push": (
        Field("src", "string", "SRC as given"),
        Field("dst", "string", "DST as given"),
        *_timing("push"),
        Field("size", "integer", "bytes of SRC"),
        Field("chunk_size", "integer", "chunk size of the target, bytes"),
        Field("bytes_read", "integer", "bytes read from SRC"),
        Field("bytes_hashed", "integer", "bytes hashed (zero chunks are not)"),
        Field("bytes_sent", "integer", "bytes on the wire, source to target"),
        Field("bytes_received", "integer", "bytes on the wire, target to source"),
        Field("chunks", "integer", "chunks of SRC"),
        Field("chunks_differing", "integer", "chunks that differed (were sent, or would be "
                                             "in a dry run)"),
        Field("chunk_bytes_differing", "integer", "bytes of those chunks before compression"),
        Field("zero_chunks", "integer", "chunks of SRC that are all zeros (stored as nothing)"),
        Field("pages_compared", "integer", "index pages (runs of chunks) compared by hash"),
        Field("pages_differing", "integer", "index pages whose chunks were then compared"),
        Field("root_hash", "string", "hex BLAKE3 root of SRC (what the target now holds)"),
        Field("target_root_hash", "string", "hex root the target held before (dry run: "
                                            "holds)"),
        Field("generation", "integer or null", "the generation committed; null: a raw "
                                               "target or a dry run"),
        Field("resumed", "boolean", "the push resumed an interrupted one's checkpoint"),
        Field("created", "boolean", "the target was created by this push (its first "
                                    "generation, or a new raw file)"),
        Field("unchanged", "boolean", "the content equalled the newest generation's: no new "
                                      "generation, that one recorded the run (`generation` "
                                      "is its number)"),
        Field("pruned", "array of integer", "the generations this push's commit pruned"),
        Field("shrunk_from", "integer or null", "the target's previous size when SRC is "
                                                "smaller (a warning); null otherwise"),
        Field("map", "string", "what narrowed the scan: `full`, `sparse`, `free-blocks`, a "
                               "map of changed ranges such as `dirty-bitmap`, joined with `+`"),
        Field("map_fallback", "string", "why a map of changed ranges was not used (a full "
                                        "scan instead; empty when it was, or there was none)"),
        Field("chunk_size_ignored", "boolean", "`--chunk-size` was given for an existing "
                                               "image with another chunk size (a warning)"),
        Field("dry_run", "boolean", "`--dry-run`: nothing was written"),
        *_capped("differing_ranges", "range", "byte ranges of SRC that differed, merged"),
        *_capped("source_changed_chunks", "integer", "chunks that changed while the push "
                                                     "read them (exit status 10)"),
        *_capped("read_errors", "range", "unreadable byte ranges stored as zeros "
                                         "(`--ignore-read-errors`, exit status 11)"),
        Field("warnings", "array of string", "the warnings also printed on stderr"),
        Field("phases", "object", "seconds spent in each phase of the push, as the source "
                                  "end saw them", _PHASES),
        Field("target", "object", "what the target end reported", _TARGET),
    ),
    "info": (
        Field("path", "string", "the image"),
        Field("format", "string", "`diskrsync image v1`, `diskrsync image v2 (encrypted)` or "
                                  "`SPGZ0001 (Go diskrsync)`"),
        Field("encryption", "object", "an encrypted image only", (
            Field("key_id", "string", "the key's public id (hex)"),
            Field("cipher", "string", "`aes-256-gcm` or `chacha20-poly1305`"),
            Field("key_in_image", "boolean", "the wrapped key is kept in the image (else "
                                             "only in a key file)"),
            Field("unlocked", "boolean", "the key was given: sources, times and metadata "
                                         "below are the client's sealed ones; without it "
                                         "sources read `(encrypted)`"),
        ), optional=True),
        Field("size", "integer", "bytes of the newest generation"),
        Field("chunk_size", "integer", "bytes per chunk"),
        Field("fanout", "integer", "entries per index page", optional=True),
        Field("stored_bytes", "integer", "bytes of stored (compressed) chunks"),
        Field("allocated_bytes", "integer", "bytes the file occupies on disk"),
        Field("file_size", "integer", "the file's apparent size"),
        Field("checkpoint", "boolean", "an interrupted push left a checkpoint the next "
                                       "resumes from", optional=True),
        Field("ratio", "number or null", "stored_bytes / size; null when size is 0"),
        Field("generations", "array of object", "oldest first", (
            Field("number", "integer", "generation number"),
            Field("time", "number", "commit time (Unix time, seconds)"),
            Field("size", "integer", "bytes"),
            Field("root_hash", "string", "hex BLAKE3 root (empty for SPGZ0001)"),
            Field("source", "string", "what was pushed (path or label)"),
            Field("meta", "object", "what the push recorded about itself (e.g. "
                                    "`source_changed_chunks`, `read_errors`): free-form, "
                                    "present only when there is something", optional=True),
        )),
    ),
    "verify": (
        Field("path", "string", "the image"),
        Field("generation", "integer or null", "`--generation`: the one checked; null: all"),
        *_timing("verify"),
        Field("ok", "boolean", "no problem and no bad chunk (exit status 0 or 12)"),
        *_capped("problems", "string", "damaged metadata, in words"),
        Field("warnings", "array of string", "redundancy lost, still fully readable (exit "
                                             "status 12)"),
        *_capped("bad_chunks", "object", "stored chunks failing their hash", (
            Field("chunk", "integer", "chunk index"),
            Field("offset", "integer", "byte offset of the chunk in the disk"),
            Field("problem", "string", "what is wrong"),
            Field("generation", "integer", "the first generation using it (images only)",
                  optional=True),
            Field("generations", "array of integer", "every retained generation using it "
                                                     "(images only)", optional=True),
        )),
        Field("chunks_checked", "integer", "stored chunks read and checked"),
        Field("contents_checked", "boolean", "chunk contents were decoded and hash-checked "
                                             "(false: an encrypted image checked without its "
                                             "key, structure and sizes only)"),
        Field("repaired", "array of string", "what `--repair` rewrote (empty without it)"),
    ),
    "restore": (
        Field("image", "string", "the image"),
        Field("generation", "integer", "the generation restored"),
        Field("dest", "string", "DEST as given"),
        Field("size", "integer", "bytes written (the generation's size)"),
        *_timing("restore"),
    ),
    "prune": (
        Field("image", "string", "the image"),
        Field("rules", "string", "the retention rules applied (`--keep-last 2 --keep-daily 7` "
                                 "...)"),
        Field("dry_run", "boolean", "`--dry-run`: nothing was pruned; `pruned` is what would "
                                    "go"),
        Field("pruned", "array of integer", "the generations removed, oldest first"),
        Field("kept", "array of integer", "the generations left, oldest first"),
        *_timing("prune"),
    ),
    "copy": (
        Field("src", "string", "SRC as given (an image or `REPO#DISK`)"),
        Field("dst", "string", "DST as given (`REPO#DISK`)"),
        Field("copied", "array of integer", "the destination's numbers of the generations "
                                            "written, oldest first"),
        Field("skipped", "integer", "generations the destination held already (copied "
                                    "before)"),
        Field("bytes_sent", "integer", "stored bytes written to the destination (what it "
                                       "lacked)"),
        *_timing("copy"),
    ),
    "convert": (
        Field("old", "string", "the SPGZ0001 file (or, with `--encrypt`, image) read"),
        Field("new", "string", "the image written"),
        Field("generation", "integer", "the (newest) generation committed"),
        Field("generations", "integer", "generations written (`--encrypt` copies every "
                                        "retained one)", optional=True),
        Field("encrypted", "boolean", "`--encrypt`: the new image is encrypted",
              optional=True),
        Field("size", "integer", "bytes"),
        Field("chunk_size", "integer", "chunk size of the new image"),
        *_timing("conversion"),
    ),
}

#: The objects of info, verify and prune on a repository location (they have `repository`
#: where the image's have `path` or `image`); restore's is the image's (`image` = REPO#DISK).
_REPO = (Field("repository", "string", "the repository's store (`s3://BUCKET/PREFIX` or a "
                                       "directory)"),
         Field("disk", "string or null", "the disk named with `#DISK`; null: every disk"))
_COUNTS = tuple(
    field for what, doc in (
        ("repacked", "partly used packs rewritten (their live blobs moved)"),
        ("condemned", "packs nothing references any more, condemned by this run"),
        ("deleted", "packs condemned by an earlier prune, deleted now"),
        ("waiting", "condemned packs left for the grace period or a reader"))
    for field in (Field(f"{what}_packs", "integer", doc),
                  Field(f"{what}_bytes", "integer", "the bytes of those packs")))
REPOSITORY: dict[str, tuple[Field, ...]] = {
    "info": (
        *_REPO,
        Field("id", "string", "the repository's id (hex)"),
        Field("chunk_size", "integer", "bytes per chunk, every disk's"),
        Field("pack_size", "integer", "the pack size target"),
        Field("encrypted", "boolean", "an encrypted repository"),
        Field("disks", "array of object", "by name", (
            Field("name", "string", "the disk"),
            Field("generations", "array of object", "oldest first", (
                Field("number", "integer", "generation number"),
                Field("time", "number", "commit time (Unix time, seconds)"),
                Field("size", "integer", "bytes"),
                Field("root_hash", "string", "hex BLAKE3 root"),
                Field("source", "string", "what was pushed (path or label)"),
                Field("meta", "object", "what the push or copy recorded (free-form)"),
            )),
        )),
        Field("packs", "integer", "pack objects in the store"),
        Field("stored_bytes", "integer", "bytes the packs occupy"),
        Field("logical_bytes", "integer", "bytes of the non-zero chunks of every generation "
                                          "of every disk, as if each were stored alone"),
        Field("ratio", "number or null", "logical_bytes / stored_bytes (what dedup and "
                                         "compression save); null when nothing is stored"),
    ),
    "verify": (
        *_REPO,
        *_timing("verify"),
        Field("ok", "boolean", "every generation readable and every blob good"),
        Field("generations", "integer", "generations checked"),
        Field("packs", "integer", "packs read"),
        Field("blobs", "integer", "blobs checked"),
        *_capped("affected", "object", "generations that need a missing or damaged object", (
            Field("disk", "string", "the disk"),
            Field("generation", "integer", "the generation"),
            Field("problems", "array of string", "what is wrong, naming packs and blobs"),
        )),
    ),
    "prune": (
        *_REPO,
        Field("rules", "string", "the retention rules applied, to each disk on its own"),
        Field("dry_run", "boolean", "`--dry-run`: nothing was changed; the rest is what "
                                    "would be"),
        Field("pruned", "object", "disk name -> the generations removed, oldest first"),
        Field("kept", "object", "disk name -> the generations left, oldest first"),
        *_COUNTS,
        *_timing("prune"),
    ),
}


def cap(out: dict[str, Any], name: str) -> None:
    """Bound list ``name`` of ``out`` to ``CAP`` entries and count them in ``name_total``."""
    items = out[name]
    out[name] = list(items[:CAP])
    out[f"{name}_total"] = len(items)


def envelope(command: str | None, fields: dict[str, Any]) -> dict[str, Any]:
    return {"version": VERSION, "command": command, **fields}


def emit(command: str, fields: dict[str, Any]) -> None:
    """Print ``command``'s object on stdout: the only thing ``--json`` prints there."""
    print(json.dumps(envelope(command, fields), indent=2))


def emit_error(command: str | None, category: str, exit_code: int, message: str) -> None:
    """Print the object of a failed command (``cli/main._run`` calls it)."""
    error = {"category": category, "exit_code": exit_code, "message": message}
    try:
        print(json.dumps(envelope(command, {"error": error}), indent=2))
        sys.stdout.flush()
    except OSError:
        pass  # stdout itself is what failed: the message on stderr has to do


# -- validation (tests/test_json.py) ---------------------------------------------------------


def _check_value(value: Any, type_: str, fields: Sequence[Field], where: str) -> list[str]:
    if type_.endswith(" or null"):
        if value is None:
            return []
        type_ = type_.removesuffix(" or null")
    if type_.startswith("array of "):
        if not isinstance(value, list):
            return [f"{where}: not an array"]
        if len(value) > CAP:
            return [f"{where}: {len(value)} entries, more than {CAP}"]
        return [p for i, v in enumerate(value)
                for p in _check_value(v, type_.removeprefix("array of "), fields,
                                      f"{where}[{i}]")]
    ok = {
        "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
        "string": lambda v: isinstance(v, str),
        "boolean": lambda v: isinstance(v, bool),
        "range": lambda v: isinstance(v, list) and len(v) == 2
        and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v),
        "object": lambda v: isinstance(v, dict),
    }[type_](value)
    if not ok:
        return [f"{where}: {value!r} is not {type_}"]
    if type_ == "object" and fields:
        return check_object(value, fields, where)
    return []


def check_object(obj: dict[str, Any], fields: Sequence[Field], where: str = "") -> list[str]:
    """What is wrong with ``obj`` against ``fields``: undocumented, missing or mistyped
    members (an empty list: nothing)."""
    problems = [f"{where}.{k}: not in the schema" for k in obj
                if k not in {f.name for f in fields}]
    for f in fields:
        if f.name not in obj:
            if not f.optional:
                problems.append(f"{where}.{f.name}: missing")
            continue
        problems += _check_value(obj[f.name], f.type, f.fields, f"{where}.{f.name}")
    return problems


def check(obj: dict[str, Any]) -> list[str]:
    """What is wrong with one printed ``--json`` object."""
    if obj.get("version") != VERSION:
        return [f"version is {obj.get('version')!r}, not {VERSION}"]
    if "error" in obj:
        problems = check_object(obj, (*ENVELOPE, ERROR))
        if obj["error"].get("exit_code") not in {code for code, _ in EXIT_CODES}:
            problems.append("error.exit_code: not a documented exit status")
        return problems
    command = obj.get("command")
    if command not in COMMANDS:
        return [f"command {command!r} has no schema"]
    fields = REPOSITORY[command] if "repository" in obj and command in REPOSITORY \
        else COMMANDS[command]
    return check_object(obj, (*ENVELOPE, *fields))
