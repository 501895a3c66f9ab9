"""The README and docs/ against the repository: length, links, and the commands they name.

Pure file checks: no servers, no processes. Each failure names the document and the line.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 250

# `python -m <module>` of tools that are not ours: installed into .venv, not in the repo.
THIRD_PARTY_MODULES = {"pytest", "pip", "gunicorn", "celery"}

LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^\s*(```|~~~)")
INLINE_CODE = re.compile(r"`[^`]*`")
SCRIPT = re.compile(r"(?<![\w./-])scripts/([A-Za-z0-9_][\w.-]*)")
PYTHON_MODULE = re.compile(r"\bpython(?:3(?:\.\d+)?)?\s+-m\s+([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)")
CLI = re.compile(r"(?<![\w-])vfy-pipeline\b(.*)")
SHELL_OPERATORS = set("();<>|&")


def _id(doc: Path) -> str:
    return doc.relative_to(ROOT).as_posix()


def _lines(doc: Path) -> Iterator[tuple[int, str, bool]]:
    """(line number, text, inside a fenced code block) for each line but the fences."""
    in_code = False
    for number, line in enumerate(doc.read_text(encoding="utf-8").splitlines(), start=1):
        if FENCE.match(line):
            in_code = not in_code
            continue
        yield number, line, in_code


def _where(doc: Path, number: int) -> str:
    return f"{_id(doc)}:{number}"


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser] | None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return None


def _cli_words(rest: str) -> list[str]:
    """The words after `vfy-pipeline` up to a comment, a pipe or another shell operator."""
    lexer = shlex.shlex(rest, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    words: list[str] = []
    try:
        for token in lexer:
            if set(token) <= SHELL_OPERATORS:
                break
            words.append(token)
    except ValueError:  # an unbalanced quote: keep what was read
        pass
    return words


def _cli_problem(words: list[str], root: argparse.ArgumentParser) -> str | None:
    """Why `vfy-pipeline <words>` is not a command of the parser, or None when it is one."""
    parser, path = root, ["vfy-pipeline"]
    for word in words:
        choices = _subcommands(parser)
        if choices is None:
            return None  # a leaf command: the rest are its arguments
        if word.startswith("-"):
            continue  # an option before the command (--json, --help)
        if word not in choices:
            known = ", ".join(sorted(choices))
            return f"'{' '.join(path)} {word}' is not a command (known: {known})"
        parser = choices[word]
        path.append(word)
    if _subcommands(parser) is not None and not {"-h", "--help", "--version"} & set(words):
        return f"'{' '.join(path)}' is not a complete command"
    return None


def _cli_parser() -> argparse.ArgumentParser:
    from ops.cli import build_parser  # here, so the other checks run even if ops breaks

    return build_parser()


def _module_resolves(module: str) -> bool:
    path = ROOT.joinpath(*module.split("."))
    return path.with_suffix(".py").is_file() or (path / "__main__.py").is_file()


def test_documents_exist() -> None:
    assert README.is_file()
    assert len(DOCS) > 1, "docs/ holds no .md file"


def test_readme_is_short() -> None:
    count = len(README.read_text(encoding="utf-8").splitlines())
    assert count <= README_MAX_LINES, (
        f"README.md has {count} lines, more than {README_MAX_LINES}: move detail into docs/"
    )


def _link_targets(line: str) -> list[str]:
    return LINK.findall(INLINE_CODE.sub("", line))


def _assert_no_problem(
    doc: Path,
    found: Callable[[str], list[str]],
    problem: Callable[[str], str | None],
    in_code: bool | None = None,
) -> None:
    """Fails naming every line of ``doc`` where ``problem`` has something to say of what
    ``found`` finds in it; only in code blocks or only outside them, when ``in_code`` says."""
    problems = [
        f"{_where(doc, number)}: {message}"
        for number, line, code in _lines(doc)
        if in_code is None or code == in_code
        for item in found(line)
        if (message := problem(item))
    ]
    assert not problems, "\n".join(problems)


def test_readme_links_every_doc() -> None:
    linked = {
        (README.parent / target.split("#", 1)[0]).resolve()
        for _, line, in_code in _lines(README)
        if not in_code
        for target in _link_targets(line)
    }
    orphans = [_id(doc) for doc in DOCS[1:] if doc.resolve() not in linked]
    assert not orphans, f"README.md links to none of: {', '.join(orphans)}"


@pytest.mark.parametrize("doc", DOCS, ids=_id)
def test_relative_links_resolve(doc: Path) -> None:
    def problem(target: str) -> str | None:
        if re.match(r"(?i)(https?:|mailto:|#)", target):
            return None
        if (doc.parent / target.split("#", 1)[0]).exists():
            return None
        return f"link to {target!r}: no such file"

    _assert_no_problem(doc, _link_targets, problem, in_code=False)


@pytest.mark.parametrize("doc", DOCS, ids=_id)
def test_scripts_exist(doc: Path) -> None:
    def problem(name: str) -> str | None:
        script = ROOT / "scripts" / name
        if not script.is_file():
            return f"scripts/{name} does not exist"
        if not os.access(script, os.X_OK):
            return f"scripts/{name} is not executable"
        return None

    _assert_no_problem(doc, SCRIPT.findall, problem)


@pytest.mark.parametrize("doc", DOCS, ids=_id)
def test_python_modules_exist(doc: Path) -> None:
    def problem(module: str) -> str | None:
        if module in THIRD_PARTY_MODULES or _module_resolves(module):
            return None
        return (
            f"'python -m {module}': no {module.replace('.', '/')}.py"
            " or package with __main__.py in the repository"
        )

    _assert_no_problem(doc, PYTHON_MODULE.findall, problem)


@pytest.mark.parametrize("doc", DOCS, ids=_id)
def test_cli_commands_exist(doc: Path) -> None:
    root = _cli_parser()
    # Only code blocks: prose may name a planned command; a code block shows one to run.
    _assert_no_problem(
        doc, CLI.findall, lambda rest: _cli_problem(_cli_words(rest), root), in_code=True
    )


def test_cli_check_knows_real_and_planned_commands() -> None:
    root = _cli_parser()
    assert _cli_problem(_cli_words("events list --status dead --json | jq ."), root) is None
    assert _cli_problem(_cli_words('flags resolve 42 --note "done" # why'), root) is None
    assert _cli_problem(_cli_words("--json stats"), root) is None
    assert _cli_problem(_cli_words("events"), root) is not None
    groups = _subcommands(root) or {}
    jobs = _subcommands(groups["jobs"]) if "jobs" in groups else None
    has_jobs_run = jobs is not None and "run" in jobs
    assert (_cli_problem(_cli_words("jobs run redrive"), root) is None) == has_jobs_run


def test_the_compat_lists_in_the_docs_name_every_compat_module() -> None:
    """compat/__init__.py, docs/architecture.md and docs/deployment.md list exactly the
    patches in compat/ (issue 25: they had drifted to 7 and to 5 of 8)."""
    modules = {p.stem for p in (ROOT / "compat").glob("*.py") if p.stem != "__init__"}
    listed = set(re.findall(r"^- ``(\w+)``:", (ROOT / "compat" / "__init__.py").read_text(), re.M))
    assert listed == modules
    for doc in ("architecture.md", "deployment.md"):
        text = (ROOT / "docs" / doc).read_text()
        named = set(re.findall(r"`(\w+)`", text))
        assert modules <= named, f"docs/{doc} does not name {sorted(modules - named)}"
