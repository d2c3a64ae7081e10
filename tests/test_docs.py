"""docs/ stays true: the CLI reference is what --help says, every documented command parses, links resolve."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from finetune import cli, docs

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
CLI_MD = DOCS / "cli.md"
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]


def _sections(text: str) -> dict[str, str]:
    """cli.md's text per command, by the command's name."""
    parts = re.split(r"^## `finetune ([a-z-]+)`$", text, flags=re.MULTILINE)
    return dict(zip(parts[1::2], parts[2::2]))


def test_the_committed_cli_reference_is_what_the_generator_renders_now():
    assert CLI_MD.read_text() == docs.render_cli_reference(), (
        "docs/cli.md is stale: regenerate it with `python -m finetune.docs > docs/cli.md`"
    )


def test_every_option_of_every_command_is_in_its_section_of_the_reference():
    sections = _sections(CLI_MD.read_text())
    parser = cli.build_parser()
    subcommands = docs.subcommand_parsers(parser)
    assert list(sections) == list(subcommands) == [command.name for command in cli.COMMANDS]
    missing = []
    for name, sub in subcommands.items():
        listed = re.findall(r"^- `([^`]*)`", sections[name], re.MULTILINE)  # one list item per argument
        words = {word for item in listed for word in re.split(r"[ ,]+", item)}
        for action in sub._actions:
            for option in action.option_strings:
                if option not in words:
                    missing.append(f"{name} {option}")
            if not action.option_strings and docs.invocation(action) not in listed:
                missing.append(f"{name} {action.dest}")
    assert not missing, f"in `finetune COMMAND --help` but not in docs/cli.md: {missing}"


def test_the_reference_shows_train_flags_under_their_group_titles():
    train = _sections(CLI_MD.read_text())["train"]
    cache = train.split("**feature cache**", 1)[1].split("**", 1)[0]
    assert "`--feature-cache {auto,on,off}`" in cache and "`--cache-dir CACHE_DIR`" in cache
    assert "`--dataset DATASET`: (required)" in train.split("**data and run dir**", 1)[1]


def _documented_commands() -> list[tuple[str, str]]:
    """Every `finetune ...` line in a bash block of the README and docs/, with the page it is on."""
    found = []
    for page in PAGES:
        for block in re.findall(r"^```bash\n(.*?)^```", page.read_text(), re.MULTILINE | re.DOTALL):
            for line in block.splitlines():
                command = line.split("#", 1)[0].strip()
                if command.startswith("finetune "):
                    found.append((page.name, command))
    return found


@pytest.mark.parametrize("page, command", _documented_commands())
def test_every_documented_command_parses_with_the_real_parser(page, command):
    words = shlex.split(command)[1:]
    try:
        args = cli.build_parser().parse_args(words)
    except SystemExit as exc:
        pytest.fail(f"{page}: `{command}` is refused by the CLI (exit {exc.code})")
    if getattr(args, "command_spec", None):
        cli.config_from_args(args.command_spec.config, args)  # the config's own checks too


def test_the_docs_name_every_command():
    text = "\n".join(page.read_text() for page in PAGES)
    for command in cli.COMMANDS:
        assert f"finetune {command.name}" in text, command.name


def _slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_relative_links_reach_a_file_and_heading(page):
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
        if re.match(r"[a-z]+:", target):
            continue  # a web address
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(target)
        elif anchor:
            headings = re.findall(r"^#+ (.*)$", file.read_text(), re.MULTILINE)
            if anchor not in {_slug(heading) for heading in headings}:
                broken.append(target)
    assert not broken, f"{page.name}: links to nothing: {broken}"


def test_the_scripts_the_docs_run_exist():
    text = "\n".join(page.read_text() for page in PAGES)
    scripts = set(re.findall(r"python (scripts/[\w/]+\.py)", text))
    assert "scripts/benchmark.py" in scripts
    assert not [script for script in scripts if not (ROOT / script).is_file()]
