"""The examples of README.md, docs/*.md and deploy/README.md run, so a broken one fails CI.

Each fenced block of those documents is one test, named after its file and the line of its
opening fence (``README.md:68-python``). What the test does depends on the block's language:

- ``python``: executed, with the document's earlier python blocks, in one interpreter per
  document (a reader running them in order), in a working directory of the document's own, on a
  fresh migrated database (``TASKER_ENV=test``, ``TASKER_DATABASE__URL``) and this checkout's
  code. A block whose first line names a file (``# myapp/flows.py``) is that file: it is written
  there, in the working directory, and compiled; later blocks and commands import it.
- ``bash``, ``sh``, ``shell``: run by bash (``set -euo pipefail``) in the same directory and
  environment, with ``tasker`` running this checkout's ``python -m tasker.cli``. Every command
  must be a ``tasker`` command (or a ``NAME=value`` assignment) that ends by itself, or ``jq``,
  or ``curl`` to the local API (``http://127.0.0.1:8080``: the document's background
  ``tasker serve``, on the port the test chose; an HTTP error fails the block). ``console``:
  the same for its ``$ `` lines, and its other lines must be exactly what they print.
- ``yaml``, ``toml``, ``json``: parsed. ``sql``: run on the document's database, rolled back.
- No language (a diagram, a log excerpt, an error message): not checked.
- Any other language: refused unless marked skip.

Markers, an HTML comment on the line before the block's fence (blank lines between allowed):

``<!-- docs-test: skip (reason) -->``
    The block cannot run in a test (it needs Docker, a cluster, your own modules, ...). The
    reason is required and shown in the test report.
``<!-- docs-test: fragment -->`` (an optional ``(reason)``)
    An excerpt (a function without its imports, code using your own tables): python is
    compiled, shell is checked by ``bash -n``, yaml/toml/json are parsed.
``<!-- docs-test: background -->``
    A block of one ``tasker worker MODULES...`` command (started with ``-p 1`` appended: one
    worker process whatever the CPU count) or one ``tasker serve`` (on a free port): it is
    started there, in a process group of its own, and the test waits until it is ready; it
    serves the blocks below it and is stopped with SIGTERM after the document's last block (the
    ``<document>:end`` test), where it must exit 0.

A marker without a block after it, an unknown marker, or a skip without a reason fails, as does a
block the test cannot check as written. Blocks share their document's state in order: running
one block alone (``-k``) runs the blocks it depends on first; after a failed block, the later
blocks of its document are skipped. Blocks from the first background block on are ``slow``.
"""

from __future__ import annotations

import json
import re
import subprocess
import tomllib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import create_database, drop_database
from tests.doc_blocks import (
    PARSED_LANGUAGES,
    SHELL_LANGUAGES,
    Action,
    Block,
    DocsTestError,
    Problem,
    parse_document,
    plan,
    shell_script,
)
from tests.doc_runner import run_block
from tests.doc_session import DocSession, EarlierBlockFailedError

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = (
    "README.md",
    *sorted(f"docs/{path.name}" for path in (ROOT / "docs").glob("*.md")),
    "deploy/README.md",
)


@dataclass(frozen=True)
class End:
    """The end of a document: its session stops (background workers must exit 0)."""

    path: str


def _params() -> list[Any]:
    """One test per marker problem, per checked block, and per document with a session."""
    params: list[Any] = []
    for path in DOCUMENTS:
        blocks, problems = parse_document(path, (ROOT / path).read_text())
        params += [pytest.param(p, id=f"{p.where}-marker") for p in problems]
        actions = [(block, _action(block)) for block in blocks]
        background = [b.line for b, action in actions if action is Action.BACKGROUND]
        slow_from = min(background, default=None)
        for block, action in actions:
            if action is Action.TEXT:
                continue
            slow = slow_from is not None and block.line >= slow_from
            marks = [pytest.mark.slow] if slow else []
            params.append(pytest.param(block, id=f"{block.where}-{block.lang}", marks=marks))
        if any(action and action.needs_session for _, action in actions):
            marks = [pytest.mark.slow] if background else []
            params.append(pytest.param(End(path), id=f"{path}:end", marks=marks))
    return params


def _action(block: Block) -> Action | None:
    try:
        return plan(block)
    except DocsTestError:
        return None


class Sessions:
    """The open DocSession of each document, each on a database cloned from the template."""

    def __init__(self, server_url: str, template: str, tmp: pytest.TempPathFactory) -> None:
        self.server_url = server_url
        self.template = template
        self.tmp = tmp
        self._open: dict[str, tuple[DocSession, str]] = {}

    def get(self, path: str) -> DocSession:
        if path not in self._open:
            name = f"tasker_doc_{uuid.uuid4().hex[:12]}"
            url = create_database(self.server_url, name, template=self.template)
            blocks, _ = parse_document(path, (ROOT / path).read_text())
            workdir = self.tmp.mktemp(path.replace("/", "_"))
            self._open[path] = (DocSession(path, blocks, workdir, url), name)
        return self._open[path][0]

    def close(self, path: str) -> list[str]:
        """Stop the document's session and drop its database; its failures."""
        if path not in self._open:
            return []
        session, name = self._open.pop(path)
        try:
            return session.close()
        finally:
            drop_database(self.server_url, name)

    def close_all(self) -> list[str]:
        return [failure for path in list(self._open) for failure in self.close(path)]


@pytest.fixture(scope="module")
def sessions(
    server_url: str, template_database: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Sessions]:
    opened = Sessions(server_url, template_database, tmp_path_factory)
    yield opened
    failures = opened.close_all()
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("item", _params())
def test_doc_example(item: Block | Problem | End, sessions: Sessions) -> None:
    if isinstance(item, Problem):
        pytest.fail(f"{item.where}: {item.message}", pytrace=False)
    if isinstance(item, End):
        failures = sessions.close(item.path)
        if failures:
            pytest.fail("\n".join(failures), pytrace=False)
        return
    action = _action(item)
    if action is None:
        pytest.fail(_refusal(item), pytrace=False)
    if action is Action.SKIP:  # not run (the marker says why): its syntax is still checked
        action = _syntax_check(item)
    if action.needs_session:
        failure = _run_in_session(sessions.get(item.path), item)
    else:
        failure = _check_alone(item, action)
    if failure:
        pytest.fail(failure, pytrace=False)


def _refusal(block: Block) -> str:
    try:
        plan(block)
    except DocsTestError as exc:
        return f"{block.where}: {exc}"
    raise AssertionError(f"{block.where} is not refused")


def _run_in_session(session: DocSession, block: Block) -> str | None:
    try:
        return session.run(block)
    except EarlierBlockFailedError as exc:
        reason = str(exc)
    pytest.skip(reason)


def _syntax_check(block: Block) -> Action:
    """The check of a block that is not run: compile, ``bash -n`` or parse, by its language."""
    if block.lang == "python":
        return Action.COMPILE
    if block.lang in SHELL_LANGUAGES:
        return Action.SHELL_SYNTAX
    if block.lang in PARSED_LANGUAGES:
        return Action.PARSE
    return Action.TEXT  # sql and the rest: nothing to check without running it


def _check_alone(block: Block, action: Action) -> str | None:
    """The checks that need no session: compile, parse, ``bash -n``; the failure."""
    try:
        if action is Action.COMPILE:
            compile("\n" * block.line + block.source, block.path, "exec")
        elif action is Action.PARSE:
            _parse(block)
        elif action is Action.SHELL_SYNTAX:
            subprocess.run(
                ["bash", "-n", "-c", shell_script(block)],
                check=True,
                capture_output=True,
                text=True,
                timeout=30,
            )
    except subprocess.CalledProcessError as exc:
        return f"{block.where}: bash -n: {exc.stderr}"
    except (SyntaxError, ValueError, yaml.YAMLError) as exc:
        return f"{block.where}: {type(exc).__name__}{_line_in_document(block, exc)}: {exc}"
    return None


def _line_in_document(block: Block, exc: Exception) -> str:
    """`` (README.md:280)`` for a yaml or json error that knows its line in the block."""
    mark = getattr(exc, "problem_mark", None)
    line = mark.line + 1 if mark is not None else getattr(exc, "lineno", None)
    if not isinstance(exc, (yaml.YAMLError, json.JSONDecodeError)) or line is None:
        return ""
    return f" ({block.path}:{block.line + line})"


def _parse(block: Block) -> None:
    if block.lang in ("yaml", "yml"):
        list(yaml.safe_load_all(block.source))
    elif block.lang == "toml":
        tomllib.loads(block.source)
    else:
        json.loads(block.source)


# -- the rules of the markers (no database) -----------------------------------------------------


def _only_block(markdown: str) -> Block:
    blocks, problems = parse_document("doc.md", markdown)
    assert not problems and len(blocks) == 1
    return blocks[0]


@pytest.mark.parametrize(
    ("markdown", "refusal"),
    [
        ("<!-- docs-test: skip -->\n```bash\nmake\n```\n", "a skip needs a reason"),
        ("<!-- docs-test: skip ( ) -->\n```bash\nmake\n```\n", "a skip needs a reason"),
        ("<!-- docs-test: maybe -->\n```bash\nmake\n```\n", "unknown docs-test marker"),
        ("<!-- docs-test: fragment -->\nProse.\n```python\nf()\n```\n", "no code block follows"),
        ("<!-- docs-test: fragment -->\n", "no code block follows"),
    ],
)
def test_markers_that_cannot_be_used_are_refused(markdown: str, refusal: str) -> None:
    _, problems = parse_document("doc.md", markdown)
    assert len(problems) == 1
    assert problems[0].where == "doc.md:1"
    assert refusal in problems[0].message


@pytest.mark.parametrize(
    ("markdown", "refusal"),
    [
        ("```bash\nmake demo\n```\n", "`make demo` cannot run in a test"),
        ("```sh\ntasker deploy workers a --modules m | kubectl apply -f -\n```\n", "`kubectl"),
        ("```bash\ntasker worker app\n```\n", "runs until it is stopped"),
        ("```bash\ntasker --env test coordinator\n```\n", "runs until it is stopped"),
        ("```bash\ntasker queues > /etc/queues\n```\n", "outside its working directory"),
        ("```bash\nT=$(wget -q x) tasker task get $T\n```\n", "`wget -q x` cannot run"),
        ("```bash\ncurl https://example.com/v1/tasks\n```\n", "must call the local API"),
        ("```bash\ncurl -s\n```\n", "must call the local API"),
        ("```bash\ntasker serve\n```\n", "runs until it is stopped"),
        ("```bash\nT=$(tasker worker app)\n```\n", "runs until it is stopped"),
        ("```dockerfile\nFROM tasker\n```\n", "no check for a dockerfile block"),
        ("<!-- docs-test: background -->\n```sh\ntasker queues\n```\n", "one `tasker worker"),
        ("<!-- docs-test: background -->\n```sh\ncurl 127.0.0.1:8080\n```\n", "or `tasker serve`"),
        ("<!-- docs-test: fragment -->\n```\nan error message\n```\n", "is not checked"),
        ("```python\n# ../outside.py\n```\n", "not a path inside"),
    ],
)
def test_blocks_that_cannot_be_checked_as_written_are_refused(markdown: str, refusal: str) -> None:
    with pytest.raises(DocsTestError, match=re.escape(refusal)):
        plan(_only_block(markdown))


@pytest.mark.parametrize(
    ("markdown", "action"),
    [
        (
            "```bash\nTASKER_X=1 tasker settings  # why\nA='b c'\ntasker q $A > o/w.yaml\n```\n",
            "shell",
        ),
        ("```console\n$ tasker coordinator --once\nan output line\n```\n", "shell"),
        (
            "```bash\nT=$(tasker task submit a b -q)\n"
            'tasker task wait "$T" || tasker task get $T\n```\n',
            "shell",
        ),
        ("<!-- docs-test: background -->\n\n```bash\ntasker worker app -p 2\n```\n", "background"),
        ("```python\n# app/flows.py\nimport tasker\n```\n", "write"),
        ("```python\nimport tasker\n```\n", "exec"),
        ("<!-- docs-test: fragment (your table) -->\n```python\nsend(1)\n```\n", "compile"),
        ("<!-- docs-test: fragment -->\n```bash\nkubectl apply -k .\n```\n", "shell-syntax"),
        ("<!-- docs-test: skip (needs Docker) -->\n```sh\ndocker build .\n```\n", "skip"),
        ("```yaml\na: 1\n```\n", "parse"),
        ("```sql\nSELECT 1\n```\n", "sql"),
        ("```\nanything\n```\n", "text"),
    ],
)
def test_what_is_done_with_a_block(markdown: str, action: str) -> None:
    assert plan(_only_block(markdown)) == action


def test_a_block_keeps_its_line_and_loses_its_list_indent() -> None:
    markdown = "Text.\n- A list item:\n\n  ~~~python\n  x = [\n      1]\n  ~~~\nMore.\n"
    assert _only_block(markdown) == Block("doc.md", 4, "python", "x = [\n    1]\n")


def test_a_failing_python_block_names_the_line_of_its_document() -> None:
    request = {"path": "README.md", "line": 10, "source": "x = 1\nraise ValueError(x)\n"}
    answer = run_block(request, {})
    assert not answer["ok"]
    assert answer["error"].splitlines()[1].strip() == 'File "README.md", line 12, in <module>'
    assert answer["error"].rstrip().endswith("ValueError: 1")


# -- a document's session (a database, no workers) -----------------------------------------------

SESSION_DOCUMENT = """\
```python
# pkg/values.py
VALUE = 41
```

```python
from pkg.values import VALUE

answer = VALUE + 1
```

```python
assert answer == 42, answer
```

```console
$ tasker queues --json
[]
```

```console
$ tasker queues --json
["a queue"]
```

```python
print("not reached")
```
"""


def test_a_session_runs_its_blocks_in_order_and_compares_console_output(
    database_url: str, tmp_path: Path
) -> None:
    blocks, problems = parse_document("doc.md", SESSION_DOCUMENT)
    assert not problems
    session = DocSession("doc.md", blocks, tmp_path, database_url)
    try:
        first, second, third, console, wrong_console, last = blocks
        assert session.run(third) is None  # runs the two blocks before it first
        assert session.outcomes == {first.line: None, second.line: None, third.line: None}
        assert session.run(console) is None
        failure = session.run(wrong_console)
        assert failure is not None and "do not print; they print:\n[]" in failure
        with pytest.raises(
            EarlierBlockFailedError, match=re.escape(f"{wrong_console.where} failed")
        ):
            session.run(last)
    finally:
        assert session.close() == []
