"""The Python environment against its lock: what is installed, which lock it matches, and whether it holds together.

The train stage records environment() in its run record (publish puts it in the lineage and the provenance; the
audit compares it with the auditing environment). `make install` runs `python -m tasks.common.environment` after
installing: it fails when the environment is not exactly its lock, or when a locked package's requirement is not
met by what is installed (torch's among them, the host's on a GPU box). pip check would also judge the host's own
unrelated packages there, which this project does not install.
"""

from __future__ import annotations

import hashlib
import re
import sys
from importlib import metadata
from pathlib import Path

from tasks.common.artifacts import sha256_file

# The lock files a fresh clone installs from (Makefile, docs/environment.md); each variant's pins are compared with
# what is installed to say which one this environment is.
LOCK_DIR = Path("requirements")
LOCK_VARIANTS = ("cpu.lock", "gpu.lock")


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _environment_paths() -> list[str]:
    """sys.path less the folders inside an installed package: setuptools (< 82) appends its `_vendor` folder when
    imported, and its vendored copies would enter the listing or not depending on what the process imported."""
    sites = [Path(p) for p in sys.path if Path(p).name in ("site-packages", "dist-packages")]
    return [p for p in sys.path if not any(site in Path(p).parents for site in sites)]


def installed_distributions() -> dict[str, str]:
    """Every distribution this interpreter imports from, {normalized name: version}; where two copies exist (a venv
    over the host's packages), the one found first on sys.path, as import finds it."""
    found: dict[str, str] = {}
    for dist in metadata.distributions(path=_environment_paths()):
        name = dist.metadata["Name"]
        if name:
            found.setdefault(_normal(name), dist.version)
    return found


def lock_pins(lock: Path) -> dict[str, str]:
    """A lock file's pins that apply to this interpreter and platform (markers evaluated), {name: version}."""
    from packaging.requirements import Requirement

    pins = {}
    for line in lock.read_text().splitlines():
        line = line.strip().removesuffix("\\").strip()
        if not line or line.startswith(("#", "--", "-")):
            continue
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate():
            (spec,) = req.specifier
            pins[_normal(req.name)] = spec.version
    return pins


def lock_differences(pins: dict[str, str], installed: dict[str, str]) -> list[str]:
    """'name: locked X, installed Y' for each pin the environment does not hold."""
    return [
        f"{name}: locked {version}, installed {installed.get(name, 'nothing')}"
        for name, version in sorted(pins.items())
        if installed.get(name) != version
    ]


def listing_sha256(distributions: list[str]) -> str:
    """The sha256 a release records for its list of `name==version` entries (sorted, one a line)."""
    return hashlib.sha256("\n".join(sorted(distributions)).encode()).hexdigest()


def environment(root: Path | str = ".") -> dict:
    """The whole Python environment: every installed distribution (and the sha256 of that list), the lock files'
    sha256, and the lock variant whose every pin is installed (None, with the differences, when none is)."""
    root = Path(root)
    installed = installed_distributions()
    listing = sorted(f"{name}=={version}" for name, version in installed.items())
    locks = {
        str(LOCK_DIR / name): sha256_file(root / LOCK_DIR / name)
        for name in ("build.lock", *LOCK_VARIANTS)
        if (root / LOCK_DIR / name).is_file()
    }
    matched, differences = None, {}
    for name in LOCK_VARIANTS:
        lock = root / LOCK_DIR / name
        if lock.is_file():
            differences[str(LOCK_DIR / name)] = lock_differences(lock_pins(lock), installed)
            if not differences[str(LOCK_DIR / name)]:
                matched = str(LOCK_DIR / name)
                break
    return {
        "python": sys.version.split()[0],
        "lock": matched,
        "lock_differences": {} if matched else differences,
        "locks_sha256": locks,
        "distributions_sha256": listing_sha256(listing),
        "distributions": listing,
    }


def broken_requirements(names: list[str]) -> list[str]:
    """'pkg needs req, installed X' for each requirement of the named distributions that what is installed misses."""
    from packaging.requirements import Requirement

    installed = installed_distributions()
    broken = []
    for name in sorted(names):
        try:
            requires = metadata.distribution(name).requires or []
        except metadata.PackageNotFoundError:
            continue
        for text in requires:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            have = installed.get(_normal(req.name))
            if have is None or not req.specifier.contains(have, prereleases=True):
                broken.append(f"{name} needs {req}, installed {have or 'nothing'}")
    return broken


def main(argv: list[str] | None = None) -> int:
    """Check this environment against the lock `make install` installed (argv[0], e.g. requirements/cpu.lock)."""
    lock = Path((argv if argv is not None else sys.argv[1:])[0])
    if not lock.is_file():
        print(f"environment: {lock} not found: run from the project root, or `make lock` to make it", file=sys.stderr)
        return 2
    pins = lock_pins(lock)
    if (build := lock.parent / "build.lock").is_file():  # setuptools, installed first by make install
        pins |= lock_pins(build)
    problems = lock_differences(pins, installed_distributions())
    problems += broken_requirements([*pins, "torch", "guanaco-qlora-pipeline"])
    for problem in problems:
        print(f"environment: {problem}", file=sys.stderr)
    if problems:
        print(f"environment: {len(problems)} problem(s) against {lock}; run `make install` again", file=sys.stderr)
        return 1
    print(f"environment: exactly {lock}, every requirement met ({len(pins)} locked packages)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
