"""Synthetic abdominal CT phantoms and a writer that turns them into a DICOM CT series.

No data set can be downloaded, so the demo segmentation model (``organ-seg``) is trained
and tested on phantoms that this module generates from a seed. A phantom is an elliptic
body in air with subcutaneous fat, soft tissue, a spine, kidneys, spleen, aorta, stomach
and bowel gas, and the target: a liver-like organ, the largest soft-tissue organ, brighter
than its surroundings, on the patient's right.

Geometry follows DICOM LPS: column index grows towards patient left (+x), row index towards
posterior (+y), slice index towards superior (+z). The liver therefore sits at low column
indices. Everything is drawn in millimetres, so the anatomy does not depend on the grid.

Variants beyond ``"normal"`` exist to exercise quality control, never to train on:

- ``"metal-artifact"``: spinal rods and surgical clips with heavy bright/dark streaks.
- ``"unusual-anatomy"``: massive hepatomegaly (liver volume far above the normal range).
- ``"situs-inversus"``: the liver on the patient's left, the spleen on the right.
- ``"low-dose"``: a normal anatomy under very heavy noise (poor input image quality).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import CTImageStorage, generate_uid
from scipy import ndimage

from pacs_sentinel.inference.synthetic_dicom import acquisition_date_time, phantom_dataset, synthetic_uid

#: Every variant :func:`make_ct_phantom` knows; ``"normal"`` is the training distribution.
PHANTOM_VARIANTS = ("normal", "metal-artifact", "unusual-anatomy", "situs-inversus", "low-dose")

#: HU range a phantom is clipped to: what 12-bit storage with intercept -1024 can hold.
HU_MIN = -1024
HU_MAX = 3071

# Label map values used while drawing.
_AIR, _FAT, _SOFT, _LIVER, _SPLEEN, _KIDNEY, _BONE, _GAS, _AORTA, _FLUID, _METAL, _MUSCLE = range(12)
#: The organs whose ground truth :meth:`CTPhantom.organ` gives (the liver is also ``CTPhantom.liver``).
ORGAN_LABELS = {"liver": _LIVER, "spleen": _SPLEEN, "kidneys": _KIDNEY, "aorta": _AORTA}


@dataclass
class CTPhantom:
    """A synthetic CT volume with the ground truth of its liver-like organ.

    Attributes:
        hu: int16 array ``(slices, rows, cols)`` in Hounsfield units.
        liver: Boolean ground-truth mask of the liver-like organ, same shape.
        spacing: ``(slice, row, col)`` spacing in mm.
        origin: Patient coordinates (mm, LPS) of the centre of the first voxel.
        variant: The variant it was drawn as (one of :data:`PHANTOM_VARIANTS`).
        labels: uint8 label map of every tissue drawn, same shape (values of
            :data:`ORGAN_LABELS` among them); None for a phantom built by hand.
    """

    hu: np.ndarray
    liver: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    variant: str
    labels: np.ndarray | None = None

    def organ(self, name: str) -> np.ndarray:
        """Boolean ground truth of one organ of :data:`ORGAN_LABELS` (e.g. a third-party SEG's
        spleen segment in tests).

        Raises:
            ValueError: Unknown organ, or a phantom without a label map.
        """
        if name not in ORGAN_LABELS or self.labels is None:
            raise ValueError(f"no ground truth of {name!r} in this phantom; organs: {sorted(ORGAN_LABELS)}")
        return self.labels == ORGAN_LABELS[name]

    @property
    def liver_volume_ml(self) -> float:
        """Ground-truth liver volume in millilitres."""
        return float(self.liver.sum()) * float(np.prod(self.spacing)) / 1000.0


def _ellipsoid(z: np.ndarray, y: np.ndarray, x: np.ndarray, centre: tuple[float, float, float],
               radii: tuple[float, float, float]) -> np.ndarray:
    """Return the implicit function ``sum(((p - c) / r)^2)``: < 1 inside the ellipsoid."""
    return ((z - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2 + ((x - centre[2]) / radii[2]) ** 2


def _smooth_field(rng: np.random.Generator, z: np.ndarray, y: np.ndarray, x: np.ndarray,
                  amplitude: float, wavelength_mm: float, terms: int = 4) -> np.ndarray:
    """A smooth random field: a sum of a few plane waves of random direction and phase."""
    field = np.zeros(np.broadcast_shapes(z.shape, y.shape, x.shape), dtype=np.float32)
    for _ in range(terms):
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        k = 2 * np.pi / (wavelength_mm * rng.uniform(0.7, 1.4))
        phase = rng.uniform(0, 2 * np.pi)
        field += np.cos(k * (direction[0] * z + direction[1] * y + direction[2] * x) + phase).astype(np.float32)
    return field * (amplitude / np.sqrt(terms))


def make_ct_phantom(
    seed: int,
    *,
    variant: str = "normal",
    shape: tuple[int, int, int] = (48, 160, 160),
    spacing: tuple[float, float, float] = (5.0, 2.5, 2.5),
) -> CTPhantom:
    """Draw one abdominal CT phantom, fully determined by ``seed``, ``variant`` and the grid.

    Args:
        seed: Seed of :func:`numpy.random.default_rng`; the same seed gives the same phantom.
        variant: One of :data:`PHANTOM_VARIANTS`.
        shape: ``(slices, rows, cols)`` of the volume.
        spacing: ``(slice, row, col)`` spacing in mm.

    Returns:
        The phantom, HU clipped to ``[HU_MIN, HU_MAX]``, with its liver ground truth.

    Raises:
        ValueError: Unknown variant, or a non-positive shape or spacing.
    """
    if variant not in PHANTOM_VARIANTS:
        raise ValueError(f"unknown phantom variant {variant!r}; expected one of {PHANTOM_VARIANTS}")
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"invalid phantom shape {shape!r}")
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"invalid phantom spacing {spacing!r}")
    rng = np.random.default_rng(seed)
    n_z, n_y, n_x = shape
    s_z, s_y, s_x = (float(v) for v in spacing)
    # Patient coordinates of voxel centres: x, y centred on the FOV, z centred on the scan.
    origin = (-(n_x - 1) * s_x / 2.0, -(n_y - 1) * s_y / 2.0, -(n_z - 1) * s_z / 2.0)
    z = (origin[2] + np.arange(n_z, dtype=np.float32) * s_z)[:, None, None]
    y = (origin[1] + np.arange(n_y, dtype=np.float32) * s_y)[None, :, None]
    x = (origin[0] + np.arange(n_x, dtype=np.float32) * s_x)[None, None, :]
    z_half = max(n_z * s_z / 2.0, 1.0)

    mirror = -1.0 if variant == "situs-inversus" else 1.0  # +1: liver on patient right (-x)
    labels = np.full(shape, _AIR, dtype=np.uint8)

    # Body: an elliptic cylinder whose size varies gently along z, plus a fat layer.
    body_a = rng.uniform(135, 172)  # half width (x)
    body_b = rng.uniform(100, 128)  # half depth (y)
    body_dy = rng.uniform(-8, 8)
    taper = 1.0 + rng.uniform(-0.06, 0.06) * (z / z_half)
    wobble = _smooth_field(rng, z, y, x, 0.015, 300.0, terms=3)
    body_f = ((x / (body_a * taper)) ** 2 + ((y - body_dy) / (body_b * taper)) ** 2) + wobble
    labels[np.broadcast_to(body_f < 1.0, shape)] = _FAT
    fat = rng.uniform(10, 28)
    inner_f = (x / (body_a * taper - fat)) ** 2 + ((y - body_dy) / (body_b * taper - fat * 0.8)) ** 2 + wobble
    inner = np.broadcast_to(inner_f < 1.0, shape)
    labels[inner] = _SOFT
    # Posterior muscles (psoas / paraspinal) as darker soft tissue.
    spine_y = body_dy + body_b - fat - rng.uniform(38, 48)
    for side in (-1, 1):
        muscle = _ellipsoid(z, y, x, (0.0, spine_y + 12, side * rng.uniform(38, 48)), (10 * z_half, 22, 24)) < 1
        labels[muscle & inner] = _MUSCLE

    # Spine: vertebral body and posterior element along the whole scan, at the back midline.
    spine_r = rng.uniform(16, 21)
    vertebra = ((x / spine_r) ** 2 + ((y - spine_y) / (spine_r * 0.9)) ** 2) < 1
    process = ((x / 7.0) ** 2 + ((y - spine_y - spine_r - 14) / 16.0) ** 2) < 1
    bone = np.broadcast_to(vertebra | process, shape)
    labels[bone] = _BONE
    # Aorta in front of the spine, slightly to the patient's left.
    aorta_r = rng.uniform(9, 13)
    aorta = np.broadcast_to((((x - mirror * 14) / aorta_r) ** 2 + ((y - spine_y + spine_r + aorta_r + 2) / aorta_r) ** 2) < 1, shape)
    labels[aorta] = _AORTA

    # Kidneys: posterior, either side of the spine, in the lower half of the liver range.
    kidney_z = rng.uniform(-0.35, -0.05) * z_half
    for side in (-1, 1):
        centre = (kidney_z + rng.uniform(-10, 10), spine_y + rng.uniform(-6, 4), side * rng.uniform(62, 78))
        kidney = _ellipsoid(z, y, x, centre, (rng.uniform(45, 58), rng.uniform(20, 26), rng.uniform(22, 28))) < 1
        labels[kidney & inner] = _KIDNEY

    # Spleen: posterior on the side opposite the liver, upper abdomen.
    spleen_c = (rng.uniform(0.1, 0.35) * z_half, spine_y - rng.uniform(15, 35), mirror * rng.uniform(80, 100))
    spleen_f = _ellipsoid(z, y, x, spleen_c, (rng.uniform(40, 55), rng.uniform(35, 45), rng.uniform(18, 26)))
    spleen_f = spleen_f + _smooth_field(rng, z, y, x, 0.25, 120.0)
    labels[(spleen_f < 1) & inner] = _SPLEEN

    # Stomach: fluid-filled with an anterior gas cap, on the spleen side, anterior.
    stomach_c = (rng.uniform(0.05, 0.3) * z_half, body_dy - rng.uniform(25, 50), mirror * rng.uniform(35, 60))
    stomach_r = (rng.uniform(40, 55), rng.uniform(25, 35), rng.uniform(30, 40))
    stomach = (_ellipsoid(z, y, x, stomach_c, stomach_r) < 1) & inner
    labels[stomach] = _FLUID
    gas_level = stomach_c[1] - stomach_r[1] * rng.uniform(0.1, 0.5)
    labels[stomach & np.broadcast_to(y < gas_level, shape)] = _GAS

    # The liver: a large right lobe, a left lobe reaching across the midline, a smooth bumpy
    # surface. Hepatomegaly scales it up and lets it run far down the abdomen.
    grow = rng.uniform(1.45, 1.6) if variant == "unusual-anatomy" else 1.0
    size = rng.uniform(0.88, 1.12, size=3) * grow
    liver_z = rng.uniform(0.1, 0.3) * z_half - (grow - 1.0) * 45.0
    right_c = (liver_z, body_dy + rng.uniform(-12, 12), -mirror * rng.uniform(55, 75) * min(grow, 1.2))
    right_r = (rng.uniform(62, 78) * size[0], rng.uniform(58, 72) * size[1], rng.uniform(52, 64) * size[2])
    left_c = (liver_z + rng.uniform(5, 25), body_dy - rng.uniform(25, 45), mirror * rng.uniform(-5, 20) * grow)
    left_r = (rng.uniform(35, 48) * size[0], rng.uniform(24, 32) * size[1], rng.uniform(45, 62) * size[2])
    bumps = _smooth_field(rng, z, y, x, 0.22, 110.0, terms=5)
    liver_f = np.minimum(_ellipsoid(z, y, x, right_c, right_r), _ellipsoid(z, y, x, left_c, left_r) ** 1.3) + bumps
    liver = (liver_f < 1) & inner & ~bone & ~aorta
    labels[liver] = _LIVER

    # Bowel gas bubbles in the lower abdomen (never inside the liver).
    for _ in range(int(rng.integers(3, 9))):
        c = (rng.uniform(-0.9, -0.2) * z_half, body_dy + rng.uniform(-70, 10), rng.uniform(-80, 80))
        bubble = (_ellipsoid(z, y, x, c, tuple(rng.uniform(6, 16, size=3))) < 1) & (labels == _SOFT)
        labels[bubble] = _GAS

    # Intensities: per-phantom tissue values (contrast phase varies), then blur and noise.
    soft = rng.uniform(35, 48)
    values = np.zeros(12, dtype=np.float32)
    values[_AIR] = -1000.0
    values[_FAT] = rng.uniform(-115, -85)
    values[_SOFT] = soft
    values[_MUSCLE] = soft + rng.uniform(-12, -4)
    values[_LIVER] = soft + rng.uniform(22, 45)
    values[_SPLEEN] = soft + rng.uniform(2, 14)
    values[_KIDNEY] = soft + rng.uniform(-12, 0)
    values[_BONE] = rng.uniform(550, 800)
    values[_GAS] = rng.uniform(-980, -850)
    values[_AORTA] = rng.uniform(120, 200)
    values[_FLUID] = rng.uniform(5, 20)
    values[_METAL] = 3000.0
    hu = values[labels]
    # Gentle texture inside organs, then partial-volume blur.
    hu += _smooth_field(rng, z, y, x, 4.0, 40.0, terms=3)
    hu = ndimage.gaussian_filter(hu, sigma=(0.4, 0.7, 0.7))

    noise_sd = rng.uniform(10, 20)
    if variant == "low-dose":
        noise_sd = rng.uniform(90, 130)
    if variant == "metal-artifact":
        hu = _add_metal(hu, rng, labels, z, y, x, spine_y=spine_y, spine_r=spine_r, liver_c=right_c, mirror=mirror)
    hu += rng.normal(0.0, noise_sd, size=shape).astype(np.float32)
    hu = np.clip(np.rint(hu), HU_MIN, HU_MAX).astype(np.int16)
    return CTPhantom(hu=hu, liver=liver, spacing=(s_z, s_y, s_x), origin=origin, variant=variant, labels=labels)


def _add_metal(hu: np.ndarray, rng: np.random.Generator, labels: np.ndarray, z: np.ndarray, y: np.ndarray,
               x: np.ndarray, *, spine_y: float, spine_r: float, liver_c: tuple[float, float, float],
               mirror: float) -> np.ndarray:
    """Add spinal rods and a cluster of surgical clips, with heavy streak artefacts.

    Streaks are radial bright and dark bands from each metal object, decaying with distance,
    plus a dark band between each pair of objects (photon starvation), on every slice where
    metal is present. They are strong enough to corrupt the liver's appearance.
    """
    shape = hu.shape
    objects: list[tuple[float, float]] = []
    # Two pedicle rods running the whole scan.
    rod_r = 4.0
    for side in (-1, 1):
        cx, cy = side * (spine_r * 0.9), spine_y + spine_r * 0.6
        rod = np.broadcast_to(((x - cx) ** 2 + (y - cy) ** 2) < rod_r**2, shape)
        hu[rod] = 3000.0
        objects.append((cx, cy))
    # Surgical clips near the liver hilum.
    clip_x = liver_c[2] * 0.45
    clip_y = liver_c[1] + rng.uniform(-5, 15)
    clip = np.broadcast_to(((x - clip_x) ** 2 / 25.0 + (y - clip_y) ** 2 / 64.0) < 1, shape)
    hu[clip] = 3000.0
    objects.append((clip_x, clip_y))

    streaks = np.zeros(np.broadcast_shapes(y.shape, x.shape), dtype=np.float32)
    for cx, cy in objects:
        theta = np.arctan2(y - cy, x - cx)
        radius = np.sqrt((x - cx) ** 2 + (y - cy) ** 2)
        for _ in range(14):
            angle = rng.uniform(-np.pi, np.pi)
            width = rng.uniform(0.03, 0.09)
            amplitude = rng.choice([-1.0, 1.0]) * rng.uniform(250, 700)
            delta = np.angle(np.exp(1j * (theta - angle)))
            streaks += amplitude * np.exp(-0.5 * (delta / width) ** 2) * np.exp(-radius / 220.0)
    # Dark bands between pairs of metal objects.
    for i in range(len(objects)):
        for j in range(i + 1, len(objects)):
            (x0, y0), (x1, y1) = objects[i], objects[j]
            length = np.hypot(x1 - x0, y1 - y0)
            t = ((x - x0) * (x1 - x0) + (y - y0) * (y1 - y0)) / length**2
            dist = np.abs((x - x0) * (y1 - y0) - (y - y0) * (x1 - x0)) / length
            streaks -= 350.0 * np.exp(-0.5 * (dist / 6.0) ** 2) * np.exp(-np.clip(np.abs(t - 0.5) - 0.5, 0, None) * 3)
    streaks = np.broadcast_to(streaks, shape) * (labels != _AIR)
    return hu + streaks.astype(np.float32)


def _uid(seed: int | None, *parts: object) -> str:
    """A UID derived from the seed and ``parts`` when a seed is given, else a random one."""
    return synthetic_uid("pacs-sentinel-phantom", seed, *parts)


def write_ct_series(
    phantom: CTPhantom,
    out_dir: Path,
    *,
    patient_id: str = "PHANTOM001",
    patient_name: str = "Phantom^Normal",
    study_uid: str | None = None,
    series_uid: str | None = None,
    accession_number: str = "",
    study_description: str = "Synthetic abdomen CT",
    seed: int | None = None,
) -> list[Path]:
    """Write the phantom as a single-frame CT Image Storage series, one file per slice.

    Pixels are stored unsigned 12-bit (in 16) with RescaleIntercept -1024, explicit VR little
    endian with file meta. UIDs and dates are derived from ``seed`` when given, so the same
    seed writes byte-identical files; otherwise UIDs are random and dates are now.

    Args:
        phantom: The phantom to write.
        out_dir: Folder to write ``CT000001.dcm``...; created when missing.
        patient_id, patient_name, accession_number, study_description: Patient/study identity.
        study_uid, series_uid: UIDs to use instead of derived ones (e.g. to put several
            series in one study).
        seed: Seed for UIDs and dates; ``None`` for random UIDs and the current date.

    Returns:
        The written paths, in slice order (slice ``k`` is InstanceNumber ``k + 1``).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or _uid(seed, "study", patient_id)
    series_uid = series_uid or _uid(seed, "series", study_uid)
    frame_uid = _uid(seed, "frame-of-reference", series_uid)
    date, time = acquisition_date_time(seed)
    n_slices, rows, cols = phantom.hu.shape
    s_z, s_y, s_x = phantom.spacing
    stored = (np.clip(phantom.hu.astype(np.int32), HU_MIN, HU_MAX) + 1024).astype(np.uint16)

    paths = []
    for k in range(n_slices):
        sop_uid = _uid(seed, "instance", series_uid, k) if seed is not None else generate_uid()
        ds = phantom_dataset(
            CTImageStorage, sop_uid, patient_name=patient_name, patient_id=patient_id, study_uid=study_uid,
            series_uid=series_uid, accession_number=accession_number, study_description=study_description,
            date=date, time=time,
        )
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.Modality = "CT"
        ds.SeriesDescription = f"Phantom abdomen ({phantom.variant})"
        ds.ManufacturerModelName = "make_ct_phantom"
        ds.BodyPartExamined = "ABDOMEN"
        ds.SliceThickness = f"{s_z:g}"
        ds.KVP = "120"
        ds.PatientPosition = "FFS"
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [f"{phantom.origin[0]:g}", f"{phantom.origin[1]:g}", f"{phantom.origin[2] + k * s_z:g}"]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.SliceLocation = f"{phantom.origin[2] + k * s_z:g}"
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = rows
        ds.Columns = cols
        ds.PixelSpacing = [f"{s_y:g}", f"{s_x:g}"]
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        ds.WindowCenter = "40"
        ds.WindowWidth = "400"
        ds.RescaleIntercept = "-1024"
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        ds.PixelData = stored[k].tobytes()
        path = out_dir / f"CT{k + 1:06d}.dcm"
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
        paths.append(path)
    return paths
