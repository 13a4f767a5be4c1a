# Copyright 2026 The qilin-med-vl Authors. Licensed under the Apache License, Version 2.0.
"""Procedural knee radiographs: both knees of one patient side by side, drawn natively at the final resolution.

Everything is vectorised numpy; a 1024 x 1024 image takes about 0.1 s on one core. Nothing is drawn at a lower
resolution and upsampled, so bone edges, lesion edges and noise share one pixel scale (an upsampled anatomy with
native lesions would let a high-resolution model find lesions by their unusually sharp edges).

Conventions:
- All anatomical sizes are in *reference pixels*, i.e. pixels of a 1024 x 1024 image, and scale with `image_size`.
- Radiological orientation: the patient faces the viewer, so the patient's right knee is on the image's left
  (leg 0) and the left knee on the image's right (leg 1). Medial is towards the image centre.
- Bright = attenuating, as on a displayed radiograph: air is black, soft tissue grey, bone light, metal white.

The model: attenuation maps (soft tissue, bone, metal) are summed and mapped to intensity with `1 - exp(-mu * a)`
(film-like saturation); then exposure gain/offset, a heel-effect gradient and signal-dependent Gaussian noise.
Findings (`Finding`) change the maps: a flake or fracture removes part of the bone, osteophytes add bone, sclerosis
densifies it, narrowing moves the joint surfaces, an implant adds metal.
"""

from dataclasses import dataclass, replace

import numpy as np

__all__ = [
    "FINDING_KINDS",
    "REFERENCE_SIZE",
    "Anatomy",
    "Finding",
    "View",
    "finding_box",
    "render_radiograph",
    "sample_anatomy",
    "sample_follow_up_view",
    "sample_view",
    "to_uint8",
]

REFERENCE_SIZE = 1024
FINDING_KINDS = ("flake", "fracture", "osteophyte", "narrowing", "implant")
BONES = ("femur", "tibia")

# Attenuation -> intensity: soft tissue (about 0.35) lands near 0.27, bone + soft tissue (about 1.4) near 0.72.
ATTENUATION_TO_INTENSITY = 0.9
# Width, in reference pixels, of the linear ramp that softens every drawn edge (bone, lesion, metal) alike.
EDGE_SOFTNESS = 1.0
METAL_ATTENUATION = 5.0
# Low-density flakes are "moth-eaten": holes of this diameter on a lattice of this spacing (reference pixels), over
# a patch whose own darkening, relative to a hole, is at least FLAKE_BASE_LEVEL (more for large, confluent flakes).
FLAKE_HOLE_DIAMETER = 1.6
FLAKE_HOLE_SPACING = 3.4
FLAKE_BASE_LEVEL = 0.1
# Largest pose shift between two views of one patient, in reference pixels (texture is drawn with this margin).
MAX_SHIFT = 12


@dataclass(frozen=True)
class Anatomy:
    """
    One patient's knees. Lengths in reference pixels; `leg_x` and `tilt` are per leg (0 = image left = patient's
    right). `joint_gap_medial` / `joint_gap_lateral` are the healthy joint-space heights per compartment.
    """

    joint_y: float
    leg_x: tuple[float, float]
    tilt: tuple[float, float]
    femur_shaft_half_width: float
    condyle_half_width: float
    tibia_plateau_half_width: float
    tibia_shaft_half_width: float
    flare_length: float
    joint_gap_medial: float
    joint_gap_lateral: float
    notch_depth: float
    eminence_height: float
    fibula_head_half_width: float
    fibula_shaft_half_width: float
    fibula_head_drop: float
    patella_radii: tuple[float, float]
    patella_rise: float
    thigh_half_width: float
    calf_half_width: float
    bone_density: float
    soft_density: float
    trabecular_amplitude: float
    coarse_amplitude: float
    texture_seed: int


@dataclass(frozen=True)
class View:
    """One exposure of an `Anatomy`: pose shift (reference pixels), exposure, noise."""

    shift_x: float = 0.0
    shift_y: float = 0.0
    gain: float = 1.0
    offset: float = 0.0
    heel_gradient: float = 0.0
    noise_sigma: float = 0.025
    noise_seed: int = 0


@dataclass(frozen=True)
class Finding:
    """
    Geometry of one finding, anatomy-relative so that it follows the pose of each view.

    Args:
        kind: one of `FINDING_KINDS`.
        leg: 0 (image left, patient's right) or 1 (image right, patient's left).
        bone: "femur" (its lower segment) or "tibia" (its upper segment); for "narrowing" the tibia by convention.
        depth: distance from the joint surface into the bone, reference pixels (flake and fracture centre,
            start of an implant).
        across: lateral position as a fraction of the bone's half-width, -1..1 in image-x direction.
        size: reference pixels: flake diameter, fracture line width, osteophyte spur length, remaining medial
            joint gap (narrowing), plate length (implant).
        strength: flake/fracture: fraction of bone removed (0..1); osteophyte: sclerosis gain; others unused.
        angle: fracture line angle, radians from horizontal.
        seed: seed of the shape's own randomness, so one lesion keeps its outline across views.
    """

    kind: str
    leg: int
    bone: str
    depth: float = 0.0
    across: float = 0.0
    size: float = 8.0
    strength: float = 0.5
    angle: float = 0.0
    seed: int = 0


def _uniform(rng, low, high):
    return float(rng.uniform(low, high))


def sample_anatomy(rng: np.random.Generator) -> Anatomy:
    """A random healthy patient."""
    tilt = _uniform(rng, -0.04, 0.04)
    return Anatomy(
        joint_y=_uniform(rng, 470, 555),
        leg_x=(_uniform(rng, 236, 276), _uniform(rng, 748, 788)),
        tilt=(tilt + _uniform(rng, -0.015, 0.015), -tilt + _uniform(rng, -0.015, 0.015)),
        femur_shaft_half_width=_uniform(rng, 40, 50),
        condyle_half_width=_uniform(rng, 82, 96),
        tibia_plateau_half_width=_uniform(rng, 80, 92),
        tibia_shaft_half_width=_uniform(rng, 33, 41),
        flare_length=_uniform(rng, 120, 165),
        joint_gap_medial=_uniform(rng, 16, 22),
        joint_gap_lateral=_uniform(rng, 18, 25),
        notch_depth=_uniform(rng, 14, 24),
        eminence_height=_uniform(rng, 7, 12),
        fibula_head_half_width=_uniform(rng, 18, 24),
        fibula_shaft_half_width=_uniform(rng, 9, 12),
        fibula_head_drop=_uniform(rng, 45, 65),
        patella_radii=(_uniform(rng, 34, 42), _uniform(rng, 42, 52)),
        patella_rise=_uniform(rng, 30, 55),
        thigh_half_width=_uniform(rng, 195, 220),
        calf_half_width=_uniform(rng, 160, 185),
        bone_density=_uniform(rng, 0.95, 1.1),
        soft_density=_uniform(rng, 0.32, 0.40),
        trabecular_amplitude=_uniform(rng, 0.10, 0.14),
        coarse_amplitude=_uniform(rng, 0.06, 0.09),
        texture_seed=int(rng.integers(2**31)),
    )


def sample_view(rng: np.random.Generator, shift: float = MAX_SHIFT) -> View:
    """A random exposure with a pose shift of at most `shift` reference pixels (<= `MAX_SHIFT`)."""
    shift = min(shift, MAX_SHIFT)
    return View(
        shift_x=_uniform(rng, -shift, shift),
        shift_y=_uniform(rng, -shift, shift),
        gain=_uniform(rng, 0.88, 1.12),
        offset=_uniform(rng, -0.06, 0.02),
        heel_gradient=_uniform(rng, -0.04, 0.04),
        noise_sigma=_uniform(rng, 0.012, 0.03),
        noise_seed=int(rng.integers(2**31)),
    )


def sample_follow_up_view(rng: np.random.Generator, view: View, shift: float = 4.0) -> View:
    """A later exposure of the same patient: pose within `shift` reference pixels of `view`, new exposure and noise."""
    follow_up = sample_view(rng)
    jitter_x, jitter_y = rng.uniform(-shift, shift, 2)
    return replace(
        follow_up,
        shift_x=float(np.clip(view.shift_x + jitter_x, -MAX_SHIFT, MAX_SHIFT)),
        shift_y=float(np.clip(view.shift_y + jitter_y, -MAX_SHIFT, MAX_SHIFT)),
    )


def _smoothstep(t):
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _inside(signed_distance, softness):
    """Soft indicator of `signed_distance > 0` (pixels), a linear ramp `softness` pixels wide."""
    return np.clip(signed_distance / softness + 0.5, 0.0, 1.0)


def lateral_sign(leg: int) -> int:
    """Image-x direction pointing laterally (away from the body's midline) for `leg`."""
    return -1 if leg == 0 else 1


class LegGeometry:
    """Bone outlines of one leg in patient coordinates (image pixels before the view shift), at scale `k`."""

    def __init__(self, anatomy: Anatomy, leg: int, k: float, medial_gap: float | None = None, eminence_gain=1.0):
        a = anatomy
        self.k = k
        self.leg = leg
        self.lateral = lateral_sign(leg)
        self.cx = a.leg_x[leg] * k
        self.tilt = a.tilt[leg]
        self.jy = a.joint_y * k
        self.flare = a.flare_length * k
        self.femur_shaft = a.femur_shaft_half_width * k
        self.condyle = a.condyle_half_width * k
        self.plateau = a.tibia_plateau_half_width * k
        self.tibia_shaft = a.tibia_shaft_half_width * k
        self.gap_medial = (a.joint_gap_medial if medial_gap is None else medial_gap) * k
        self.gap_lateral = a.joint_gap_lateral * k
        self.notch = a.notch_depth * k
        self.eminence = a.eminence_height * k * eminence_gain

    def center_x(self, y):
        return self.cx + self.tilt * (y - self.jy)

    def femur_half_width(self, y):
        t = _smoothstep((y - (self.jy - self.flare)) / self.flare)
        return self.femur_shaft + (self.condyle - self.femur_shaft) * t

    def tibia_half_width(self, y):
        t = _smoothstep(((self.jy + self.flare) - y) / self.flare)
        return self.tibia_shaft + (self.plateau - self.tibia_shaft) * t

    def half_width(self, bone, y):
        return self.femur_half_width(y) if bone == "femur" else self.tibia_half_width(y)

    def gap(self, u):
        """Joint-space height at lateral position `u` (fraction of half-width, image-x direction)."""
        medial_weight = 1.0 / (1.0 + np.exp(-6.0 * u * -self.lateral))
        return self.gap_lateral + (self.gap_medial - self.gap_lateral) * medial_weight

    def femur_bottom(self, u):
        return self.jy - self.gap(u) / 2 - self.notch * np.exp(-((u / 0.2) ** 2)) - 22 * self.k * np.abs(u) ** 4

    def tibia_top(self, u):
        return self.jy + self.gap(u) / 2 - self.eminence * np.exp(-((u / 0.1) ** 2)) + 10 * self.k * np.abs(u) ** 4

    def surface_y(self, bone, u):
        return self.femur_bottom(u) if bone == "femur" else self.tibia_top(u)

    def point(self, bone, depth, across):
        """Patient-coordinate (x, y) of a point `depth` pixels into `bone` from its joint surface, at `across`."""
        direction = -1.0 if bone == "femur" else 1.0
        y = float(self.surface_y(bone, across)) + direction * depth
        for _ in range(2):  # the half-width depends on y, which is already close
            x = self.center_x(y) + across * self.half_width(bone, y)
        return float(x), float(y)


def _tube_profile(u, hollow):
    """Projected thickness of a tube: outer radius 1, medullary cavity radius `hollow`, filled at 25 % density."""
    outer = np.sqrt(np.clip(1.0 - u * u, 0.0, None))
    inner = np.sqrt(np.clip(hollow * hollow - u * u, 0.0, None))
    return outer - 0.75 * inner


def _correlated_noise(rng, shape, sigmas_y, sigmas_x, amplitudes):
    """Sum of Gaussian-filtered white-noise fields (one FFT), each scaled to standard deviation `amplitude`."""
    white = rng.standard_normal(shape, dtype=np.float32)
    spectrum = np.fft.rfft2(white)
    fy = np.fft.fftfreq(shape[0]).astype(np.float32)[:, None]
    fx = np.fft.rfftfreq(shape[1]).astype(np.float32)[None, :]
    transfer = np.zeros_like(fy * fx)
    for sy, sx, amplitude in zip(sigmas_y, sigmas_x, amplitudes):
        # Unit-sum Gaussian kernel -> variance 1 / (4 pi sx sy); renormalise to `amplitude`.
        gain = amplitude * np.sqrt(4.0 * np.pi * sx * sy)
        transfer += gain * np.exp(-2.0 * np.pi**2 * ((sy * fy) ** 2 + (sx * fx) ** 2))
    return np.fft.irfft2(spectrum * transfer, s=shape).astype(np.float32)


class _Canvas:
    """Attenuation maps of one view, in image pixels, with patient-coordinate pixel centres `x`, `y`."""

    def __init__(self, size: int, view: View, k: float):
        self.size = size
        self.k = k
        self.shift_x = view.shift_x * k
        self.shift_y = view.shift_y * k
        self.x = np.arange(size, dtype=np.float32) + 0.5 - self.shift_x
        self.y = np.arange(size, dtype=np.float32) + 0.5 - self.shift_y
        self.soft = np.zeros((size, size), np.float32)
        self.bone = np.zeros((size, size), np.float32)
        self.metal = np.zeros((size, size), np.float32)

    def window(self, x0, x1, y0, y1):
        """Row and column slices covering patient-coordinate box [x0, x1] x [y0, y1], clipped to the image."""
        c0 = int(np.clip(np.floor(x0 + self.shift_x), 0, self.size))
        c1 = int(np.clip(np.ceil(x1 + self.shift_x) + 1, 0, self.size))
        r0 = int(np.clip(np.floor(y0 + self.shift_y), 0, self.size))
        r1 = int(np.clip(np.ceil(y1 + self.shift_y) + 1, 0, self.size))
        return slice(r0, r1), slice(c0, c1)


def _draw_leg(canvas: _Canvas, anatomy: Anatomy, geometry: LegGeometry):
    k, soft_edge = geometry.k, EDGE_SOFTNESS * geometry.k
    size = canvas.size
    half = size // 2
    columns = slice(0, half) if geometry.leg == 0 else slice(half, size)
    x = canvas.x[columns][None, :]

    # Soft tissue: a cylinder whose radius goes from thigh to calf.
    y = canvas.y[:, None]
    t = np.clip(canvas.y / size, 0.0, 1.0)[:, None]
    tissue_half_width = (anatomy.thigh_half_width * (1 - t) + anatomy.calf_half_width * t) * k
    u = (x - geometry.center_x(y)) / tissue_half_width
    canvas.soft[:, columns] += anatomy.soft_density * np.sqrt(np.clip(1.0 - u * u, 0.0, None))

    # Femur: from the top edge down to the condyles.
    rows, _ = canvas.window(0, 0, -1e9, geometry.jy + 4 * k)
    y = canvas.y[rows][:, None]
    width = geometry.femur_half_width(y)
    u = (x - geometry.center_x(y)) / width
    bottom = geometry.femur_bottom(u)
    inside = _inside((1.0 - np.abs(u)) * width, soft_edge) * _inside(bottom - y, soft_edge)
    hollow = 0.7 * (1.0 - _smoothstep((y - (geometry.jy - geometry.flare)) / geometry.flare))
    plate = 0.3 * np.exp(-(((bottom - y) / (4 * k)) ** 2))  # subchondral plate
    canvas.bone[rows, columns] += anatomy.bone_density * inside * (_tube_profile(u, hollow) + plate)

    # Tibia: from the plateau down to the bottom edge.
    rows, _ = canvas.window(0, 0, geometry.jy - geometry.eminence - 4 * k, 1e9)
    y = canvas.y[rows][:, None]
    width = geometry.tibia_half_width(y)
    u = (x - geometry.center_x(y)) / width
    top = geometry.tibia_top(u)
    inside = _inside((1.0 - np.abs(u)) * width, soft_edge) * _inside(y - top, soft_edge)
    hollow = 0.7 * (1.0 - _smoothstep(((geometry.jy + geometry.flare) - y) / geometry.flare))
    plate = 0.3 * np.exp(-(((y - top) / (4 * k)) ** 2))
    canvas.bone[rows, columns] += anatomy.bone_density * inside * (_tube_profile(u, hollow) + plate)

    # Fibula: lateral, its head just below the plateau, partly behind the tibia.
    head_top = geometry.jy + anatomy.fibula_head_drop * k
    rows, _ = canvas.window(0, 0, head_top - 2 * k, 1e9)
    y = canvas.y[rows][:, None]
    head_w, shaft_w = anatomy.fibula_head_half_width * k, anatomy.fibula_shaft_half_width * k
    width = shaft_w + (head_w - shaft_w) * np.exp(-(((y - head_top - head_w) / (1.6 * head_w)) ** 2))
    fibula_x = geometry.center_x(y) + geometry.lateral * 0.8 * geometry.plateau
    u = (x - fibula_x) / width
    inside = _inside((1.0 - np.abs(u)) * width, soft_edge) * _inside(y - (head_top + 0.7 * head_w * u * u), soft_edge)
    canvas.bone[rows, columns] += 0.8 * anatomy.bone_density * inside * _tube_profile(u, 0.5)

    # Patella: seen through the femur, a faint oval above the joint.
    radius_x, radius_y = anatomy.patella_radii[0] * k, anatomy.patella_radii[1] * k
    patella_y = geometry.jy - anatomy.patella_rise * k
    patella_x = geometry.center_x(patella_y) - geometry.lateral * 4 * k
    rows, _ = canvas.window(0, 0, patella_y - radius_y - 2, patella_y + radius_y + 2)
    y = canvas.y[rows][:, None]
    rho = np.sqrt(((x - patella_x) / radius_x) ** 2 + ((y - patella_y) / radius_y) ** 2)
    inside = _inside((1.0 - rho) * min(radius_x, radius_y), soft_edge)
    canvas.bone[rows, columns] += 0.4 * anatomy.bone_density * inside * np.sqrt(np.clip(1 - rho * rho, 0, None))


# --- findings -------------------------------------------------------------------------------------------------


def _flake_mask(finding: Finding, geometry: LegGeometry, canvas: _Canvas):
    """
    Soft mask (0..1) of a moth-eaten low-density flake: a faint irregular star-like patch peppered with holes
    `FLAKE_HOLE_DIAMETER` reference pixels across. Holes that small are mostly averaged away by a 3x downscale
    (1024 -> 336) but largely survive a 1.5x one (1024 -> 672); from about 16 px up the patch itself darkens
    (confluent flakes, `(size - 8) / 16` of a hole's darkening), so large flakes stay visible at any resolution.
    Returns (rows, cols, mask).
    """
    k = geometry.k
    cx, cy = geometry.point(finding.bone, finding.depth, finding.across)
    radius = finding.size * k / 2
    extent = radius * 1.45 + 2 * k
    rows, cols = canvas.window(cx - extent, cx + extent, cy - extent, cy + extent)
    y = canvas.y[rows][:, None] - cy
    x = canvas.x[cols][None, :] - cx
    rng = np.random.default_rng(finding.seed)
    theta = np.arctan2(y, x)
    outline = np.ones_like(theta)
    for harmonic in range(2, 6):  # star-like irregular outline
        outline = outline + rng.uniform(0.04, 0.12) * np.cos(harmonic * theta + rng.uniform(0, 2 * np.pi))
    patch = _inside(radius * outline - np.sqrt(x * x + y * y), EDGE_SOFTNESS * k)
    confluence = float(np.clip((finding.size - 8.0) / 16.0, FLAKE_BASE_LEVEL, 0.85))
    # Holes on a jittered lattice (reference pixels from the centre, the same in every view): spaced so that no two
    # merge into a blob that a 3x downscale would keep.
    steps = np.arange(-finding.size / 2, finding.size / 2 + FLAKE_HOLE_SPACING, FLAKE_HOLE_SPACING)
    lattice_x, lattice_y = np.meshgrid(steps, steps)
    lattice_x = lattice_x.ravel() + rng.uniform(-0.3, 0.3, lattice_x.size) * FLAKE_HOLE_SPACING
    lattice_y = lattice_y.ravel() + rng.uniform(-0.3, 0.3, lattice_y.size) * FLAKE_HOLE_SPACING
    keep = (np.hypot(lattice_x, lattice_y) < finding.size / 2 * 0.9) & (rng.uniform(0, 1, lattice_x.size) < 0.8)
    if not keep.any():
        keep[np.argmin(np.hypot(lattice_x, lattice_y))] = True
    hx = (lattice_x[keep] * k).astype(np.float32)[:, None, None]
    hy = (lattice_y[keep] * k).astype(np.float32)[:, None, None]
    hole_radius = FLAKE_HOLE_DIAMETER / 2
    holes = _inside(hole_radius * k - np.sqrt((x - hx) ** 2 + (y - hy) ** 2), EDGE_SOFTNESS * k).max(axis=0)
    return rows, cols, patch * np.maximum(confluence, holes)


def _draw_flake(canvas, finding, geometry, anatomy):
    rows, cols, mask = _flake_mask(finding, geometry, canvas)
    canvas.bone[rows, cols] *= 1.0 - finding.strength * mask


def _draw_fracture(canvas, finding, geometry, anatomy):
    k = geometry.k
    cx, cy = geometry.point(finding.bone, finding.depth, 0.0)
    half_length = geometry.half_width(finding.bone, cy) * 1.15 / max(np.cos(finding.angle), 0.5)
    extent = half_length + 4 * k
    rows, cols = canvas.window(cx - extent, cx + extent, cy - extent, cy + extent)
    y = canvas.y[rows][:, None] - cy
    x = canvas.x[cols][None, :] - cx
    along = x * np.cos(finding.angle) + y * np.sin(finding.angle)
    across = -x * np.sin(finding.angle) + y * np.cos(finding.angle)
    rng = np.random.default_rng(finding.seed)
    jag = np.zeros_like(along)
    for wavelength in (9.0, 23.0, 51.0):  # a jagged, not straight, line
        jag = jag + rng.uniform(0.4, 1.2) * k * np.sin(2 * np.pi * along / (wavelength * k) + rng.uniform(0, 6.3))
    half_width = finding.size * k / 2
    mask = _inside(half_width - np.abs(across - jag), EDGE_SOFTNESS * k) * _inside(half_length - np.abs(along), 2 * k)
    canvas.bone[rows, cols] *= 1.0 - finding.strength * mask


def _spur(canvas, x_base, y_base, outward, toward_joint, length, base, k, density):
    """A bony spur: a tapered triangle growing `outward` (+-1 in x) from (x_base, y_base), curling to the joint."""
    extent = length + base + 3 * k
    rows, cols = canvas.window(x_base - extent, x_base + extent, y_base - extent, y_base + extent)
    a = (canvas.x[cols][None, :] - x_base) * outward
    b = (canvas.y[rows][:, None] - y_base) * toward_joint
    fraction = np.clip(a / length, 0.0, 1.0)
    centre = 0.35 * length * fraction**2  # tip curls towards the joint space
    half = base / 2 * (1.0 - fraction)
    mask = _inside(half - np.abs(b - centre), EDGE_SOFTNESS * k) * _inside(length - a, EDGE_SOFTNESS * k)
    mask = mask * _inside(a + base, EDGE_SOFTNESS * k)  # merges with the bone margin it grows from
    canvas.bone[rows, cols] += density * 0.6 * mask


def _draw_osteophyte(canvas, finding, geometry, anatomy):
    """Marginal spurs on both sides of the bone's joint surface (drawn before texture: they are bone)."""
    k = geometry.k
    rng = np.random.default_rng(finding.seed)
    toward_joint = 1.0 if finding.bone == "femur" else -1.0
    for side in (-1.0, 1.0):
        scale = rng.uniform(0.7, 1.0) if side != -geometry.lateral else 1.0  # medial spurs the larger
        length = finding.size * k * scale
        depth = 6 * k
        x_edge, y_edge = geometry.point(finding.bone, depth, side * 0.9)
        x_edge = geometry.center_x(y_edge) + side * geometry.half_width(finding.bone, y_edge) * 0.93
        _spur(canvas, x_edge, y_edge, side, toward_joint, length, 0.55 * length + 3 * k, k, anatomy.bone_density)


def _sclerosis(canvas, finding, geometry):
    """Subchondral sclerosis: denser bone in a band along the joint surface (applied after texture)."""
    k = geometry.k
    band = (8 + 0.6 * finding.size) * k
    width = geometry.half_width(finding.bone, geometry.jy) * 1.3
    if finding.bone == "femur":
        rows, cols = canvas.window(
            geometry.cx - width - 60 * k, geometry.cx + width + 60 * k, geometry.jy - 3 * band - 40 * k, geometry.jy
        )
    else:
        rows, cols = canvas.window(
            geometry.cx - width - 60 * k,
            geometry.cx + width + 60 * k,
            geometry.jy - 20 * k,
            geometry.jy + 3 * band + 40 * k,
        )
    y = canvas.y[rows][:, None]
    u = (canvas.x[cols][None, :] - geometry.center_x(y)) / geometry.half_width(finding.bone, y)
    distance = (geometry.femur_bottom(u) - y) if finding.bone == "femur" else (y - geometry.tibia_top(u))
    profile = np.exp(-np.clip(distance, 0.0, None) / band) * (distance > -2 * k)
    canvas.bone[rows, cols] *= 1.0 + finding.strength * profile


def _implant_rows(finding: Finding, geometry: LegGeometry) -> tuple[float, float]:
    """Top and bottom (patient coordinates) of a plate starting `depth` into the bone and `size` long."""
    direction = -1.0 if finding.bone == "femur" else 1.0
    start = float(geometry.surface_y(finding.bone, geometry.lateral * 0.9)) + direction * finding.depth * geometry.k
    end = start + direction * finding.size * geometry.k
    return min(start, end), max(start, end)


def _draw_implant(canvas, finding, geometry, anatomy):
    """A lateral plate along the bone with screws across it."""
    k = geometry.k
    rng = np.random.default_rng(finding.seed)
    y0, y1 = _implant_rows(finding, geometry)
    thickness = rng.uniform(9, 12) * k
    reach = geometry.condyle + thickness + 8 * k
    rows, cols = canvas.window(geometry.cx - reach - 60 * k, geometry.cx + reach + 60 * k, y0 - 4 * k, y1 + 4 * k)
    y = canvas.y[rows][:, None]
    x = canvas.x[cols][None, :]
    bone_edge = geometry.center_x(y) + geometry.lateral * geometry.half_width(finding.bone, y)
    outward = (x - bone_edge) * geometry.lateral  # >0 outside the bone
    soft = EDGE_SOFTNESS * k
    plate = _inside(thickness - np.abs(outward - thickness / 2), soft) * _inside(np.minimum(y - y0, y1 - y), soft)
    metal = plate
    count = int(rng.integers(3, 6))
    screw_length = rng.uniform(1.5, 1.8)
    for i in range(count):
        screw_y = y0 + (i + 0.5) * (y1 - y0) / count
        half = geometry.half_width(finding.bone, screw_y)
        threads = 0.6 * k * np.sin(2 * np.pi * outward / (4.0 * k))
        shaft = _inside(2.6 * k + threads - np.abs(y - screw_y), soft)
        span = _inside(np.minimum(outward + screw_length * half, thickness - outward), soft)
        metal = np.maximum(metal, shaft * span)
    canvas.metal[rows, cols] += METAL_ATTENUATION * metal


# Findings that change the bone maps before texture (they are bone) and after it (they are changes of bone).
_BEFORE_TEXTURE = {"osteophyte": _draw_osteophyte}
_AFTER_TEXTURE = {"flake": _draw_flake, "fracture": _draw_fracture, "implant": _draw_implant}


def render_radiograph(anatomy: Anatomy, view: View, findings=(), image_size: int = REFERENCE_SIZE) -> np.ndarray:
    """
    Draw one radiograph.

    Returns:
        `np.ndarray` of shape `(image_size, image_size)`, float32 intensities in [0, 1] (bright = attenuating).
    """
    unknown = [f.kind for f in findings if f.kind not in FINDING_KINDS]
    if unknown:
        raise ValueError(f"Unknown finding kinds {unknown}; expected {FINDING_KINDS}")
    k = image_size / REFERENCE_SIZE
    canvas = _Canvas(image_size, view, k)
    geometries = []
    for leg in (0, 1):
        narrowing = [f for f in findings if f.kind == "narrowing" and f.leg == leg]
        spurs = [f for f in findings if f.kind == "osteophyte" and f.leg == leg]
        geometry = LegGeometry(
            anatomy,
            leg,
            k,
            medial_gap=min(f.size for f in narrowing) if narrowing else None,
            # a sharpened intercondylar eminence goes with tibial spurs
            eminence_gain=1.0 + sum(0.05 * f.size for f in spurs if f.bone == "tibia"),
        )
        geometries.append(geometry)
        _draw_leg(canvas, anatomy, geometry)
    for finding in findings:
        if finding.kind in _BEFORE_TEXTURE:
            _BEFORE_TEXTURE[finding.kind](canvas, finding, geometries[finding.leg], anatomy)

    # Bone texture belongs to the patient: one field with a margin, cropped where this view's shift puts it.
    margin = int(np.ceil(MAX_SHIFT * k)) + 1
    texture_rng = np.random.default_rng(anatomy.texture_seed)
    padded = image_size + 2 * margin
    trabecular, coarse = anatomy.trabecular_amplitude, anatomy.coarse_amplitude
    texture = _correlated_noise(
        texture_rng,
        (padded, padded),
        sigmas_y=(2.2 * k, 9.0 * k),
        sigmas_x=(1.0 * k, 9.0 * k),
        amplitudes=(trabecular, coarse),
    )
    r0 = margin - round(canvas.shift_y)
    c0 = margin - round(canvas.shift_x)
    texture = texture[r0 : r0 + image_size, c0 : c0 + image_size]
    canvas.bone *= 1.0 + texture
    canvas.soft *= 1.0 + 0.25 * texture

    for finding in findings:
        if finding.kind == "osteophyte":
            _sclerosis(canvas, finding, geometries[finding.leg])
        elif finding.kind in _AFTER_TEXTURE:
            _AFTER_TEXTURE[finding.kind](canvas, finding, geometries[finding.leg], anatomy)

    attenuation = canvas.soft + np.clip(canvas.bone, 0.0, None) + canvas.metal
    intensity = 1.0 - np.exp(-ATTENUATION_TO_INTENSITY * attenuation)
    heel = 1.0 + view.heel_gradient * (np.arange(image_size, dtype=np.float32)[:, None] / image_size - 0.5)
    intensity = view.gain * intensity * heel + view.offset
    # Quantum noise grows with attenuation (fewer photons reach the detector behind bone).
    noise_rng = np.random.default_rng(view.noise_seed)
    noise = noise_rng.standard_normal((image_size, image_size), dtype=np.float32)
    intensity += view.noise_sigma * (0.35 + 0.9 * np.clip(intensity, 0.0, 1.0)) * noise
    return np.clip(intensity, 0.0, 1.0)


def to_uint8(intensity: np.ndarray) -> np.ndarray:
    """[0, 1] float intensities -> 8-bit grey levels (round half up)."""
    return np.floor(np.clip(intensity, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def finding_box(anatomy: Anatomy, view: View, finding: Finding, image_size: int = REFERENCE_SIZE):
    """
    Bounding box `[x0, y0, x1, y1]` of `finding` in image pixels of this view (integers, clipped to the image).
    """
    k = image_size / REFERENCE_SIZE
    geometry = LegGeometry(anatomy, finding.leg, k)
    sx, sy = view.shift_x * k, view.shift_y * k
    if finding.kind == "flake":
        cx, cy = geometry.point(finding.bone, finding.depth, finding.across)
        r = finding.size * k / 2 * 1.45
        box = (cx - r, cy - r, cx + r, cy + r)
    elif finding.kind == "fracture":
        cx, cy = geometry.point(finding.bone, finding.depth, 0.0)
        half = geometry.half_width(finding.bone, cy) * 1.15
        rise = abs(np.tan(finding.angle)) * half + 3 * k
        box = (cx - half, cy - rise, cx + half, cy + rise)
    elif finding.kind == "narrowing":
        x_medial = geometry.center_x(geometry.jy) - geometry.lateral * geometry.condyle * 0.5
        half = geometry.condyle * 0.5
        box = (x_medial - half, geometry.jy - 20 * k, x_medial + half, geometry.jy + 20 * k)
    else:
        width = geometry.condyle + (finding.size * k if finding.kind == "osteophyte" else 16 * k)
        if finding.kind == "osteophyte":
            lo, hi = (
                (geometry.jy - 60 * k, geometry.jy) if finding.bone == "femur" else (geometry.jy, geometry.jy + 60 * k)
            )
        else:
            lo, hi = _implant_rows(finding, geometry)
        box = (geometry.cx - width, lo, geometry.cx + width, hi)
    x0, y0, x1, y1 = box
    return [int(np.clip(round(v), 0, image_size)) for v in (x0 + sx, y0 + sy, x1 + sx, y1 + sy)]
