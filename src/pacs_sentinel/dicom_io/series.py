"""Turn the instances of one image series into a 3D volume with its geometry.

The volume keeps the source datasets in slice order, so that every later stage (the mask,
the SEG frames, the overlays) maps slice ``i`` back to the instance (and, for an enhanced
multi-frame instance, the frame) it came from.

Two kinds of input are accepted: classic single-frame series (one file per slice, geometry in
``ImagePositionPatient`` / ``ImageOrientationPatient`` / ``PixelSpacing``) and enhanced
multi-frame instances (Enhanced CT/MR/PET, Legacy Converted Enhanced; geometry in the shared
and per-frame functional groups). Both are reduced to one list of slices that is checked and
sorted the same way.

A series that cannot be represented as one regular grid is refused with a
:class:`~pacs_sentinel.errors.SeriesError` whose one-line message says why (it becomes the
job's FAILED reason): gaps (missing slices), uneven spacing, mixed orientations, matrix sizes
or pixel spacings, duplicated positions, gantry tilt or sheared stacks (refused, not
resampled), missing geometry, too few slices, several series, mixed SOP classes, colour
images. Compressed pixel data is decoded by pydicom's pixel backends (pylibjpeg and its
openjpeg/libjpeg/rle plugins); see :func:`decode_frame`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut
from pydicom.pixels import pixel_array as decode_pixel_array
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from pacs_sentinel.errors import SeriesError

#: Relative deviation of one slice gap from the median gap still counted as "the same spacing".
#: A gap that is (within this tolerance) a whole multiple of the median is a missing slice.
SPACING_TOLERANCE = 0.05
#: Largest component difference between two orientations that still counts as "the same".
ORIENTATION_TOLERANCE = 1e-3
#: Slices closer than this along the normal (mm) are at the same position.
DUPLICATE_TOLERANCE_MM = 0.01
#: Largest in-plane shift of a slice off the straight stack, in pixels, still accepted.
SHEAR_TOLERANCE_PIXELS = 0.25
#: Relative difference of two pixel spacings that still counts as "the same".
PIXEL_SPACING_TOLERANCE = 1e-3
#: Pixel spacings (mm) outside this range are no image a pipeline can use: zero, negative or
#: wild values (a broken export) would make later stages fail obscurely or allocate terabytes.
PLAUSIBLE_PIXEL_SPACING_MM = (0.01, 100.0)


@dataclass
class Volume:
    """One image series as a 3D array with its patient-space geometry.

    Attributes:
        array: float32 array ``(slices, rows, cols)`` after the modality LUT (HU for CT).
        spacing: ``(slice, row, col)`` spacing in mm; ``row`` is the distance between rows.
        origin: Patient coordinates (mm) of the centre of the first voxel.
        direction: 3x3 matrix whose columns are the unit vectors of the column index
            (along a row), the row index (down a column) and the slice index, in patient space.
        datasets: The source instances, ``datasets[i]`` is slice ``array[i]``. For an enhanced
            multi-frame source the same dataset object is repeated for each of its slices.
        frame_numbers: ``None`` when every source instance is single-frame (the classic
            case). Otherwise ``frame_numbers[i]`` is the 1-based frame number, within
            ``datasets[i]``, of slice ``i`` (1 for a single-frame instance), which is what a
            SEG needs to reference a frame of a multi-frame source.
    """

    array: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: np.ndarray
    datasets: list[Dataset]
    frame_numbers: list[int] | None = None

    @property
    def study_uid(self) -> str:
        """StudyInstanceUID of the series."""
        return str(self.datasets[0].StudyInstanceUID)

    @property
    def series_uid(self) -> str:
        """SeriesInstanceUID of the series."""
        return str(self.datasets[0].SeriesInstanceUID)

    @property
    def modality(self) -> str | None:
        """The series' Modality (e.g. ``"CT"``), or None when it has no source datasets (a
        phantom, in HU) or the attribute is empty."""
        if not self.datasets:
            return None
        return str(self.datasets[0].get("Modality", "") or "").strip().upper() or None

    @property
    def voxel_volume_mm3(self) -> float:
        """Volume of one voxel in mm3."""
        return float(np.prod(self.spacing))

    @property
    def source_instances(self) -> list[Dataset]:
        """The distinct source instances in slice order (a multi-frame instance once)."""
        seen: set[int] = set()
        unique = []
        for ds in self.datasets:
            if id(ds) not in seen:
                seen.add(id(ds))
                unique.append(ds)
        return unique

    def to_sitk(self) -> sitk.Image:
        """Return the volume as a SimpleITK image (x = column, y = row, z = slice)."""
        image = sitk.GetImageFromArray(self.array)
        image.SetSpacing((self.spacing[2], self.spacing[1], self.spacing[0]))
        image.SetOrigin(self.origin)
        image.SetDirection(tuple(float(v) for v in self.direction.flatten()))
        return image


@dataclass
class _Slice:
    """One 2D slice of the series: a single-frame instance or one frame of a multi-frame one."""

    dataset: Dataset
    frame_number: int | None  # 1-based; None for a single-frame instance
    position: np.ndarray  # ImagePositionPatient, mm
    orientation: np.ndarray  # ImageOrientationPatient, 6 direction cosines
    pixel_spacing: tuple[float, float]  # (row spacing, column spacing), mm

    @property
    def label(self) -> str:
        """How the messages name this slice."""
        uid = _uid_of(self.dataset)
        return uid if self.frame_number is None else f"frame {self.frame_number} of {uid}"


def _uid_of(ds: Dataset) -> str:
    return str(ds.get("SOPInstanceUID", "?"))


def _transfer_syntax_name(ds: Dataset) -> str:
    meta = getattr(ds, "file_meta", None)
    uid = meta.get("TransferSyntaxUID") if meta is not None else None
    return uid.name if uid is not None else "unknown transfer syntax"


def _frame_count(ds: Dataset) -> int:
    try:
        return int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError) as exc:
        raise SeriesError(f"instance {_uid_of(ds)} has an invalid NumberOfFrames {ds.NumberOfFrames!r}") from exc


def _is_enhanced(ds: Dataset) -> bool:
    return "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds


def functional_group_item(ds: Dataset, frame_index: int | None, keyword: str) -> Dataset | None:
    """The first item of macro ``keyword`` for a frame: per-frame group first, then shared.

    ``frame_index`` is 0-based; None (or one outside the per-frame groups) reads the shared
    group only. A dataset without functional groups (a classic image) gives None.
    """
    for groups_keyword, index in (("PerFrameFunctionalGroupsSequence", frame_index), ("SharedFunctionalGroupsSequence", 0)):
        groups = ds.get(groups_keyword)
        if groups and index is not None and 0 <= index < len(groups):
            macro = groups[index].get(keyword)
            if macro:
                return macro[0]
    return None


def read_datasets(paths: Iterable[Path | str]) -> list[Dataset]:
    """Read DICOM files, raising :class:`SeriesError` naming the first unreadable one."""
    datasets = []
    for path in paths:
        try:
            datasets.append(pydicom.dcmread(path))
        except Exception as exc:  # pydicom raises many types for a bad file
            raise SeriesError(f"cannot read DICOM file {path}: {exc}") from exc
    return datasets


#: Uncompressed transfer syntaxes whose pixel data :func:`native_stored_values` reads directly.
NATIVE_LITTLE_ENDIAN = frozenset({ImplicitVRLittleEndian, ExplicitVRLittleEndian})


def native_stored_values(ds: Dataset) -> np.ndarray | None:
    """The stored values of uncompressed little-endian grayscale pixel data, read directly.

    Gives exactly what :func:`pydicom.pixels.pixel_array` gives (same values and dtype, shape
    ``(frames, rows, cols)``: bits above Bits Stored masked off for unsigned data, the sign
    extended for signed data) without its per-call decoder set-up (~0.1 ms a file; 64 files
    per study). Anything else (compressed, big endian, float, colour, 1-bit, short or
    odd-sized data) returns None and goes to pydicom.

    Returns:
        A read-only array, or None when this fast path does not apply.
    """
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if syntax not in NATIVE_LITTLE_ENDIAN or "PixelData" not in ds:
        return None
    try:
        allocated, stored = int(ds.BitsAllocated), int(ds.BitsStored)
        signed, samples = int(ds.PixelRepresentation), int(ds.get("SamplesPerPixel", 1) or 1)
        rows, cols, frames = int(ds.Rows), int(ds.Columns), int(ds.get("NumberOfFrames", 1) or 1)
    except (AttributeError, TypeError, ValueError):
        return None
    if allocated not in (8, 16, 32) or not 1 <= stored <= allocated or signed not in (0, 1) or samples != 1:
        return None
    data = ds.PixelData
    count = frames * rows * cols
    if not isinstance(data, bytes) or count <= 0 or len(data) < count * allocated // 8:
        return None
    dtype = np.dtype(f"<{'i' if signed else 'u'}{allocated // 8}")
    values = np.frombuffer(data, dtype=dtype, count=count).reshape(frames, rows, cols)
    unused = allocated - stored
    if unused:
        if signed:
            values = (values << unused) >> unused  # arithmetic shift: the sign bit is bit Stored - 1
        else:
            values = values & dtype.type((1 << stored) - 1)
        values.flags.writeable = False
    return values


def _decode_stored(ds: Dataset) -> np.ndarray:
    """Decode every frame of ``ds`` to stored values, shape ``(frames, rows, cols)``.

    Uses :func:`pydicom.pixels.pixel_array` (nothing is cached on the dataset), which picks
    a decoder plugin for compressed transfer syntaxes (pylibjpeg, openjpeg, libjpeg, rle).

    Raises:
        SeriesError: No pixel data, empty or colour pixel data, or the data cannot be decoded.
    """
    keyword = next((k for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData") if k in ds), None)
    if keyword is None:
        raise SeriesError(f"instance {_uid_of(ds)} has no pixel data")
    if not ds[keyword].value:  # zero length: pydicom reads it as None
        raise SeriesError(f"cannot decode pixel data of {_uid_of(ds)} ({_transfer_syntax_name(ds)}): "
                          "the pixel data is empty (0 bytes)")
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if samples != 1:
        raise SeriesError(
            f"instance {_uid_of(ds)} has colour pixel data ({ds.get('PhotometricInterpretation', '?')}); "
            "only grayscale images can be loaded as a volume"
        )
    native = native_stored_values(ds)
    if native is not None:
        return native
    try:
        pixels = decode_pixel_array(ds)
    except Exception as exc:  # decoder plugins raise many types; all mean "cannot decode"
        reason = " ".join(str(exc).split())
        raise SeriesError(
            f"cannot decode pixel data of {_uid_of(ds)} ({_transfer_syntax_name(ds)}): {reason}"
        ) from exc
    frames = _frame_count(ds)
    if pixels.ndim == 2:
        pixels = pixels[np.newaxis]
    if pixels.ndim != 3 or pixels.shape[0] != frames:
        raise SeriesError(
            f"cannot decode pixel data of {_uid_of(ds)} ({_transfer_syntax_name(ds)}): "
            f"decoded shape {pixels.shape} does not match {frames} frame(s)"
        )
    return pixels


def rescale(ds: Dataset, frame_index: int = 0) -> tuple[float, float]:
    """``(slope, intercept)`` of one frame: functional groups, then top level, then identity.

    Raises:
        SeriesError: The slope or intercept is there but is no number.
    """
    item = functional_group_item(ds, frame_index, "PixelValueTransformationSequence") if _is_enhanced(ds) else None
    source = item if item is not None and "RescaleSlope" in item else ds
    values = []
    for keyword, default in (("RescaleSlope", 1.0), ("RescaleIntercept", 0.0)):
        try:
            value = source.get(keyword, default)
            values.append(default if value in (None, "") else float(value))
        except (TypeError, ValueError) as exc:  # pydicom converts the DS on access
            raw = source.get_item(pydicom.tag.Tag(keyword))  # the element as received, undecoded
            value = raw.value if raw is not None else None
            shown = value.decode(errors="replace").strip() if isinstance(value, bytes) else str(value)
            raise SeriesError(f"{keyword} of {_uid_of(ds)} is not a number: {shown!r}") from exc
    return values[0], values[1]


def _to_modality_values(stored: np.ndarray, ds: Dataset, frame_index: int, out: np.ndarray | None = None) -> np.ndarray:
    """Apply the modality LUT of one frame to its stored values, as float32 (into ``out``)."""
    if "ModalityLUTSequence" in ds:
        values = apply_modality_lut(stored, ds)
        if out is None:
            return np.asarray(values, dtype=np.float32)
        out[...] = values
        return out
    slope, intercept = rescale(ds, frame_index)
    if out is None:
        out = stored.astype(np.float32)
    else:
        out[...] = stored
    if slope != 1.0:
        out *= np.float32(slope)
    if intercept != 0.0:
        out += np.float32(intercept)
    return out


def decode_frame(ds: Dataset, frame_number: int = 1) -> np.ndarray:
    """Decode one frame of ``ds`` and apply its modality LUT (rescale slope/intercept).

    Compressed transfer syntaxes (JPEG baseline/extended/lossless, JPEG-LS, JPEG 2000, RLE)
    are decoded by pydicom's pixel backends with the installed pylibjpeg plugins.

    Args:
        ds: A grayscale image instance.
        frame_number: 1-based frame number (1 for a single-frame instance).

    Returns:
        float32 array ``(rows, cols)`` of modality values (HU for CT).

    Raises:
        SeriesError: No pixel data, colour pixel data, a frame number out of range, or pixel
            data that cannot be decoded (``cannot decode pixel data of <uid> (<syntax>): ...``).
    """
    frames = _frame_count(ds)
    if not 1 <= frame_number <= frames:
        raise SeriesError(f"instance {_uid_of(ds)} has no frame {frame_number} (it has {frames})")
    stored = _decode_stored(ds)[frame_number - 1]
    return _to_modality_values(stored, ds, frame_number - 1)


def _floats(value: object, count: int, what: str) -> np.ndarray:
    try:
        array = np.asarray([float(v) for v in value], dtype=float)  # type: ignore[union-attr]
    except (TypeError, ValueError) as exc:
        raise SeriesError(f"{what} is not {count} numbers: {value!r}") from exc
    if array.shape != (count,) or not np.all(np.isfinite(array)):
        raise SeriesError(f"{what} is not {count} numbers: {value!r}")
    return array


def pixel_spacing(value: object, what: str, keyword: str = "PixelSpacing") -> np.ndarray:
    """A pixel spacing (``PixelSpacing``, ``ImagerPixelSpacing``) as two numbers within
    :data:`PLAUSIBLE_PIXEL_SPACING_MM`; ``what`` names its instance (or frame) in the message.

    Raises:
        SeriesError: Not two numbers, or a value outside the plausible range.
    """
    spacing = _floats(value, 2, f"{keyword} of {what}")
    low, high = PLAUSIBLE_PIXEL_SPACING_MM
    if not np.all((spacing >= low) & (spacing <= high)):
        raise SeriesError(f"{keyword} {_format_vector(spacing)} of {what} is not a plausible pixel spacing "
                          f"(each value between {low:g} and {high:g} mm)")
    return spacing


def _single_frame_slice(ds: Dataset) -> _Slice:
    uid = _uid_of(ds)
    for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
        if ds.get(keyword) in (None, ""):
            raise SeriesError(f"instance {uid} has no {keyword}")
    spacing = pixel_spacing(ds.PixelSpacing, uid)
    return _Slice(
        dataset=ds,
        frame_number=None,
        position=_floats(ds.ImagePositionPatient, 3, f"ImagePositionPatient of {uid}"),
        orientation=_floats(ds.ImageOrientationPatient, 6, f"ImageOrientationPatient of {uid}"),
        pixel_spacing=(float(spacing[0]), float(spacing[1])),
    )


def _multi_frame_slices(ds: Dataset) -> list[_Slice]:
    uid = _uid_of(ds)
    frames = _frame_count(ds)
    if not _is_enhanced(ds):
        raise SeriesError(
            f"multi-frame instance {uid} ({pydicom.uid.UID(str(ds.get('SOPClassUID', ''))).name or '?'}) has no functional groups; "
            "its frames cannot be placed in patient space"
        )
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame is not None and len(per_frame) != frames:
        raise SeriesError(f"instance {uid} has {len(per_frame)} per-frame functional groups for {frames} frames")
    slices = []
    for index in range(frames):
        what = f"frame {index + 1} of {uid}"
        position = functional_group_item(ds, index, "PlanePositionSequence")
        orientation = functional_group_item(ds, index, "PlaneOrientationSequence")
        measures = functional_group_item(ds, index, "PixelMeasuresSequence")
        for macro, keyword, name in (
            (position, "ImagePositionPatient", "PlanePositionSequence"),
            (orientation, "ImageOrientationPatient", "PlaneOrientationSequence"),
            (measures, "PixelSpacing", "PixelMeasuresSequence"),
        ):
            if macro is None or macro.get(keyword) in (None, ""):
                raise SeriesError(f"{what} has no {keyword} ({name})")
        spacing = pixel_spacing(measures.PixelSpacing, what)  # type: ignore[union-attr]
        slices.append(
            _Slice(
                dataset=ds,
                frame_number=index + 1,
                position=_floats(position.ImagePositionPatient, 3, f"ImagePositionPatient of {what}"),  # type: ignore[union-attr]
                orientation=_floats(orientation.ImageOrientationPatient, 6, f"ImageOrientationPatient of {what}"),  # type: ignore[union-attr]
                pixel_spacing=(float(spacing[0]), float(spacing[1])),
            )
        )
    return slices


#: The attributes loading reads from every instance (besides the functional groups).
HEADER_KEYWORDS = (
    "SOPInstanceUID", "SOPClassUID", "SeriesInstanceUID", "NumberOfFrames", "SamplesPerPixel",
    "PhotometricInterpretation", "PlanarConfiguration", "Rows", "Columns", "BitsAllocated", "BitsStored",
    "HighBit", "PixelRepresentation", "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing",
    "RescaleSlope", "RescaleIntercept", "SliceThickness", "SpacingBetweenSlices",
)


def _check_header(ds: Dataset) -> None:
    """Refuse an instance whose header pydicom cannot read, or that has no matrix size.

    pydicom converts an element when it is first read; a value representation it does not
    know, or a value whose length does not fit its VR, raises then (``NotImplementedError``,
    ``BytesLengthException``...), deep inside whatever stage reads it first.
    """
    for keyword in HEADER_KEYWORDS:
        try:
            ds.get(keyword)
        except Exception as exc:  # pydicom raises many types for an element it cannot convert
            uid = "?" if keyword == "SOPInstanceUID" else _uid_of(ds)
            raise SeriesError(f"{keyword} of instance {uid} cannot be read: {exc}") from exc
    for keyword in ("Rows", "Columns"):
        if ds.get(keyword) in (None, ""):
            raise SeriesError(f"instance {_uid_of(ds)} has no {keyword}")


def _check_instances(datasets: Sequence[Dataset], min_slices: int) -> None:
    """Refuse empty input, unreadable headers, several series, mixed SOP classes and too few slices."""
    if not datasets:
        raise SeriesError("no instances in series")
    for ds in datasets:
        _check_header(ds)
    series_uids = sorted({str(ds.get("SeriesInstanceUID", "")) for ds in datasets})
    if len(series_uids) != 1:
        shown = ", ".join(uid or "(none)" for uid in series_uids[:3]) + (", ..." if len(series_uids) > 3 else "")
        raise SeriesError(f"instances of {len(series_uids)} series given ({shown}); expected one series")
    sop_classes = sorted({str(ds.get("SOPClassUID", "")) for ds in datasets})
    if len(sop_classes) != 1:
        names = ", ".join(pydicom.uid.UID(uid).name if uid else "(none)" for uid in sop_classes)
        raise SeriesError(f"series mixes SOP classes ({names}); expected one kind of image")
    n_slices = sum(_frame_count(ds) for ds in datasets)
    if n_slices < min_slices:
        noun = "slice" if n_slices == 1 else "slices"
        raise SeriesError(f"series has {n_slices} {noun}; this pipeline needs at least {min_slices}")


def _check_plane(slices: list[_Slice]) -> tuple[np.ndarray, np.ndarray]:
    """Refuse mixed or invalid orientations, matrix sizes and pixel spacings.

    Returns:
        The unit row direction (along a row) and column direction (down a column).
    """
    first = slices[0]
    for s in slices[1:]:
        if np.abs(s.orientation - first.orientation).max() > ORIENTATION_TOLERANCE:
            raise SeriesError(
                "series mixes slice orientations "
                f"({_format_vector(first.orientation)} in {first.label}, {_format_vector(s.orientation)} in {s.label}); "
                "a localizer or a reformat may be in the series"
            )
    row_dir, col_dir = first.orientation[:3], first.orientation[3:]
    if (
        abs(np.linalg.norm(row_dir) - 1) > 0.01
        or abs(np.linalg.norm(col_dir) - 1) > 0.01
        or abs(float(np.dot(row_dir, col_dir))) > 0.01
    ):
        raise SeriesError(
            f"ImageOrientationPatient {_format_vector(first.orientation)} of {first.label} "
            "is not two orthogonal unit vectors"
        )
    shapes = sorted({(int(s.dataset.Rows), int(s.dataset.Columns)) for s in slices})
    if len(shapes) != 1:
        sizes = " and ".join(f"{r}x{c}" for r, c in shapes[:3])
        raise SeriesError(f"series mixes matrix sizes {sizes} (rows x columns)")
    ref = np.asarray(first.pixel_spacing)
    for s in slices[1:]:
        if np.any(np.abs(np.asarray(s.pixel_spacing) - ref) > PIXEL_SPACING_TOLERANCE * ref):
            raise SeriesError(
                f"series mixes pixel spacings {ref[0]:g}x{ref[1]:g} mm and "
                f"{s.pixel_spacing[0]:g}x{s.pixel_spacing[1]:g} mm (row x column)"
            )
    row_dir = row_dir / np.linalg.norm(row_dir)
    col_dir = col_dir / np.linalg.norm(col_dir)
    return row_dir, col_dir


def _format_vector(values: np.ndarray) -> str:
    return "[" + ", ".join(f"{v:.4g}" for v in values) + "]"


def _check_stack(slices: list[_Slice], along: np.ndarray, normal: np.ndarray) -> None:
    """Refuse duplicated positions, tilted or sheared stacks on slices sorted along the normal.

    ``along`` holds each slice's position along the normal (mm), sorted.

    Gantry tilt is refused rather than resampled: a resampled volume would no longer map
    slice ``i`` to a source instance, which the SEG and the overlays rely on.
    """
    gaps = np.diff(along)
    duplicates = np.flatnonzero(gaps < DUPLICATE_TOLERANCE_MM)
    if duplicates.size:
        i = int(duplicates[0])
        sharing = len(set(duplicates.tolist()) | set((duplicates + 1).tolist()))
        raise SeriesError(
            f"series has duplicated slice positions ({sharing} slices share a position with another; "
            f"first at {along[i]:.2f} mm along the normal: "
            f"{slices[i].label} and {slices[i + 1].label}); several acquisitions, phases or echoes "
            "in one series are not supported"
        )
    distances = along - along[0]
    # In-plane offset of each slice from the line through the first slice along the normal.
    offsets = np.stack([s.position for s in slices]) - slices[0].position
    offsets -= np.outer(offsets @ normal, normal)
    shift = np.linalg.norm(offsets, axis=1)
    tolerance = SHEAR_TOLERANCE_PIXELS * min(slices[0].pixel_spacing)
    if shift.max() <= tolerance:
        return
    # A tilted stack is straight: its offsets grow linearly with the distance along the normal.
    slope = (distances @ offsets) / float(distances @ distances)
    residual = np.linalg.norm(offsets - np.outer(distances, slope), axis=1)
    if residual.max() <= tolerance:
        angle = math.degrees(math.atan(float(np.linalg.norm(slope))))
        raise SeriesError(f"gantry tilt of {angle:.3g}° is not supported; reconstruct without tilt")
    raise SeriesError(
        f"slices are not stacked along their normal (in-plane shift of up to {shift.max():.2f} mm); "
        "reconstruct the series as a regular stack"
    )


def _instance_number(s: _Slice) -> int | None:
    """InstanceNumber of a single-frame slice (None for a frame, or when absent or not a number)."""
    if s.frame_number is not None:
        return None
    try:
        return int(s.dataset.get("InstanceNumber"))
    except (TypeError, ValueError):
        return None


def _numbered_through(slices: list[_Slice], gaps_at: np.ndarray) -> bool:
    """True when the two instances around every gap in ``gaps_at`` have consecutive instance
    numbers: nothing was left out there, the spacing changed (single-frame slices only)."""
    for i in gaps_at:
        before, after = _instance_number(slices[int(i)]), _instance_number(slices[int(i) + 1])
        if before is None or after is None or abs(before - after) != 1:
            return False
    return True


def _check_spacing(slices: list[_Slice], along: np.ndarray) -> None:
    """Refuse missing slices (a gap that is a multiple of the spacing) and uneven spacing.

    A gap that is a whole multiple of the spacing is a missing slice unless the instances
    around it are numbered consecutively (a series whose spacing changes, e.g. 2.5 mm then
    5 mm, has no missing slice; a lost file leaves a hole in the numbering).

    ``along`` holds each slice's position along the normal (mm), sorted.
    """
    gaps = np.diff(along)
    median_gap = float(np.median(gaps))
    uneven = np.flatnonzero(np.abs(gaps - median_gap) > SPACING_TOLERANCE * median_gap)
    if uneven.size == 0:
        return
    multiples = np.rint(gaps[uneven] / median_gap)
    is_missing = (multiples >= 2) & (np.abs(gaps[uneven] - multiples * median_gap) <= SPACING_TOLERANCE * median_gap)
    numbered_through = bool(np.all(is_missing)) and _numbered_through(slices, uneven)
    if np.all(is_missing) and not numbered_through:
        i = int(uneven[0])
        missing = int((multiples - 1).sum())
        where = f" in {uneven.size} places, first" if uneven.size > 1 else ""
        raise SeriesError(
            f"series is missing {missing} slice{'s' if missing > 1 else ''}{where}: gap of {gaps[i]:.2f} mm "
            f"after {along[i]:.2f} mm along the normal ({slices[i].label}), expected {median_gap:.2f} mm"
        )
    complete = "; no slice is missing (the instances around the wider gaps are numbered consecutively)" \
        if numbered_through else ""
    raise SeriesError(
        f"series has inconsistent slice spacing: gaps between slices range from {gaps.min():.2f} to "
        f"{gaps.max():.2f} mm (median {median_gap:.2f} mm){complete}; a volume needs one constant spacing"
    )


def _single_slice_spacing(s: _Slice) -> float:
    """Slice spacing of a one-slice volume: SpacingBetweenSlices, SliceThickness (the first that is a
    positive number), else 1 mm."""
    sources = [s.dataset]
    if s.frame_number is not None:
        measures = functional_group_item(s.dataset, s.frame_number - 1, "PixelMeasuresSequence")
        if measures is not None:
            sources.insert(0, measures)
    for source in sources:
        for keyword in ("SpacingBetweenSlices", "SliceThickness"):
            try:
                value = float(source.get(keyword) or 0)
            except (TypeError, ValueError):  # not a number: try the next source
                continue
            if math.isfinite(value) and value > 0:
                return value
    return 1.0


def _stack_pixels(slices: list[_Slice]) -> np.ndarray:
    """Decode every source instance once and fill the float32 volume slice by slice."""
    first = slices[0].dataset
    array = np.empty((len(slices), int(first.Rows), int(first.Columns)), dtype=np.float32)
    decoded: dict[int, np.ndarray] = {}
    for i, s in enumerate(slices):
        key = id(s.dataset)
        stored = decoded.get(key)
        if stored is None:
            stored = _decode_stored(s.dataset)
            if _frame_count(s.dataset) > 1:
                decoded[key] = stored  # keep only multi-frame ones: they serve several slices
        index = 0 if s.frame_number is None else s.frame_number - 1
        _to_modality_values(stored[index], s.dataset, index, out=array[i])
    return array


def load_volume(datasets: Sequence[Dataset], *, min_slices: int = 2) -> Volume:
    """Sort the slices of one series along its normal and stack them into a volume.

    Single-frame instances give one slice each; an enhanced multi-frame instance (Enhanced
    CT/MR, Legacy Converted Enhanced, ...) gives one slice per frame, placed by its plane
    position/orientation and pixel measures from the per-frame or shared functional groups
    and rescaled by its pixel value transformation. Compressed pixel data is decoded (see
    :func:`decode_frame`).

    Gantry tilt and other sheared stacks are refused, not resampled: slice ``i`` must stay
    the source instance ``datasets[i]`` for the SEG and the overlays.

    Args:
        datasets: The instances of exactly one image series, in any order.
        min_slices: Fewest slices accepted (3D models need several).

    Returns:
        The volume, slices sorted by increasing position along the slice normal (the cross
        product of the row and column directions). ``frame_numbers`` is set when any source
        instance is multi-frame.

    Raises:
        SeriesError: With a one-line reason: no instances, several series, mixed SOP classes,
            too few slices, missing or invalid geometry, mixed orientations, matrix sizes or
            pixel spacings, duplicated positions, gantry tilt or sheared stack, missing
            slices, inconsistent spacing, colour images, undecodable pixel data.
    """
    _check_instances(datasets, min_slices)
    slices: list[_Slice] = []
    multi_frame = False
    for ds in datasets:
        if _frame_count(ds) > 1 or _is_enhanced(ds):
            multi_frame = True
            slices.extend(_multi_frame_slices(ds))
        else:
            slices.append(_single_frame_slice(ds))

    row_dir, col_dir = _check_plane(slices)
    normal = np.cross(row_dir, col_dir)
    normal /= np.linalg.norm(normal)
    along = np.array([float(np.dot(s.position, normal)) for s in slices])
    order = np.argsort(along, kind="stable")
    slices = [slices[i] for i in order]
    along = along[order]

    if len(slices) > 1:
        _check_stack(slices, along, normal)
        _check_spacing(slices, along)
        slice_spacing = float(along[-1] - along[0]) / (len(slices) - 1)
    else:
        slice_spacing = _single_slice_spacing(slices[0])

    array = _stack_pixels(slices)
    row_spacing, col_spacing = slices[0].pixel_spacing
    return Volume(
        array=array,
        spacing=(slice_spacing, row_spacing, col_spacing),
        origin=tuple(float(v) for v in slices[0].position),
        direction=np.stack([row_dir, col_dir, normal], axis=1),
        datasets=[s.dataset for s in slices],
        frame_numbers=[s.frame_number or 1 for s in slices] if multi_frame else None,
    )


def load_series_files(paths: Iterable[Path | str], *, min_slices: int = 2) -> Volume:
    """Read the files of one series and return its volume (see :func:`load_volume`)."""
    return load_volume(read_datasets(paths), min_slices=min_slices)
