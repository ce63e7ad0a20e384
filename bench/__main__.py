"""`python -m bench NAME [--quick] [--json FILE] [options]`: runs one benchmark suite.

Run from the repository root. `python -m bench --help` lists the suites, `python -m bench NAME
--help` shows a suite's method and options. `--json FILE` writes the figures the suite
printed, with the options and the machine, so runs can be compared by a script.
`python -m bench all [--quick] [--json FILE]` runs every suite in turn (`python -m bench
--quick` is short for `all --quick`); its JSON holds one such document per suite.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from bench.suites import SUITES, Suite, SuiteSpec

if TYPE_CHECKING:
    from bench.lib import Figures, Outcome

JSON_SCHEMA = 1
COMMON_DESTS = ("quick", "json")
ALL = "all"


def _top_parser() -> argparse.ArgumentParser:
    width = max(len(name) for name in SUITES)
    listing = "\n".join(f"  {name:<{width}}  {suite.summary}" for name, suite in SUITES.items())
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Runs one benchmark suite; each prints its figures with ratios against\n"
        "a baseline measured in the same run. Run from the repository root.",
        epilog=f"suites:\n{listing}\n\n`python -m bench NAME --help` shows a suite's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "suite", metavar="NAME", choices=[*SUITES, ALL], help=f"the suite to run, or {ALL}"
    )
    return parser


def _all_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"python -m bench {ALL}",
        description="Runs every suite in turn with its default options, or its quickest form.",
    )
    parser.add_argument("--quick", action="store_true", help="every suite's quickest form")
    parser.add_argument(
        "--json", type=Path, default=None, metavar="FILE", help="one document per suite"
    )
    return parser


def _suite_parser(suite: Suite, spec: SuiteSpec) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"python -m bench {suite.name}",
        description=spec.description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    spec.add_arguments(parser)
    known = vars(parser.parse_args([]))
    unknown = sorted(set(spec.quick) - set(known))
    if unknown:
        raise TypeError(f"{suite.module}: --quick sets options it does not have: {unknown}")
    common = parser.add_argument_group("every suite")
    quick = " ".join(f"--{dest.replace('_', '-')} {_shown(v)}" for dest, v in spec.quick.items())
    common.add_argument(
        "--quick",
        action="store_true",
        help=f"the quickest form, a few seconds (= {quick or 'the defaults'}); an option "
        "given as well overrides it",
    )
    common.add_argument(
        "--json",
        type=Path,
        default=None,
        metavar="FILE",
        help="also write the figures, the options and the machine to FILE as JSON",
    )
    return parser


def _shown(value: object) -> str:
    if isinstance(value, list | tuple):
        return ",".join(str(item) for item in value)
    return str(value)


def json_ready(value: object) -> object:
    """`value` with paths as text, tuples as lists and non-finite floats as null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {str(key): json_ready(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [json_ready(item) for item in value]
    return value


def document(suite: Suite, args: argparse.Namespace, outcome: Outcome) -> Figures:
    options = {dest: value for dest, value in vars(args).items() if dest not in COMMON_DESTS}
    return {
        "schema": JSON_SCHEMA,
        "suite": suite.name,
        "status": outcome.status,
        "quick": bool(args.quick),
        "options": options,
        "machine": {
            "python": platform.python_version(),
            "implementation": platform.python_implementation(),
            "arch": platform.machine(),
            "cpus": os.cpu_count(),
        },
        "figures": outcome.figures,
    }


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments and arguments[0] == ALL:
        return run_all(arguments[1:])
    if arguments and arguments[0] == "--quick":
        return run_all(arguments)
    if not arguments or arguments[0] not in SUITES:
        _top_parser().parse_args(arguments)  # prints the help, or an error naming the suites
        return 2
    suite = SUITES[arguments[0]]
    spec = suite.load()
    parser = _suite_parser(suite, spec)
    args = _parsed(parser, spec, arguments[1:])
    if args.json is not None:
        _check_writable(parser, args.json)  # before the run, not after minutes of it
    outcome = spec.run(args)
    if args.json is not None:
        _write(args.json, document(suite, args, outcome))
    return outcome.status


def run_all(arguments: Sequence[str]) -> int:
    """Every suite in turn; the worst status, and one JSON document per suite."""
    parser = _all_parser()
    chosen = parser.parse_args(arguments)
    if chosen.json is not None:
        _check_writable(parser, chosen.json)
    documents: list[Figures] = []
    status = 0
    for suite in SUITES.values():
        print(f"== {suite.name}", flush=True)
        spec = suite.load()
        args = _parsed(_suite_parser(suite, spec), spec, ["--quick"] if chosen.quick else [])
        outcome = spec.run(args)
        status = max(status, outcome.status)
        documents.append(document(suite, args, outcome))
        print(flush=True)
    if chosen.json is not None:
        _write(chosen.json, {"schema": JSON_SCHEMA, "suite": ALL, "suites": documents})
    return status


def _parsed(
    parser: argparse.ArgumentParser, spec: SuiteSpec, arguments: Sequence[str]
) -> argparse.Namespace:
    args = parser.parse_args(arguments)
    if args.quick:
        parser.set_defaults(**spec.quick)
        args = parser.parse_args(arguments)
    return args


def _write(path: Path, figures: Figures) -> None:
    text = json.dumps(json_ready(figures), indent=2, allow_nan=False)
    path.write_text(text + "\n", encoding="utf-8")


def _check_writable(parser: argparse.ArgumentParser, path: Path) -> None:
    """Exits 2 with one line when FILE cannot be written (its folder missing, no rights)."""
    try:
        with path.open("a", encoding="utf-8"):
            pass
    except OSError as error:
        parser.error(f"argument --json: cannot write {path}: {error.strerror}")


if __name__ == "__main__":  # not when multiprocessing's spawn re-imports this as __mp_main__
    sys.exit(main())
