"""Type-check libs/, services/ and gateway/ with mypy, each file once under its installed module name.

pyproject.toml maps the package onto three folders ([tool.setuptools.package-dir]: audiomesh -> libs/audiomesh,
audiomesh.services -> services, audiomesh.gateway -> gateway). The editable install resolves that with an
import hook, which mypy does not run, and mypy_path cannot merge folders into one regular package. So this
script lays the same package out as symlinks under build/typecheck (rebuilt on every run, a few ms), runs
mypy on it with the [tool.mypy] settings, and prints its messages under the real paths. Arguments are passed
on to mypy (e.g. --no-incremental). Exit status is mypy's.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TREE = Path("build/typecheck")  # relative to ROOT: mypy prints paths as found, and this is what we rewrite


def package_dirs() -> dict[str, Path]:
    """Package name -> its source folder, from pyproject.toml (the one definition of the layout)."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    mapping = pyproject["tool"]["setuptools"]["package-dir"]
    return {name: Path(folder) for name, folder in mapping.items()}


def build_tree(packages: dict[str, Path]) -> dict[Path, Path]:
    """Symlink each package folder into TREE at its module path; return tree path -> real path."""
    shutil.rmtree(ROOT / TREE, ignore_errors=True)
    links: dict[Path, Path] = {}
    for name in sorted(packages, key=lambda n: n.count(".")):  # parents first
        source, target = packages[name], TREE.joinpath(*name.split("."))
        has_mapped_children = any(other.startswith(name + ".") for other in packages)
        (ROOT / target.parent).mkdir(parents=True, exist_ok=True)
        if has_mapped_children:
            # A real folder of per-entry links, so the mapped subpackages can sit beside them.
            (ROOT / target).mkdir(exist_ok=True)
            for entry in (ROOT / source).iterdir():
                if entry.name != "__pycache__":
                    (ROOT / target / entry.name).symlink_to(entry)
        else:
            link = ROOT / target
            if link.is_symlink():  # the parent folder had an entry of this name
                link.unlink()
            link.symlink_to(ROOT / source, target_is_directory=True)
        links[target] = source
    return links


def real_path(line: str, links: dict[Path, Path]) -> str:
    """Rewrite a mypy message's leading tree path to the file's path in the repository."""
    for tree_path in sorted(links, key=lambda p: len(p.parts), reverse=True):  # deepest mapping wins
        prefix = tree_path.as_posix() + "/"
        if line.startswith(prefix):
            return links[tree_path].as_posix() + "/" + line[len(prefix) :]
    return line


def main() -> int:
    os.chdir(ROOT)
    links = build_tree(package_dirs())
    done = subprocess.run([sys.executable, "-m", "mypy", *sys.argv[1:]], capture_output=True, text=True)
    for stream, text in ((sys.stdout, done.stdout), (sys.stderr, done.stderr)):
        for line in text.splitlines():
            print(real_path(line, links), file=stream)
    return done.returncode


if __name__ == "__main__":
    sys.exit(main())
