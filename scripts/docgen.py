"""Shell completion, man page and CLI reference, generated from the CLI's own parser.

    .venv/bin/python scripts/docgen.py {bash,zsh,man,markdown,json}

prints one of them on stdout; ``make docs`` writes them to ``contrib/completion/``,
``contrib/diskrsync.1``, ``docs/cli.md`` and ``docs/json.md`` (from the ``--json`` schema in
``diskrsync/cli/jsonout.py``), and ``tests/test_docs.py`` fails when a committed
copy differs from what this module makes of the current parser. The output depends only on
``build_parser()`` and the tables below (no dates), so regenerating is idempotent. A development
tool, not installed with diskrsync: it imports the installed package (run it with the venv's
python).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from diskrsync import __version__
from diskrsync.base import errors
from diskrsync.cli import jsonout
from diskrsync.cli.main import build_parser

PROG = "diskrsync"

# Exit statuses, in order: base/errors.py's table, so they cannot drift.
EXIT_CODES = list(errors.EXIT_CODES)

ENVIRONMENT: list[tuple[str, str]] = [
    ("DISKRSYNC_SSH_KEEPALIVE", "INTERVAL,COUNT of the SSH keepalive watchdog (e.g. 15,4)"),
    ("SSH_AUTH_SOCK", "the ssh agent whose keys are tried"),
]

# How a positional argument or an option value is completed, by metavar.
FILE_METAVARS = {"IMAGE", "SRC", "DST", "DEST", "FILE", "PATH", "OLD.spgz", "NEW.spgz"}
DIR_METAVARS = {"MOUNTPOINT", "DIR"}


# What a positional argument is, when the parser gives it no help of its own.
POSITIONAL_HELP = {
    "IMAGE": "a diskrsync image (or a Go diskrsync SPGZ0001 file)",
    "DEST": "a file (written sparse), a block device, or - for stdout",
    "OLD.spgz": "the Go diskrsync SPGZ0001 file to read",
    "NEW.spgz": "the diskrsync image to create",
}


# -- a plain model of the parser -------------------------------------------------------


@dataclass
class Option:
    flags: list[str]  # long first (the preferred name first), then short
    metavar: str | None  # None: a flag without a value
    help: str
    group: str
    required: bool = False
    repeatable: bool = False
    choices: list[str] | None = None


@dataclass
class Positional:
    name: str
    help: str


@dataclass
class Command:
    name: str
    summary: str
    positionals: list[Positional] = field(default_factory=list)
    options: list[Option] = field(default_factory=list)


@dataclass
class Cli:
    description: str
    global_options: list[Option]
    commands: list[Command]


def _metavar(action: argparse.Action) -> str:
    mv = action.metavar
    if isinstance(mv, tuple):
        return " ".join(mv)
    return mv or action.dest.upper()


def _option(action: argparse.Action, group: str) -> Option:
    flags = sorted(action.option_strings, key=lambda f: not f.startswith("--"))  # stable
    takes_value = action.nargs != 0
    return Option(
        flags=flags,
        metavar=_metavar(action) if takes_value else None,
        help=(action.help or "").strip(),
        group=group,
        required=bool(action.required),
        repeatable=isinstance(action, argparse._AppendAction),
        choices=[str(c) for c in action.choices] if action.choices else None,
    )


def _visible(action: argparse.Action) -> bool:
    return action.help != argparse.SUPPRESS


def _group_title(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    for g in parser._action_groups:
        if action in g._group_actions:
            title = g.title or ""
            return "" if title in ("options", "optional arguments", "positional arguments") \
                else title
    return ""


def _command(name: str, summary: str, parser: argparse.ArgumentParser) -> Command:
    cmd = Command(name, summary)
    for action in parser._actions:
        if not _visible(action) or isinstance(action, argparse._HelpAction):
            continue
        if action.option_strings:
            cmd.options.append(_option(action, _group_title(parser, action)))
        else:
            name = _metavar(action)
            text = (action.help or "").strip() or POSITIONAL_HELP.get(name, "")
            cmd.positionals.append(Positional(name, text))
    return cmd


def model(parser: argparse.ArgumentParser | None = None) -> Cli:
    """The commands users can see (``serve`` is hidden) with their visible options."""
    parser = parser or build_parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    commands = []
    for choice in subs._choices_actions:
        commands.append(_command(choice.dest, (choice.help or "").strip(),
                                 subs.choices[choice.dest]))
    global_options = [
        _option(a, "") for a in parser._actions
        if a.option_strings and _visible(a) and a is not subs
    ]
    return Cli((parser.description or "").strip(), global_options, commands)


def _synopsis_parts(cmd: Command) -> list[str]:
    parts = []
    for o in cmd.options:
        if o.required:
            parts.append(f"{o.flags[0]} {o.metavar}" if o.metavar else o.flags[0])
    if any(not o.required for o in cmd.options):
        parts.append("[OPTIONS]")
    parts.extend(p.name for p in cmd.positionals)
    return parts


def _help_sentence(text: str) -> str:
    if not text:
        return ""
    return text[0].upper() + text[1:] + ("" if text.endswith(".") else ".")


def _option_help(o: Option) -> str:
    """The option's own help text, plus what the parser says but the text does not."""
    text = o.help.rstrip(".")
    notes = []
    if o.required:
        notes.append("required")
    if o.repeatable and "repeatable" not in text:
        notes.append("repeatable")
    if notes:
        text = f"{text} ({', '.join(notes)})" if text else ", ".join(notes)
    return text


# -- bash --------------------------------------------------------------------------------


def _bash_case_for_values(cli: Cli) -> list[str]:
    """Options whose value is a file, a directory, or free text (nothing offered)."""
    files: set[str] = set()
    dirs: set[str] = set()
    free: set[str] = set()
    for o in [*cli.global_options, *(o for c in cli.commands for o in c.options)]:
        if o.metavar is None:
            continue
        target = files if o.metavar in FILE_METAVARS else dirs if o.metavar in DIR_METAVARS \
            else free
        target.update(o.flags)
    lines = []
    if files:
        lines += [f"        {'|'.join(sorted(files))})",
                  "            _diskrsync_files; return ;;"]
    if dirs:
        lines += [f"        {'|'.join(sorted(dirs))})",
                  "            _diskrsync_dirs; return ;;"]
    if free:
        lines += [f"        {'|'.join(sorted(free))})", "            return ;;"]
    return lines


def _bash_completer(metavar: str) -> str:
    return "_diskrsync_dirs" if metavar in DIR_METAVARS else "_diskrsync_files"


def bash(cli: Cli) -> str:
    names = " ".join(c.name for c in cli.commands)
    glob = " ".join(f for o in cli.global_options for f in o.flags)
    out = [
        "# bash completion for diskrsync; generated by `scripts/docgen.py bash`,",
        "# do not edit. Install as /usr/share/bash-completion/completions/diskrsync.",
        "",
        "_diskrsync_files() {",
        "    compopt -o filenames 2>/dev/null",
        '    mapfile -t COMPREPLY < <(compgen -f -- "$cur")',
        "}",
        "",
        "_diskrsync_dirs() {",
        "    compopt -o filenames 2>/dev/null",
        '    mapfile -t COMPREPLY < <(compgen -d -- "$cur")',
        "}",
        "",
        "_diskrsync() {",
        "    local cur prev cmd at i n opts valopts",
        "    local -a positional",
        '    cur="${COMP_WORDS[COMP_CWORD]}"',
        '    prev="${COMP_WORDS[COMP_CWORD-1]}"',
        '    cmd=""',
        "    for ((at = 1; at < COMP_CWORD; at++)); do",
        '        case "${COMP_WORDS[at]}" in',
        "            -*) ;;",
        '            *) cmd="${COMP_WORDS[at]}"; break ;;',
        "        esac",
        "    done",
        '    case "$prev" in',
        *_bash_case_for_values(cli),
        "    esac",
        '    if [ -z "$cmd" ]; then',
        '        if [[ "$cur" == -* ]]; then',
        f'            mapfile -t COMPREPLY < <(compgen -W "{glob}" -- "$cur")',
        "        else",
        f'            mapfile -t COMPREPLY < <(compgen -W "{names}" -- "$cur")',
        "        fi",
        "        return",
        "    fi",
        '    case "$cmd" in',
    ]
    for c in cli.commands:
        opts = " ".join(f for o in c.options for f in o.flags)
        valopts = " ".join(f for o in c.options if o.metavar for f in o.flags)
        completers = " ".join(_bash_completer(p.name) for p in c.positionals)
        out += [
            f"        {c.name})",
            f'            opts="{opts} --help"',
            f'            valopts=" {valopts} "',
            f"            positional=({completers}) ;;",
        ]
    out += [
        "        *) return ;;",
        "    esac",
        '    if [[ "$cur" == -* ]]; then',
        '        mapfile -t COMPREPLY < <(compgen -W "$opts" -- "$cur")',
        "        return",
        "    fi",
        "    # which positional argument is being completed: count the words before it",
        "    n=0",
        "    for ((i = at + 1; i < COMP_CWORD; i++)); do",
        '        if [[ "$valopts" == *" ${COMP_WORDS[i]} "* ]]; then',
        "            ((i++))",
        '        elif [[ "${COMP_WORDS[i]}" != -* ]]; then',
        "            ((n++))",
        "        fi",
        "    done",
        '    if ((n < ${#positional[@]})); then',
        '        "${positional[n]}"',
        "    fi",
        "}",
        "",
        "complete -F _diskrsync diskrsync",
        "",
    ]
    return "\n".join(out)


# -- zsh ---------------------------------------------------------------------------------


def _zsh_quote(text: str) -> str:
    return text.replace("\\", "\\\\").replace("'", "'\\''").replace("[", "\\[").replace(
        "]", "\\]")


def _zsh_action(metavar: str | None) -> str:
    if metavar is None:
        return ""
    if metavar in FILE_METAVARS:
        return f":{metavar.lower()}:_files"
    if metavar in DIR_METAVARS:
        return f":{metavar.lower()}:_files -/"
    return f":{metavar.lower()}: "


def _zsh_spec(o: Option) -> str:
    desc = _zsh_quote(o.help)
    action = _zsh_action(o.metavar)
    if o.repeatable:
        prefix = "*"
    elif len(o.flags) > 1:
        prefix = "(" + " ".join(o.flags) + ")"
    else:
        prefix = ""
    if len(o.flags) > 1:
        names = "{" + ",".join(o.flags) + "}"
        return f"'{prefix}'{names}'[{desc}]{action}'"
    return f"'{prefix}{o.flags[0]}[{desc}]{action}'"


def zsh(cli: Cli) -> str:
    out = [
        "#compdef diskrsync",
        "# zsh completion for diskrsync; generated by `scripts/docgen.py zsh`,",
        "# do not edit. Install as _diskrsync in a directory of $fpath.",
        "",
        "_diskrsync_commands() {",
        "    local -a commands",
        "    commands=(",
    ]
    for c in cli.commands:
        out.append(f"        '{c.name}:{_zsh_quote(c.summary)}'")
    out += [
        "    )",
        "    _describe -t commands 'diskrsync command' commands",
        "}",
        "",
        "_diskrsync() {",
        "    local curcontext=\"$curcontext\" state line",
        "    typeset -A opt_args",
        "    _arguments -C \\",
    ]
    for o in cli.global_options:
        out.append(f"        {_zsh_spec(o)} \\")
    out += [
        "        '1: :_diskrsync_commands' \\",
        "        '*:: :->args'",
        "    case $state in",
        "        args)",
        "            case $words[1] in",
    ]
    for c in cli.commands:
        out.append(f"                {c.name})")
        out.append("                    _arguments \\")
        for o in c.options:
            out.append(f"                        {_zsh_spec(o)} \\")
        for i, p in enumerate(c.positionals, 1):
            action = _zsh_action(p.name)[len(p.name) + 2:] or " "
            out.append(f"                        '{i}:{p.name.lower()}:{action}' \\")
        out[-1] = out[-1].removesuffix(" \\")
        out.append("                    ;;")
    out += [
        "            esac",
        "            ;;",
        "    esac",
        "}",
        "",
        '_diskrsync "$@"',
        "",
    ]
    return "\n".join(out)


# -- man page (roff) ---------------------------------------------------------------------


def _roff(text: str) -> str:
    text = text.replace("\\", "\\e").replace("-", "\\-")
    # a line starting with . or ' would be a request
    return re.sub(r"^([.'])", r"\\&\1", text, flags=re.M)


def _roff_flags(o: Option) -> str:
    flags = ", ".join(f"\\fB{_roff(f)}\\fR" for f in o.flags)
    if o.metavar:
        flags += f" \\fI{_roff(o.metavar)}\\fR"
    return flags


def man(cli: Cli) -> str:
    out = [
        '.\\" Generated by `scripts/docgen.py man`; do not edit.',
        f'.TH DISKRSYNC 1 "" "diskrsync {__version__}" "User Commands"',
        ".SH NAME",
        f"diskrsync \\- {_roff(cli.description[0].lower() + cli.description[1:].rstrip('.'))}",
        ".SH SYNOPSIS",
    ]
    for c in cli.commands:
        out.append(f".B diskrsync {c.name}")
        out.append(" ".join(_roff(p) for p in _synopsis_parts(c)))
        out.append(".br")
    out[-1:] = []
    out += [
        ".SH DESCRIPTION",
        "diskrsync makes an image file (or a raw file or device) equal to a source disk, file "
        "or image, sending only the chunks that differ. Images are zstd-compressed, crash-safe "
        "and keep several generations; they can be verified, restored, pruned and mounted "
        "read-only. Either end of a push may be remote: write it as",
        ".IR [user@]host:path",
        "or",
        ".IR ssh://[user@]host[:port]/path ;",
        "diskrsync must be installed on the remote host too.",
        ".PP",
        "The source must not change while it is read: push a snapshot (LVM, libvirt, btrfs, "
        "ZFS) or a frozen or unmounted filesystem.",
        ".SH COMMANDS",
    ]
    for c in cli.commands:
        out.append(f".SS {c.name} {' '.join(_roff(p) for p in _synopsis_parts(c))}")
        out.append(_roff(_help_sentence(c.summary)))
        for p in c.positionals:
            if p.help:
                out += [".TP", f"\\fI{_roff(p.name)}\\fR", _roff(_help_sentence(p.help))]
        group = ""
        for o in c.options:
            if o.group and o.group != group:
                group = o.group
                out += [".PP", f"\\fI{_roff(_help_sentence(group).rstrip('.'))}:\\fR"]
            out += [".TP", _roff_flags(o), _roff(_option_help(o))]
    out += [".SH GLOBAL OPTIONS"]
    for o in cli.global_options:
        out += [".TP", _roff_flags(o), _roff(_option_help(o))]
    out += [".PP", "Every command takes \\fB\\-\\-help\\fR too."]
    out += [".SH EXIT STATUS"]
    for code, text in EXIT_CODES:
        out += [".TP", f"\\fB{code}\\fR", _roff(_help_sentence(text))]
    out += [".SH ENVIRONMENT"]
    for name, text in ENVIRONMENT:
        out += [".TP", f"\\fB{name}\\fR", _roff(_help_sentence(text))]
    out += [
        ".SH EXAMPLES",
        ".nf",
        _roff("diskrsync push /dev/vg0/snap /srv/backups/web1.spgz"),
        _roff("diskrsync push /dev/vg0/snap backup@vault:/srv/backups/web1.spgz"),
        _roff("diskrsync info /srv/backups/web1.spgz"),
        _roff("diskrsync mount /srv/backups/web1.spgz /mnt/raw"),
        _roff("mount -o loop,ro /mnt/raw/partitions/p1 /mnt/files"),
        _roff("diskrsync restore /srv/backups/web1.spgz /dev/sdb"),
        ".fi",
        ".SH SEE ALSO",
        "The user guide (docs/user-guide.md) and the CLI reference (docs/cli.md);",
        ".BR ssh (1),",
        ".BR lvcreate (8),",
        ".BR virsh (1),",
        ".BR losetup (8).",
        "",
    ]
    return "\n".join(out)


# -- markdown ----------------------------------------------------------------------------


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("<", "&lt;")


def markdown(cli: Cli) -> str:
    out = [
        "# diskrsync command line reference",
        "",
        "<!-- Generated by `scripts/docgen.py markdown` (`make docs`); do not edit. -->",
        "",
        f"{_help_sentence(cli.description)} Every command has `--help`; the",
        "[user guide](user-guide.md) shows them at work.",
        "",
        "SRC and DST of `push` may be remote: `[user@]host:path` or "
        "`ssh://[user@]host[:port]/path`.",
        "",
        "| command | what it does |",
        "|---|---|",
    ]
    for c in cli.commands:
        out.append(f"| [`{c.name}`](#{c.name}) | {_md(c.summary)} |")
    for c in cli.commands:
        out += ["", f"## {c.name}", "", "```", f"diskrsync {c.name} "
                + " ".join(_synopsis_parts(c)), "```", "", _md(_help_sentence(c.summary))]
        if c.positionals:
            out += ["", "| argument | meaning |", "|---|---|"]
            for p in c.positionals:
                out.append(f"| `{p.name}` | {_md(_help_sentence(p.help))} |")
        groups: list[str] = []
        for o in c.options:
            if o.group not in groups:
                groups.append(o.group)
        for g in groups:
            out += ["", f"{_help_sentence(g).rstrip('.')}:" if g else "Options:", "",
                    "| option | meaning |", "|---|---|"]
            for o in c.options:
                if o.group != g:
                    continue
                flags = ", ".join(f"`{f}{' ' + o.metavar if o.metavar else ''}`"
                                  for f in o.flags)
                out.append(f"| {flags} | {_md(_option_help(o))} |")
    out += ["", "## Global options", "", "| option | meaning |", "|---|---|"]
    for o in cli.global_options:
        out.append(f"| {', '.join(f'`{f}`' for f in o.flags)} | {_md(_option_help(o))} |")
    out += ["", "## Exit status", "", "| status | meaning |", "|---|---|"]
    out += [f"| {code} | {_md(text)} |" for code, text in EXIT_CODES]
    out += ["", "## Environment", "", "| variable | meaning |", "|---|---|"]
    out += [f"| `{name}` | {_md(_help_sentence(text))} |" for name, text in ENVIRONMENT]
    out.append("")
    return "\n".join(out)


# -- docs/json.md ----------------------------------------------------------------------


def _json_rows(fields: Sequence[jsonout.Field], prefix: str = "") -> list[str]:
    rows = []
    for f in fields:
        name = f"{prefix}{f.name}"
        doc = _help_sentence(f.doc) + (" Optional." if f.optional else "")
        rows.append(f"| `{name}` | {f.type} | {_md(doc)} |")
        if f.fields:
            inner = f"{name}[]." if f.type.startswith("array of") else f"{name}."
            rows += _json_rows(f.fields, inner)
    return rows


def json_reference() -> str:
    """docs/json.md, from the schema in diskrsync/cli/jsonout.py (not from the parser)."""
    table = ["| field | type | meaning |", "|---|---|---|"]
    out = [
        "# diskrsync --json reference",
        "",
        "<!-- Generated by `scripts/docgen.py json` (`make docs`) from "
        "diskrsync/cli/jsonout.py; do not edit. -->",
        "",
        "With `--json`, " + ", ".join(f"`{c}`" for c in jsonout.COMMANDS) + " print one JSON "
        "object on stdout and nothing else there (messages, warnings and progress go to "
        "stderr). Every object has the envelope's fields; a command that fails prints the "
        "envelope and `error` instead of its own fields, with the same exit status. "
        "`restore --json` refuses DEST `-` (the disk would share stdout with the object).",
        "",
        f"**Bounded size.** A list that grows with the disk holds at most its first "
        f"{jsonout.CAP} entries, and a `NAME_total` field counts them all. "
        f"**Types.** `range` is `[offset, length]` in bytes; times are Unix times in seconds "
        f"(UTC), durations seconds; hashes are lowercase hex.",
        "",
        f"**Compatibility.** This is schema version {jsonout.VERSION}. Within one version "
        f"fields are only added, so a reader must ignore fields it does not know; removing, "
        f"renaming or changing the meaning of one raises `version`. tests/test_json.py checks "
        f"every command's real output against these tables.",
        "",
        "## Envelope",
        "",
        *table,
        *_json_rows(jsonout.ENVELOPE),
        "",
        "## Errors",
        "",
        *table,
        *_json_rows([jsonout.ERROR]),
        "",
        "Exit statuses (`error.exit_code`, also the process's):",
        "",
        "| status | meaning |",
        "|---|---|",
        *[f"| {code} | {_md(text)} |" for code, text in EXIT_CODES],
    ]
    for command, fields in jsonout.COMMANDS.items():
        out += ["", f"## {command}", "", *table, *_json_rows(fields)]
    for command, fields in jsonout.REPOSITORY.items():
        out += ["", f"## {command} (a repository)", "",
                f"`{command}` of a repository location (`s3://...`, `repo:DIR`, with or without "
                f"`#DISK`) prints this object instead.", "", *table, *_json_rows(fields)]
    out.append("")
    return "\n".join(out)


GENERATORS: dict[str, Callable[[Cli], str]] = {
    "bash": bash,
    "zsh": zsh,
    "man": man,
    "markdown": markdown,
}

# Where `make docs` writes each output, relative to the repository root.
OUTPUTS: dict[str, str] = {
    "bash": "contrib/completion/diskrsync.bash",
    "zsh": "contrib/completion/_diskrsync",
    "man": "contrib/diskrsync.1",
    "markdown": "docs/cli.md",
    "json": "docs/json.md",
}

# Outputs made from something else than the parser.
DOCS: dict[str, Callable[[], str]] = {"json": json_reference}


def generate(kind: str, parser: argparse.ArgumentParser | None = None) -> str:
    if kind in DOCS:
        return DOCS[kind]()
    return GENERATORS[kind](model(parser))


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="scripts/docgen.py",
                                 description="Print completion, man page or CLI reference.")
    ap.add_argument("kind", choices=sorted([*GENERATORS, *DOCS]))
    args = ap.parse_args(argv)
    sys.stdout.write(generate(args.kind))
    return 0


if __name__ == "__main__":
    sys.exit(main())
