"""The offline HTML report in a real browser: headless Chromium (Debian's ``chromium``).

A small run is trained and reported; Chromium then opens ``report.html`` from
disk. Every ``<img>`` must decode to the size of the PNG it embeds, the page
must fetch nothing (no resource entries, and no external URL in the file), and
a screenshot must be a non-blank PNG of the window size. Chromium is required:
without it the tests fail (``bash scripts/setup.sh`` installs it); deselect
them explicitly with ``-m 'not browser'``.
"""

import base64
import json
import re
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest

from diverse.app.cli import main

pytestmark = pytest.mark.browser

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--disable-extensions",
                  "--host-resolver-rules=MAP * ~NOTFOUND"]  # nothing could leave the machine
RUN = ["--set", "data.name=digits", "--set", "data.train_subset=300", "--set",
       "data.test_subset=100", "--set", 'data.ood=["uniform"]', "--set", "model.hidden=[16]",
       "--set", "ensemble.members=3", "--set", "ensemble.execution=vmap", "--set",
       "train.epochs=2", "--set", "train.lr=0.01", "--set", "train.batch_size=32"]

# marks every image with its decoded size once the page has loaded, and lists what the
# page fetched (data: URIs are not resource fetches; anything else would be listed)
PROBE = """<script>
window.addEventListener("load", () => {
  for (const img of document.images) {
    img.setAttribute("data-natural", img.naturalWidth + "x" + img.naturalHeight);
  }
  const fetched = performance.getEntriesByType("resource").map(e => e.name);
  document.body.setAttribute("data-fetched", JSON.stringify(fetched));
  document.body.setAttribute("data-probe", "done");
});
</script>"""


def _chromium() -> str:
    path = shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(path).is_file():
        pytest.fail("Debian's chromium is not installed (/usr/bin/chromium); run "
                    "`bash scripts/setup.sh` (it installs it), or deselect these tests with "
                    "-m 'not browser'", pytrace=False)
    return path


def _run_chromium(args: list[str], profile: Path) -> subprocess.CompletedProcess:
    return subprocess.run([_chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                          capture_output=True, text=True, timeout=120, check=False)


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    _chromium()  # fail before training when there is no browser
    root = tmp_path_factory.mktemp("browser")
    config = root / "c.toml"
    config.write_text("")
    run_dir = root / "run"
    assert main(["train", str(config), *RUN, "--out", str(run_dir), "--quiet"]) == 0
    return run_dir / "report.html"


def test_report_is_self_contained(report):
    page = report.read_text()
    assert "<script" not in page.lower() and "<link" not in page.lower()
    assert not re.search(r"https?://", page) and "url(" not in page and "@import" not in page
    refs = re.findall(r'\b(?:src|href)="([^"]*)"', page)
    assert refs and all(r.startswith("data:image/png;base64,") for r in refs)


def test_every_figure_loads_in_chromium(report, tmp_path):
    page = report.read_text()
    expected = [_png_size(base64.b64decode(b))
                for b in re.findall(r'src="data:image/png;base64,([^"]+)"', page)]
    markdown = (report.parent / "report.md").read_text()
    assert len(expected) == markdown.count("![")
    for png in ("training_curves", "reliability", "ensemble_size", "entropy_ood", "confidence",
                "entropy_by_size", "member_similarity", "disagreement_test",
                "disagreement_ood_uniform"):
        assert f"(plots/{png}.png)" in markdown
    probed = tmp_path / "probed.html"
    probed.write_text(page.replace("</body>", PROBE + "</body>"))
    done = _run_chromium(["--run-all-compositor-stages-before-draw",
                          "--virtual-time-budget=10000", "--dump-dom", probed.as_uri()],
                         tmp_path / "profile")
    assert done.returncode == 0, done.stderr[-2000:]
    dom = done.stdout
    assert 'data-probe="done"' in dom, "the load event never fired"
    fetched = json.loads(re.search(r'data-fetched="([^"]*)"', dom).group(1).replace("&quot;", '"'))
    assert fetched == []  # the page requested nothing
    loaded = [tuple(map(int, m)) for m in re.findall(r'data-natural="(\d+)x(\d+)"', dom)]
    assert loaded == expected  # each image decoded, at the size of the PNG it embeds
    assert all(w > 0 and h > 0 for w, h in loaded)


def test_screenshot_is_a_non_blank_png_of_the_window(report, tmp_path):
    import matplotlib.image

    shot = tmp_path / "shot.png"
    done = _run_chromium(["--window-size=1200,3200", "--hide-scrollbars",
                          f"--screenshot={shot}", report.as_uri()], tmp_path / "profile")
    assert done.returncode == 0, done.stderr[-2000:]
    assert _png_size(shot.read_bytes()) == (1200, 3200)
    pixels = matplotlib.image.imread(shot)[..., :3]  # floats in [0, 1]
    ink = (pixels < 0.9).any(-1)  # anything darker than near-white: text, tables, plots
    assert 0.02 < ink.mean() < 0.9 and pixels.std() > 0.05
    colourful = np.abs(pixels - pixels.mean(-1, keepdims=True)).max(-1) > 0.15
    assert colourful.mean() > 0.001  # the plots' coloured lines and bars were painted
