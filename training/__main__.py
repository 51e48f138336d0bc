"""``python -m training ARGS`` = ``vllm-lk train ARGS``: the entry for torchrun (data-parallel
training), which starts a module rather than a console script."""

from __future__ import annotations

import argparse
import logging
import sys

from training.train_cli import add_arguments, run
from vllm_lk.errors import UserError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training", description="vllm-lk train (for torchrun)")
    parser.add_argument("--log-level", default="INFO", help="logging level (default: INFO)")
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return run(args)
    except UserError as err:
        print(f"vllm-lk train: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
