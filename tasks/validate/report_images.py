"""The README's pictures, regenerated from this workspace's reports (run after `dvc repro`):

    python -m tasks.validate.report_images          # or: make report-images

writes docs/validation_report.png (reports/validation/index.html as headless Chromium shows it, offline),
docs/token_lengths.png (reports/lengths.png) and docs/training_loss.png (reports/training_loss.png, the train stage's).
Needs Debian's `chromium` for the first (`apt-get install -y chromium`); each image stays under 300 KB.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from tasks.common.paths import LENGTH_HISTOGRAM, LOSS_CURVE
from tasks.validate.validation_page import write_validation_page

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "chromium", "chromium-browser", "google-chrome")
MAX_BYTES = 300 * 1024


def find_chromium() -> str | None:
    for name in CHROMIUM_CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    return None


def _chromium(page: Path, *flags: str, timeout: float = 120) -> subprocess.CompletedProcess:
    exe = find_chromium()
    if exe is None:
        raise FileNotFoundError("chromium not found: apt-get install -y chromium")
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        return subprocess.run(
            [
                exe,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--no-first-run",
                "--hide-scrollbars",
                f"--user-data-dir={profile}",
                *flags,
                Path(page).resolve().as_uri(),
            ],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=True,
        )


def dump_dom(page: Path) -> str:
    """The page's DOM after load, as headless Chromium builds it (no network is used by our pages)."""
    return _chromium(page, "--dump-dom").stdout


def screenshot(page: Path, png: Path, width: int = 1100, height: int = 1110) -> Path:
    png.parent.mkdir(parents=True, exist_ok=True)
    _chromium(page, f"--screenshot={Path(png).resolve()}", f"--window-size={width},{height}")
    return png


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--project-dir", type=Path, default=Path("."))
    ap.add_argument("--out", type=Path, default=Path("docs"))
    args = ap.parse_args(argv)
    root, out = args.project_dir, args.out
    made = []
    report_dir = root / "reports/validation"
    if not (report_dir / "result.json").exists():
        print(f"{report_dir / 'result.json'} is missing: run `dvc repro validate` first", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="validation-page-") as tmp:
        page = report_dir / "index.html"
        if not page.exists():  # reports from before the page existed: render it from the same result.json
            for name in ("result.json", "lengths.json"):
                if (report_dir / name).exists():
                    shutil.copy2(report_dir / name, Path(tmp) / name)
            page = write_validation_page(Path(tmp))
        made.append(screenshot(page, out / "validation_report.png"))
    for drawn, name in ((LENGTH_HISTOGRAM, "token_lengths.png"), (LOSS_CURVE, "training_loss.png")):
        if not (root / drawn).is_file():
            print(f"{root / drawn} is missing: run `dvc repro` first", file=sys.stderr)
            return 2
        made.append(Path(shutil.copyfile(root / drawn, out / name)))
    for png in made:
        size = png.stat().st_size
        print(f"{png}: {size / 1024:.0f} KB")
        if size > MAX_BYTES:
            print(f"{png} is over {MAX_BYTES // 1024} KB", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
