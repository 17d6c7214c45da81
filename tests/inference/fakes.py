"""Shared helpers of the inference tests: synthetic volumes and a pointwise fake network."""

from __future__ import annotations

import numpy as np
import torch

from pacs_sentinel.dicom_io.series import Volume
from pacs_sentinel.inference.models import SegmentationModel
from pacs_sentinel.inference.preprocess import ModelGeometry
from pacs_sentinel.results import Code, SegmentLabel

BLOB = SegmentLabel(name="Blob", property_category=Code("91723000", "SCT", "Anatomical Structure"),
                    property_type=Code("123037004", "SCT", "Body structure"), tracking_id="blob")


class ThresholdNet(torch.nn.Module):
    """A fake segmentation network: channel 1 is the input above ``level`` (softmax logits).

    Pointwise, so its output does not depend on the window or on flips.
    """

    def __init__(self, level: float = 0.6, sharpness: float = 60.0) -> None:
        super().__init__()
        self.level = level
        self.sharpness = sharpness

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.zeros_like(x), self.sharpness * (x - self.level)], dim=1)


def threshold_model(**geometry: object) -> SegmentationModel:
    """A :class:`SegmentationModel` around :class:`ThresholdNet` (window -200..300 HU)."""
    settings = {"axcodes": "RAS", "spacing_mm": (1.5, 1.5, 1.5), "intensity_window": (-200.0, 300.0),
                "roi_size": (32, 32, 32), "sw_overlap": 0.25}
    settings.update(geometry)
    return SegmentationModel(name="threshold", version="0", labels=[BLOB], card={}, network=ThresholdNet(),
                             device=torch.device("cpu"), geometry=ModelGeometry(**settings))  # type: ignore[arg-type]


def sphere_volume(shape: tuple[int, int, int], spacing: tuple[float, float, float], direction: np.ndarray,
                  *, centre_mm: tuple[float, float, float] = (4.0, -3.0, 5.0), radius_mm: float = 18.0,
                  inside_hu: float = 200.0, outside_hu: float = 0.0) -> tuple[Volume, np.ndarray]:
    """A volume of the given grid (origin chosen so the grid is centred on 0) with a sphere.

    Returns:
        The volume and the sphere's voxels on its grid, ``(slices, rows, cols)`` bool.
    """
    direction = np.asarray(direction, dtype=float)
    steps = np.stack([direction[:, 2] * spacing[0], direction[:, 1] * spacing[1], direction[:, 0] * spacing[2]], axis=1)
    half = (np.asarray(shape, dtype=float) - 1) / 2
    origin = -steps @ half
    index = np.stack(np.meshgrid(*(np.arange(n) for n in shape), indexing="ij"), axis=-1).astype(float)
    points = index @ steps.T + origin
    truth = np.linalg.norm(points - np.asarray(centre_mm), axis=-1) <= radius_mm
    array = np.where(truth, inside_hu, outside_hu).astype(np.float32)
    volume = Volume(array=array, spacing=tuple(float(s) for s in spacing), origin=tuple(float(v) for v in origin),  # type: ignore[arg-type]
                    direction=direction, datasets=[])
    return volume, truth
