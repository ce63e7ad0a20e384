from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from kaiwo_gpu.cli.main import build_parser, main
from kaiwo_gpu.cli.request_flags import request_from_flags


def test_demo_places_and_summarises(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--nodes", "1", "--gpus", "2", "--requests", "30", "--seed", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    placed = [line for line in lines if " -> node-00 GPU " in line]
    refused = [line for line in lines if " REFUSED " in line]
    assert placed
    assert refused, "30 requests cannot all fit on 2 GPUs"
    assert all("no GPU can take" in line for line in refused)
    assert lines[-1].startswith(f"{len(placed)} placed, {len(refused)} refused with best-fit")


def test_demo_is_repeatable_for_a_seed(capsys: pytest.CaptureFixture[str]) -> None:
    main(["demo", "--seed", "9", "--strategy", "round-robin"])
    first = capsys.readouterr().out
    main(["demo", "--seed", "9", "--strategy", "round-robin"])
    assert capsys.readouterr().out == first


@pytest.mark.parametrize(
    "argv",
    [["demo", "--nodes", "0"], ["demo", "--gpus", "x"], ["demo", "--strategy", "tetris"], ["nope"]],
)
def test_bad_flags_exit_2_with_one_line(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    error_lines = [
        line for line in capsys.readouterr().err.splitlines() if line.startswith("kaiwo-gpu")
    ]
    assert len(error_lines) == 1
    assert "error:" in error_lines[0]


def test_strategies_lists_every_builtin(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["strategies"]) == 0
    out = capsys.readouterr().out
    for name in (
        "first-fit",
        "best-fit",
        "worst-fit",
        "round-robin",
        "load-balanced",
        "frag-aware",
    ):
        assert name in out


@pytest.mark.integration
def test_console_script_is_installed() -> None:
    script = Path(sys.executable).parent / "kaiwo-gpu"
    assert script.exists(), "install the package (pip install -e .) to get the kaiwo-gpu command"
    result = subprocess.run([script, "--version"], capture_output=True, text=True, check=True)
    assert result.stdout.startswith("kaiwo-gpu 0.")


@pytest.mark.parametrize(("spelling", "kind"), [("time-slicing", "none"), ("mps", "cu-mask")])
def test_isolation_aliases_are_accepted_as_flags_and_mapped(spelling: str, kind: str) -> None:
    """Every alias the annotations accept is a flag value too (one table: ISOLATION_ALIASES)."""
    args = build_parser().parse_args(["allocate", "--fraction=0.5", f"--isolation={spelling}"])
    placed = request_from_flags(args)
    assert placed.isolation.value == kind
    assert f"{spelling!r}" in placed.isolation_note


ODD_COMMAND_LINES = [
    ["--help"],
    ["--he", "run"],
    ["--hel", "allocate"],
    ["-h", "run"],
    ["--", "run"],
    ["--", "--version"],
    ["--versio"],
    ["--version"],
    ["alloc"],
    ["foo", "--help"],
    ["-x", "run"],
    [],
    ["run", "--help"],
    ["allocate", "--fraction", "2"],
    ["coordinator", "--listen", "nonsense"],
]


@pytest.mark.parametrize("argv", ODD_COMMAND_LINES, ids=" ".join)
def test_a_parser_built_for_a_command_line_answers_it_as_the_whole_parser_would(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """Only the named command's parser is built (start-up time), which must never change
    what a command line gets: the same help, version, error and exit status."""

    def answer(parser: argparse.ArgumentParser) -> tuple[object, str, str]:
        try:
            parsed: object = vars(parser.parse_args(argv))
        except SystemExit as exit_:
            parsed = exit_.code
        captured = capsys.readouterr()
        return parsed, captured.out, captured.err

    assert answer(build_parser(argv)) == answer(build_parser())


@pytest.mark.parametrize(("spelling", "kind"), [("TIME-SLICING", "none"), (" mps", "cu-mask")])
def test_the_isolation_flag_reads_a_kind_as_the_annotation_does(spelling: str, kind: str) -> None:
    args = build_parser().parse_args(["allocate", "--fraction=0.5", f"--isolation={spelling}"])
    assert request_from_flags(args).isolation.value == kind
