"""The fenced code blocks of a Markdown document, their docs-test markers, and what the test of
tests/test_docs_examples.py does with each (pure: no I/O, no processes).

``parse_document`` finds the blocks and the markers; ``plan`` decides a block's ``Action`` and
refuses what cannot be checked honestly (an unknown language, a command a test cannot run, a
marker that does not fit), with a message naming the fix.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from enum import StrEnum
from pathlib import PurePosixPath

__all__ = [
    "Action",
    "Block",
    "DocsTestError",
    "Marker",
    "Problem",
    "ShellCommand",
    "parse_document",
    "plan",
    "python_file_path",
    "shell_commands",
    "shell_script",
]

MARKER_KINDS = ("skip", "fragment", "background")
MARKER = re.compile(r"^\s*<!--\s*docs-test:(?P<body>.*?)-->\s*$")
MARKER_BODY = re.compile(r"^(?P<kind>[a-z-]+)\s*(?:\((?P<reason>.*)\))?$")
FENCE = re.compile(r"^(?P<indent> *)(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`]*)$")
FILE_HEADER = re.compile(r"^#\s*(?P<path>[\w./-]+\.py)\s*$")
ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
SHELL_LANGUAGES = ("bash", "sh", "shell", "console")
PARSED_LANGUAGES = ("yaml", "yml", "toml", "json")
TEXT_LANGUAGES = ("", "text", "txt")
COMMAND_SEPARATORS = ("|", "||", "&&", ";", "&")
REDIRECTIONS = (">", ">>", "<", ">&", "&>")
SUBSTITUTION = re.compile(r"\$\(([^()]*)\)")


class DocsTestError(Exception):
    """A block or marker the docs test cannot check as written; the message names the fix."""


class Action(StrEnum):
    """What the docs test does with a block."""

    SKIP = "skip"  # marked skip: reported as skipped, with its reason
    TEXT = "text"  # no language (a diagram, an output, a message): not checked
    WRITE = "write"  # a python block headed `# path.py`: written there, compiled
    COMPILE = "compile"  # a python fragment: compiled
    EXEC = "exec"  # python: executed in the document's interpreter
    PARSE = "parse"  # yaml, toml, json: parsed
    SHELL = "shell"  # `tasker` commands: run by bash
    SHELL_SYNTAX = "shell-syntax"  # a shell fragment: checked by `bash -n`
    BACKGROUND = "background"  # one `tasker worker` command, running for the blocks below
    SQL = "sql"  # run against the document's database, then rolled back

    @property
    def needs_session(self) -> bool:
        """True for the actions that share the document's state, in the document's order."""
        return self in (Action.WRITE, Action.EXEC, Action.SHELL, Action.BACKGROUND, Action.SQL)


@dataclass(frozen=True)
class Marker:
    kind: str
    reason: str


@dataclass(frozen=True)
class Block:
    """A fenced block: ``line`` is the line of its opening fence (1-based)."""

    path: str
    line: int
    lang: str
    source: str
    marker: Marker | None = None

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"


@dataclass(frozen=True)
class Problem:
    """A marker that cannot be used (no reason, unknown kind, no block after it)."""

    path: str
    line: int
    message: str

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"


@dataclass(frozen=True)
class ShellCommand:
    """A simple command of a shell block: its words, and the files it redirects to or from."""

    words: tuple[str, ...]
    redirections: tuple[str, ...]

    @property
    def program(self) -> tuple[str, ...]:
        """The words without the leading ``NAME=value`` assignments."""
        words = list(self.words)
        while words and ASSIGNMENT.match(words[0]):
            words.pop(0)
        return tuple(words)

    @property
    def assignments(self) -> dict[str, str]:
        count = len(self.words) - len(self.program)
        return dict(word.split("=", 1) for word in self.words[:count])


# -- parsing ---------------------------------------------------------------------------------


def parse_document(path: str, text: str) -> tuple[list[Block], list[Problem]]:
    """The fenced blocks of ``text``, each with the marker on the line before it (blank lines
    between them allowed), and the markers that cannot be used."""
    blocks: list[Block] = []
    problems: list[Problem] = []
    pending: tuple[int, Marker] | None = None
    lines = text.splitlines()
    index = 0
    while index < len(lines):
        line = lines[index]
        fence = FENCE.match(line)
        if fence:
            marker = pending[1] if pending else None
            block, index = _read_block(path, lines, index, fence, marker)
            blocks.append(block)
            pending = None
            continue
        if MARKER.match(line):
            if pending:
                problems.append(Problem(path, pending[0], "a second marker follows this one"))
            pending = _read_marker(path, index + 1, line, problems)
        elif line.strip() and pending:
            problems.append(Problem(path, pending[0], "no code block follows this marker"))
            pending = None
        index += 1
    if pending:
        problems.append(Problem(path, pending[0], "no code block follows this marker"))
    return blocks, problems


def _read_marker(
    path: str, number: int, line: str, problems: list[Problem]
) -> tuple[int, Marker] | None:
    match = MARKER.match(line)
    assert match is not None
    body = MARKER_BODY.match(match["body"].strip())
    if body is None or body["kind"] not in MARKER_KINDS:
        problems.append(
            Problem(
                path,
                number,
                f"unknown docs-test marker {match['body'].strip()!r}; the markers are "
                "skip (reason), fragment and background (see tests/test_docs_examples.py)",
            )
        )
        return None
    reason = (body["reason"] or "").strip()
    if body["kind"] == "skip" and not reason:
        problems.append(
            Problem(
                path,
                number,
                "a skip needs a reason: <!-- docs-test: skip (why a test cannot run this) -->",
            )
        )
        return None
    return number, Marker(body["kind"], reason)


def _read_block(
    path: str, lines: list[str], start: int, fence: re.Match[str], marker: Marker | None
) -> tuple[Block, int]:
    """The block opened at ``lines[start]`` and the index of the line after its closing fence."""
    indent, mark = len(fence["indent"]), fence["fence"]
    body: list[str] = []
    index = start + 1
    while index < len(lines):
        line = lines[index]
        stripped = line.strip()
        if stripped.startswith(mark[0] * len(mark)) and not stripped.strip(mark[0]):
            break
        body.append(line[indent:] if not line[:indent].strip() else line.lstrip())
        index += 1
    lang = fence["info"].strip().split(" ")[0].lower() if fence["info"].strip() else ""
    source = "\n".join(body) + "\n" if body else ""
    return Block(path, start + 1, lang, source, marker), index + 1


# -- planning --------------------------------------------------------------------------------


def plan(block: Block) -> Action:
    """What the docs test does with ``block``; DocsTestError when it cannot check it."""
    kind = block.marker.kind if block.marker else None
    if block.lang in TEXT_LANGUAGES:
        if kind is not None:
            raise DocsTestError(
                "a block without a language is not checked: remove the marker, or give the "
                "block its language"
            )
        return Action.TEXT
    if kind == "skip":
        return Action.SKIP
    if block.lang == "python":
        return _plan_python(block, kind)
    if block.lang in SHELL_LANGUAGES:
        return _plan_shell(block, kind)
    if block.lang in PARSED_LANGUAGES and kind != "background":
        return Action.PARSE
    if block.lang == "sql" and kind is None:
        return Action.SQL
    raise DocsTestError(
        f"the docs test has no check for a {block.lang} block"
        + (f" marked {kind}" if kind else "")
        + ": mark it <!-- docs-test: skip (why) -->"
    )


def _plan_python(block: Block, kind: str | None) -> Action:
    if kind == "background":
        raise DocsTestError("background is for a `tasker worker` command, not python")
    if kind == "fragment":
        return Action.COMPILE
    return Action.WRITE if python_file_path(block) else Action.EXEC


def _plan_shell(block: Block, kind: str | None) -> Action:
    if kind == "fragment":
        return Action.SHELL_SYNTAX
    commands = shell_commands(block)
    if kind == "background":
        _check_background(commands)
        return Action.BACKGROUND
    for command in commands:
        _check_runnable(command)
    return Action.SHELL


def python_file_path(block: Block) -> PurePosixPath | None:
    """``myapp/flows.py`` for a python block whose first line is ``# myapp/flows.py``."""
    first = block.source.split("\n", 1)[0]
    match = FILE_HEADER.match(first)
    if match is None:
        return None
    path = PurePosixPath(match["path"])
    if path.is_absolute() or ".." in path.parts:
        raise DocsTestError(f"{path} is not a path inside the example's working directory")
    return path


def shell_commands(block: Block) -> list[ShellCommand]:
    """The simple commands of a shell block (for ``console``: of its ``$ `` lines)."""
    commands: list[ShellCommand] = []
    for line in _command_lines(block):
        commands += _line_commands(line)
    return commands


def _line_commands(line: str) -> list[ShellCommand]:
    """The simple commands of one line; a command substitution ``$(...)`` is a command of its
    own (``TASK=$(tasker task submit ...)``), and stands for one word in its line."""
    commands: list[ShellCommand] = []
    for inner in SUBSTITUTION.findall(line):
        commands += _line_commands(inner)
    line = SUBSTITUTION.sub("SUBSTITUTED", line)
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    words: list[str] = []
    redirections: list[str] = []
    tokens = iter(lexer)
    for token in tokens:
        if token in COMMAND_SEPARATORS:
            commands.append(ShellCommand(tuple(words), tuple(redirections)))
            words, redirections = [], []
        elif token in REDIRECTIONS:
            redirections.append(next(tokens, ""))
        else:
            words.append(token)
    if words or redirections:
        commands.append(ShellCommand(tuple(words), tuple(redirections)))
    return commands


def shell_script(block: Block) -> str:
    """What bash runs of a shell block: its text; for ``console``, its ``$ `` lines without
    the prompt (the other lines are their output; a command whose quote or backslash continues
    on the next lines takes them along)."""
    if block.lang != "console":
        return block.source
    return "".join(command + "\n" for command in _console_commands(block))


def _console_commands(block: Block) -> list[str]:
    commands: list[str] = []
    current: str | None = None
    for line in block.source.splitlines():
        if current is not None:
            current += "\n" + line
        elif line.startswith("$ "):
            current = line[2:]
        else:
            continue
        if _complete(current):
            commands.append(current)
            current = None
    if current is not None:
        commands.append(current)
    return commands


def _complete(command: str) -> bool:
    """Whether ``command`` ends here (no open quote, no trailing backslash)."""
    if command.endswith("\\"):
        return False
    try:
        list(shlex.shlex(command, posix=True))
    except ValueError:
        return False
    return True


def _command_lines(block: Block) -> list[str]:
    if block.lang == "console":
        lines = [command.replace("\\\n", " ") for command in _console_commands(block)]
    else:
        lines = block.source.replace("\\\n", " ").splitlines()
    return [line for line in lines if line.strip()]


def _tasker_command(command: ShellCommand) -> str | None:
    """The subcommand (``worker``, ``deploy``...) of a ``tasker`` command, else None."""
    program = command.program
    if not program or program[0] != "tasker":
        return None
    words = iter(program[1:])
    for word in words:
        if word in ("--env", "--settings"):
            next(words, None)
        elif not word.startswith("-"):
            return word
    return ""


def _long_running(command: ShellCommand) -> bool:
    sub = _tasker_command(command)
    if "--help" in command.program or "-h" in command.program:
        return False
    return sub in BACKGROUND_COMMANDS or (sub == "coordinator" and "--once" not in command.program)


#: The `tasker` commands a background block may start: a worker, and the HTTP API.
BACKGROUND_COMMANDS = ("worker", "serve")
#: Programs other than `tasker` that shell blocks may run: `curl` (to this machine's API only)
#: and `jq` to read its answers.
TOOLS = ("curl", "jq")
_LOCAL_URL = re.compile(r"^(https?://)?(127\.0\.0\.1|localhost)(:\d+)?(/|$)")


def _check_tool(command: ShellCommand) -> None:
    """A `curl` only talks to this machine (the documents' API at 127.0.0.1:8080)."""
    if command.program[0] != "curl":
        return
    urls = [word for word in command.program[1:] if "://" in word or word.startswith("127.")]
    if not urls or not all(_LOCAL_URL.match(url) for url in urls):
        raise DocsTestError(
            "`curl` in an example must call the local API (http://127.0.0.1:8080/...)"
        )


def _check_runnable(command: ShellCommand) -> None:
    if not command.program:
        return  # NAME=value: an assignment
    shown = " ".join(command.program[:3])
    if command.program[0] in TOOLS:
        _check_tool(command)
    elif _tasker_command(command) is None:
        raise DocsTestError(
            f"`{shown}` cannot run in a test (only `tasker` commands do): mark the block "
            "<!-- docs-test: skip (why) -->"
        )
    if _long_running(command):
        raise DocsTestError(
            f"`{shown}` runs until it is stopped: mark the block <!-- docs-test: background "
            "--> (a `tasker worker` for the blocks below) or <!-- docs-test: skip (why) -->"
        )
    for target in command.redirections:
        path = PurePosixPath(target)
        if path.is_absolute() or ".." in path.parts:
            raise DocsTestError(f"`{shown}` writes {target}, outside its working directory")


def _check_background(commands: list[ShellCommand]) -> None:
    if (
        len(commands) != 1
        or _tasker_command(commands[0]) not in BACKGROUND_COMMANDS
        or commands[0].redirections
    ):
        raise DocsTestError(
            "a background block holds exactly one `tasker worker MODULES...` or `tasker serve` "
            "command"
        )
