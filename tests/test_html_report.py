"""``bench leaderboard --html``: one self-contained page; rendered in headless Chromium (screenshot),
checking that every table and embedded image rendered. The Chromium part skips where it is absent."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]



@pytest.fixture(scope="module")
def page(tmp_path_factory) -> Path:
    from harness.runner import RunOptions
    from harness.spec import expand
    from harness.sweep import run_sweep
    from harness.tracking import default_tracking_uri

    out = tmp_path_factory.mktemp("html") / "sweep"
    # two seeds (mean ± std), two bit-widths (the plots have a line)
    specs = expand("fp,rtn", "tiny-random", "w8a8,w6a8", [0, 1], "smoke", None, "uniform", 8, 3)
    assert run_sweep(specs, RunOptions(out=out), default_tracking_uri(out), {}).ok
    r = subprocess.run([sys.executable, "-m", "harness.cli", "leaderboard", "--out", str(out), "--html"],
                       env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    path = out / "leaderboard.html"
    assert path.is_file()
    return path


def test_page_is_self_contained(page: Path) -> None:
    text = page.read_text()
    assert not re.search(r"""(src|href)=['"]https?://""", text), "the page must not fetch anything"
    assert "<link" not in text
    tables = text.count("<table class='lb'")
    assert tables >= 8  # one per metric
    assert "<tr class='fp'>" in text and "Δ FP" in text and " ± " in text
    images = re.findall(r"src='data:image/png;base64,", text)
    assert len(images) == 1 + 6  # plots + a sample grid per run (fp, rtn x 2 bit-widths, x 2 seeds)
    assert "tiny-random — protocol <code>smoke</code>" in text


# Injected into a copy of the page by the test only: records what rendered, for --dump-dom to read.
CHECK_JS = """
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  var el = document.getElementById('render-check');
  el.setAttribute('data-images', String(imgs.length));
  el.setAttribute('data-images-ok', String(ok));
  el.setAttribute('data-tables', String(document.querySelectorAll('table.lb').length));
  el.setAttribute('data-done', '1');
});
"""


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


@pytest.mark.chromium
def test_renders_in_headless_chromium(page: Path, tmp_path: Path) -> None:
    exe = _chromium()
    if exe is None:
        pytest.skip("Chromium is not installed (Debian: apt-get install chromium; or ci/chromium.sh)")
    flags = CHROMIUM_FLAGS + [f"--user-data-dir={tmp_path / 'profile'}"]
    checked = tmp_path / "checked.html"
    checked.write_text(page.read_text().replace(
        "</body>", f"<div id='render-check' data-done='0'></div><script>{CHECK_JS}</script></body>"))
    shot = tmp_path / "leaderboard.png"
    r = subprocess.run([exe, *flags, "--hide-scrollbars", "--window-size=1300,2600", f"--screenshot={shot}",
                        page.as_uri()], capture_output=True, text=True, timeout=90)
    assert shot.is_file(), r.stderr[-2000:]
    dom = subprocess.run([exe, *flags, "--dump-dom", "--virtual-time-budget=5000", checked.as_uri()],
                         capture_output=True, text=True, timeout=90)
    m = re.search(r'<div id="render-check"([^>]*)>', dom.stdout)
    assert m, dom.stderr[-2000:]
    attrs = dict(re.findall(r'data-([\w-]+)="([^"]*)"', m.group(1)))
    assert attrs.get("done") == "1", attrs
    assert int(attrs["images"]) == 7 and attrs["images-ok"] == attrs["images"], attrs  # every image decoded
    assert int(attrs["tables"]) >= 8, attrs

    from PIL import Image

    img = Image.open(shot).convert("RGB")
    assert img.size == (1300, 2600)
    colours = img.resize((130, 260)).getcolors(maxcolors=1 << 16)
    assert colours is not None and len(colours) > 50, "the screenshot looks blank"
    if os.environ.get("DMQ_SCREENSHOT"):
        shutil.copy(shot, os.environ["DMQ_SCREENSHOT"])
