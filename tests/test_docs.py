"""The documentation stays true to the program: docs/options.md lists exactly the options it
accepts, every docs/ page is linked from the README, the README stays short, and every relative
link in the README and docs/ leads to a file that exists."""

from __future__ import annotations

import re
from pathlib import Path

from trackingproxy.options import FLAGS, PARAMETERS, REPEATABLE, Options

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
OPTIONS_PAGE = DOCS / "options.md"
CHECK_SECTION = "## Options of `trackingproxy check` only"
README_MAX_LINES = 250

_OPTION = re.compile(r"`--([a-z0-9][a-z0-9-]*)")
_CELL_SEPARATOR = re.compile(r"(?<!\\)\|")  # `\|` inside a cell is not a separator
_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)[^)]*\)")
_FENCED = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
_CODE_SPAN = re.compile(r"`[^`\n]*`")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def table_options(text: str) -> dict[str, set[str]]:
    """The `--options` named in the first cell of each table row, by `## ` section heading."""
    sections: dict[str, set[str]] = {}
    heading = ""
    for line in text.splitlines():
        if line.startswith("## "):
            heading = line.strip()
        elif line.startswith("|"):
            first_cell = _CELL_SEPARATOR.split(line)[1]
            sections.setdefault(heading, set()).update(_OPTION.findall(first_cell))
    return sections


def relative_links(page: Path) -> list[str]:
    """Targets of the page's Markdown links and images that are neither URLs nor anchors."""
    text = _CODE_SPAN.sub("", _FENCED.sub("", page.read_text()))
    targets = (m.group(1) for m in _LINK.finditer(text))
    return [t for t in targets if not _SCHEME.match(t) and not t.startswith("#")]


def resolve(page: Path, target: str) -> Path:
    return (page.parent / target.split("#", 1)[0]).resolve()


def long_options(options: Options) -> set[str]:
    """Every long option a parsed-options object accepts, without twistd's --help/--version."""
    return {name.rstrip("=") for name in options.longOpt} - {"help", "version"}


def check_only_options() -> set[str]:
    """The options `trackingproxy check` accepts on top of the proxy's."""
    from trackingproxy.checks.cli import CheckOptions

    return long_options(CheckOptions(environ={})) - long_options(Options(environ={}))


def docs_pages() -> list[Path]:
    return sorted(DOCS.glob("*.md"))


def test_options_page_lists_exactly_the_proxy_options():
    """Every option and flag defined in trackingproxy/options.py has a row in docs/options.md,
    and no row there (outside the check-only table) names an option the proxy does not have."""
    program = set(REPEATABLE) | {name for name, _, _ in PARAMETERS} | {name for name, _ in FLAGS}
    sections = table_options(OPTIONS_PAGE.read_text())
    documented = set().union(*(names for h, names in sections.items() if h != CHECK_SECTION))
    assert not program - documented, f"missing from docs/options.md: {program - documented}"
    assert not documented - program, f"not options of the program: {documented - program}"


def test_options_page_lists_exactly_the_check_only_options():
    """The check-only table of docs/options.md names exactly the options `trackingproxy check`
    accepts on top of the proxy's."""
    documented = table_options(OPTIONS_PAGE.read_text()).get(CHECK_SECTION, set())
    assert documented == check_only_options()


def test_every_docs_page_is_linked_from_the_readme():
    """Each docs/*.md page is the target of a link in README.md."""
    linked = {resolve(README, target) for target in relative_links(README)}
    assert docs_pages(), "no docs/*.md pages"
    unlinked = [page.name for page in docs_pages() if page.resolve() not in linked]
    assert not unlinked, f"docs pages not linked from README.md: {unlinked}"


def test_readme_is_short():
    """README.md stays a guide for users: at most 250 lines."""
    lines = len(README.read_text().splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines"


def test_relative_links_lead_to_existing_files():
    """Every relative link or image in README.md and docs/*.md points to a file that exists."""
    broken = [
        f"{page.relative_to(ROOT)}: {target}"
        for page in [README, *docs_pages()]
        for target in relative_links(page)
        if not resolve(page, target).exists()
    ]
    assert not broken, f"broken links: {broken}"
