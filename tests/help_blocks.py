"""`vllm-lk ... --help` blocks in README.md and docs/*.md, checked against the real parser.

A block is a fenced ``text`` block whose first line is ``$ vllm-lk [COMMAND ...] --help``; the rest
must be exactly what that command prints at 80 columns. ``python -m tests.help_blocks`` rewrites
every block from the parser (run it after changing a command's flags or help)."""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"```text\n\$ vllm-lk(?P<args>(?: [\w-]+)*) --help\n(?P<body>.*?)```", re.S)


def documents() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def real_help(args: list[str]) -> str:
    """What ``vllm-lk ARGS --help`` prints at 80 columns (argparse reads COLUMNS)."""
    from server.cli import build_parser

    saved = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "80"
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
            build_parser().parse_args([*args, "--help"])
    finally:
        if saved is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = saved
    return out.getvalue()


def blocks(text: str):
    """(args, documented help) of every help block in ``text``."""
    for match in BLOCK.finditer(text):
        yield match.group("args").split(), match.group("body")


def rewrite(text: str) -> str:
    return BLOCK.sub(lambda m: f"```text\n$ vllm-lk{m.group('args')} --help\n{real_help(m.group('args').split())}```", text)


def main() -> int:
    for path in documents():
        text = path.read_text()
        new = rewrite(text)
        if new != text:
            path.write_text(new)
            print(f"updated {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
