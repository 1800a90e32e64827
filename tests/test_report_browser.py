"""report.html in a real browser (headless Chromium over the DevTools pipe): it renders (not blank, every image
loaded) and clicking a column header sorts the table, both ways."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from conftest import make_vae
from PIL import Image

from diffusers_vae_ext.autoencoders import as_autoencoder
from diffusers_vae_ext.evaluation import EvalVAE, evaluate, write_report
from diffusers_vae_ext.evaluation.browser import HeadlessBrowser, find_browser


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny inputs
    out = tmp_path_factory.mktemp("report")
    vaes = [EvalVAE("base", as_autoencoder(make_vae(0))), EvalVAE("tuned", as_autoencoder(make_vae(3)))]
    result = evaluate(vaes, out, resolution=32, check_fp16=True, fp16_images=1, show_progress=False)
    torch.set_num_threads(threads)
    return write_report(result)["html"], result


@pytest.fixture(scope="module")
def browser():
    if find_browser() is None:
        pytest.skip(
            "No Chromium-family browser on PATH (chromium, google-chrome); .ci/run installs Debian's chromium."
        )
    with HeadlessBrowser(width=1100, height=800) as browser:
        yield browser


def column_values(browser, table: str, column: int) -> list[float]:
    return browser.evaluate(
        f"Array.from(document.querySelectorAll('#{table} tbody tr')).map(function (r) "
        f"{{ return parseFloat(r.cells[{column}].dataset.value); }})"
    )


def test_report_renders_and_sorts_in_chromium(report, browser):
    path, result = report
    browser.open(path)
    assert browser.evaluate("document.title").startswith("VAE evaluation")
    images = browser.evaluate("Array.from(document.images).map(function (i) { return [i.naturalWidth, i.src]; })")
    assert len(images) == 6 * 5 and all(width > 0 for width, _ in images), images  # 6 photos x (original + 2 x 2)

    shot = Image.open(io.BytesIO(browser.screenshot(full_page=False))).convert("RGB")
    assert shot.size == (1100, 800)
    pixels = np.asarray(shot)
    assert pixels.std() > 20  # not a blank page
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 500  # text, tables and photo crops

    # Summary table: click "PSNR (dB)" (column 1): ascending, then descending; the label column follows the rows.
    means = {vae.label: vae.metrics["psnr"].mean for vae in result.vaes}
    browser.click("#summary thead th:nth-child(2)")
    ascending = column_values(browser, "summary", 1)
    assert ascending == sorted(ascending) and len(ascending) == 2
    labels = browser.evaluate(
        "Array.from(document.querySelectorAll('#summary tbody tr td:first-child')).map(function (c) { return c.textContent; })"
    )
    assert labels == sorted(means, key=means.get)
    browser.click("#summary thead th:nth-child(2)")
    assert column_values(browser, "summary", 1) == sorted(ascending, reverse=True)

    # Per-image table: sort by the first VAE's PSNR column.
    headers = browser.evaluate(
        "Array.from(document.querySelectorAll('#images thead th')).map(function (h) { return h.textContent; })"
    )
    column = headers.index("base PSNR")
    browser.click(f"#images thead th:nth-child({column + 1})")
    values = column_values(browser, "images", column)
    assert values == sorted(values) and len(values) == 6
    assert browser.evaluate(f"document.querySelector('#images thead th:nth-child({column + 1})').dataset.dir") == "asc"
