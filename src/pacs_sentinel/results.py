"""Typed results handed from one stage to the next: inference -> qc -> reports.

These types carry no behaviour beyond small derived properties, so every package may
import them without creating a dependency between the stages themselves.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import numpy as np

#: The product's private coding scheme (documented in docs/conformance.md).
QC_SCHEME = "99PSQC"
QC_SCHEME_NAME = "PACS Sentinel quality control"
QC_SCHEME_UID = "1.2.826.0.1.3680043.8.498.70368859335017405545946105290673940493"


@dataclass(frozen=True)
class Code:
    """A coded concept: (value, scheme designator, meaning)."""

    value: str
    scheme: str
    meaning: str


# Concept names of the QC contract (DESIGN.md, "The QC contract in the Structured Report").
QUALITY_SCORE = Code("QC001", QC_SCHEME, "Segmentation quality score")
QC_VERDICT = Code("QC002", QC_SCHEME, "QC verdict")
QC_FINDING = Code("QC003", QC_SCHEME, "QC finding")
QC_VERSION = Code("QC004", QC_SCHEME, "QC version")
VOLUME = Code("118565006", "SCT", "Volume")
FINDING_PROBABILITY = Code("QC005", QC_SCHEME, "Finding probability")


class Verdict(enum.Enum):
    """The QC verdict on one AI output; its value is the coded concept sent in the SR."""

    ACCEPTED = Code("QC010", QC_SCHEME, "Accepted")
    NEEDS_REVIEW = Code("QC011", QC_SCHEME, "Needs review")

    @property
    def label(self) -> str:
        """Human-readable verdict, e.g. ``"Needs review"``."""
        return self.value.meaning


class Reason(enum.Enum):
    """One QC flag; raised flags are reported as QC finding items (QC003) in the SR."""

    EMPTY_MASK = Code("QC020", QC_SCHEME, "Empty mask")
    VOLUME_ANOMALY = Code("QC021", QC_SCHEME, "Volume anomaly")
    SHAPE_IRREGULARITY = Code("QC022", QC_SCHEME, "Shape irregularity")
    FRAGMENTATION = Code("QC023", QC_SCHEME, "Fragmentation")
    LOW_MODEL_CONFIDENCE = Code("QC024", QC_SCHEME, "Low model confidence")
    HIGH_UNCERTAINTY = Code("QC025", QC_SCHEME, "High uncertainty")
    POOR_INPUT_QUALITY = Code("QC026", QC_SCHEME, "Poor input image quality")
    BORDER_CONTACT = Code("QC027", QC_SCHEME, "Mask touches image border")
    IMPLAUSIBLE_LOCATION = Code("QC028", QC_SCHEME, "Implausible location")
    DISAGREEMENT = Code("QC029", QC_SCHEME, "Disagreement with reference model")
    LOW_PREDICTED_DICE = Code("QC030", QC_SCHEME, "Low predicted Dice")
    LOW_EXPECTED_DICE = Code("QC031", QC_SCHEME, "Low expected Dice")
    UNFAMILIAR_INPUT = Code("QC032", QC_SCHEME, "Input unlike the training images")
    UNCOVERED_STRUCTURE = Code("QC033", QC_SCHEME, "Structure not covered by QC")

    @property
    def label(self) -> str:
        """Human-readable reason, e.g. ``"Fragmentation"``."""
        return self.value.meaning


@dataclass(frozen=True)
class SegmentLabel:
    """What a segment is: its name and SNOMED CT property category and type."""

    name: str
    property_category: Code
    property_type: Code
    tracking_id: str


@dataclass
class UncertaintySamples:
    """Repeated stochastic predictions of one input, for the QC's uncertainty signals.

    Attributes:
        probabilities: Foreground probabilities per sample, rounded to float16 precision and
            stored as float32 (numpy computes on float16 slowly), shape
            ``(samples, labels, z, y, x)`` on the model's working grid (not the source grid:
            QC only compares samples with each other and with ``mask``).
        kinds: What each sample is, e.g. ``"mc-dropout"``, ``"tta:flip-z"``.
        mask: Boolean ``(labels, z, y, x)``: the deterministic prediction thresholded on the
            working grid, the reference the samples are compared with.
        spacing: Working-grid spacing ``(z, y, x)`` in mm.
        seconds: Wall-clock time spent producing the samples.
    """

    probabilities: np.ndarray
    kinds: list[str]
    mask: np.ndarray
    spacing: tuple[float, float, float]
    seconds: float = 0.0


@dataclass
class SegmentationResult:
    """Output of a segmentation model, in the geometry of the source series.

    Attributes:
        probabilities: One float32 map per label, shape ``(labels, slices, rows, cols)``,
            values in [0, 1]; slice ``i`` belongs to the source instance ``i`` of the volume.
            None for a segmentation that was read, not predicted (a third-party SEG judged
            by a ``seg-qc`` pipeline): QC then has no model-confidence signal.
        mask: Boolean masks with the same shape, the thresholded probabilities.
        labels: The label of each channel; segment numbers are ``index + 1``.
        model_name: Name of the model (e.g. ``"organ-seg"``).
        model_version: Version string of the model weights.
        seconds: Wall-clock time spent in inference.
        reference: Statistics the model card records per label name for QC
            (e.g. ``{"Liver": {"volume_ml_p01": ..., "volume_ml_p99": ...}}``).
        uncertainty: Stochastic samples (MC dropout, test-time augmentation), or None when
            the pipeline asks for none.
        timing: Seconds per stage, e.g. ``{"preprocess": .., "forward": .., "samples": ..,
            "inverse": ..}``.
    """

    probabilities: np.ndarray | None
    mask: np.ndarray
    labels: list[SegmentLabel]
    model_name: str
    model_version: str
    seconds: float = 0.0
    reference: dict[str, dict[str, float]] = field(default_factory=dict)
    uncertainty: UncertaintySamples | None = None
    timing: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class FindingLabel:
    """A finding a classification model reports: its name and coded concept."""

    name: str
    code: Code
    tracking_id: str


@dataclass
class ClassificationResult:
    """Output of a multi-label classification model for one image.

    Attributes:
        probabilities: Calibrated (temperature-scaled) sigmoid probability per label, shape
            ``(labels,)``.
        logits: Raw logits per label, shape ``(labels,)``.
        labels: The finding of each output; finding numbers are ``index + 1``.
        thresholds: Decision threshold per label: a finding is positive when its
            probability is at or above it.
        model_name: Name of the model (e.g. ``"cxr-cls"``).
        model_version: Version string of the weights.
        temperature: The temperature the logits were divided by before the sigmoid.
        samples: Calibrated probabilities of the stochastic passes, ``(samples, labels)``,
            or None when none were asked for.
        sample_kinds: What each sample is (``"mc-dropout"``, ``"tta:flip-x"``...).
        heatmaps: Grad-CAM map in [0, 1] on the source image grid ``(rows, cols)`` for each
            positive finding, keyed by label index.
        seconds: Wall-clock inference time.
        timing: Seconds per stage.
        reference: Statistics the model card records for QC (per label name).
        feature_distance: Mahalanobis distance of the image's pooled features from the
            training images' (None when the model ships no feature statistics).
        feature_distance_range: ``(low, high)`` of that distance: as familiar as the
            validation images at ``low``, unlike anything trained on at ``high``.
    """

    probabilities: np.ndarray
    logits: np.ndarray
    labels: list[FindingLabel]
    thresholds: np.ndarray
    model_name: str
    model_version: str
    temperature: float = 1.0
    samples: np.ndarray | None = None
    sample_kinds: list[str] = field(default_factory=list)
    heatmaps: dict[int, np.ndarray] = field(default_factory=dict)
    seconds: float = 0.0
    timing: dict[str, float] = field(default_factory=dict)
    reference: dict[str, dict[str, float]] = field(default_factory=dict)
    feature_distance: float | None = None
    feature_distance_range: tuple[float, float] | None = None

    def positive(self, index: int) -> bool:
        """True when finding ``index`` is at or above its threshold."""
        return bool(self.probabilities[index] >= self.thresholds[index])


@dataclass
class SegmentQC:
    """The QC judgement of one segment."""

    segment_number: int
    label: SegmentLabel
    quality_score: float
    verdict: Verdict
    reasons: list[Reason]
    volume_mm3: float
    signals: dict[str, float] = field(default_factory=dict)


@dataclass
class FindingQC:
    """The QC judgement of one finding of a classification result."""

    finding_number: int
    label: FindingLabel
    probability: float
    positive: bool
    quality_score: float
    verdict: Verdict
    reasons: list[Reason]
    signals: dict[str, float] = field(default_factory=dict)


@dataclass
class QCResult:
    """The QC judgement of one AI output: all of its segments, or all of its findings."""

    qc_version: str
    segments: list[SegmentQC]
    findings: list[FindingQC] = field(default_factory=list)

    def _judged(self) -> list[SegmentQC | FindingQC]:
        return [*self.segments, *self.findings]

    @property
    def verdict(self) -> Verdict:
        """``NEEDS_REVIEW`` when any segment or finding needs review, else ``ACCEPTED``."""
        if any(item.verdict is Verdict.NEEDS_REVIEW for item in self._judged()):
            return Verdict.NEEDS_REVIEW
        return Verdict.ACCEPTED

    @property
    def quality_score(self) -> float:
        """The lowest score: a result is as trustworthy as its worst segment or finding."""
        return min((item.quality_score for item in self._judged()), default=0.0)

    @property
    def reasons(self) -> list[Reason]:
        """Every distinct reason raised on any segment or finding, in first-seen order."""
        seen: list[Reason] = []
        for item in self._judged():
            for reason in item.reasons:
                if reason not in seen:
                    seen.append(reason)
        return seen
