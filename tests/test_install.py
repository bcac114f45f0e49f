"""`make install TORCH=skip` on a GPU box keeps the torch it already has, also when that torch lives in a venv.

GPU images often ship a tuned CUDA torch in a venv of their own (/opt/torch/.venv on the GPU machine here). A
plain `python3 -m venv --system-site-packages` from that venv's python3 sees the base interpreter's packages
only, and pip then fetches gigabytes of torch again. The test builds such a host venv with a stand-in torch
(a CUDA build's version and `torch.version.cuda`), runs the Makefile's venv step from it, and checks that the
new venv imports that torch and that pip counts it as installed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT


def _site_packages(venv: Path) -> Path:
    out = subprocess.run(
        [venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    )
    return Path(out.stdout.strip())


@pytest.fixture(scope="module")
def host_venv(tmp_path_factory) -> Path:
    """A venv standing for the GPU image's own, holding a stand-in CUDA torch 2.11.0."""
    host = tmp_path_factory.mktemp("host") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", host], check=True)
    site = _site_packages(host)
    (site / "torch").mkdir()
    (site / "torch" / "__init__.py").write_text("__version__ = '2.11.0+cu130'\nclass version:\n    cuda = '13.0'\n")
    meta = site / "torch-2.11.0+cu130.dist-info"
    meta.mkdir()
    (meta / "METADATA").write_text("Metadata-Version: 2.1\nName: torch\nVersion: 2.11.0+cu130\n")
    (meta / "RECORD").write_text("")
    return host


def _make_venv(dest: Path, host: Path, torch: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{host / 'bin'}:{os.environ['PATH']}"}  # `python3` is the host venv's
    env.pop("VIRTUAL_ENV", None)
    return subprocess.run(
        ["make", "--no-print-directory", "-C", str(ROOT), "venv", f"VENV={dest}", f"TORCH={torch}"],
        env=env,
        capture_output=True,
        text=True,
    )


def test_torch_skip_keeps_the_host_venvs_torch(tmp_path, host_venv):
    venv = tmp_path / ".venv"
    proc = _make_venv(venv, host_venv, "skip")
    assert proc.returncode == 0, proc.stderr
    where = subprocess.run(
        [venv / "bin" / "python", "-c", "import torch; print(torch.__version__, torch.__file__)"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert where.startswith("2.11.0+cu130 ") and str(_site_packages(host_venv)) in where
    # pip counts it as installed: with no index to fetch from, torch>=2.4 (pyproject's range) is already satisfied.
    pip = subprocess.run(
        [venv / "bin" / "python", "-m", "pip", "install", "--no-index", "torch>=2.4"], capture_output=True, text=True
    )
    assert pip.returncode == 0 and "Requirement already satisfied: torch" in pip.stdout, pip.stdout + pip.stderr


def test_without_skip_the_venv_does_not_see_the_host(tmp_path, host_venv):
    venv = tmp_path / ".venv"
    subprocess.run(
        [host_venv / "bin" / "python3", "-m", "venv", "--system-site-packages", "--without-pip", venv], check=True
    )
    assert subprocess.run([venv / "bin" / "python", "-c", "import torch"], capture_output=True).returncode != 0


def test_torch_skip_without_any_torch_says_what_to_do(tmp_path):
    bare = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", bare], check=True)
    proc = _make_venv(tmp_path / ".venv", bare, "skip")
    assert proc.returncode != 0
    assert "TORCH=skip keeps the torch of the python3 that runs make" in proc.stderr
    assert "leave TORCH unset" in proc.stderr


def _lock_pins(lock: Path) -> dict[str, str]:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins = {}
    for line in lock.read_text().splitlines():
        line = line.strip().rstrip("\\").strip()
        if line and not line.startswith(("#", "-")):
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate():
                pins[canonicalize_name(req.name)] = str(req.specifier).removeprefix("==")
    return pins


def test_the_installed_set_equals_the_lock():
    """`make install` (what `make test` and CI run) installs exactly the lock: every pin at its version, and nothing
    the lock does not name but pip and this project itself."""
    from packaging.utils import canonicalize_name

    cfg = (Path(sys.prefix) / "pyvenv.cfg").read_text() if sys.prefix != sys.base_prefix else ""
    if not cfg or "include-system-site-packages = true" in cfg:
        pytest.skip("not a venv of its own (make install TORCH=skip sees the host's packages too)")
    listed = subprocess.run(
        [sys.executable, "-m", "pip", "list", "--format", "json"], capture_output=True, text=True, check=True
    ).stdout
    import json

    installed = {canonicalize_name(d["name"]): d["version"] for d in json.loads(listed)}
    variant = Path(sys.prefix) / ".lock-variant"  # written by make install; make test-latest installs the ranges
    if not variant.is_file():
        pytest.skip("not a venv made by `make install` from the lock (make test-latest installs the newest versions)")
    lock = ROOT / "requirements" / ("gpu.lock" if "gpu" in variant.read_text() else "cpu.lock")
    expected = {**_lock_pins(ROOT / "requirements" / "build.lock"), **_lock_pins(lock)}
    extra = sorted(set(installed) - set(expected) - {"pip", "guanaco-qlora-pipeline"})
    assert not extra, f"installed but not in {lock.name}: {extra}"
    differ = {n: (v, installed.get(n)) for n, v in expected.items() if installed.get(n) != v}
    assert not differ, f"locked vs installed: {differ}"


def test_the_install_check_names_a_package_that_is_not_as_locked(tmp_path, capsys):
    """`make install` ends with `python -m tasks.common.environment <lock>`: a pin not held fails it."""
    from importlib import metadata

    from tasks.common.environment import main

    lock = tmp_path / "cpu.lock"
    lock.write_text(
        f"pyyaml=={metadata.version('pyyaml')} \\\n    --hash=sha256:{'0' * 64}\n"
        "requests==0.0.1 ; python_version >= '3'\n"
        "pywin32==312 ; sys_platform == 'win32'\n"  # another platform's pin: not this environment's
    )
    assert main([str(lock)]) == 1
    err = capsys.readouterr().err
    assert "requests: locked 0.0.1, installed " in err and "pyyaml" not in err and "pywin32" not in err


def test_the_recorded_installed_set_ignores_folders_inside_packages(tmp_path, monkeypatch):
    """setuptools (< 82) appends its `_vendor` folder to sys.path when imported: the vendored copies there are not
    the environment, and counting them made a release's listing depend on what the process had imported."""
    from tasks.common.environment import installed_distributions

    site = tmp_path / "lib" / "site-packages"
    for folder, name in ((site, "real-pkg"), (site / "setuptools" / "_vendor", "vendored-pkg")):
        info = folder / f"{name.replace('-', '_')}-1.0.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    monkeypatch.setattr(sys, "path", [str(site), str(site / "setuptools" / "_vendor")])
    assert installed_distributions() == {"real-pkg": "1.0"}
