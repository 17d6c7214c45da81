"""Input-image QC: is the CT volume itself fit for an AI model to read?

Computed once per study volume and applied to every segment judged on it: a poor input
explains a poor output. Each check measures one physically explainable quantity, turns it
into a sub-score in [0, 1] with :func:`~pacs_sentinel.qc.heuristics.ramp` and raises
:attr:`~pacs_sentinel.results.Reason.POOR_INPUT_QUALITY` when the sub-score falls below
:data:`~pacs_sentinel.qc.heuristics.FLAG_BELOW`:

- ``noise_hu``: image noise, the robust standard deviation (1.4826 x MAD) of the in-plane
  residual against a 3x3 mean, rescaled to the standard deviation of white noise, measured
  in homogeneous soft tissue (smoothed value in ``SOFT_TISSUE_HU``);
- ``edge_width_px``: blur, the width of the body/air edge in pixels
  (step height / steepest gradient; about 2.5 sigma of a Gaussian blur);
- ``metal_ml``: streak-artefact source, the volume of metal (voxels at or above
  ``METAL_HU``, brighter than cortical bone) inside the body;
- ``air_level_hu`` and ``out_of_range_share``: is the volume in Hounsfield units at all?
  Every CT in HU shows air near -1000 HU somewhere (around the body, in the bowel or lungs);
  no CT value lies above the 12-bit range (3071 HU) in more than a handful of voxels;
- ``contrast_range_hu``: the spread between the 1st and 99th percentile (a flat, windowed or
  saturated image has almost none);
- ``blockiness``: block artefacts of lossy JPEG (DCT) compression, which codes each slice in
  8 x 8 pixel blocks: the mean absolute step between neighbouring soft-tissue pixels across the
  block boundaries (every 8th pixel, rows and columns, at the phase where the step is largest)
  over the median step at the seven other phases, on up to ``BLOCK_SLICES`` full-resolution slices. About 1
  without blocks (lossless, JPEG 2000, noise and blur alike);
- ``truncated_slice_share``: truncated field of view, the share of axial slices on which the
  body touches the image border along more than ``TRUNCATION_BORDER_SHARE`` of the border
  (a sagittal or coronal series is looked at axially: its own slices end at the scan range).

On a series of another modality (MR, PET...: not in HU) only the checks that compare the
body with its background run (:data:`UNIT_FREE_CHECKS`: blur, truncation), with the body found
by Otsu's threshold; noise, metal, HU range, contrast and blocks read HU and are not measured
there, so an MR series is never called "not in HU". (Blocks were tried between body pixels of
the interquartile range instead of soft tissue: on phantoms mapped to MR-like contrasts, 8-bit
JPEG at quality 10 left too few pixels in that narrow window to measure.)

Thresholds are module constants calibrated on the product's phantoms
(:func:`pacs_sentinel.inference.phantoms.make_ct_phantom`): no check fires on 20 ``"normal"``
phantoms, the noise check fires on ``"low-dose"`` and the metal check on ``"metal-artifact"``.

Input quality explains failures but does not by itself make a mask wrong (the demo model
segments the low-dose phantoms with Dice about 0.9). Signals therefore carry a fusion floor
(:attr:`~pacs_sentinel.qc.heuristics.Signal.fusion_floor`): noise and blur alone lower the
quality score to at most ``NOISE_FUSION_FLOOR`` and are reported as findings, but they send a
result to review only together with another doubt. Metal, a volume not in HU and a truncated
field of view have no floor: they are known causes of silent failures.

The fitted fusion (:mod:`pacs_sentinel.qc.fusion`) weighs each check by what it predicted on
the calibration set. Blockiness is not among its features (the phantoms carry no compression):
like any signal the calibration never saw, it multiplies the fused score by its fusion factor,
down to ``BLOCK_FUSION_FLOOR`` for heavy blocking; with the shipped threshold (0.89) that sends
such a study to review, with the finding saying why.

The volume is subsampled (at most ``MAX_SLICES`` slices, in-plane stride so that a slice has
at most ``MAX_SLICE_PIXELS`` pixels) so that the checks take a few tens of milliseconds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from pacs_sentinel.dicom_io.series import Volume
from pacs_sentinel.qc.heuristics import Signal, axial_view, patient_x_mm, ramp
from pacs_sentinel.results import Reason

#: Voxels above this are body (air is -1000 HU, fat -100 HU).
BODY_HU = -500.0
#: Lowest and highest value 12-bit CT storage holds with the usual intercept of -1024.
HU_MIN = -1024.0
HU_MAX = 3071.0
#: Smoothed HU range counted as soft tissue for the noise estimate.
SOFT_TISSUE_HU = (-150.0, 250.0)
#: Noise (HU, white-noise equivalent): sub-score 1 at or below LOW, 0 at or above HIGH.
#: Routine abdominal CT is 10-30 HU; the normal phantoms 10-20 HU, the low-dose ones 90-130 HU.
NOISE_LOW_HU = 40.0
NOISE_HIGH_HU = 80.0
#: Body/air edge width in pixels: sub-score 1 at or below LOW, 0 at or above HIGH.
#: A sharp reconstruction has edges 2-4 pixels wide (normal phantoms: about 3).
EDGE_WIDTH_LOW_PX = 6.0
EDGE_WIDTH_HIGH_PX = 10.0
#: Metal: HU above cortical bone (<= about 2000 HU) and enamel-free abdomen.
METAL_HU = 2500.0
#: Metal volume inside the body (ml): sub-score 1 at or below LOW, 0 at or above HIGH.
#: A surgical clip is about 0.05 ml; spinal rods about 20-30 ml.
METAL_LOW_ML = 1.0
METAL_HIGH_ML = 4.0
#: 1st percentile of the volume (HU): sub-score 1 at or below LOW (air present), 0 at or
#: above HIGH (no air anywhere: not HU, e.g. raw stored values, normalised data, MR).
AIR_LEVEL_LOW_HU = -800.0
AIR_LEVEL_HIGH_HU = -400.0
#: Share of voxels above HU_MAX (or not finite): sub-score 1 at or below LOW, 0 at HIGH.
OUT_OF_RANGE_LOW = 0.001
OUT_OF_RANGE_HIGH = 0.01
#: 99th minus 1st percentile (HU): sub-score 0 at or below LOW, 1 at or above HIGH.
CONTRAST_LOW_HU = 300.0
CONTRAST_HIGH_HU = 700.0
#: A slice is truncated when the body covers more than this share of its border pixels.
TRUNCATION_BORDER_SHARE = 0.05
#: Share of truncated slices: sub-score 1 at or below LOW, 0 at or above HIGH.
TRUNCATED_LOW = 0.2
TRUNCATED_HIGH = 0.6
#: JPEG's block size in pixels, and the slices (full resolution, evenly spread) blockiness reads.
BLOCK_PX = 8
BLOCK_SLICES = 8
#: Blockiness (boundary step / other steps): sub-score 1 at or below LOW, 0 at or above HIGH.
#: Phantoms of every QC image family (blur, noise, ghosting... included) and pydicom's CT files as
#: stored (CT_small, lossy JPEG 2000 693_J2KI): 1.0-1.25. Phantom slices through 8-bit JPEG
#: (Pillow, window -1024..1024 HU): quality 75: 1.7-1.8; quality 30: 1.9-2.9 (the demo model's
#: Dice unchanged); quality 10: 4.2-5.8 (its Dice 0.72-0.94 where 0.92-0.96 unchanged; metal
#: phantoms 2.0). DCMTK's dcmcjpeg, 12-bit extended at quality 10: 1.7; 8-bit baseline at
#: quality 30: 2.4, at quality 10: 4.6.
BLOCKINESS_LOW = 1.5
BLOCKINESS_HIGH = 3.0
#: The ratio reported when the blocks are flat inside (no step but at their boundaries), and its cap.
BLOCKINESS_CAP = 10.0
#: Fusion floors: what a check at sub-score 0 still leaves of the quality score.
NOISE_FUSION_FLOOR = 0.8
BLUR_FUSION_FLOOR = 0.8
BLOCK_FUSION_FLOOR = 0.8
#: The checks run on a series that is not CT (the others read HU).
UNIT_FREE_CHECKS = ("edge_width_px", "truncated_slice_share")
#: Subsampling: at most this many slices, at most this many pixels per slice.
MAX_SLICES = 16
MAX_SLICE_PIXELS = 256 * 256
#: Fewer soft-tissue or edge pixels than this: the measurement is skipped (sub-score 1).
MIN_SAMPLES = 200


@dataclass(frozen=True)
class ImageQC:
    """Input-image QC of one volume.

    Attributes:
        signals: One signal per check (see the module docstring).
        body: Boolean body mask (largest component above ``BODY_HU``) on the subsampled grid.
        body_stride: ``(slice, row, col)`` stride of that grid in voxels of the volume.
    """

    signals: list[Signal]
    body: np.ndarray
    body_stride: tuple[int, int, int]

    def midline_x_mm(self, volume: Volume) -> float | None:
        """Patient x of the body's centroid, in :func:`~pacs_sentinel.qc.heuristics.patient_x_mm`'s frame.

        Returns:
            The midline, or None when the volume shows no body.
        """
        indices = np.argwhere(self.body)
        if indices.size == 0:
            return None
        indices = indices * np.asarray(self.body_stride)
        return float(patient_x_mm(indices, volume.spacing, volume.direction).mean())

    def body_area_cm2(self, volume: Volume) -> float | None:
        """The body's axial cross-section (cm², holes filled: lungs and bowel gas count as body),
        the median over the axial slices that show it: how big the patient is, whatever the
        field of view, matrix or slice thickness.

        Returns:
            The area, or None when the volume shows no body.
        """
        spacing = tuple(float(s) * k for s, k in zip(volume.spacing, self.body_stride, strict=True))
        body, axial_spacing = axial_view(self.body, volume.direction, spacing)  # type: ignore[arg-type]
        areas = [int(ndimage.binary_fill_holes(plane).sum()) for plane in body if plane.any()]
        if not areas:
            return None
        return float(np.median(areas)) * axial_spacing[1] * axial_spacing[2] / 100.0

    @property
    def reasons(self) -> list[Reason]:
        """The reasons the fired checks raise (at most one: POOR_INPUT_QUALITY)."""
        return list(dict.fromkeys(s.reason for s in self.signals if s.fired))


def _strides(shape: tuple[int, ...]) -> tuple[int, int, int]:
    n_z, n_y, n_x = shape
    s_z = max(1, int(np.ceil(n_z / MAX_SLICES)))
    s_xy = max(1, int(np.ceil(np.sqrt(n_y * n_x / MAX_SLICE_PIXELS))))
    return s_z, s_xy, s_xy


def _largest_component(mask: np.ndarray) -> np.ndarray:
    labels, count = ndimage.label(mask)
    if count <= 1:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(sizes.argmax())


def _noise(slices: np.ndarray) -> float | None:
    """White-noise-equivalent noise (HU) in homogeneous soft tissue, or None (too little)."""
    local_mean = ndimage.uniform_filter(slices, size=(1, 3, 3), mode="nearest")
    residual = slices - local_mean
    smooth = ndimage.uniform_filter(slices, size=(1, 7, 7), mode="nearest")
    soft = (smooth > SOFT_TISSUE_HU[0]) & (smooth < SOFT_TISSUE_HU[1])
    soft[:, :2, :] = soft[:, -2:, :] = soft[:, :, :2] = soft[:, :, -2:] = False
    values = residual[soft]
    if values.size < MIN_SAMPLES:
        return None
    mad = float(np.median(np.abs(values - np.median(values))))
    # Residual of white noise against a 3x3 mean has variance 8/9 of the noise variance.
    return 1.4826 * mad / np.sqrt(8.0 / 9.0)


def _erode_in_plane(mask: np.ndarray) -> np.ndarray:
    """Binary erosion by the in-plane 4-neighbourhood, outside the image counting as empty.

    What ``ndimage.binary_erosion`` gives with that structure (a 2D cross in the middle
    plane of a 3x3x3 one), with four shifted ANDs instead of its generic loop.
    """
    eroded = mask.copy()
    eroded[:, 1:, :] &= mask[:, :-1, :]
    eroded[:, :-1, :] &= mask[:, 1:, :]
    eroded[:, :, 1:] &= mask[:, :, :-1]
    eroded[:, :, :-1] &= mask[:, :, 1:]
    eroded[:, [0, -1], :] = False
    eroded[:, :, [0, -1]] = False
    return eroded


def _edge_width(slices: np.ndarray, body: np.ndarray) -> float | None:
    """Median width (pixels) of the body/air edge: step height / steepest gradient."""
    # In-plane Sobel (HU per pixel); never across slices, which may be far apart.
    derivative, smoothing = [-0.5, 0.0, 0.5], [0.25, 0.5, 0.25]
    gy = ndimage.correlate1d(ndimage.correlate1d(slices, derivative, axis=1, mode="nearest"), smoothing, axis=2, mode="nearest")
    gx = ndimage.correlate1d(ndimage.correlate1d(slices, derivative, axis=2, mode="nearest"), smoothing, axis=1, mode="nearest")
    gradient = np.hypot(gx, gy)
    edge = body & ~_erode_in_plane(body)
    edge[:, :3, :] = edge[:, -3:, :] = edge[:, :, :3] = edge[:, :, -3:] = False  # not the FOV edge
    if int(edge.sum()) < MIN_SAMPLES:
        return None
    # Box erosion/dilation through a moving average (much faster than binary morphology).
    body_share = ndimage.uniform_filter(body.astype(np.float32), size=(1, 9, 9), mode="nearest")
    near_edge = ndimage.uniform_filter(edge.astype(np.float32), size=(1, 15, 15), mode="nearest") > 0
    inside = (body_share > 0.999) & near_edge
    outside = (body_share < 0.001) & near_edge
    if int(inside.sum()) < MIN_SAMPLES or int(outside.sum()) < MIN_SAMPLES:
        return None
    step = float(np.median(slices[inside]) - np.median(slices[outside]))
    # The steepest gradient near each edge pixel (the threshold need not hit the mid-step):
    # the 3x3 in-plane maximum at the edge pixels only (they are 3 pixels off the image
    # border, so every neighbour exists); the same values as a maximum filter of the volume.
    z, y, x = np.nonzero(edge)
    peak = gradient[z, y, x]
    for dy, dx in ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)):
        np.maximum(peak, gradient[z, y + dy, x + dx], out=peak)
    steepest = float(np.median(peak))
    if steepest <= 0 or step <= 0:
        return None
    return step / steepest


def _blockiness(array: np.ndarray) -> float | None:
    """Mean absolute step across JPEG block boundaries over the median step at the other phases.

    Read on up to :data:`BLOCK_SLICES` slices at full resolution (a subsampled grid would lose
    the blocks' alignment), between pixels that are both soft tissue (:data:`SOFT_TISSUE_HU`),
    where blocks show and edges do not dominate; along rows and along columns separately, and
    averaged. Along each, the boundaries are the phase (pixel index modulo 8) where the mean step
    is largest: every 8th pixel from the corner as encoded, offset when the image was cropped
    after compression.

    Returns:
        The ratio, or None with too few soft-tissue pixels or no texture at all to compare with.
    """
    count = array.shape[0]
    sums, counts = np.zeros((2, BLOCK_PX)), np.zeros((2, BLOCK_PX))
    for index in np.unique(np.linspace(0, count - 1, min(BLOCK_SLICES, count)).round().astype(int)):
        plane = np.asarray(array[index], dtype=np.float32)
        soft = (plane > SOFT_TISSUE_HU[0]) & (plane < SOFT_TISSUE_HU[1])  # False where not finite
        for axis in (0, 1):
            step = np.abs(np.diff(plane, axis=axis))
            both = soft[:-1] & soft[1:] if axis == 0 else soft[:, :-1] & soft[:, 1:]
            # Step j lies between pixels j and j + 1.
            phase = np.arange(step.shape[axis]) % BLOCK_PX
            phase = np.broadcast_to(phase[:, None] if axis == 0 else phase[None, :], step.shape)
            sums[axis] += np.bincount(phase[both], weights=step[both], minlength=BLOCK_PX)
            counts[axis] += np.bincount(phase[both], minlength=BLOCK_PX)
    ratios = []
    for axis in (0, 1):
        if counts[axis].min() < MIN_SAMPLES:
            continue
        means = sums[axis] / counts[axis]
        boundary = int(np.argmax(means))
        inside = float(np.median(np.delete(means, boundary)))
        if inside > 1e-3:
            ratios.append(min(BLOCKINESS_CAP, float(means[boundary]) / inside))
        elif means[boundary] > 1e-3:  # steps only at the block boundaries: flat blocks (very heavy JPEG)
            ratios.append(BLOCKINESS_CAP)
    return float(np.mean(ratios)) if ratios else None


def _truncated_share(body: np.ndarray) -> float:
    border = np.concatenate([body[:, 0, :], body[:, -1, :], body[:, :, 0], body[:, :, -1]], axis=1)
    return float(np.mean(border.mean(axis=1) > TRUNCATION_BORDER_SHARE)) if body.shape[0] else 0.0


def _otsu_threshold(values: np.ndarray) -> float:
    """Otsu's threshold of ``values`` (SimpleITK, 256 bins): body against background where
    intensities have no fixed scale (MR)."""
    otsu = sitk.OtsuThresholdImageFilter()
    otsu.SetNumberOfHistogramBins(256)
    otsu.Execute(sitk.GetImageFromArray(np.ascontiguousarray(values, dtype=np.float32)))
    return float(otsu.GetThreshold())


def assess_image(volume: Volume) -> ImageQC:
    """Run every input-image check on ``volume``: all of them on CT (in HU; a volume without
    source datasets, a phantom, counts as CT), and on any other modality only those that do
    not read HU (:data:`UNIT_FREE_CHECKS`, the body found by Otsu's threshold instead of
    ``BODY_HU``).

    Returns:
        The signals (all with reason ``POOR_INPUT_QUALITY``) and the subsampled body mask.
    """
    stride = _strides(volume.array.shape)
    sampled = np.asarray(volume.array[:: stride[0], :: stride[1], :: stride[2]], dtype=np.float32)
    finite = np.isfinite(sampled)
    if (volume.modality or "CT") != "CT":
        lowest = float(sampled[finite].min()) if finite.any() else 0.0
        return _assess_unit_free(volume, np.where(finite, sampled, lowest).astype(np.float32), stride)
    out_of_range = float(np.mean(~finite | (np.where(finite, sampled, 0.0) > HU_MAX + 0.5)))
    sampled = np.where(finite, sampled, HU_MIN).astype(np.float32)
    p01, p99 = (float(v) for v in np.percentile(sampled, [1, 99]))
    body = _largest_component(sampled > BODY_HU)
    voxel_ml = float(np.prod(volume.spacing)) * float(np.prod(stride)) / 1000.0
    metal_ml = float(np.count_nonzero(body & (sampled >= METAL_HU))) * voxel_ml
    noise = _noise(sampled)
    blur, truncation = _body_signals(volume, sampled, body)
    blockiness = _blockiness(volume.array)

    poor = Reason.POOR_INPUT_QUALITY
    signals = [
        Signal("noise_hu", noise if noise is not None else 0.0,
               1.0 - ramp(noise, NOISE_LOW_HU, NOISE_HIGH_HU) if noise is not None else 1.0, poor,
               fusion_floor=NOISE_FUSION_FLOOR),
        blur,
        Signal("metal_ml", metal_ml, 1.0 - ramp(metal_ml, METAL_LOW_ML, METAL_HIGH_ML), poor),
        Signal("air_level_hu", p01, 1.0 - ramp(p01, AIR_LEVEL_LOW_HU, AIR_LEVEL_HIGH_HU), poor),
        Signal("out_of_range_share", out_of_range, 1.0 - ramp(out_of_range, OUT_OF_RANGE_LOW, OUT_OF_RANGE_HIGH), poor),
        Signal("contrast_range_hu", p99 - p01, ramp(p99 - p01, CONTRAST_LOW_HU, CONTRAST_HIGH_HU), poor),
        Signal("blockiness", blockiness if blockiness is not None else 1.0,
               1.0 - ramp(blockiness, BLOCKINESS_LOW, BLOCKINESS_HIGH) if blockiness is not None else 1.0, poor,
               fusion_floor=BLOCK_FUSION_FLOOR),
        truncation,
    ]
    return ImageQC(signals=signals, body=body, body_stride=stride)


def _body_signals(volume: Volume, sampled: np.ndarray, body: np.ndarray) -> tuple[Signal, Signal]:
    """The checks that compare the body with its background, in any modality: blur (the width
    of the body's edge) and a truncated field of view."""
    width = _edge_width(sampled, body)
    # The field of view cuts the body in axial planes; a sagittal or coronal series' slices
    # always end at the scan range (head and feet), which is no truncation.
    truncated = _truncated_share(axial_view(body, volume.direction, volume.spacing)[0])
    poor = Reason.POOR_INPUT_QUALITY
    return (Signal("edge_width_px", width if width is not None else 0.0,
                   1.0 - ramp(width, EDGE_WIDTH_LOW_PX, EDGE_WIDTH_HIGH_PX) if width is not None else 1.0, poor,
                   fusion_floor=BLUR_FUSION_FLOOR),
            Signal("truncated_slice_share", truncated, 1.0 - ramp(truncated, TRUNCATED_LOW, TRUNCATED_HIGH), poor))


def _assess_unit_free(volume: Volume, sampled: np.ndarray, stride: tuple[int, int, int]) -> ImageQC:
    """The checks of a volume not in HU (MR, PET...): blur and a truncated field of view, which
    compare the body with its background; noise, metal, HU range, contrast and JPEG blocks (read
    between soft-tissue pixels, a window in HU) are not measured (no signal, so no finding and no
    say in the fusion)."""
    body = _largest_component(sampled > _otsu_threshold(sampled)) if sampled.size else np.zeros_like(sampled, bool)
    return ImageQC(signals=list(_body_signals(volume, sampled, body)), body=body, body_stride=stride)
