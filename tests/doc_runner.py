"""The interpreter of one document's python blocks (``python -m tests.doc_runner``).

Reads one JSON request per line on stdin, ``{"path": ..., "line": ..., "source": ...}``, and runs
the block in a namespace shared by every block of the document, in order, as a reader running
them one after another in one interpreter would. Answers one JSON line per request,
``{"ok": bool, "output": ..., "error": ...}``, on the original stdout; whatever the blocks
print goes to stderr (the harness's log), and ``output`` repeats what they printed with
``print``. Tracebacks name the document and the line inside it.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import traceback
from typing import Any


def run_block(request: dict[str, Any], namespace: dict[str, Any]) -> dict[str, Any]:
    """Run one block in ``namespace``; the answer to send back."""
    output = io.StringIO()
    # Blank lines first, so the block's lines keep their numbers in the document.
    source = "\n" * int(request["line"]) + str(request["source"])
    try:
        code = compile(source, str(request["path"]), "exec")
        with contextlib.redirect_stdout(output):
            exec(code, namespace)
    except BaseException as exc:  # a block's SystemExit or KeyboardInterrupt is its failure too
        if exc.__traceback__ is not None and not isinstance(exc, SyntaxError):
            exc = exc.with_traceback(exc.__traceback__.tb_next)  # from the block's own frame
        error = "".join(traceback.format_exception(exc))
        return {"ok": False, "output": output.getvalue(), "error": error}
    finally:
        sys.stderr.write(output.getvalue())
    return {"ok": True, "output": output.getvalue(), "error": ""}


def main() -> None:
    answers = os.fdopen(os.dup(sys.stdout.fileno()), "w", encoding="utf-8")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # what blocks print must not mix in
    namespace: dict[str, Any] = {"__name__": "__main__"}
    for line in sys.stdin:
        answer = run_block(json.loads(line), namespace)
        answers.write(json.dumps(answer) + "\n")
        answers.flush()


if __name__ == "__main__":
    main()
