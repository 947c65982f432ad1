"""`mixq report`: one self-contained HTML page, checked as Chromium renders it (headless), not only
as text: the figures must draw, the heat maps must carry colour, the table must lay out."""

import re
import shutil
import subprocess

import numpy as np
import pytest

from mixq.cli import main

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
VIRIDIS_YELLOW = np.array([253, 231, 37])  # the top of the heat maps' colour scale


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    return code, capsys.readouterr()


@pytest.fixture(scope="module")
def report(tiny_llama_dir, text_file, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    calib = ["--calib-text", text_file, "--calib-windows", 8, "--calib-len", 64]
    assert main([str(a) for a in ["-q", "profile", tiny_llama_dir, *calib, "--bits-options", "2,3,4,8",
                                  "--group-sizes", "32,64", "--held-out-len", 64, "--held-out-windows", 2,
                                  "--fisher-windows", 2, "--out", tmp / "tiny.profile"]]) == 0
    assert main([str(a) for a in ["-q", "quantize", tiny_llama_dir, "--budget", "4.5bpw", "--profile",
                                  tmp / "tiny.profile", *calib, "--eval-text", text_file, "--eval-windows", 6,
                                  "--eval-len", 64, "--out", tmp / "run-4.5"]]) == 0
    assert main([str(a) for a in ["report", tmp / "tiny.profile", tmp / "run-4.5", "--budget", "6bpw",
                                  "--out", tmp / "report.html"]]) == 0
    return tmp


def test_the_page_is_self_contained_and_has_every_section(report):
    page = (report / "report.html").read_text()
    ids = re.findall(r'<section id="([a-z0-9-]+)"', page)
    assert ids == ["frontier", "sensitivity", "allocation-plan-for-bpw", "allocation-run", "measured"]
    assert page.count("<svg") == 4  # inline figures; their bitmaps are data: URIs, nothing is fetched
    assert not re.findall(r'(?:src|href)="(?!data:|#)', page)
    assert "run-4.5" in page and "95% interval" in page


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium package renders the page (apt install chromium)")
def test_chromium_renders_the_figures_and_the_table(report, tmp_path):
    from PIL import Image

    shot = tmp_path / "page.png"
    done = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           "--window-size=1200,4000", f"--screenshot={shot}", (report / "report.html").as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and shot.exists(), done.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    inked = (pixels < 250).any(axis=2)
    rows_inked = np.nonzero(inked.any(axis=1))[0]
    assert rows_inked.max() - rows_inked.min() > 2000  # four figures and a table, laid out one under another
    yellow = (np.abs(pixels - VIRIDIS_YELLOW).sum(axis=2) < 40).sum()
    assert yellow > 20000  # the heat maps drew their cells, not only axes
    dom = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom",
                          (report / "report.html").as_uri()], capture_output=True, text=True, timeout=120).stdout
    assert dom.count("<svg") == 4 and dom.count("<tr>") == 2  # the table's head and the run's row


def test_bad_inputs_are_one_line(report, capsys, tmp_path):
    code, cap = run(capsys, "report", report / "tiny.profile", report / "tiny.profile", "--out", tmp_path / "r.html")
    assert code == 2 and "at most one profile" in cap.err
    code, cap = run(capsys, "report", tmp_path, "--out", tmp_path / "r.html")
    assert code == 2 and "not a mixq output directory" in cap.err
    assert not (tmp_path / "r.html").exists()
