"""File-based IR tests in the style of LLVM lit + FileCheck, run in process by tests/ir/test_llir_files.py.

A test is one ``.llir`` file under tests/ir/: IR text plus directives in ``//`` comments (the IR grammar
ignores comments, so the whole file is the input and parse errors keep their line:column).

    // RUN: dce,cse                   the pipeline, as given to ``llmasos opt -p``; exactly one RUN line.
                                      ``// RUN: verify`` runs no pass: parse, verify, print.
    // CHECK: text                    matches ``text`` after the previous match (same line or later)
    // CHECK-NEXT: text               matches on the line right after the previous match's line
    // CHECK-SAME: text               matches on the previous match's line, after it
    // CHECK-NOT: text                ``text`` must not occur between the previous match and the next one
                                      (or the end of the output)
    // CHECK-LABEL: text              a CHECK that also fences the checks after it: they cannot match past
                                      the next label (labels are found first, in order)
    // CHECK-ERROR: text              the run must FAIL (non-zero exit) and stderr must contain ``text``;
                                      several are matched in order. NEXT/SAME/NOT then apply to stderr;
                                      plain CHECK and CHECK-LABEL are not allowed in such a file.

Without CHECK-ERROR the run must succeed and the checks apply to the printed IR (stdout). Matching is
per line and a pattern is a substring, not a whole line; its leading and trailing whitespace is ignored
and a run of blanks inside matches any run of blanks. ``{{regex}}`` embeds a Python regex. ``[[...]]``
(FileCheck variables) is not supported and is matched literally. A misspelt directive
(``// CHECK-NXT:``, ``// CHEKC:``), an empty pattern, a file without RUN or without checks: all errors,
so a test cannot pass by checking nothing. (A directive name without a colon is an error too; other
capitalised words without one, ``// CHECKS below``, are prose.)

The ``param-data`` and ``producer-link`` verifier rules have no file test: IR text carries no parameter
data, and the parser sets every producer link itself (tests/ir/test_verifier.py covers both).
"""
from __future__ import annotations

import contextlib
import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

DIRECTIVES = ("CHECK", "CHECK-NEXT", "CHECK-SAME", "CHECK-NOT", "CHECK-LABEL", "CHECK-ERROR")
# Anything that looks like a directive, so that a typo is an error instead of a silently ignored comment.
_DIRECTIVE_RE = re.compile(r"//\s*(RUN|CHE?C?K[A-Z-]*|CHEKC[A-Z-]*)\b\s*(:?)(.*)$")
_REGEX_PART = re.compile(r"\{\{(.*?)\}\}")


class FileCheckError(AssertionError):
    """A test file that is malformed, or output that does not match its checks."""


@dataclass(frozen=True)
class Check:
    kind: str  # one of DIRECTIVES
    pattern: str
    line: int  # 1-based line in the test file
    regex: re.Pattern

    def describe(self) -> str:
        return f"line {self.line}: {self.kind}: {self.pattern}"


@dataclass(frozen=True)
class TestFile:
    run: str  # the pipeline
    checks: list[Check]

    @property
    def expects_error(self) -> bool:
        return any(c.kind == "CHECK-ERROR" for c in self.checks)


def compile_pattern(pattern: str) -> re.Pattern:
    """A check pattern as a regex: literal text (blank runs match blank runs) with ``{{regex}}`` parts."""
    parts, pos = [], 0
    for m in _REGEX_PART.finditer(pattern):
        parts.append(_literal(pattern[pos:m.start()]))
        try:
            re.compile(m.group(1))
        except re.error as e:
            raise FileCheckError(f"bad regex {{{{{m.group(1)}}}}}: {e}") from None
        parts.append(f"(?:{m.group(1)})")
        pos = m.end()
    parts.append(_literal(pattern[pos:]))
    return re.compile("".join(parts))


def _literal(text: str) -> str:
    return r"[ \t]+".join(re.escape(w) for w in re.split(r"[ \t]+", text))


def parse_test(text: str, name: str = "<test>") -> TestFile:
    """The RUN line and the checks of a test file; malformed directives raise FileCheckError."""
    runs: list[tuple[int, str]] = []
    checks: list[Check] = []
    for i, line in enumerate(text.split("\n"), 1):
        m = _DIRECTIVE_RE.search(line)
        if m is None:
            continue
        kind, colon, rest = m.group(1), m.group(2), m.group(3)
        where = f"{name}:{i}"
        known = kind == "RUN" or kind in DIRECTIVES
        if not known and not colon:
            continue  # prose such as "// CHECKS below"
        if not known:
            raise FileCheckError(f"{where}: unknown directive {kind!r}; known: RUN, {', '.join(DIRECTIVES)}")
        if not colon:
            raise FileCheckError(f"{where}: {kind} needs a colon: '// {kind}: ...'")
        pattern = rest.strip()
        if not pattern:
            raise FileCheckError(f"{where}: empty {kind} pattern")
        if kind == "RUN":
            runs.append((i, pattern))
            continue
        try:
            regex = compile_pattern(pattern)
        except FileCheckError as e:
            raise FileCheckError(f"{where}: {e}") from None
        checks.append(Check(kind, pattern, i, regex))
    if len(runs) != 1:
        raise FileCheckError(f"{name}: needs exactly one '// RUN: <pipeline>' line, found {len(runs)}"
                             + (f" (lines {', '.join(str(n) for n, _ in runs)})" if runs else ""))
    if not checks:
        raise FileCheckError(f"{name}: no CHECK lines: a test that checks nothing cannot fail")
    tf = TestFile(runs[0][1], checks)
    if tf.expects_error:
        bad = [c for c in checks if c.kind in ("CHECK", "CHECK-LABEL")]
        if bad:
            raise FileCheckError(f"{name}:{bad[0].line}: {bad[0].kind} in a file with CHECK-ERROR; the run fails "
                                 f"and prints no IR, so match stderr with CHECK-ERROR/NEXT/SAME/NOT")
    if checks[0].kind in ("CHECK-NEXT", "CHECK-SAME"):
        raise FileCheckError(f"{name}:{checks[0].line}: {checks[0].kind} has no previous match to follow")
    return tf


# -- matching ------------------------------------------------------------------------------------------

Pos = tuple[int, int]  # (line index, column) into the output


def check_output(output: str, checks: list[Check], what: str = "output") -> None:
    """Match ``checks`` in order against ``output``; raise FileCheckError naming the failing check."""
    lines = output.split("\n")
    if lines and lines[-1] == "" and len(lines) > 1:
        lines.pop()
    end: Pos = (len(lines), 0)

    def fail(c: Check, why: str, at: Optional[Pos] = None) -> FileCheckError:
        return FileCheckError(f"{c.describe()}\n  {why}\n{_show(lines, at, what)}")

    # Labels first: each is searched after the previous one; the checks between two labels live between them.
    label_at: dict[int, tuple[int, int, int]] = {}
    pos: Pos = (0, 0)
    for i, c in enumerate(checks):
        if c.kind == "CHECK-LABEL":
            m = _search(lines, c.regex, pos, end)
            if m is None:
                raise fail(c, f"label not found in the {what} after line {pos[0] + 1}", pos)
            label_at[i] = m
            pos = (m[0], m[2])
    pos, last_line, nots = (0, 0), None, []
    label_idx = sorted(label_at)
    for i, c in enumerate(checks):
        limit = next(((label_at[j][0], label_at[j][1]) for j in label_idx if j > i), end)
        if c.kind == "CHECK-NOT":
            nots.append(c)
            continue
        if c.kind in ("CHECK-NEXT", "CHECK-SAME") and last_line is None:
            raise fail(c, f"{c.kind} has no previous match to follow")
        if c.kind == "CHECK-LABEL":
            m = label_at[i]
        elif c.kind == "CHECK-NEXT":
            nxt = last_line + 1
            m = _search(lines, c.regex, (nxt, 0), min((nxt + 1, 0), limit)) if nxt < len(lines) else None
            if m is None:
                raise fail(c, f"not found on the line after the previous match (line {last_line + 1})",
                           (nxt, 0))
        elif c.kind == "CHECK-SAME":
            m = _search(lines, c.regex, pos, min((last_line + 1, 0), limit))
            if m is None:
                raise fail(c, f"not found on the previous match's line {last_line + 1} after column {pos[1] + 1}",
                           pos)
        else:  # CHECK, CHECK-ERROR
            m = _search(lines, c.regex, pos, limit)
            if m is None:
                fence = " before the next CHECK-LABEL" if limit != end else ""
                raise fail(c, f"not found in the {what} after line {pos[0] + 1}, column {pos[1] + 1}{fence}", pos)
        _check_nots(lines, nots, pos, (m[0], m[1]), fail)
        nots = []
        pos, last_line = (m[0], m[2]), m[0]
    _check_nots(lines, nots, pos, end, fail)


def _check_nots(lines, nots, start: Pos, stop: Pos, fail) -> None:
    for c in nots:
        m = _search(lines, c.regex, start, stop)
        if m is not None:
            raise fail(c, f"found at line {m[0] + 1}, column {m[1] + 1}: {lines[m[0]][m[1]:m[2]]!r}", (m[0], m[1]))


def _search(lines: list[str], regex: re.Pattern, start: Pos, stop: Pos) -> Optional[tuple[int, int, int]]:
    """First match at or after ``start`` and ending at or before ``stop``: (line, begin col, end col)."""
    line, col = start
    while (line, 0) < stop and line < len(lines):
        text = lines[line] if line < stop[0] else lines[line][:stop[1]]
        m = regex.search(text, col)
        if m is not None:
            return line, m.start(), m.end()
        line, col = line + 1, 0
    return None


def _show(lines: list[str], at: Optional[Pos], what: str) -> str:
    out = [f"  {what} ({len(lines)} lines):"]
    for i, text in enumerate(lines):
        out.append(f"  {'>' if at is not None and at[0] == i else ' '}{i + 1:4} | {text}")
    return "\n".join(out)


# -- running a file --------------------------------------------------------------------------------------

def run_opt(path: Path, pipeline: str) -> tuple[int, str, str]:
    """``llmasos opt PATH -p PIPELINE`` in this process: (exit status, stdout, stderr)."""
    from llmasos.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(["opt", str(path), f"--pipeline={'' if pipeline == 'verify' else pipeline}"])
    return rc, out.getvalue(), err.getvalue()


def run_test_file(path: Path) -> None:
    """Run one .llir test; FileCheckError says which check failed and shows the output."""
    name = str(path)
    tf = parse_test(Path(path).read_text(), name)
    rc, out, err = run_opt(path, tf.run)
    if tf.expects_error:
        if rc == 0:
            raise FileCheckError(f"{name}: expected 'llmasos opt -p {tf.run}' to fail (CHECK-ERROR), but it "
                                 f"succeeded and printed:\n{out}")
        try:
            check_output(err, tf.checks, "stderr")
        except FileCheckError as e:
            raise FileCheckError(f"{name}: {e}") from None
        return
    if rc != 0:
        raise FileCheckError(f"{name}: 'llmasos opt -p {tf.run}' failed with status {rc} (add CHECK-ERROR lines "
                             f"if that is the point of the test):\n{err}")
    try:
        check_output(out, tf.checks, "output")
    except FileCheckError as e:
        raise FileCheckError(f"{name}: {e}") from None
