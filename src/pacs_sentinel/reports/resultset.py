"""The set of objects one AI result produces: SEG, QC SR and SC overlay(s).

:func:`build_result_set` (segmentation) and :func:`build_classification_result_set`
(classification: no SEG) are what the daemon calls after QC; :meth:`ResultSet.datasets` is
what goes to the PACS and :meth:`ResultSet.write` keeps a copy (and PNGs of the overlays)
in the job's output folder.

With ``withheld_seg=True`` (policy on_review = "withhold-seg") the SEG is built but not sent:
it is in :attr:`ResultSet.withheld` instead of :meth:`ResultSet.datasets`, written as
``SEG_withheld.dcm`` for the local review, and neither the SR nor the SC references it.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import highdicom as hd
import numpy as np
from PIL import Image
from pydicom.dataset import Dataset

from pacs_sentinel import atomic
from pacs_sentinel.dicom_io.series import Volume
from pacs_sentinel.errors import ReportError
from pacs_sentinel.reports.classification import build_classification_report, build_heatmap_overlays
from pacs_sentinel.reports.overlay import build_overlay
from pacs_sentinel.reports.seg import build_segmentation, verdict_text
from pacs_sentinel.reports.sr import build_qc_report
from pacs_sentinel.results import ClassificationResult, QCResult, SegmentationResult

#: zlib level of the overlay PNGs. PNG is lossless at every level: 1 writes the same pixels
#: about 2.5x faster than Pillow's default 6, for files about a fifth larger (~80 kB).
PNG_COMPRESS_LEVEL = 1


@dataclass
class ResultSet:
    """The result objects of one AI output, in the order they are sent.

    Attributes:
        segmentation: The SEG; None for a classification result, which has none.
        report: The TID 1500 SR with the QC verdict; references the SEG (segmentation) or
            the classified image (classification).
        overlays: Secondary-capture overlays (one per rendered slice).
        overlay_images: The RGB pixels of each overlay, for PNG files.
        withheld: Objects built but held back by policy (the SEG under "withhold-seg"): kept
            for the local review, never sent; ``segmentation`` is then None.
        key_objects: Key Object Selection documents sent after the overlays (``[review]
            send_kos``: the "Quality Issue" KOS of a result that needs review).
    """

    segmentation: hd.seg.Segmentation | None
    report: hd.sr.Comprehensive3DSR
    overlays: list[hd.sc.SCImage] = field(default_factory=list)
    overlay_images: list[np.ndarray] = field(default_factory=list)
    withheld: list[Dataset] = field(default_factory=list)
    key_objects: list[Dataset] = field(default_factory=list)

    def datasets(self) -> list[Dataset]:
        """Return SEG (when there is one), SR, the SCs and any KOS: the objects sent to the PACS.

        Objects in :attr:`withheld` are never part of it.
        """
        seg = [] if self.segmentation is None else [self.segmentation]
        return [*seg, self.report, *self.overlays, *self.key_objects]

    def write(self, out_dir: Path) -> list[Path]:
        """Write ``SEG.dcm``, ``SR.dcm``, ``SC_<n>.dcm``, ``KOS_<n>.dcm`` and ``overlay_<n>.png`` into ``out_dir``.

        Without a SEG (classification) there is no ``SEG.dcm``; the other names stay. A
        withheld SEG is written as ``SEG_withheld.dcm`` (see :meth:`withheld_paths`) but is
        NOT in the returned list: callers send every returned ``.dcm``.

        Each file is written under a temporary name, flushed to the disk and renamed (and the
        folders flushed), so neither a crash nor a power cut leaves a truncated or empty file
        with a final name once this returns. ``n`` counts from 1. The PNGs are encoded on a
        helper thread while the DICOM files are written: Pillow's zlib encoder releases the
        GIL, so that work goes to another core instead of adding to the worker's time.

        Returns:
            The paths of what is sent, DICOM files first (in :meth:`datasets` order), then
            PNGs. Withheld files are written too, but only :meth:`withheld_paths` names them.

        Raises:
            ReportError: A file cannot be written.
        """
        out_dir = Path(out_dir)
        try:
            atomic.make_folders(out_dir)
        except OSError as exc:
            raise ReportError(f"cannot create {out_dir}: {exc}") from exc
        objects: list[tuple[Path, Dataset]] = []
        if self.segmentation is not None:
            objects.append((out_dir / "SEG.dcm", self.segmentation))
        objects.append((out_dir / "SR.dcm", self.report))
        objects += [(out_dir / f"SC_{n}.dcm", sc) for n, sc in enumerate(self.overlays, start=1)]
        objects += [(out_dir / f"KOS_{n}.dcm", ko) for n, ko in enumerate(self.key_objects, start=1)]
        objects += list(zip(self.withheld_paths(out_dir), self.withheld, strict=True))
        images = [(out_dir / f"overlay_{n}.png", image) for n, image in enumerate(self.overlay_images, start=1)]
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="overlay-png") as pool:
            pngs = [pool.submit(_write_file, path, image) for path, image in images]
            for path, ds in objects:
                _write_file(path, ds)
            for png in pngs:
                png.result()
        held = set(self.withheld_paths(out_dir))
        return [path for path, _ in objects if path not in held] + [path for path, _ in images]

    def withheld_paths(self, out_dir: Path) -> list[Path]:
        """Return where :meth:`write` puts the :attr:`withheld` objects (kept, never sent).

        The withheld SEG is ``SEG_withheld.dcm``; any other withheld object ``withheld_<n>.dcm``.
        """
        paths = []
        for n, ds in enumerate(self.withheld, start=1):
            name = "SEG_withheld.dcm" if ds.get("Modality") == "SEG" and n == 1 else f"withheld_{n}.dcm"
            paths.append(Path(out_dir) / name)
        return paths


def _write_file(path: Path, payload: Dataset | np.ndarray) -> None:
    """Write a DICOM object (Part 10) or an RGB image (PNG) atomically and durably
    (:func:`pacs_sentinel.atomic.replace_durably`: temporary name, fsync, rename, fsync of
    the folder), so a job that queues the file for sending never points at an empty one.

    Raises:
        ReportError: The file cannot be written (the temporary file is removed).
    """
    def write(tmp: Path) -> None:
        if isinstance(payload, Dataset):
            payload.save_as(tmp, enforce_file_format=True)
        else:
            Image.fromarray(payload, mode="RGB").save(tmp, format="PNG", compress_level=PNG_COMPRESS_LEVEL)

    try:
        atomic.replace_durably(write, path)
    except (OSError, ValueError, TypeError) as exc:
        raise ReportError(f"cannot write {path}: {exc}") from exc


def build_result_set(
    volume: Volume,
    result: SegmentationResult,
    qc: QCResult,
    *,
    series_number_base: int = 900,
    withheld_seg: bool = False,
    seg_type: str = "BINARY",
) -> ResultSet:
    """Build SEG (series ``base + 1``), SR (``base + 2``) and SC overlay (``base + 3``).

    Args:
        volume: The source series.
        result: The model output.
        qc: The QC judgement.
        series_number_base: Series numbers of the three new series follow it.
        withheld_seg: Policy "withhold-seg": the SEG is built but put in
            :attr:`ResultSet.withheld` (not sent); the SR does not reference it and says
            that it is held for review and why; the overlay banner says so too. Series
            number ``base + 1`` stays the SEG's.
        seg_type: ``[reports] seg_type``, passed to
            :func:`~pacs_sentinel.reports.seg.build_segmentation`: ``"BINARY"`` (default)
            or ``"LABELMAP"``.

    Returns:
        The result set; nothing is written or sent.

    Raises:
        ReportError: One of the objects cannot be built.
    """
    segmentation = build_segmentation(
        volume, result, qc, series_number=series_number_base + 1, seg_type=seg_type
    )
    report = build_qc_report(
        volume, segmentation, result, qc, series_number=series_number_base + 2, withheld_seg=withheld_seg
    )
    overlay, pixels = build_overlay(
        volume, result, qc, series_number=series_number_base + 3, withheld_seg=withheld_seg
    )
    if withheld_seg:
        return ResultSet(
            segmentation=None, report=report, overlays=[overlay], overlay_images=[pixels], withheld=[segmentation]
        )
    return ResultSet(segmentation=segmentation, report=report, overlays=[overlay], overlay_images=[pixels])


def build_classification_result_set(
    source: Dataset,
    result: ClassificationResult,
    qc: QCResult,
    *,
    series_number_base: int = 900,
) -> ResultSet:
    """Build the findings SR (series ``base + 2``) and heat-map SCs (``base + 3``) of one image.

    Series ``base + 1``, the SEG's in a segmentation result set, stays unused, so that a
    series number means the same kind of object whichever kind of model a pipeline runs.

    Args:
        source: The classified image.
        result: The model output.
        qc: The QC judgement (one :class:`~pacs_sentinel.results.FindingQC` per finding).
        series_number_base: Series numbers of the new series follow it.

    Returns:
        The result set, without a SEG; nothing is written or sent.

    Raises:
        ReportError: One of the objects cannot be built.
    """
    report = build_classification_report(source, result, qc, series_number=series_number_base + 2)
    overlays = build_heatmap_overlays(source, result, qc, series_number=series_number_base + 3)
    return ResultSet(
        segmentation=None,
        report=report,
        overlays=[sc for sc, _ in overlays],
        overlay_images=[pixels for _, pixels in overlays],
    )


#: What a seg-qc result's banner and series descriptions say was judged.
THIRD_PARTY_SUBJECT = "Third-party SEG"


def build_seg_qc_result_set(
    volume: Volume,
    segmentation: hd.seg.Segmentation,
    result: SegmentationResult,
    qc: QCResult,
    *,
    series_number_base: int = 900,
) -> ResultSet:
    """Build the QC SR (series ``base + 2``) and SC overlay (``base + 3``) of a third-party SEG.

    No SEG is written: the SR's measurement groups reference the segments of ``segmentation``
    itself (its SOP instance and segment numbers, with the source images of each segment),
    and its evidence lists the SEG and the source series. Series ``base + 1`` stays unused.

    Args:
        volume: The image series the SEG references.
        segmentation: The judged SEG (as highdicom reads it).
        result: The SEG's segments as a result (see
            :func:`~pacs_sentinel.qc.segqc.judge_segmentation`): masks on the volume's grid.
        qc: The QC judgement; its segment numbers are the SEG's.
        series_number_base: Series numbers of the new series follow it.

    Returns:
        The result set, without a SEG; nothing is written or sent.

    Raises:
        ReportError: One of the objects cannot be built.
    """
    report = build_qc_report(
        volume, segmentation, result, qc, series_number=series_number_base + 2,
        series_description=f"QC of third-party SEG (QC: {verdict_text(qc.verdict)})",
    )
    overlay, pixels = build_overlay(
        volume, result, qc, series_number=series_number_base + 3, subject=THIRD_PARTY_SUBJECT
    )
    return ResultSet(segmentation=None, report=report, overlays=[overlay], overlay_images=[pixels])
