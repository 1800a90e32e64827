"""The evaluation report: `report.html` (one self-contained page; its PNGs beside it), `report.md` (the summary
table for a model card). `metrics.csv` / `metrics.jsonl` are written row by row by the runner.

The page has a sortable summary table (VAEs x metrics), a per-image table (sortable by any column) with the
worst patch of each image at 1:1 — original, each reconstruction, each error heat map — the half-precision
check per block, and the latent statistics. Its CSS and the sorting script are inline: no network, no assets
other than the PNGs in `images/`.
"""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any

from .results import EvalResult, MetricSummary, VAEResult

# (key, header, digits, higher is better)
_METRIC_COLUMNS = (
    ("psnr", "PSNR (dB)", 2, True),
    ("ssim", "SSIM", 4, True),
    ("lpips", "LPIPS", 4, False),
    ("kl", "KL (nats / image)", 1, None),
)

METRIC_HELP = {
    "PSNR": "peak signal-to-noise ratio of the reconstruction on [0, 1] pixels, in dB; higher is better. "
    "+3 dB halves the mean squared error.",
    "SSIM": "structural similarity (7x7 windows, [0, 1] pixels, mean over channels); 1 is identical.",
    "LPIPS": "learned perceptual distance (VGG16, v0.1); lower is better. Tracks what people see as blur or "
    "texture loss better than PSNR.",
    "rFID": "Frechet distance between Inception-v3 pool3 features of the originals and the reconstructions; "
    "lower is better. Biased upwards for small sets: compare only values measured on the same images.",
    "KL": "KL divergence of the posterior to N(0, I), summed over the latent; how much information the latent "
    "carries beyond the prior (the VAE's regulariser). n/a for deterministic autoencoders (AutoencoderDC, "
    "AutoencoderTiny): they have no posterior.",
    "probe_loss": "diffusability probe (--diffusability): held-out flow-matching loss of a small UNet trained for a "
    "fixed budget on the per-element standardised latents, relative to the best per-element Gaussian predictor at "
    "the same t, mean over t; 1.0 = no usable structure found, lower = easier for a diffusion model to learn. "
    "Comparable across VAEs at the same budget and image set (docs/diffusability.md).",
    "HF energy": "share of the per-channel standardised spectral power in the upper half of radial frequencies, of "
    "the latents and of the images resized to the latent grid; latents much rougher than their images are harder to "
    "denoise. White noise gives about 0.75.",
    "sample FID": "FID of images decoded from the probe's samples against the evaluated images (count beside it): "
    "a tiny, fixed-budget gFID; compare only at the same budget and counts.",
    "scaling_factor": "1 / std of posterior samples: the factor that gives a diffusion model unit-variance latents. "
    "'scaled std' is the std the current config gives; about 1 means the latent space is well scaled.",
}


def _number(value: float | None, digits: int) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if abs(value) >= 1e6:  # e.g. the KL of a posterior whose variance blew up
        return f"{value:.3g}"
    return f"{value:.{digits}f}"


def _with_ci(summary: MetricSummary | None, digits: int) -> str:
    if summary is None:
        return "n/a"
    if not math.isfinite(summary.ci95):
        return _number(summary.mean, digits)
    return f"{_number(summary.mean, digits)} ± {_number(summary.ci95, digits)}"


def _fp16_verdict(result: VAEResult, dtype: str) -> str:
    for report in result.half_precision:
        if report.dtype == dtype:
            return report.verdict
    return "not checked"


def _scaling_text(result: VAEResult) -> tuple[str, str]:
    latent = result.latent
    if latent.get("convention") == "per_channel":
        # Wan, Qwen-Image, LTX-Video, FLUX.2: the pipelines normalise each channel; one global factor says little.
        return "per-channel", "per-channel (latent table)"
    current = latent.get("current", {}).get("scaling_factor")
    suggested = latent.get("suggested_scaling_factor")
    low, high = latent.get("suggested_scaling_factor_ci95", [math.nan, math.nan])
    interval = f" [{low:#.4g}, {high:#.4g}]" if math.isfinite(low) and math.isfinite(high) else ""
    return (_number(current, 5) if current is not None else "n/a"), f"{suggested:#.4g}{interval}"


def summary_rows(result: EvalResult) -> list[dict[str, str]]:
    """The summary table as rows of display strings (shared by Markdown and HTML)."""
    rows = []
    for vae in result.vaes:
        row = {"VAE": vae.label}
        for key, header, digits, _ in _METRIC_COLUMNS:
            row[header] = _with_ci(vae.metrics.get(key), digits)
        row["rFID"] = _number(vae.rfid, 2)
        current, suggested = _scaling_text(vae)
        row["scaling_factor (config)"] = current
        row["suggested [95% CI]"] = suggested
        row["scaled std"] = _number(vae.latent.get("scaled_std"), 3)
        row["float16"] = _fp16_verdict(vae, "float16")
        row["bfloat16"] = _fp16_verdict(vae, "bfloat16")
        rows.append(row)
    return rows


def _drop_empty_columns(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    empty = [k for k in rows[0] if all(row[k] in ("n/a", "not checked") for row in rows)]
    return [{k: v for k, v in row.items() if k not in empty} for row in rows]


def diffusability_rows(result: EvalResult) -> list[dict[str, str]]:
    """The diffusability table (one row per VAE) as display strings; empty without --diffusability."""
    if not isinstance(result.settings.get("diffusability"), dict):
        return []
    rows = []
    for vae in result.vaes:
        record = vae.diffusability or {}
        if "skipped" in record:
            rows.append({"VAE": vae.label, "probe_loss": "skipped: " + record["skipped"].splitlines()[0],
                         "HF energy latents": "n/a", "HF energy images": "n/a", "sample FID": "n/a",
                         "probe latents": "n/a", "seconds": "n/a"})  # fmt: skip
            continue
        settings = record.get("settings", {})
        fid = record.get("sample_fid")
        rows.append(
            {
                "VAE": vae.label,
                "probe_loss": _number(record.get("probe_loss"), 3),
                "HF energy latents": _number(record.get("high_frequency_energy"), 3),
                "HF energy images": _number(record.get("image_high_frequency_energy"), 3),
                "sample FID": "n/a" if fid is None else f"{fid:.1f} (n={record.get('sample_fid_count')})",
                "probe latents": f"{settings.get('num_train')} + {settings.get('num_held_out')} held out, "
                f"{'x'.join(str(d) for d in settings.get('probe_shape', []))}, {settings.get('steps')} steps",
                "seconds": _number(record.get("seconds"), 1),
            }
        )
    return rows


def _diffusability_markdown(result: EvalResult) -> list[str]:
    rows = diffusability_rows(result)
    if not rows:
        return []
    plots = result.settings["diffusability"].get("plots", {})
    lines = [
        "",
        "## Diffusability",
        "",
        "probe_loss: held-out loss of a small flow-matching UNet relative to the per-element Gaussian optimum "
        "(1.0 = nothing learned, lower = easier to diffuse); HF energy: share of spectral power in the upper half "
        "of radial frequencies (white noise ~0.75).",
        "",
        *_markdown_table(rows),
    ]
    lines.append("")
    for key, title in (("spectrum", "Spectrum"), ("loss_curve", "Probe loss per t")):
        if key in plots:
            lines.append(f"![{title}]({plots[key]})")
    for vae in result.vaes:
        grid = (vae.diffusability or {}).get("sample_grid")
        if grid:
            lines.append(f"![{vae.label} probe samples]({grid})")
    return lines


def _markdown_table(rows: list[dict[str, str]]) -> list[str]:
    # The header comes from the first row's keys; every row has the same keys in the same order.
    return [
        "| " + " | ".join(rows[0]) + " |",
        "|" + "|".join("---" for _ in rows[0]) + "|",
        *("| " + " | ".join(row.values()) + " |" for row in rows),
    ]


def write_markdown(result: EvalResult, path: str | Path | None = None) -> str:
    """The summary table in Markdown (for a model card), with how it was measured. Written to `path` if given."""
    rows = _drop_empty_columns(summary_rows(result))
    settings = result.settings
    lines = [
        f"Reconstruction of {settings['num_images']} images ({settings['data']}) at "
        f"{settings['resolution']}x{settings['resolution']} (centre crops), posterior mode (or deterministic "
        "latents) decoded; "
        "mean ± 95 % confidence interval over images.",
        "",
        *_markdown_table(rows),
    ]
    if any(vae.rfid is not None for vae in result.vaes):
        lines += [
            "",
            f"rFID over {settings['num_images']} images: small sets give large values; compare like with like.",
        ]
    lines += _diffusability_markdown(result)
    text = "\n".join(lines) + "\n"
    if path is not None:
        Path(path).write_text(text, encoding="utf-8")
    return text


_CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 24px; color: #1d1d1f;
       background: #fff; }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 17px; margin: 28px 0 8px; }
p.meta { color: #555; margin: 0 0 12px; }
table { border-collapse: collapse; margin: 8px 0 16px; }
th, td { border: 1px solid #d0d0d6; padding: 4px 8px; text-align: right; vertical-align: middle; }
th { background: #eef0f5; cursor: pointer; user-select: none; white-space: nowrap; }
th[data-dir="asc"]::after { content: " \\25B2"; } th[data-dir="desc"]::after { content: " \\25BC"; }
td.text, th.text { text-align: left; }
tbody tr:nth-child(even) { background: #fafafc; }
td.best { background: #dff3e4; font-weight: 600; }
td.bad { background: #fde2e1; }
td.img { padding: 2px; } td.img img { display: block; image-rendering: pixelated; }
td.img .scale { font-size: 11px; color: #555; text-align: center; }
dl { display: grid; grid-template-columns: max-content auto; gap: 4px 16px; } dt { font-weight: 600; }
.legend { display: inline-block; width: 160px; height: 12px; vertical-align: middle;
          background: linear-gradient(to right, #000004, #3b0f70, #8c2981, #de4968, #fe9f6d, #fcfdbf); }
"""

_SORT_JS = """
document.querySelectorAll("table.sortable").forEach(function (table) {
  table.querySelectorAll("thead th").forEach(function (th, column) {
    th.addEventListener("click", function () {
      var dir = th.dataset.dir === "asc" ? "desc" : "asc";
      table.querySelectorAll("thead th").forEach(function (h) { delete h.dataset.dir; });
      th.dataset.dir = dir;
      var body = table.tBodies[0];
      var rows = Array.prototype.slice.call(body.rows);
      function key(row) {
        var cell = row.cells[column];
        var raw = cell.dataset.value !== undefined ? cell.dataset.value : cell.textContent.trim();
        var number = parseFloat(raw);
        return isNaN(number) ? raw : number;
      }
      rows.sort(function (a, b) {
        var x = key(a), y = key(b);
        var xn = typeof x === "number", yn = typeof y === "number";
        if (xn !== yn) { return xn ? -1 : 1; }  // numbers before n/a whatever the direction
        var order = xn ? x - y : String(x).localeCompare(String(y));
        return dir === "asc" ? order : -order;
      });
      rows.forEach(function (row) { body.appendChild(row); });
    });
  });
});
"""


def _cell(text: str, value: Any = None, classes: str = "") -> str:
    attributes = ""
    if value is not None and not (isinstance(value, float) and not math.isfinite(value)):
        attributes += f' data-value="{html.escape(str(value))}"'
    if classes:
        attributes += f' class="{classes}"'
    return f"<td{attributes}>{html.escape(text)}</td>"


def _summary_table(result: EvalResult) -> str:
    rows = _drop_empty_columns(summary_rows(result))
    headers = list(rows[0])
    best: dict[str, int] = {}
    for key, header, _, higher in _METRIC_COLUMNS:
        values = [(i, v.metrics.get(key)) for i, v in enumerate(result.vaes) if v.metrics.get(key) is not None]
        if higher is not None and len(values) > 1:
            pick = max if higher else min
            best[header] = pick(values, key=lambda item: item[1].mean)[0]
    rfids = [(i, v.rfid) for i, v in enumerate(result.vaes) if v.rfid is not None]
    if len(rfids) > 1:
        best["rFID"] = min(rfids, key=lambda item: item[1])[0]
    out = ['<table class="sortable" id="summary"><thead><tr>']
    out += [
        f'<th class="{"text" if h in ("VAE", "float16", "bfloat16") else ""}">{html.escape(h)}</th>' for h in headers
    ]
    out.append("</tr></thead><tbody>")
    for index, (vae, row) in enumerate(zip(result.vaes, rows)):
        out.append("<tr>")
        for header in headers:
            value = None
            for key, name, _, _ in _METRIC_COLUMNS:
                if name == header and vae.metrics.get(key) is not None:
                    value = vae.metrics[key].mean
            if header == "rFID":
                value = vae.rfid
            elif header == "suggested [95% CI]":
                value = vae.latent.get("suggested_scaling_factor")
            elif header == "scaled std":
                value = vae.latent.get("scaled_std")
            classes = "text" if header in ("VAE", "float16", "bfloat16") else ""
            if best.get(header) == index:
                classes += " best"
            if header in ("float16", "bfloat16") and row[header].startswith(("overflows", "imprecise")):
                classes += " bad"
            out.append(_cell(row[header], value, classes.strip()))
        out.append("</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _image_table(result: EvalResult) -> str:
    labels = [v.label for v in result.vaes]
    by_image: dict[int, dict[str, dict[str, Any]]] = {}
    names: dict[int, str] = {}
    for row in result.rows:
        by_image.setdefault(row["index"], {})[row["vae"]] = row
        names[row["index"]] = row["image"]
    patches = {p["index"]: p for p in result.patches}
    has_lpips = any(row.get("lpips") is not None for row in result.rows)
    headers = ['<th class="text">image</th>']
    if patches:
        headers.append('<th class="text">original (worst patch, 1:1)</th>')
    for label in labels:
        if patches:
            headers += [
                f'<th class="text">{html.escape(label)}</th>',
                f'<th class="text">{html.escape(label)} error</th>',
            ]
        headers += [f"<th>{html.escape(label)} PSNR</th>", f"<th>{html.escape(label)} SSIM</th>"]
        if has_lpips:
            headers.append(f"<th>{html.escape(label)} LPIPS</th>")
    out = ['<table class="sortable" id="images"><thead><tr>', "".join(headers), "</tr></thead><tbody>"]
    for index in sorted(by_image):
        patch = patches.get(index)
        out.append("<tr>")
        out.append(_cell(names[index], names[index], "text"))
        if patches:
            out.append(_image_cell(patch["original"] if patch else None, f"{names[index]} original"))
        for label in labels:
            row = by_image[index].get(label, {})
            if patches:
                vae_patch = (patch or {}).get("vaes", {}).get(label, {})
                out.append(_image_cell(vae_patch.get("crop"), f"{label} reconstruction"))
                scale = f"0 to {patch['heat_top']:.3g}" if patch else None
                out.append(_image_cell(vae_patch.get("error"), f"{label} error", vae_patch.get("patch_error"), scale))
            out.append(_cell(_number(row.get("psnr"), 2), row.get("psnr")))
            out.append(_cell(_number(row.get("ssim"), 4), row.get("ssim")))
            if has_lpips:
                out.append(_cell(_number(row.get("lpips"), 4), row.get("lpips")))
        out.append("</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _image_cell(path: str | None, alt: str, value: float | None = None, caption: str | None = None) -> str:
    if path is None:
        return "<td></td>"
    data = "" if value is None else f' data-value="{value:.6g}"'
    below = f'<div class="scale">{html.escape(caption)}</div>' if caption else ""
    image = f'<img src="{html.escape(path)}" alt="{html.escape(alt)}" loading="lazy">'
    return f'<td class="img"{data}>{image}{below}</td>'


def _half_precision_section(result: EvalResult) -> str:
    checked = [v for v in result.vaes if v.half_precision]
    if not checked:
        return ""
    out = [
        "<h2>Half precision</h2>",
        f'<p class="meta">Each VAE run in float32 and in half precision on the first {result.settings["fp16_images"]} '
        "images. Per block: the largest |activation| in float32 against the half dtype's largest finite value, and "
        "whether the half-precision run produced inf/NaN there. PSNR: half-precision output vs float32 output.</p>",
    ]
    for vae in checked:
        reports = vae.half_precision
        lines = ""
        for report in reports:
            status = "" if report.safe else ' class="bad"'
            lines += (
                f"<li>{report.dtype}: <span{status}>{html.escape(report.verdict)}</span> (decode "
                f"{_number(report.decode_psnr, 1)} dB, round trip {_number(report.roundtrip_psnr, 1)} dB)</li>"
            )
        out.append(f"<p><b>{html.escape(vae.label)}</b></p><ul>{lines}</ul>")
        opened = " open" if not all(report.safe for report in reports) else ""
        head = '<th class="text">block</th><th>max |activation| (float32)</th>'
        for report in reports:
            head += f'<th>% of {report.dtype} range</th><th class="text">{report.dtype} inf/NaN</th>'
        out.append(
            f"<details{opened}><summary>blocks of {html.escape(vae.label)}</summary>"
            f'<table class="sortable"><thead><tr>{head}</tr></thead><tbody>'
        )
        for position, block in enumerate(reports[0].blocks):
            cells = _cell(block.block, position, "text") + _cell(f"{block.max_abs_float32:.4g}", block.max_abs_float32)
            for report in reports:
                other = report.blocks[position]
                bad = " bad" if other.nonfinite or other.fraction_of_range >= 1 else ""
                cells += _cell(f"{100 * other.fraction_of_range:.3g} %", other.fraction_of_range, bad.strip())
                cells += _cell("YES" if other.nonfinite else "no", None, "text" + bad)
            out.append(f"<tr>{cells}</tr>")
        out.append("</tbody></table></details>")
    return "".join(out)


def _latent_section(result: EvalResult) -> str:
    out = [
        "<h2>Latent space</h2>",
        '<p class="meta">Statistics of posterior samples (one seeded draw per image; the latents themselves for '
        "deterministic autoencoders), laid out as the class's pipelines normalise them. The suggested values, in the "
        "class's own convention (config keys, or weights for LTX-Video and FLUX.2), make the latents a diffusion "
        "model sees have mean 0 (where the convention shifts) and std 1.</p>",
        '<table><thead><tr><th class="text">VAE</th><th class="text">class</th><th class="text">convention</th>'
        '<th>mean</th><th>std</th><th class="text">per-channel mean</th><th class="text">per-channel std</th>'
        '<th class="text">suggested config</th></tr></thead><tbody>',
    ]
    for vae in result.vaes:
        latent = vae.latent
        suggested = ", ".join(f"{k}={_short(v)}" for k, v in latent.get("suggested", {}).items() if v is not None)
        out.append(
            "<tr>"
            + _cell(vae.label, None, "text")
            + _cell(vae.class_name, None, "text")
            + _cell(latent.get("convention", ""), None, "text")
            + _cell(_number(latent.get("mean"), 4), latent.get("mean"))
            + _cell(_number(latent.get("std"), 4), latent.get("std"))
            + _cell(", ".join(f"{v:.3f}" for v in latent.get("channel_mean", [])), None, "text")
            + _cell(", ".join(f"{v:.3f}" for v in latent.get("channel_std", [])), None, "text")
            + _cell(suggested, None, "text")
            + "</tr>"
        )
    out.append("</tbody></table>")
    return "".join(out)


def _diffusability_section(result: EvalResult) -> str:
    rows = diffusability_rows(result)
    if not rows:
        return ""
    plots = result.settings["diffusability"].get("plots", {})
    headers = list(rows[0])
    out = [
        '<h2 id="diffusability">Diffusability</h2>',
        '<p class="meta">How easily a diffusion model learns each latent space, on the posterior draws of the images '
        "above: a small diffusers UNet2DModel trained with flow matching for a fixed budget on per-element "
        "standardised latents; probe_loss is its held-out loss relative to the best per-element Gaussian predictor "
        "(1.0 = nothing learned, lower = easier). HF energy: share of spectral power in the upper half of radial "
        "frequencies, latents vs the images at latent resolution. See docs/diffusability.md.</p>",
        '<table class="sortable" id="diffusability-table"><thead><tr>',
        "".join(
            f'<th class="{"text" if h in ("VAE", "probe latents") else ""}">{html.escape(h)}</th>' for h in headers
        ),
        "</tr></thead><tbody>",
    ]
    for row in rows:
        cells = "".join(
            _cell(value, None, "text" if key in ("VAE", "probe latents") or value.startswith("skipped") else "")
            for key, value in row.items()
        )
        out.append(f"<tr>{cells}</tr>")
    out.append("</tbody></table>")
    for key, alt in (("spectrum", "spectra of latents and images"), ("loss_curve", "probe loss per t")):
        if key in plots:
            out.append(f'<img src="{html.escape(plots[key])}" alt="{alt}" style="max-width:48%;margin-right:1%">')
    for vae in result.vaes:
        grid = (vae.diffusability or {}).get("sample_grid")
        if grid:
            out.append(
                f"<p><b>{html.escape(vae.label)}</b>: samples of the probe, decoded</p>"
                f'<img src="{html.escape(grid)}" alt="{html.escape(vae.label)} probe samples" '
                'style="image-rendering:pixelated;max-width:100%">'
            )
    return "".join(out)


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.5g}"
    if isinstance(value, list):
        return "[" + ", ".join(_short(v) for v in value) + "]"
    return str(value)


def write_html(result: EvalResult, path: str | Path | None = None) -> Path:
    """Write the one-page report (default `<output_dir>/report.html`); image paths are relative to it."""
    path = Path(path) if path is not None else result.output_dir / "report.html"
    settings = result.settings
    labels = ", ".join(v.label for v in result.vaes)
    skipped = ""
    if result.skipped:
        items = "".join(f"<li>{html.escape(s['image'])}: {html.escape(s['reason'])}</li>" for s in result.skipped)
        skipped = f"<h2>Skipped images ({len(result.skipped)})</h2><ul>{items}</ul>"
    help_items = "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(v)}</dd>" for k, v in METRIC_HELP.items())
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>VAE evaluation: {html.escape(labels)}</title><style>{_CSS}</style></head>
<body>
<h1>VAE evaluation: {html.escape(labels)}</h1>
<p class="meta">{settings["num_images"]} images ({html.escape(settings["data"])}), {settings["resolution"]}x{settings["resolution"]}
centre crops, posterior mode (or deterministic latents) decoded, on {html.escape(settings["device"])} in {result.seconds:.1f} s. Mean ± 95 % confidence
interval over images; best value per column in green. Click a column header to sort.</p>
<h2>Summary</h2>
{_summary_table(result)}
<h2>Per image</h2>
<p class="meta">Crops: the {settings["patch_size"]}x{settings["patch_size"]} patch where the VAEs do worst on average, at 1:1.
Heat map: |error| per pixel on the [0, 1] scale, <span class="legend"></span> from 0 to the value under it (per image, the
same for every VAE so their maps compare; sorting an error column sorts by the mean error in the patch).</p>
{_image_table(result)}
{_half_precision_section(result)}
{_latent_section(result)}
{_diffusability_section(result)}
{skipped}
<h2>What the numbers mean</h2>
<dl>{help_items}</dl>
<script>{_SORT_JS}</script>
</body></html>
"""
    path.write_text(page, encoding="utf-8")
    return path


def write_report(result: EvalResult) -> dict[str, Path]:
    """Write report.html and report.md into the result's output folder; returns their paths."""
    html_path = write_html(result)
    markdown_path = result.output_dir / "report.md"
    write_markdown(result, markdown_path)
    return {"html": html_path, "markdown": markdown_path}
