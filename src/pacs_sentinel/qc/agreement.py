"""Agreement: how far a segment made by someone else agrees with our own model's prediction.

When QC judges a third-party SEG (a ``seg-qc`` pipeline) and one of our models segments the
same structure, the Dice coefficient between the two masks is a further QC signal: a vendor
mask that our model disagrees with strongly is sent to review with the reason
:attr:`~pacs_sentinel.results.Reason.DISAGREEMENT`. Segments and model labels are matched
by their segmented property type code (SNOMED CT; legacy SRT codes match their SCT
equivalents), never by name.

The agreement is evidence about the other mask only when our own prediction can be trusted:
where our model fails (a metal artefact, an anatomy it was not trained on) a correct vendor mask
disagrees with it. Since QC 2.7.0 the agreement is therefore used only when our model's mask
passes its own QC with a score of at least :data:`REFERENCE_MIN_SCORE`, as a feature of the
fusion's ``with-agreement`` models (fitted on vendor-like phantom masks where that held);
otherwise the segment is judged as if no prediction of ours were at hand. Where it is used, a
disagreement (Dice below 0.7, QC029) also sends the segment to review whatever its score (a policy
reason, :data:`~pacs_sentinel.qc.fusion.POLICY_REASONS`): the score says how likely the mask is
acceptable, a clear disagreement with a prediction we trust is reason enough for a second look.
"""

from __future__ import annotations

import numpy as np
from pydicom.sr.coding import Code as PydicomCode

from pacs_sentinel.qc.heuristics import Signal, ramp
from pacs_sentinel.results import Code, Reason, SegmentLabel

#: Dice with our model's mask: sub-score 1 at or above HIGH, 0 at or below LOW (0.5 half way,
#: where the reason is raised). The demo model's held-out Dice with ground truth is 0.95 (p05
#: about 0.9); a mask shifted by a quarter of the organ, or missing a lobe, falls below 0.7.
AGREEMENT_DICE_HIGH = 0.85
AGREEMENT_DICE_LOW = 0.55
#: Our own mask's QC score (P(Dice >= 0.7)) from which its agreement with another mask is used:
#: our mask is more likely acceptable than not. Cross-validated on 320 vendor-like phantom masks
#: (perturbations of the truth, 160 phantoms of the calibration's image families; QC 2.7.0): a gate
#: at 0.5 used the agreement on 86 % of them, AUROC 0.954 (0.951 at 0.8934, 0.888 without the
#: agreement); with no gate the agreement earned little weight (AUROC 0.914): a correct mask on a
#: metal image disagrees with our failed one as much as a shifted mask does with our correct one.
REFERENCE_MIN_SCORE = 0.5


def same_concept(a: Code, b: Code) -> bool:
    """True when two codes name the same concept (value and scheme; SRT equals its SCT code)."""
    try:
        return PydicomCode(a.value, a.scheme, a.meaning) == PydicomCode(b.value, b.scheme, b.meaning)
    except (KeyError, ValueError):  # an unknown legacy code: compare literally
        return (a.value, a.scheme) == (b.value, b.scheme)


def matching_label(label: SegmentLabel, candidates: list[SegmentLabel]) -> SegmentLabel | None:
    """The first of ``candidates`` with the same segmented property type as ``label``, or None."""
    for candidate in candidates:
        if same_concept(label.property_type, candidate.property_type):
            return candidate
    return None


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice coefficient of two boolean masks of one shape (1.0 when both are empty).

    Raises:
        ValueError: The shapes differ.
    """
    if a.shape != b.shape:
        raise ValueError(f"cannot compare masks of shapes {a.shape} and {b.shape}")
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    total = int(a.sum()) + int(b.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(a, b).sum()) / total


def reference_trusted(reference_score: float | None) -> bool:
    """Whether our prediction's agreement with another mask is used: its own QC score is at
    least :data:`REFERENCE_MIN_SCORE` (None: not judged, the caller vouches for it)."""
    return reference_score is None or reference_score >= REFERENCE_MIN_SCORE


def agreement_signal(dice_value: float) -> Signal:
    """The agreement signal of one segment: Dice with our model's prediction of its label."""
    return Signal("agreement_dice", float(dice_value), ramp(float(dice_value), AGREEMENT_DICE_LOW, AGREEMENT_DICE_HIGH),
                  Reason.DISAGREEMENT)
