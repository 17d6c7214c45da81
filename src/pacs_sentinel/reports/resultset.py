"""The set of objects one AI result produces: SEG, QC SR and SC overlay(s).

:func:`build_result_set` is what the daemon calls after QC; :meth:`ResultSet.datasets` is
what goes to the PACS and :meth:`ResultSet.write` keeps a copy (and PNGs of the overlays)
in the job's output folder.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import highdicom as hd
import numpy as np
from PIL import Image
from pydicom.dataset import Dataset

from pacs_sentinel.dicom_io.series import Volume
from pacs_sentinel.errors import ReportError
from pacs_sentinel.reports.overlay import build_overlay
from pacs_sentinel.reports.seg import build_segmentation
from pacs_sentinel.reports.sr import build_qc_report
from pacs_sentinel.results import QCResult, SegmentationResult


@dataclass
class ResultSet:
    """The result objects of one AI output, in the order they are sent.

    Attributes:
        segmentation: The SEG.
        report: The TID 1500 SR with the QC verdict; references the SEG.
        overlays: Secondary-capture overlays (one per rendered slice).
        overlay_images: The RGB pixels of each overlay, for PNG files.
    """

    segmentation: hd.seg.Segmentation
    report: hd.sr.Comprehensive3DSR
    overlays: list[hd.sc.SCImage] = field(default_factory=list)
    overlay_images: list[np.ndarray] = field(default_factory=list)

    def datasets(self) -> list[Dataset]:
        """Return SEG, SR and the SCs: the objects sent to the PACS."""
        return [self.segmentation, self.report, *self.overlays]

    def write(self, out_dir: Path) -> list[Path]:
        """Write ``SEG.dcm``, ``SR.dcm``, ``SC_<n>.dcm`` and ``overlay_<n>.png`` into ``out_dir``.

        Each file is written under a temporary name and renamed, so a crash never leaves a
        truncated file with a final name. ``n`` counts from 1.

        Returns:
            The paths written, DICOM files first (in :meth:`datasets` order), then PNGs.

        Raises:
            ReportError: A file cannot be written.
        """
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        targets: list[tuple[Path, Dataset | np.ndarray]] = [
            (out_dir / "SEG.dcm", self.segmentation),
            (out_dir / "SR.dcm", self.report),
        ]
        targets += [(out_dir / f"SC_{n}.dcm", sc) for n, sc in enumerate(self.overlays, start=1)]
        targets += [(out_dir / f"overlay_{n}.png", image) for n, image in enumerate(self.overlay_images, start=1)]
        written = []
        for path, payload in targets:
            tmp = path.with_name(f".{path.name}.tmp")
            try:
                if isinstance(payload, Dataset):
                    payload.save_as(tmp, enforce_file_format=True)
                else:
                    Image.fromarray(payload, mode="RGB").save(tmp, format="PNG")
                os.replace(tmp, path)
            except (OSError, ValueError, TypeError) as exc:
                tmp.unlink(missing_ok=True)
                raise ReportError(f"cannot write {path}: {exc}") from exc
            written.append(path)
        return written


def build_result_set(
    volume: Volume,
    result: SegmentationResult,
    qc: QCResult,
    *,
    series_number_base: int = 900,
    withheld_seg: bool = False,
) -> ResultSet:
    """Build SEG (series ``base + 1``), SR (``base + 2``) and SC overlay (``base + 3``).

    Args:
        volume: The source series.
        result: The model output.
        qc: The QC judgement.
        series_number_base: Series numbers of the three new series follow it.
        withheld_seg: Passed to the SR (policy keeps the SEG from the PACS).

    Returns:
        The result set; nothing is written or sent.

    Raises:
        ReportError: One of the objects cannot be built.
    """
    segmentation = build_segmentation(volume, result, qc, series_number=series_number_base + 1)
    report = build_qc_report(
        volume, segmentation, result, qc, series_number=series_number_base + 2, withheld_seg=withheld_seg
    )
    overlay, pixels = build_overlay(volume, result, qc, series_number=series_number_base + 3)
    return ResultSet(segmentation=segmentation, report=report, overlays=[overlay], overlay_images=[pixels])
