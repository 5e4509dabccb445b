"""The README and the pages of docs/ as a user reads them: every Python block runs as written, and every number
the README quotes beside a results file appears in that file.

Code blocks: every fenced ```python block of README.md and docs/*.md runs, offline, in the order of its page, in
one namespace per page (a later block may use an earlier one's names), with a temporary folder as the working
directory. A block preceded by the line ``<!-- skip-test: reason -->`` is left out (for a block that needs a long
run or real CIFAR-10); the test fails if a page with Python blocks has none that runs, or if no page has one.

Numbers: a paragraph, list item or table of the README that links a results file (``benchmarks/results/*.md``,
``docs/results/*``) quotes it: every number written in it outside code spans (and in a ```text block right after
it) must appear as a number in one of the files it links. So a README sentence with a number sits next to the
link to the file the number comes from, and changing the file without the sentence (or the reverse) fails here.
A README paragraph that quotes a measured-looking number (a decimal, a time, a ratio, a percentage) without such
a link fails too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
README = REPO_ROOT / "README.md"
PAGES = [README, *sorted((REPO_ROOT / "docs").glob("*.md"))]
SKIP_MARK = re.compile(r"^<!--\s*skip-test:\s*(?P<reason>.+?)\s*-->\s*$")
FENCE = re.compile(r"^(?P<fence>```+|~~~+)\s*(?P<lang>[\w+-]*)")
#: Links to the files a README number may come from.
RESULTS_LINK = re.compile(r"\]\((?P<path>(?:benchmarks/results|docs/results)/[^)#\s]+)\)")
#: A number as written in prose: 1,024 · 0.691 · 7.5 · 1e-5 · 2.5×; not a part of a name such as h0 or fig2.
NUMBER = re.compile(r"(?<![\w.\-/])-?\d[\d,]*(?:\.\d+)?(?:e[-+]?\d+)?(?![\w])")
pytestmark = pytest.mark.filterwarnings(
    "ignore:.*does not have many workers",
    "ignore:.*GPU available but not used",
)


# ------------------------------------------------------------------------------------------------ code blocks
@dataclass
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    lang: str
    text: str
    skip: str | None  # the reason of a skip-test mark, or None


def code_blocks(text: str, page: Path) -> list[Block]:
    """The fenced code blocks of a markdown text, with their language and skip mark."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        fence, start = match.group("fence"), i
        j = i + 1
        while j < len(lines) and not lines[j].startswith(fence):
            j += 1
        prev = next((lines[k] for k in range(start - 1, -1, -1) if lines[k].strip()), "")
        skip = SKIP_MARK.match(prev.strip())
        blocks.append(Block(page, start + 1, match.group("lang").lower(), "\n".join(lines[start + 1 : j]),
                            skip.group("reason") if skip else None))
        i = j + 1
    return blocks


def python_blocks(page: Path) -> list[Block]:
    return [b for b in code_blocks(page.read_text(), page) if b.lang in ("python", "py")]


def test_code_block_parser_reads_languages_and_skip_marks():
    text = "a\n```python\nx = 1\n```\n<!-- skip-test: needs CIFAR-10 -->\n```python\ny = 2\n```\n```bash\nls\n```\n"
    blocks = code_blocks(text, Path("t.md"))
    assert [(b.lang, b.text, b.skip, b.line) for b in blocks] == [
        ("python", "x = 1", None, 2),
        ("python", "y = 2", "needs CIFAR-10", 6),
        ("bash", "ls", None, 9),
    ]


def test_every_page_with_python_blocks_runs_some_and_the_readme_has_one():
    runnable = {page.name: [b for b in python_blocks(page) if b.skip is None] for page in PAGES}
    assert runnable["README.md"], "the README's Python example must run"
    for page in PAGES:
        blocks = python_blocks(page)
        if blocks:
            assert any(b.skip is None for b in blocks), f"{page.name}: every Python block is marked skip-test"
    assert sum(len(v) for v in runnable.values()) >= 5


@pytest.mark.parametrize("page", [p for p in PAGES if python_blocks(p)], ids=lambda p: p.name)
def test_python_blocks_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # whatever a block writes (logs, checkpoints) lands here
    namespace: dict = {"__name__": f"docs_{page.stem}"}
    ran = 0
    for block in python_blocks(page):
        if block.skip is not None:
            continue
        code = compile(block.text, f"{page.relative_to(REPO_ROOT)}:{block.line}", "exec")
        exec(code, namespace)
        ran += 1
    assert ran >= 1


# ------------------------------------------------------------------------------------------------ numbers
def numbers_in(text: str) -> list[str]:
    """The numbers of a prose text, normalised (thousands separators dropped), code spans left out."""
    text = "\n".join(line for line in text.splitlines() if not FENCE.match(line))  # keep a block's content
    prose = re.sub(r"`[^`\n]*`", " ", text)
    prose = re.sub(r"\]\([^)]*\)", "]", prose)  # link targets are paths, not quotes
    return [m.group(0).replace(",", "") for m in NUMBER.finditer(prose) if m.group(0).strip("-")]


def quoted_blocks(text: str) -> list[tuple[str, list[str]]]:
    """(block, linked results files) for each paragraph, list item or table of ``text`` that links a results file;
    a ```text block right after such a block belongs to it."""
    chunks: list[str] = []
    current: list[str] = []
    in_code, code_kind = False, ""
    for line in text.splitlines():
        fence = FENCE.match(line)
        if in_code:
            current.append(line) if code_kind == "text" else None
            if line.startswith("```"):
                in_code = False
            continue
        if fence:
            in_code, code_kind = True, fence.group("lang")
            if code_kind == "text" and not current and chunks:
                current = [chunks.pop()]  # the output block continues the paragraph that introduced it
            elif code_kind != "text":
                chunks.append("\n".join(current)) if current else None
                current = []
            continue
        if not line.strip() or line.startswith("#") or re.match(r"^\s*[-*] ", line):
            if current:
                chunks.append("\n".join(current))
            current = [line] if line.strip() and not line.startswith("#") else []
            continue
        current.append(line)
    if current:
        chunks.append("\n".join(current))
    return [(chunk, RESULTS_LINK.findall(chunk)) for chunk in chunks if RESULTS_LINK.search(chunk)]


def disagreements(text: str, root: Path) -> tuple[list[str], int]:
    """The README numbers missing from the results files their block links, and how many were checked."""
    problems, checked = [], 0
    for block, paths in quoted_blocks(text):
        found: set[str] = set()
        for rel in paths:
            path = root / rel
            if not path.is_file():
                problems.append(f"linked results file {rel} does not exist")
                continue
            found |= set(numbers_in(path.read_text()))
        for number in numbers_in(block):
            checked += 1
            if number not in found:
                problems.append(f"{number} (in: {' '.join(block.split())[:120]}...) is not in {', '.join(paths)}")
    return problems, checked


#: A measured-looking number: decimals, exponents, times, ratios and percentages (integers such as "3 vs 5" or
#: "10 epochs" are settings, not measurements).
MEASUREMENT = re.compile(r"\d\.\d|\de[-+]?\d|\d\s?(?:s|min|ms|×|%)(?![\w])")


def unlinked_measurements(text: str) -> list[str]:
    """Prose blocks of ``text`` that quote a measured-looking number without linking a results file."""
    linked = {block for block, _ in quoted_blocks(text)}
    found, prose_lines, in_code = [], [], False
    for line in text.splitlines():  # code blocks are left out: they are commands and output, checked elsewhere
        if FENCE.match(line):
            in_code = not in_code
            prose_lines.append("")
        elif not in_code:
            prose_lines.append(line)
    for chunk in re.split(r"\n\s*\n", "\n".join(prose_lines)):
        if not chunk.strip() or any(chunk.strip() in block for block in linked):
            continue
        prose = re.sub(r"`[^`\n]*`", " ", chunk)
        prose = re.sub(r"\]\([^)]*\)", "]", prose)
        if MEASUREMENT.search(prose):
            found.append(" ".join(chunk.split())[:120])
    return found


def test_numbers_are_matched_as_written():
    assert numbers_in("h0 grows from 7.5 to 1,024 (`every_n_steps=10`) in 32 s, α 4.7e-3, fig2 and [x](a/b1.md)") == [
        "7.5", "1024", "32", "4.7e-3",
    ]  # fmt: skip


def test_a_number_that_disagrees_with_its_file_fails(tmp_path):
    (tmp_path / "docs" / "results").mkdir(parents=True)
    (tmp_path / "docs" / "results" / "run.md").write_text("| val acc | 0.691 |\n| steps | 790 |\n")
    good = "The run took 790 steps and reached 0.691 ([results](docs/results/run.md)).\n\nPython 3.10 is needed.\n"
    assert disagreements(good, tmp_path) == ([], 2)
    bad = good.replace("0.691", "0.701")
    problems, _ = disagreements(bad, tmp_path)
    assert len(problems) == 1 and problems[0].startswith("0.701 ")
    missing = good.replace("run.md", "gone.md")
    assert disagreements(missing, tmp_path)[0][0] == "linked results file docs/results/gone.md does not exist"
    # an output block after the paragraph that links the file is checked too
    with_output = good + "\nIt prints:\n[r](docs/results/run.md)\n```text\nval 0.691, 791 steps\n```\n"
    problems, checked = disagreements(with_output, tmp_path)
    assert problems and problems[0].startswith("791 ") and checked == 4


def test_a_measurement_without_a_link_to_its_results_file_fails():
    text = "Setup: 3 vs 5, 10 epochs, Python `3.10`.\n\nIt took 32 s.\n\nAccuracy 0.691 ([r](docs/results/run.md)).\n"
    assert unlinked_measurements(text) == ["It took 32 s."]


def test_every_measurement_in_the_readme_links_its_results_file():
    found = unlinked_measurements(README.read_text())
    assert not found, "README numbers without a link to the results file they come from:\n" + "\n".join(found)


def test_every_number_the_readme_quotes_is_in_the_results_file_it_links():
    problems, checked = disagreements(README.read_text(), REPO_ROOT)
    assert not problems, "\n".join(problems)
    assert checked >= 10, f"only {checked} quoted numbers found: the README should link its sources"
