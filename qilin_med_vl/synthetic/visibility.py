# Copyright 2026 The qilin-med-vl Authors. Licensed under the Apache License, Version 2.0.
"""How much of a small lesion survives downscaling: the contrast of low-density flakes at each model input size
(`qilin-med-vl synth-data --visibility-report`), measured on the renderer's own radiographs."""


import numpy as np

from .render import (
    BONES,
    REFERENCE_SIZE,
    Finding,
    LegGeometry,
    render_radiograph,
    sample_anatomy,
    sample_view,
    to_uint8,
)

__all__ = ["format_visibility_report", "lesion_visibility_report"]

def _downscale(image_uint8: np.ndarray, size: int, resample: str) -> np.ndarray:
    from PIL import Image

    if size == image_uint8.shape[0]:
        return image_uint8.astype(np.float32) / 255.0
    method = {"box": Image.Resampling.BOX, "bicubic": Image.Resampling.BICUBIC}[resample]
    return np.asarray(Image.fromarray(image_uint8).resize((size, size), method), np.float32) / 255.0


def lesion_visibility_report(
    diameters=(6, 8, 10, 12, 24),
    resolutions=(336, 672, 1024),
    lesions_per_diameter: int = 6,
    resamples=("box", "bicubic"),
    strength: float = 0.8,
    seed: int = 0,
) -> list[dict]:
    """
    Contrast of low-density flakes that survives downscaling a 1024 px radiograph to each model input size.

    For each lesion, the same patient and exposure (same noise) are drawn with and without it, stored as 8-bit, and
    downscaled with PIL (`box`, or `bicubic` as the Qilin / CLIP image processor does). At each resolution:
    - `signal`: the deepest darkening the lesion causes, `max(clean - lesioned)` (intensity, 0..1);
    - `background`: the standard deviation of the clean image (plane-detrended) in a ring 4-30 reference pixels
      around the lesion: the bone texture and noise a reader has to tell the lesion from;
    - `retained`: `signal` as a fraction of the full-resolution signal; `cnr`: `signal / background`.

    Returns:
        One dict per (diameter, resample, resolution): the means over lesions of the quantities above.
    """
    rng = np.random.default_rng(seed)
    size = REFERENCE_SIZE
    rows = []
    for diameter in diameters:
        samples = {}  # (resample, resolution) -> list of (signal, background)
        full_signal = []
        for _ in range(lesions_per_diameter):
            anatomy, view = sample_anatomy(rng), sample_view(rng)
            finding = Finding(
                "flake",
                int(rng.integers(2)),
                str(rng.choice(BONES)),
                depth=float(rng.uniform(45, 100)),
                across=float(rng.uniform(-0.45, 0.45)),
                size=float(diameter),
                strength=strength,
                seed=int(rng.integers(2**31)),
            )
            clean = to_uint8(render_radiograph(anatomy, view, [], size))
            lesioned = to_uint8(render_radiograph(anatomy, view, [finding], size))
            centre_x, centre_y = LegGeometry(anatomy, finding.leg, 1.0).point(
                finding.bone, finding.depth, finding.across
            )
            centre_x, centre_y = centre_x + view.shift_x, centre_y + view.shift_y
            full_signal.append(float((clean.astype(np.float32) - lesioned).max() / 255.0))
            for resample in resamples:
                for resolution in resolutions:
                    scale = resolution / size
                    low_clean = _downscale(clean, resolution, resample)
                    low_lesioned = _downscale(lesioned, resolution, resample)
                    yy, xx = np.mgrid[0:resolution, 0:resolution].astype(np.float32) + 0.5
                    rho = np.hypot(xx - centre_x * scale, yy - centre_y * scale)
                    ring = (rho > (diameter / 2 + 4) * scale) & (rho < (diameter / 2 + 30) * scale)
                    design = np.stack([xx[ring], yy[ring], np.ones(int(ring.sum()), np.float32)], axis=1)
                    values = low_clean[ring]
                    residual = values - design @ np.linalg.lstsq(design, values, rcond=None)[0]
                    signal = float((low_clean - low_lesioned).max())
                    samples.setdefault((resample, resolution), []).append((signal, float(residual.std())))
        reference = float(np.mean(full_signal))
        for (resample, resolution), values in samples.items():
            signal = np.array([v[0] for v in values])
            background = np.array([v[1] for v in values])
            rows.append(
                {
                    "diameter": float(diameter),
                    "resample": resample,
                    "resolution": resolution,
                    "signal": float(signal.mean()),
                    "background": float(background.mean()),
                    "retained": float(signal.mean() / reference),
                    "cnr": float((signal / background).mean()),
                }
            )
    return rows


def format_visibility_report(rows: list[dict]) -> str:
    """A Markdown table of `lesion_visibility_report` rows: retained contrast and CNR per size and resolution."""
    resolutions = sorted({row["resolution"] for row in rows})
    header = "| diameter at 1024 | resample | " + " | ".join(f"retained / CNR at {r}" for r in resolutions) + " |"
    lines = [header, "|" + "---|" * (2 + len(resolutions))]
    keys = sorted({(row["diameter"], row["resample"]) for row in rows})
    for diameter, resample in keys:
        cells = []
        for resolution in resolutions:
            row = next(
                r for r in rows if (r["diameter"], r["resample"], r["resolution"]) == (diameter, resample, resolution)
            )
            cells.append(f"{row['retained']:.2f} / {row['cnr']:.1f}")
        lines.append(f"| {diameter:g} px | {resample} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
