"""QC of a multi-label classification result: one quality score and verdict per finding.

Each finding is judged on signals that can each only lower trust; every signal becomes a
sub-score in [0, 1] (1 = nothing suspicious) and the quality score is their product, as for
segmentation (:mod:`pacs_sentinel.qc.evaluate`). The verdict is purely
``quality_score >= accept_threshold``.

Signals, per finding:

- **Decision confidence** (:attr:`Reason.LOW_MODEL_CONFIDENCE`): how far the calibrated
  (temperature-scaled) probability lies from the decision threshold, as a share of the room
  on that side of the threshold. A probability at the threshold is a coin toss (margin 0); 0
  or 1 is a certain decision (margin 1).
- **Sample spread** (:attr:`Reason.HIGH_UNCERTAINTY`), when the model produced stochastic
  samples (MC dropout, test-time augmentation): the standard deviation of the samples'
  probabilities, and the share of samples whose decision differs from the reported one.
- **Input image** (:attr:`Reason.POOR_INPUT_QUALITY`), when the image is given: the share of
  pixels stuck at the darkest or brightest value (clipped exposure, blank image) and the
  intensity range measured in noise standard deviations (a flat or noise-drowned image).
  These are properties of the image, so every finding gets the same image sub-scores.
"""

from __future__ import annotations

import math

import numpy as np
import structlog
from scipy import ndimage

from pacs_sentinel.qc.evaluate import verdict_for
from pacs_sentinel.qc.heuristics import Signal
from pacs_sentinel.results import ClassificationResult, FindingQC, QCResult, Reason

log = structlog.get_logger(__name__)

QC_VERSION = "1.0.0-cls"

#: Decision margin (0 at the threshold, 1 at probability 0 or 1): sub-score 0 at or below
#: LOW, 1 at or above HIGH. With threshold 0.5, probabilities 0.525..0.70 (and 0.30..0.475)
#: ramp up; 0.60 scores 0.43 and is flagged, 0.65 scores 0.71.
MARGIN_LOW = 0.05
MARGIN_HIGH = 0.40
#: Standard deviation of the sample probabilities: sub-score 1 at or below LOW, 0 at or
#: above HIGH.
SAMPLE_STD_LOW = 0.05
SAMPLE_STD_HIGH = 0.20
#: Share of samples whose decision differs from the reported one: sub-score 1 at or below
#: LOW, 0 at or above HIGH (half of the samples disagreeing is a coin toss).
DISAGREEMENT_LOW = 0.10
DISAGREEMENT_HIGH = 0.40
#: Fewer samples than this say nothing about spread; the uncertainty signals are skipped.
MIN_SAMPLES = 3
#: Share of pixels at the image's minimum or maximum value (the larger of the two):
#: sub-score 1 at or below LOW, 0 at or above HIGH. A CT slice's circular field of view
#: leaves about 21 % of the pixels at the padding value, under LOW.
SATURATION_LOW = 0.30
SATURATION_HIGH = 0.60
#: Intensity range (1st to 99th percentile) in noise standard deviations: sub-score 0 at
#: or below LOW, 1 at or above HIGH.
CONTRAST_TO_NOISE_LOW = 5.0
CONTRAST_TO_NOISE_HIGH = 20.0
#: Reported value of the contrast-to-noise ratio of a noise-free image.
CONTRAST_TO_NOISE_CAP = 1000.0
#: Sum of squared weights of the Laplacian-like kernel of :func:`noise_sigma`: its response
#: to white noise of standard deviation s has standard deviation 6 s.
_NOISE_KERNEL = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], dtype=np.float64)
_NOISE_KERNEL_NORM = 6.0


def _rising(value: float, low: float, high: float) -> float:
    """0 at or below ``low``, 1 at or above ``high``, linear in between (NaN gives 0)."""
    if math.isnan(value):
        return 0.0
    return float(min(1.0, max(0.0, (value - low) / (high - low))))


def _falling(value: float, low: float, high: float) -> float:
    """1 at or below ``low``, 0 at or above ``high``, linear in between (NaN gives 0)."""
    if math.isnan(value):
        return 0.0
    return 1.0 - _rising(value, low, high)


def decision_margin(probability: float, threshold: float) -> float:
    """Distance of ``probability`` from ``threshold`` as a share of the room on its side.

    Returns:
        0 at the threshold, 1 at probability 1 (positive side) or 0 (negative side); NaN
        when the probability is NaN.
    """
    if math.isnan(probability):
        return math.nan
    if probability >= threshold:
        room = 1.0 - threshold
        return 1.0 if room <= 0 else (probability - threshold) / room
    return 1.0 if threshold <= 0 else (threshold - probability) / threshold


def confidence_signal(probability: float, threshold: float) -> Signal:
    """Decision confidence of one finding from its calibrated probability."""
    margin = decision_margin(probability, threshold)
    return Signal("decision_margin", margin, _rising(margin, MARGIN_LOW, MARGIN_HIGH), Reason.LOW_MODEL_CONFIDENCE)


def uncertainty_signals(samples: np.ndarray, threshold: float, positive: bool) -> list[Signal]:
    """Spread of one finding's stochastic sample probabilities.

    Args:
        samples: The samples' probabilities of this finding, shape ``(samples,)``.
        threshold: The finding's decision threshold.
        positive: The reported decision.

    Returns:
        The sample standard deviation and the disagreement share, or no signal when there
        are fewer than :data:`MIN_SAMPLES` finite samples.
    """
    values = np.asarray(samples, dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size < MIN_SAMPLES:
        return []
    std = float(values.std())
    disagreement = float(np.mean((values >= threshold) != positive))
    return [
        Signal("sample_std", std, _falling(std, SAMPLE_STD_LOW, SAMPLE_STD_HIGH), Reason.HIGH_UNCERTAINTY),
        Signal(
            "sample_disagreement",
            disagreement,
            _falling(disagreement, DISAGREEMENT_LOW, DISAGREEMENT_HIGH),
            Reason.HIGH_UNCERTAINTY,
        ),
    ]


def noise_sigma(image: np.ndarray) -> float:
    """Robust estimate of the image's noise standard deviation.

    A Laplacian-like 3x3 kernel cancels smooth intensity changes (Immerkaer, 1996); the
    median absolute deviation of its response ignores the few edge pixels. Returns 0 for a
    noise-free image.
    """
    response = ndimage.convolve(image, _NOISE_KERNEL, mode="reflect")[1:-1, 1:-1]
    if response.size == 0:
        return 0.0
    mad = float(np.median(np.abs(response - np.median(response))))
    return 1.4826 * mad / _NOISE_KERNEL_NORM


def image_signals(image: np.ndarray) -> list[Signal]:
    """Input-image checks: clipped or blank pixels, and contrast against noise.

    Args:
        image: The 2D image as the model saw it before normalisation (stored values or
            modality units), ``(rows, cols)`` or ``(1, rows, cols)``.

    Returns:
        The saturation and contrast-to-noise signals.

    Raises:
        ValueError: The image is not 2D or is empty.
    """
    pixels = np.asarray(image, dtype=np.float64)
    if pixels.ndim == 3 and pixels.shape[0] == 1:
        pixels = pixels[0]
    if pixels.ndim != 2 or pixels.size == 0:
        raise ValueError(f"image must be a non-empty 2D array, got shape {pixels.shape}")
    finite = pixels[np.isfinite(pixels)]
    if finite.size == 0:
        return [
            Signal("saturated_share", 1.0, 0.0, Reason.POOR_INPUT_QUALITY),
            Signal("contrast_to_noise", 0.0, 0.0, Reason.POOR_INPUT_QUALITY),
        ]
    low, high = float(finite.min()), float(finite.max())
    if high > low:
        saturated = max(float(np.mean(finite == low)), float(np.mean(finite == high)))
    else:
        saturated = 1.0  # every pixel has the same value
    p01, p99 = np.percentile(finite, [1, 99])
    spread = float(p99 - p01)
    sigma = noise_sigma(np.where(np.isfinite(pixels), pixels, low))
    if spread <= 0:
        cnr = 0.0
    elif sigma <= 0:
        cnr = CONTRAST_TO_NOISE_CAP
    else:
        cnr = min(CONTRAST_TO_NOISE_CAP, spread / sigma)
    return [
        Signal("saturated_share", saturated, _falling(saturated, SATURATION_LOW, SATURATION_HIGH),
               Reason.POOR_INPUT_QUALITY),
        Signal("contrast_to_noise", cnr, _rising(cnr, CONTRAST_TO_NOISE_LOW, CONTRAST_TO_NOISE_HIGH),
               Reason.POOR_INPUT_QUALITY),
    ]


def _check_shapes(result: ClassificationResult) -> None:
    n_labels = len(result.labels)
    probabilities = np.asarray(result.probabilities)
    thresholds = np.asarray(result.thresholds)
    if probabilities.shape != (n_labels,):
        raise ValueError(f"probabilities shape {probabilities.shape} does not match {n_labels} label(s)")
    if thresholds.shape != (n_labels,):
        raise ValueError(f"thresholds shape {thresholds.shape} does not match {n_labels} label(s)")
    if result.samples is not None:
        samples = np.asarray(result.samples)
        if samples.ndim != 2 or samples.shape[1] != n_labels:
            raise ValueError(f"samples shape {samples.shape} is not (samples, {n_labels})")


def evaluate_classification(
    result: ClassificationResult,
    *,
    accept_threshold: float = 0.5,
    image: np.ndarray | None = None,
) -> QCResult:
    """Judge every finding of a classification result.

    Args:
        result: The model's output for one image.
        accept_threshold: Quality scores at or above it are accepted.
        image: The 2D input image (stored values or modality units); enables the input
            image checks. None skips them.

    Returns:
        The QC result: no segments, one :class:`FindingQC` per label (finding number =
        label index + 1). A finding sent to review always names at least one reason.

    Raises:
        ValueError: The result's arrays do not match its labels, or ``image`` is not 2D.
    """
    _check_shapes(result)
    shared = image_signals(image) if image is not None else []
    samples = None if result.samples is None else np.asarray(result.samples, dtype=np.float64)
    findings = []
    for index, label in enumerate(result.labels):
        probability = float(result.probabilities[index])
        threshold = float(result.thresholds[index])
        positive = result.positive(index)
        signals: list[Signal] = [confidence_signal(probability, threshold)]
        if samples is not None:
            signals += uncertainty_signals(samples[:, index], threshold, positive)
        signals += shared
        score = 1.0
        for signal in signals:
            score *= signal.subscore
        score = round(score, 4)  # the verdict is taken on the score as reported
        reasons: list[Reason] = []
        for signal in signals:
            if signal.fired and signal.reason not in reasons:
                reasons.append(signal.reason)
        if score < accept_threshold and not reasons:
            # Several moderate doubts multiplied below the threshold: name the weakest, so a
            # finding sent to review always says why.
            reasons = [min(signals, key=lambda s: s.subscore).reason]
        values = {"probability": round(probability, 6), "threshold": round(threshold, 6)}
        values.update({s.name: round(s.value, 6) for s in signals})
        values.update({f"{s.name}_subscore": round(s.subscore, 6) for s in signals})
        findings.append(
            FindingQC(
                finding_number=index + 1,
                label=label,
                probability=probability,
                positive=positive,
                quality_score=score,
                verdict=verdict_for(score, accept_threshold),
                reasons=reasons,
                signals=values,
            )
        )
    qc = QCResult(qc_version=QC_VERSION, segments=[], findings=findings)
    log.info(
        "classification qc evaluated",
        model=result.model_name,
        verdict=qc.verdict.label,
        quality_score=qc.quality_score,
        positive=[f.label.name for f in findings if f.positive],
        reasons=[r.label for r in qc.reasons],
    )
    return qc
