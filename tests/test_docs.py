"""The documentation cannot drift from the code: every ``ptqbench`` command line in README.md and docs/
parses with its subcommand's own parser, each method page carries the option table the code generates,
relative links resolve, and the README stays a guide (short, no history, nothing outside the repository)."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest

from harness.cli import main
from harness.cli.methods import with_table
from harness.registry import REGISTRY

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
SHELL_STOPS = {"|", "||", "&&", ";", ">", ">>", "2>&1", "&"}


def command_lines(text: str) -> list[str]:
    """``ptqbench ...`` lines of shell code blocks (continuations joined) and of inline code spans."""
    found = []
    for lang, body in re.findall(r"```(\w*)\n(.*?)```", text, flags=re.S):
        if lang not in ("", "bash", "sh", "shell", "console"):
            continue
        for line in body.replace("\\\n", " ").splitlines():
            line = line.strip().removeprefix("$ ")
            if line.startswith("ptqbench "):
                found.append(line)
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    found += [span for span in re.findall(r"`(ptqbench [^`]+)`", prose)]
    return found


def arguments(line: str) -> list[str]:
    """The words after ``ptqbench``, up to a comment or a shell operator."""
    words = []
    for word in shlex.split(line, comments=True)[1:]:
        if word in SHELL_STOPS:
            break
        words.append(word)
    return words


def documented_commands() -> list[tuple[str, str]]:
    return [(str(page.relative_to(ROOT)), line) for page in PAGES for line in command_lines(page.read_text())]


def check(words: list[str]) -> None:
    """Parse ``words`` as ``ptqbench``'s command line: known subcommand and flags, valid choices, no extra arguments.

    Only the parsers run (no type conversion), so paths need not exist and placeholders parse.
    """
    ctx = click.Context(main, info_name="ptqbench")
    _, rest, _ = main.make_parser(ctx).parse_args(list(words))  # the group's own options, up to the subcommand
    assert rest, "no subcommand"
    name, rest = rest[0], rest[1:]
    command = main.get_command(ctx, name)
    assert command is not None, f"no subcommand {name!r}"
    if "--help" in rest:
        return
    sub = click.Context(command, info_name=name, parent=ctx)
    values, extra, _ = command.make_parser(sub).parse_args(list(rest))  # unknown options raise here
    assert not extra, f"extra arguments {extra}"  # the parser hands declared arguments to values
    for p in command.params:
        if isinstance(p.type, click.Choice) and values.get(p.name) is not None:
            given = values[p.name] if isinstance(values[p.name], (list, tuple)) else [values[p.name]]
            for value in given:
                assert value in p.type.choices, f"{p.opts[0]} {value!r} not in {p.type.choices}"


def test_the_docs_show_commands():
    assert len(documented_commands()) >= 20


@pytest.mark.parametrize("page, line", documented_commands())
def test_every_documented_command_parses(page, line):
    try:
        check(arguments(line))
    except click.UsageError as err:
        pytest.fail(f"{page}: `{line}`: {err.format_message()}")


def test_the_checker_refuses_bad_command_lines():
    with pytest.raises(click.UsageError):
        check(["run", "configs/demo.yaml", "--no-such-flag"])
    with pytest.raises(AssertionError):
        check(["nosuchcommand"])
    with pytest.raises(AssertionError):
        check(["export", "3f2a9c0d1e2b4a5c", "extra", "--out", "x"])
    with pytest.raises(AssertionError, match="not in"):
        check(["run", "configs/demo.yaml", "--executor", "kubernetes"])
    check(["run", "configs/demo.yaml", "--out", "runs/demo", "--dry-run"])


@pytest.mark.parametrize("name", [n for n in REGISTRY.names() if REGISTRY.source(n) == "builtin"])
def test_each_method_page_carries_the_generated_option_table(name):
    page = ROOT / "docs" / "methods" / f"{name}.md"
    assert page.is_file(), f"docs/methods/{name}.md is missing"
    text = page.read_text()
    assert with_table(text, REGISTRY.get(name)) == text, f"run: ptqbench methods --write-docs docs/methods ({page.name} is stale)"


def test_every_builtin_option_says_what_it_does():
    from harness.method import options

    missing = [f"{n}.{o.name}" for n in REGISTRY.names() if REGISTRY.source(n) == "builtin"
               for o in options(REGISTRY.get(n).config_class) if not o.help]
    assert missing == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text())
    broken = [link for link in links if "://" not in link and not (page.parent / link).exists()]
    assert broken == []


def test_the_readme_is_a_guide_and_the_docs_speak_of_now():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 320
    for page in PAGES:
        text = page.read_text()
        hits = re.findall(r"\b(sessions?|what changed|earlier sessions?)\b|\.\./shared", text, flags=re.I)
        assert not hits, f"{page.relative_to(ROOT)}: {hits}"
