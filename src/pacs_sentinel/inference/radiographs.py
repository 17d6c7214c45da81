"""Synthetic chest radiographs with multi-label findings, and a DICOM DX writer.

No data set can be downloaded, so the demo classification model (``cxr-cls``) is trained and
tested on posteroanterior (PA) chest radiograph phantoms that this module draws from a seed:
an elliptic body, two dark lung fields under domed hemidiaphragms, a bright mediastinum
and spine, the heart shadow, posterior and anterior ribs, clavicles, a gastric bubble and a
smooth lung texture, projected through a simple detector model (Poisson quantum noise,
detector blur).

The image follows the display convention of a PA film: the patient's right is on the image
left (low column indices), the head at the top. ``image`` holds **attenuation-like line
integrals** as float32, about 0 in air and up to about 0.9 in the densest region; brighter is
denser, as in a MONOCHROME2 radiograph. :func:`write_dx_image` stores ``image * 4095`` as
12-bit pixels.

Findings (:data:`FINDINGS`):

- ``"nodule"``: one (sometimes two) small round opacities of 6-14 mm radius inside a lung.
- ``"effusion"``: fluid filling a lung base up to a meniscus that climbs laterally, blunting
  the costophrenic angle; unilateral or bilateral.
- ``"cardiomegaly"``: a heart shadow wider than about 55 % of the thorax (cardiothoracic ratio
  0.55-0.68; normal hearts are drawn at 0.38-0.48).

Variants beyond ``"normal"`` exist to exercise quality control, never to train on:

- ``"underexposed"``: very few photons: heavy quantum noise and starved (saturated) dense areas.
- ``"noisy"``: normal exposure with strong additive electronic noise.
- ``"rotated"``: patient tilted 12-25 degrees in the image plane and off-centre.

The same seed draws the same anatomy, exposure and noise whatever findings are asked for,
so a finding can be switched on and off on an otherwise identical image.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from scipy import ndimage

from pacs_sentinel.inference.synthetic_dicom import acquisition_date_time, phantom_dataset, synthetic_uid

#: Finding names, in the order of the classifier's outputs.
FINDINGS = ("nodule", "effusion", "cardiomegaly")
#: Probability of each finding when :func:`make_cxr_phantom` draws them at random. Drawn
#: independently; enriched well above screening prevalence, as curated training sets are.
FINDING_PREVALENCE = {"nodule": 0.25, "effusion": 0.25, "cardiomegaly": 0.25}
RADIOGRAPH_VARIANTS = ("normal", "underexposed", "noisy", "rotated")

#: Edge of the (square) detector in mm; pixel spacing is this over the image size.
DETECTOR_MM = 430.0
#: SOP Class UID of Digital X-Ray Image Storage - For Presentation.
DX_IMAGE_STORAGE_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
#: Stored pixel values are ``image * PIXEL_SCALE``, 12 bits.
PIXEL_SCALE = 4095
BITS_STORED = 12

# Detector model: transmitted photons = I0 * exp(-MU * attenuation).
_MU = 4.0


@dataclass
class RadiographPhantom:
    """A synthetic PA chest radiograph and its ground truth.

    Attributes:
        image: float32 ``(rows, cols)`` attenuation-like values (0 = air, about 0.9 at most;
            brighter = denser), patient right on the image left.
        findings: Ground truth per finding name of :data:`FINDINGS`.
        pixel_spacing: (row, column) spacing in mm at the detector.
        variant: One of :data:`RADIOGRAPH_VARIANTS`.
        cardiothoracic_ratio: Heart width over the inner thorax width.
        lungs: Boolean mask of the lung fields (without the heart shadow).
        finding_masks: Boolean mask per *present* finding (the nodules, the fluid, the heart).
    """

    image: np.ndarray
    findings: dict[str, bool]
    pixel_spacing: tuple[float, float]
    variant: str
    cardiothoracic_ratio: float = 0.0
    lungs: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), dtype=bool))
    finding_masks: dict[str, np.ndarray] = field(default_factory=dict)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Gaussian-filtered white noise scaled to unit standard deviation."""
    field_ = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    return field_ / (field_.std() + 1e-12)


def make_cxr_phantom(
    seed: int,
    *,
    findings: dict[str, bool] | None = None,
    variant: str = "normal",
    shape: tuple[int, int] = (256, 256),
) -> RadiographPhantom:
    """Draw a PA chest radiograph phantom from a seed.

    Args:
        seed: Seed of ``np.random.default_rng``; the same seed and arguments give the same
            image, bit for bit.
        findings: Which findings to draw (missing names are absent); None draws each with
            :data:`FINDING_PREVALENCE`.
        variant: One of :data:`RADIOGRAPH_VARIANTS`.
        shape: ``(rows, cols)``; the detector is always 430 mm square, so the pixel spacing
            is ``430 / shape``.

    Returns:
        The phantom.

    Raises:
        ValueError: Unknown variant or finding name, or a shape under 32 pixels.
    """
    if variant not in RADIOGRAPH_VARIANTS:
        raise ValueError(f"unknown radiograph variant {variant!r}; known: {', '.join(RADIOGRAPH_VARIANTS)}")
    rows, cols = int(shape[0]), int(shape[1])
    if rows < 32 or cols < 32:
        raise ValueError(f"radiograph shape {shape!r} is too small (at least 32x32)")
    rng = np.random.default_rng(seed)
    drawn = {name: bool(rng.random() < FINDING_PREVALENCE[name]) for name in FINDINGS}
    if findings is not None:
        unknown = sorted(set(findings) - set(FINDINGS))
        if unknown:
            raise ValueError(f"unknown finding(s) {unknown}; known: {', '.join(FINDINGS)}")
        drawn = {name: bool(findings.get(name, False)) for name in FINDINGS}

    # ---- anatomy parameters (drawn whatever the findings, so findings toggle cleanly)
    size = rng.uniform(0.88, 1.04)  # thorax scale
    shift = rng.uniform(-0.025, 0.025, size=2)
    angle = rng.uniform(-2.0, 2.0)
    if variant == "rotated":
        angle = rng.choice([-1.0, 1.0]) * rng.uniform(12.0, 25.0)
        shift = shift + rng.uniform(-0.06, 0.06, size=2)
    body_density = rng.uniform(0.36, 0.46)
    lung_air = rng.uniform(0.24, 0.32)
    lung_centre = rng.uniform(0.185, 0.205)
    lung_half = rng.uniform(0.135, 0.155)
    apex = rng.uniform(0.11, 0.15)
    diaphragm = rng.uniform(0.66, 0.74)
    dome = rng.uniform(0.05, 0.08)
    left_lower = rng.uniform(0.01, 0.03)  # the left hemidiaphragm sits lower
    rib_phase = rng.uniform(-0.01, 0.01)
    rib_amp = rng.uniform(0.05, 0.08)
    texture_amp = rng.uniform(0.015, 0.03)
    ctr_normal = rng.uniform(0.38, 0.48)
    ctr_enlarged = rng.uniform(0.55, 0.68)
    heart_offset = rng.uniform(0.10, 0.22)
    bubble = rng.random() < 0.6
    n_nodules = 2 if rng.random() < 0.2 else 1
    nodule_mm = rng.uniform(6.0, 14.0, size=2)
    nodule_amp = rng.uniform(0.15, 0.3, size=2)
    nodule_pick = rng.random(size=2)
    effusion_sides = [(True, False), (False, True), (True, True)][int(rng.choice(3, p=[0.35, 0.35, 0.3]))]
    effusion_height = rng.uniform(0.06, 0.16, size=2)
    blur = rng.uniform(0.5, 1.0)
    photons = rng.uniform(1.5e4, 4e4)
    gain = rng.uniform(0.92, 1.06)
    if variant == "underexposed":
        photons = rng.uniform(15.0, 50.0)
    electronic_sd = rng.uniform(0.04, 0.07) if variant == "noisy" else 0.0
    texture = _smooth_noise(rng, (rows, cols), sigma=max(1.0, rows / 128))
    counts_seed = int(rng.integers(2**63 - 1))

    # ---- anatomy coordinates: a (horizontal, image left < 0) and b (0 top .. 1 bottom)
    v, u = np.mgrid[0:rows, 0:cols].astype(np.float64)
    u = (u + 0.5) / cols - 0.5 - shift[0]
    v = (v + 0.5) / rows - 0.5 - shift[1]
    theta = np.deg2rad(angle)
    a = (np.cos(theta) * u + np.sin(theta) * v) / size
    b = (-np.sin(theta) * u + np.cos(theta) * v) / size + 0.5
    pixel_mm = (DETECTOR_MM / rows, DETECTOR_MM / cols)

    # Body: neck, shoulders, then the chest wall; elliptic cross-section.
    half_body = np.interp(b, [0.0, 0.06, 0.17, 0.3, 1.0], [0.11, 0.12, 0.46, 0.43, 0.41])
    inside = np.clip(1.0 - (a / half_body) ** 2, 0.0, None)
    att = body_density * np.sqrt(inside)
    att += 0.05 * (inside > 0) * np.clip((b - 0.8) / 0.2, 0, 1)  # abdomen, thicker

    # Lungs: rounded apex, domed diaphragm, deepest at the lateral costophrenic recess.
    lungs = np.zeros((rows, cols), dtype=bool)
    lung_depth = np.zeros((rows, cols))
    base_levels = {}
    for side in (-1, 1):
        centre = side * lung_centre
        rel = (a - centre) / lung_half
        width = lung_half * np.sqrt(np.clip((b - apex) / 0.2, 0.0, 1.0))
        base = diaphragm + (left_lower if side == 1 else 0.0)
        base_levels[side] = base
        lateral = np.clip(side * (a - centre) / lung_half, -1.0, 1.0)
        floor = base - dome * (1.0 - rel**2) + 0.03 * np.clip(lateral, 0, 1) ** 2
        mask = (np.abs(a - centre) <= width) & (b >= apex) & (b <= floor)
        depth = np.sqrt(np.clip(1.0 - ((a - centre) / np.maximum(width, 1e-6)) ** 2, 0.0, 1.0))
        lungs |= mask
        lung_depth = np.where(mask, depth, lung_depth)

    # Heart: an ellipse on the diaphragm, shifted to the patient's left (image right).
    thorax_width = 2.0 * (lung_centre + lung_half)
    ctr = ctr_enlarged if drawn["cardiomegaly"] else ctr_normal
    heart_half = ctr * thorax_width / 2.0
    heart_height = 0.12 + 0.1 * (ctr - 0.4)
    heart_centre = (heart_offset * heart_half, diaphragm + left_lower / 2 - heart_height * 0.75)
    heart = ((a - heart_centre[0]) / heart_half) ** 2 + ((b - heart_centre[1]) / heart_height) ** 2 <= 1.0
    heart &= b <= diaphragm + left_lower
    lungs &= ~heart
    mediastinum = (np.abs(a) < 0.06) & (b > 0.05) & (b < diaphragm)
    lungs &= ~mediastinum

    # Effusion: fluid from the base up to a meniscus that rises laterally.
    fluid = np.zeros((rows, cols), dtype=bool)
    if drawn["effusion"]:
        for index, side in enumerate((-1, 1)):
            if not effusion_sides[index]:
                continue
            centre = side * lung_centre
            lateral = np.clip(side * (a - centre) / lung_half, -1.0, 1.0)
            level = base_levels[side] - effusion_height[index] * (0.55 + 0.45 * (lateral + 1) / 2) - 0.02 * lateral**2
            fluid |= lungs & (b >= level) & (np.sign(a) == side)
    lung_air_map = lung_air * lung_depth * lungs
    if fluid.any():
        # Fluid replaces air, denser with depth below the meniscus.
        soft_edge = ndimage.gaussian_filter(fluid.astype(np.float64), 1.2)
        lung_air_map = lung_air_map * (1.0 - 0.9 * soft_edge)
    att -= lung_air_map
    att += 0.04 * heart + 0.03 * mediastinum

    # Spine with vertebrae, trachea, clavicles, ribs.
    spine = np.abs(a) < 0.035
    att += spine * (inside > 0) * (0.12 + 0.04 * np.cos(2 * np.pi * b / 0.045) ** 2)
    att -= 0.06 * ((np.abs(a) < 0.014) & (b > 0.02) & (b < 0.3))
    for side in (-1, 1):
        s = side * a
        clavicle_b = 0.15 - 0.13 * (s - 0.04)
        att += 0.09 * np.exp(-(((b - clavicle_b) / 0.012) ** 2)) * ((s > 0.03) & (s < 0.3))
        reach = (s > 0.035) & (np.abs(a) < half_body * 0.95) & (b < diaphragm + 0.1)
        # Ten posterior ribs (curving down laterally) and fainter anterior ribs (rising
        # laterally), drawn as one periodic profile each: rib k sits at phase k.
        x = (s - 0.035) / 0.4
        posterior = (b - (0.1 + rib_phase) - 0.07 * x - 0.09 * x**2) / 0.058
        anterior = (b - (0.25 + rib_phase) + 0.1 * x) / 0.058
        for phase, amp, width, keep in ((posterior, rib_amp, 0.011, True), (anterior, 0.4 * rib_amp, 0.009, x > 0.3)):
            offset = (phase - np.round(phase)) * 0.058
            ribs = np.exp(-((offset / width) ** 2)) * (phase > -0.5) * (phase < 9.5)
            att += reach * keep * amp * ribs
    if bubble:
        att -= 0.12 * (((a - (lung_centre + 0.02)) / 0.05) ** 2 + ((b - (diaphragm + left_lower + 0.06)) / 0.03) ** 2 <= 1)
    att += texture_amp * texture * ndimage.gaussian_filter(lungs.astype(np.float64), 2.0)

    # Nodules: spheres projected inside the lungs, away from the lung edges.
    nodules = np.zeros((rows, cols), dtype=bool)
    if drawn["nodule"]:
        margin = max(2, int(round(14.0 / pixel_mm[0])))
        candidates = np.argwhere(ndimage.binary_erosion(lungs & ~fluid, iterations=margin))
        if len(candidates) == 0:
            candidates = np.argwhere(lungs)
        rr, cc = np.mgrid[0:rows, 0:cols]
        for k in range(n_nodules):
            if len(candidates) == 0:
                break
            r0, c0 = candidates[int(nodule_pick[k] * len(candidates))]
            radius_px = nodule_mm[k] / pixel_mm[0]
            d2 = ((rr - r0) ** 2 + (cc - c0) ** 2) / radius_px**2
            att += nodule_amp[k] * np.sqrt(np.clip(1.0 - d2, 0.0, None))
            nodules |= d2 <= 1.0

    # Detector: blur, quantum (Poisson) noise, electronic noise, gain.
    att = ndimage.gaussian_filter(np.clip(att, 0.0, None), blur * rows / 256)
    expected = photons * np.exp(-_MU * att)
    counts = np.random.default_rng(counts_seed).poisson(expected)
    measured = -np.log(np.maximum(counts, 0.5) / photons) / _MU
    if electronic_sd:
        measured = measured + np.random.default_rng(counts_seed + 1).normal(0.0, electronic_sd, size=measured.shape)
    image = np.clip(measured * gain, 0.0, 1.0).astype(np.float32)

    masks = {}
    if drawn["nodule"]:
        masks["nodule"] = nodules
    if drawn["effusion"]:
        masks["effusion"] = fluid
    if drawn["cardiomegaly"]:
        masks["cardiomegaly"] = heart
    return RadiographPhantom(
        image=image,
        findings=drawn,
        pixel_spacing=pixel_mm,
        variant=variant,
        cardiothoracic_ratio=float(ctr),
        lungs=lungs,
        finding_masks=masks,
    )


# --------------------------------------------------------------------------- DICOM writer


def _uid(seed: int | None, *parts: object) -> str:
    """A UID derived from the seed and ``parts`` when a seed is given, else a random one."""
    return synthetic_uid("pacs-sentinel-radiograph", seed, *parts)


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def write_dx_image(
    phantom: RadiographPhantom,
    out_dir: Path,
    *,
    patient_id: str = "CXR001",
    patient_name: str = "Phantom^Chest",
    study_uid: str | None = None,
    series_uid: str | None = None,
    accession_number: str = "",
    study_description: str = "Synthetic chest radiograph",
    seed: int | None = None,
) -> Path:
    """Write the phantom as one Digital X-Ray Image - For Presentation file.

    MONOCHROME2, 12 bits stored in 16 (``image * 4095``), pixel intensity relationship LOG with
    sign -1 (higher values = less X-ray intensity), PA chest (ViewPosition ``PA``, anatomic
    region SCT 51185008 "Chest", PatientOrientation ``L\\F``), window from the 1st-99th
    percentile, explicit VR little endian with file meta. UIDs and dates derive from ``seed``
    when given, so the same seed writes byte-identical files.

    Args:
        phantom: The radiograph to write.
        out_dir: Folder to write ``DX000001.dcm`` into; created when missing.
        patient_id, patient_name, accession_number, study_description: Identity.
        study_uid, series_uid: UIDs to use instead of derived ones.
        seed: Seed for UIDs and dates; None for random UIDs and the current date and time.

    Returns:
        The written path.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or _uid(seed, "study", patient_id)
    series_uid = series_uid or _uid(seed, "series", study_uid)
    sop_uid = _uid(seed, "instance", series_uid)
    date, time = acquisition_date_time(seed)
    stored = np.clip(np.rint(np.asarray(phantom.image, dtype=np.float64) * PIXEL_SCALE), 0, PIXEL_SCALE).astype(np.uint16)
    rows, cols = stored.shape
    low, high = np.percentile(stored, [1.0, 99.0])
    width = max(float(high - low), 2.0)
    centre = (float(low) + float(high)) / 2.0
    spacing = [f"{phantom.pixel_spacing[0]:.6g}", f"{phantom.pixel_spacing[1]:.6g}"]

    ds = phantom_dataset(
        DX_IMAGE_STORAGE_FOR_PRESENTATION, sop_uid, patient_name=patient_name, patient_id=patient_id,
        study_uid=study_uid, series_uid=series_uid, accession_number=accession_number,
        study_description=study_description, date=date, time=time,
    )
    ds.InstanceCreationDate = date
    ds.InstanceCreationTime = time
    # General Series, DX Series
    ds.Modality = "DX"
    ds.SeriesDescription = f"Phantom chest PA ({phantom.variant})"
    ds.BodyPartExamined = "CHEST"
    ds.PresentationIntentType = "FOR PRESENTATION"
    # General Equipment (the rest is the phantoms' common equipment)
    ds.StationName = "PHANTOM-DX"
    ds.ManufacturerModelName = "make_cxr_phantom"
    # General Acquisition, General Image, DX Image
    ds.InstanceNumber = 1
    ds.PatientOrientation = ["L", "F"]
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    ds.PixelIntensityRelationship = "LOG"
    ds.PixelIntensityRelationshipSign = -1
    ds.RescaleIntercept = "0"
    ds.RescaleSlope = "1"
    ds.RescaleType = "US"
    ds.PresentationLUTShape = "IDENTITY"
    # DX Anatomy Imaged
    ds.ImageLaterality = "U"
    ds.AnatomicRegionSequence = DicomSequence([_code("51185008", "SCT", "Chest")])
    # DX Positioning
    ds.ViewPosition = "PA"
    ds.ViewCodeSequence = DicomSequence([_code("399348003", "SCT", "postero-anterior")])
    ds.PositionerType = "COLUMN"
    ds.DistanceSourceToDetector = "1800"
    # X-Ray acquisition dose / generation
    ds.KVP = "120"
    # DX Detector
    ds.DetectorType = "SCINTILLATOR"
    ds.ImagerPixelSpacing = spacing
    ds.PixelSpacing = spacing
    # Acquisition Context
    ds.AcquisitionContextSequence = DicomSequence([])
    # Image Pixel
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = cols
    ds.BitsAllocated = 16
    ds.BitsStored = BITS_STORED
    ds.HighBit = BITS_STORED - 1
    ds.PixelRepresentation = 0
    # VOI LUT
    ds.WindowCenter = f"{centre:.1f}"
    ds.WindowWidth = f"{width:.1f}"
    ds.WindowCenterWidthExplanation = "PHANTOM"
    ds.PixelData = stored.tobytes()
    path = out_dir / "DX000001.dcm"
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return path
