"""Outline colour by QC reason (issue 6): one colour per reason, a legend with swatches."""

from __future__ import annotations

import numpy as np
import pytest

from pacs_sentinel.reports.overlay import (
    LEGEND_TITLE,
    REASON_COLOURS,
    banner_lines,
    build_overlay,
    outline_colour,
    render_overlay,
    representative_slice,
)
from pacs_sentinel.reports.seg import VERDICT_COLOURS
from pacs_sentinel.results import Reason, Verdict

from .conftest import make_qc

GREEN = VERDICT_COLOURS[Verdict.ACCEPTED]
ORANGE = VERDICT_COLOURS[Verdict.NEEDS_REVIEW]


def count_colour(image: np.ndarray, colour: tuple[int, int, int]) -> int:
    return int(np.all(image == np.asarray(colour, dtype=np.uint8), axis=-1).sum())


def split(volume, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The slice part and the banner part of a rendered overlay."""
    rows = round(volume.array.shape[1] * image.shape[1] / volume.array.shape[2])
    return image[:rows], image[rows:]


def test_every_reason_has_a_distinct_colour():
    assert set(REASON_COLOURS) == set(Reason)
    colours = list(REASON_COLOURS.values())
    assert len(set(colours)) == len(colours)
    assert GREEN not in colours and ORANGE not in colours
    # Never grey: the CT slice underneath is grey (r = g = b).
    assert all(len(set(colour)) > 1 for colour in colours)


def test_the_original_detector_colours():
    assert REASON_COLOURS[Reason.VOLUME_ANOMALY] == (230, 25, 25)  # red
    assert REASON_COLOURS[Reason.SHAPE_IRREGULARITY] == (255, 225, 25)  # yellow
    assert REASON_COLOURS[Reason.FRAGMENTATION] == (30, 110, 255)  # blue
    assert REASON_COLOURS[Reason.LOW_MODEL_CONFIDENCE] == (150, 60, 220)  # purple


def test_outline_colour_rules():
    assert outline_colour(Verdict.ACCEPTED, []) == GREEN
    assert outline_colour(Verdict.NEEDS_REVIEW, []) == ORANGE
    assert outline_colour(Verdict.NEEDS_REVIEW, [Reason.SHAPE_IRREGULARITY, Reason.FRAGMENTATION]) == (
        REASON_COLOURS[Reason.SHAPE_IRREGULARITY]
    )


@pytest.mark.parametrize(
    ("verdict", "reasons", "expected"),
    [
        (Verdict.NEEDS_REVIEW, [Reason.FRAGMENTATION], REASON_COLOURS[Reason.FRAGMENTATION]),
        (Verdict.NEEDS_REVIEW, [Reason.VOLUME_ANOMALY], REASON_COLOURS[Reason.VOLUME_ANOMALY]),
        (Verdict.NEEDS_REVIEW, [Reason.VOLUME_ANOMALY, Reason.FRAGMENTATION], REASON_COLOURS[Reason.VOLUME_ANOMALY]),
        (Verdict.ACCEPTED, [], GREEN),
    ],
    ids=["fragmentation-blue", "volume-red", "first-reason-wins", "accepted-green"],
)
def test_outline_pixels_have_the_reason_colour(volume, seg_result, verdict, reasons, expected):
    qc = make_qc(volume, seg_result, verdict, reasons, 0.42 if reasons else 0.91)
    slice_part, _ = split(volume, render_overlay(volume, seg_result, qc))
    outlined = count_colour(slice_part, expected)
    assert outlined > 100
    scale = slice_part.shape[1] / volume.array.shape[2]
    assert outlined < 0.3 * seg_result.mask[0, representative_slice(seg_result)].sum() * scale**2
    for other in [GREEN, ORANGE, *REASON_COLOURS.values()]:
        if other != expected:
            assert count_colour(slice_part, other) == 0, other


def test_two_segments_each_have_their_own_colour(volume, seg_result_two):
    qc = make_qc(volume, seg_result_two, Verdict.NEEDS_REVIEW, [Reason.VOLUME_ANOMALY], 0.42)
    slice_part, _ = split(volume, render_overlay(volume, seg_result_two, qc, slice_index=5))
    assert count_colour(slice_part, REASON_COLOURS[Reason.VOLUME_ANOMALY]) > 50  # Liver, needs review
    assert count_colour(slice_part, GREEN) > 20  # Spleen, accepted


def test_legend_shows_a_swatch_per_reason(volume, seg_result):
    reasons = [Reason.VOLUME_ANOMALY, Reason.FRAGMENTATION, Reason.LOW_MODEL_CONFIDENCE, Reason.SHAPE_IRREGULARITY]
    qc = make_qc(volume, seg_result, Verdict.NEEDS_REVIEW, reasons, 0.3)
    _, banner = split(volume, render_overlay(volume, seg_result, qc))
    for reason in reasons:
        assert count_colour(banner, REASON_COLOURS[reason]) >= 20, reason
    for reason in set(Reason) - set(reasons):
        assert count_colour(banner, REASON_COLOURS[reason]) == 0, reason
    # The verdict accent (bar and title) is unchanged.
    assert count_colour(banner, ORANGE) > 200


def test_accepted_banner_has_no_legend_swatches(volume, seg_result, qc_accepted):
    _, banner = split(volume, render_overlay(volume, seg_result, qc_accepted))
    assert all(count_colour(banner, colour) == 0 for colour in REASON_COLOURS.values())


def test_banner_words_unchanged(seg_result, qc_review):
    lines = banner_lines(seg_result, qc_review)
    assert lines[0] == "AI result - QC: Needs review"
    assert lines[2] == "Reasons: Fragmentation, Low model confidence, Mask touches image border"
    assert all(LEGEND_TITLE not in line for line in lines)  # the legend is drawn, reasons stay in words


def test_legend_wraps_within_narrow_banner(volume, seg_result):
    qc = make_qc(volume, seg_result, Verdict.NEEDS_REVIEW, list(Reason), 0.1)
    _, banner = split(volume, render_overlay(volume, seg_result, qc))
    for reason in Reason:
        assert count_colour(banner, REASON_COLOURS[reason]) >= 20, reason


def test_coloured_secondary_capture_passes_dciodvfy(volume, seg_result, dciodvfy_clean):
    qc = make_qc(volume, seg_result, Verdict.NEEDS_REVIEW, [Reason.FRAGMENTATION, Reason.VOLUME_ANOMALY], 0.4)
    sc, pixels = build_overlay(volume, seg_result, qc)
    assert count_colour(pixels, REASON_COLOURS[Reason.FRAGMENTATION]) > 100
    dciodvfy_clean(sc, "SCImage")
