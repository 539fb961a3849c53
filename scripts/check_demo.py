"""CI's check that the quickstart printed the table the README shows.

The README holds the demo's table between ``<!-- demo-table -->`` and ``<!-- /demo-table -->``;
``scripts/quickstart.sh`` writes it to ``outputs/eval/demo/results.md``. Any difference fails, so
the README's figure is what a fresh clone with the lock prints, not what a machine once printed.

    .venv/bin/python scripts/check_demo.py [README.md] [outputs/eval/demo/results.md]
"""

from __future__ import annotations

import difflib
import re
import sys
from pathlib import Path

START, END = "<!-- demo-table -->", "<!-- /demo-table -->"


def table_lines(text: str) -> list[str]:
    """The markdown table rows of ``text`` (lines starting with ``|``), stripped."""
    return [line.strip() for line in text.splitlines() if line.strip().startswith("|")]


def readme_table(readme: Path) -> list[str]:
    match = re.search(re.escape(START) + "(.*?)" + re.escape(END), readme.read_text(encoding="utf-8"), re.S)
    if not match:
        raise SystemExit(f"check_demo: {readme} has no {START} ... {END} block")
    return table_lines(match.group(1))


def main(argv: list[str]) -> int:
    readme = Path(argv[0] if argv else "README.md")
    results = Path(argv[1] if len(argv) > 1 else "outputs/eval/demo/results.md")
    if not results.is_file():
        print(f"check_demo: {results} not found: run bash scripts/quickstart.sh first", file=sys.stderr)
        return 2
    expected, printed = readme_table(readme), table_lines(results.read_text(encoding="utf-8"))
    if expected == printed:
        print(f"check_demo: the quickstart's table equals {readme}'s ({len(printed) - 2} rows)")
        return 0
    diff = difflib.unified_diff(expected, printed, f"{readme}", f"{results}", lineterm="")
    print("check_demo: the quickstart printed another table than the README shows:\n" + "\n".join(diff),
          file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
