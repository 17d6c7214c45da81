"""The result set of a judged third-party SEG: QC SR referencing THAT SEG's segments, overlay, no SEG."""

from __future__ import annotations

import highdicom as hd
import numpy as np
import pytest
from scipy import ndimage

from pacs_sentinel.dicom_io.seg_masks import map_segments
from pacs_sentinel.qc.segqc import LabelReference, judge_segmentation
from pacs_sentinel.reports.resultset import build_seg_qc_result_set
from pacs_sentinel.results import Verdict
from tests.conftest import make_third_party_seg
from tests.reports.conftest import LIVER, sphere_mask


@pytest.fixture(scope="module")
def judged(volume):
    sphere = sphere_mask(*volume.array.shape)
    shifted = np.roll(sphere, 14, axis=2)
    # No Tracking ID/UID: both are optional in a SEG, the SR needs them.
    seg = make_third_party_seg(volume.datasets, [sphere, shifted],
                               [("10200004", "SCT", "Liver"), ("T-62000", "SRT", "Liver")], tracking=False)
    mapped = map_segments(seg, volume)
    # The SR must carry both verdicts: the agreeing sphere (our vouched-for prediction is the same
    # sphere) scores near 1 since QC 2.7.0, where the agreement is a fitted feature; the
    # disagreeing one near 0.
    result, qc, _ = judge_segmentation(volume, mapped, [LabelReference(LIVER, "organ-seg 1.1.0", {}, sphere)],
                                       accept_threshold=0.5)
    assert qc.segments[0].quality_score >= 0.5 > qc.segments[1].quality_score
    return seg, mapped, result, qc


def test_no_seg_is_sent_and_the_sr_references_the_third_party_seg(volume, judged, roundtrip_bytes) -> None:
    seg, mapped, result, qc = judged
    result_set = build_seg_qc_result_set(volume, mapped.dataset, result, qc, series_number_base=700)

    assert result_set.segmentation is None
    assert [ds.Modality for ds in result_set.datasets()] == ["SR", "OT"]
    sr = hd.sr.Comprehensive3DSR.from_dataset(roundtrip_bytes(result_set.report))
    assert sr.SeriesNumber == 702 and sr.SeriesDescription == "QC of third-party SEG (QC: needs review)"
    groups = sr.content.get_volumetric_roi_measurement_groups()
    assert len(groups) == 2
    numbers = []
    for group in groups:
        referenced = group.referenced_segment[0].ReferencedSOPSequence[0]
        assert referenced.ReferencedSOPInstanceUID == seg.SOPInstanceUID
        numbers.append(int(referenced.ReferencedSegmentNumber))
        assert group.tracking_identifier == f"Liver {numbers[-1]}"  # fallback: the segment label
    assert numbers == [1, 2]
    verdicts = [s.verdict for s in qc.segments]
    assert verdicts == [Verdict.ACCEPTED, Verdict.NEEDS_REVIEW]
    evidence = {str(ref.ReferencedSOPInstanceUID) for study in sr.CurrentRequestedProcedureEvidenceSequence
                for series in study.ReferencedSeriesSequence for ref in series.ReferencedSOPSequence}
    assert str(seg.SOPInstanceUID) in evidence
    assert {str(ds.SOPInstanceUID) for ds in volume.datasets} <= evidence


def test_tracking_uids_are_stable_for_the_same_seg(volume, judged) -> None:
    _, mapped, result, qc = judged
    first = build_seg_qc_result_set(volume, mapped.dataset, result, qc).report
    second = build_seg_qc_result_set(volume, mapped.dataset, result, qc).report
    uids = [hd.sr.Comprehensive3DSR.from_dataset(sr).content.get_volumetric_roi_measurement_groups()[0]
            .tracking_uid for sr in (first, second)]
    assert uids[0] == uids[1]


def test_seg_qc_objects_are_valid(volume, judged, dciodvfy_clean) -> None:
    _, mapped, result, qc = judged
    result_set = build_seg_qc_result_set(volume, mapped.dataset, result, qc)
    dciodvfy_clean(result_set.report, "Comprehensive3DSR")
    dciodvfy_clean(result_set.overlays[0], "SCImage")
    assert result_set.overlays[0].SeriesDescription == "Third-party SEG QC overlay (QC: needs review)"


def test_a_fractional_segment_references_only_the_images_its_mask_lies_on(volume, roundtrip_bytes) -> None:
    """Found from outside: a FRACTIONAL SEG's frames also hold values below half the maximum
    (here a ring of 0.3 reaching two slices past the sphere), which are not in the judged mask;
    the SR listed those slices as the segment's source images too."""
    sphere = sphere_mask(*volume.array.shape)
    seg = make_third_party_seg(volume.datasets, [sphere], [("10200004", "SCT", "Liver")], seg_type="FRACTIONAL")
    mapped = map_segments(seg, volume)
    assert np.array_equal(mapped.segments[0].mask, sphere)
    result, qc, _ = judge_segmentation(volume, mapped, [LabelReference(LIVER, "organ-seg 1.1.0", {}, sphere)],
                                       accept_threshold=0.5)
    sr = hd.sr.Comprehensive3DSR.from_dataset(roundtrip_bytes(build_seg_qc_result_set(volume, mapped.dataset,
                                                                                    result, qc).report))
    def sources(items) -> set[str]:  # the "Source Image for Segmentation" items, at any depth
        found = set()
        for item in items:
            if item.get("ConceptNameCodeSequence") and item.ConceptNameCodeSequence[0].CodeValue == "121233":
                found.add(str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID))
            found |= sources(item.get("ContentSequence", []))
        return found

    referenced = sources(sr.ContentSequence)
    on = {str(ds.SOPInstanceUID) for ds, plane in zip(volume.datasets, sphere, strict=True) if plane.any()}
    ring = ndimage.binary_dilation(sphere, iterations=2)  # where make_third_party_seg puts 0.3
    frames = {str(ds.SOPInstanceUID) for ds, plane in zip(volume.datasets, ring, strict=True) if plane.any()}
    assert on < frames  # the SEG has frames the mask does not lie on
    assert referenced == on
