"""Command line: ``pyro-reparam-conv demo``."""

from __future__ import annotations

import argparse
import runpy
from pathlib import Path
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="pyro-reparam-conv")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="run the main job")
    args = parser.parse_args(argv)
    if args.command == "demo":
        script = Path(__file__).resolve().parent.parent / "examples" / "seed_network.py"
        runpy.run_path(str(script), run_name="__main__")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
