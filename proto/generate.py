"""Regenerates the committed Python code for the protos in proto/kaiwo_gpu/v1.

Run `python proto/generate.py` after editing a .proto file. `--out-dir` writes
elsewhere, which is how the staleness test compares a fresh run with what is committed.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import sysconfig
from pathlib import Path

from grpc_tools import protoc

PROTO_ROOT = Path(__file__).resolve().parent
REPO_ROOT = PROTO_ROOT.parent
DEFAULT_OUT = REPO_ROOT / "common"
PACKAGE_DIR = Path("kaiwo_gpu") / "v1"


def _plugin(name: str) -> str:
    """Finds a protoc plugin next to this interpreter first, so a venv works without activation."""
    scripts = Path(sysconfig.get_path("scripts"))
    candidate = scripts / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise SystemExit(f"{name} not found: install mypy-protobuf (pip install -e '.[dev]')")
    return found


def generate(out_dir: Path) -> list[Path]:
    """Runs protoc over every .proto in the package and returns the files it wrote."""
    protos = sorted((PROTO_ROOT / PACKAGE_DIR).glob("*.proto"))
    package_out = out_dir / PACKAGE_DIR
    package_out.mkdir(parents=True, exist_ok=True)
    well_known = Path(protoc.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"--proto_path={PROTO_ROOT}",
        f"--proto_path={well_known}",
        f"--plugin=protoc-gen-mypy={_plugin('protoc-gen-mypy')}",
        f"--plugin=protoc-gen-mypy_grpc={_plugin('protoc-gen-mypy_grpc')}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--mypy_out={out_dir}",
        f"--mypy_grpc_out={out_dir}",
        *(str(p.relative_to(PROTO_ROOT)) for p in protos),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    init = package_out / "__init__.py"
    init.write_text(
        '"""Generated protobuf and gRPC code of the kaiwo-gpu API v1 (do not edit)."""\n'
    )
    return sorted(p for p in package_out.iterdir() if p.suffix in {".py", ".pyi"})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    for path in generate(args.out_dir):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
