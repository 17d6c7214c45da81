"""Model sources: a MONAI bundle and a TorchScript file with its sidecar, built in the test."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.networks.nets import UNet

from pacs_sentinel.errors import ModelError
from pacs_sentinel.inference.models import clear_model_cache, load_segmentation_model
from pacs_sentinel.inference.sources import GENERIC_CATEGORY, GENERIC_TYPE
from pacs_sentinel.results import Code

from .fakes import sphere_volume

UNET = {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "channels": [4, 8], "strides": [2],
        "num_res_units": 0, "dropout": 0.2}
SPLEEN = Code("78961009", "SCT", "Spleen")

# TorchScript is deprecated in torch 2.x but is still how models are shipped.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")


@pytest.fixture(autouse=True)
def fresh_cache():
    clear_model_cache()
    yield
    clear_model_cache()


def make_bundle(root: Path, *, metadata_extra: dict | None = None, unet: dict = UNET) -> Path:
    """A tiny MONAI bundle: 2-level UNet state dict, Orientationd/Spacingd/ScaleIntensityRanged."""
    (root / "configs").mkdir(parents=True)
    (root / "models").mkdir()
    torch.manual_seed(0)
    torch.save(UNet(**unet).state_dict(), root / "models" / "model.pt")
    inference = {
        "bundle_root": ".",
        "device": "$torch.device('cpu')",
        "network_def": {"_target_": "monai.networks.nets.UNet", **UNET},
        "network": "$@network_def.to(@device)",
        "preprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "LoadImaged", "keys": "image"},
            {"_target_": "EnsureChannelFirstd", "keys": "image"},
            {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"},
            {"_target_": "Spacingd", "keys": "image", "pixdim": [2.0, 2.0, 3.0], "mode": "bilinear"},
            {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": -57, "a_max": 164,
             "b_min": 0.0, "b_max": 1.0, "clip": True},
        ]},
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [32, 32, 16], "sw_batch_size": 2, "overlap": 0.5},
        "postprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "Activationsd", "keys": "pred", "softmax": True},
        ]},
    }
    metadata = {"name": "tiny-spleen", "version": "0.1.0",
                "network_data_format": {"outputs": {"pred": {"channel_def": {"0": "background", "1": "spleen"}}}},
                **(metadata_extra or {})}
    (root / "configs" / "inference.json").write_text(json.dumps(inference), encoding="utf-8")
    (root / "configs" / "metadata.json").write_text(json.dumps(metadata), encoding="utf-8")
    return root


class TinyNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv3d(1, 3, 3, padding=1)
        self.drop = torch.nn.Dropout(0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.drop(x))


SIDECAR = {
    "name": "tiny-ts", "version": "2.0", "orientation": "LPS", "spacing_mm": [2.0, 2.0, 4.0],
    "intensity_window": [-100, 200], "roi_size": [24, 24, 12], "activation": "sigmoid",
    "labels": [
        {"name": "Spleen", "property_category": ["91723000", "SCT", "Anatomical Structure"],
         "property_type": ["78961009", "SCT", "Spleen"], "tracking_id": "spleen"},
        {"name": "Kidney", "property_category": ["91723000", "SCT", "Anatomical Structure"],
         "property_type": ["64033007", "SCT", "Kidney"]},
    ],
    "reference": {"Spleen": {"volume_ml_p01": 80.0, "volume_ml_p99": 420.0}},
}


def make_torchscript(root: Path, sidecar: dict = SIDECAR) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    torch.jit.script(TinyNet().eval()).save(str(root / "model.ts"))
    (root / "model.json").write_text(json.dumps(sidecar), encoding="utf-8")
    return root / "model.ts"


def test_bundle_loads_and_predicts(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "bundle")
    model = load_segmentation_model(str(bundle), device="cpu")
    assert (model.name, model.version) == ("tiny-spleen", "0.1.0")
    g = model.geometry
    assert g.axcodes == "RAS" and g.spacing_mm == (2.0, 2.0, 3.0) and g.roi_size == (32, 32, 16)
    assert g.intensity_window == (-57.0, 164.0) and g.sw_batch_size == 2 and g.sw_overlap == 0.5
    assert [label.name for label in model.labels] == ["spleen"] and model.channels == [1]
    assert model.labels[0].property_category == GENERIC_CATEGORY and model.labels[0].property_type == GENERIC_TYPE
    volume, _ = sphere_volume((20, 50, 40), (3.0, 1.2, 1.2), np.eye(3))
    result = model.predict(volume, mc_dropout_samples=2, tta_flips=("z",))
    assert result.probabilities.shape == result.mask.shape == (1, 20, 50, 40)
    assert result.uncertainty is not None and result.uncertainty.probabilities.shape[:2] == (3, 1)
    assert load_segmentation_model(str(bundle / "."), device="cpu") is model  # same resolved path: loaded once


def test_bundle_with_torchscript_weights(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "b")
    (bundle / "models" / "model.pt").unlink()
    torch.jit.script(UNet(**UNET).eval()).save(str(bundle / "models" / "model.ts"))
    model = load_segmentation_model(str(bundle), device="cpu")
    volume, _ = sphere_volume((10, 30, 30), (3.0, 2.0, 2.0), np.eye(3))
    result = model.predict(volume, mc_dropout_samples=2)
    assert result.mask.shape == (1, 10, 30, 30)
    samples = result.uncertainty
    assert samples is not None and not np.array_equal(samples.probabilities[0], samples.probabilities[1])


def test_bundle_sentinel_block_gives_codes(tmp_path: Path) -> None:
    sentinel = {"labels": [{"name": "Spleen", "channel": 1, "property_category": ["91723000", "SCT", "Anatomical Structure"],
                            "property_type": ["78961009", "SCT", "Spleen"], "tracking_id": "spleen"}],
                "reference": {"Spleen": {"volume_ml_p99": 400}}}
    model = load_segmentation_model(str(make_bundle(tmp_path / "b", metadata_extra={"sentinel": sentinel})), device="cpu")
    assert model.labels[0].property_type == SPLEEN and model.reference == {"Spleen": {"volume_ml_p99": 400.0}}


def test_bundle_missing_weights(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "b")
    (bundle / "models" / "model.pt").unlink()
    with pytest.raises(ModelError, match=str(bundle)):
        load_segmentation_model(str(bundle), device="cpu")


def test_bundle_bad_json(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "b")
    (bundle / "configs" / "inference.json").write_text("{ not json", encoding="utf-8")
    with pytest.raises(ModelError, match="inference.json"):
        load_segmentation_model(str(bundle), device="cpu")


def test_bundle_bad_metadata(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "b")
    (bundle / "configs" / "metadata.json").write_text("[1, 2", encoding="utf-8")
    with pytest.raises(ModelError, match="metadata.json"):
        load_segmentation_model(str(bundle), device="cpu")


def test_bundle_weights_of_another_shape(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "b")
    torch.save(UNet(**{**UNET, "channels": [4, 16]}).state_dict(), bundle / "models" / "model.pt")
    with pytest.raises(ModelError, match="size mismatch") as error:
        load_segmentation_model(str(bundle), device="cpu")
    assert str(bundle) in str(error.value)


def test_torchscript_with_sidecar(tmp_path: Path) -> None:
    path = make_torchscript(tmp_path / "ts")
    model = load_segmentation_model(str(path), device="cpu")
    assert (model.name, model.version) == ("tiny-ts", "2.0")
    assert model.geometry.axcodes == "LPS" and model.geometry.activation == "sigmoid" and model.channels == [0, 1]
    assert [label.property_type.value for label in model.labels] == ["78961009", "64033007"]
    assert model.labels[1].tracking_id == "kidney"
    volume, _ = sphere_volume((12, 30, 36), (4.0, 1.5, 1.5), np.eye(3))
    result = model.predict(volume, mc_dropout_samples=3)
    assert result.probabilities.shape == (2, 12, 30, 36)
    assert result.reference["Spleen"]["volume_ml_p99"] == 420.0
    samples = result.uncertainty
    assert samples is not None and samples.probabilities.shape[:2] == (3, 2)
    assert np.abs(samples.probabilities[0].astype(float) - samples.probabilities[1].astype(float)).max() > 0  # scripted dropout


def test_torchscript_without_sidecar(tmp_path: Path) -> None:
    path = make_torchscript(tmp_path / "ts")
    path.with_suffix(".json").unlink()
    with pytest.raises(ModelError, match="model.json"):
        load_segmentation_model(str(path), device="cpu")


@pytest.mark.parametrize("sidecar", ['{"name": ', json.dumps({**SIDECAR, "spacing_mm": [1, 2]}),
                                     json.dumps({k: v for k, v in SIDECAR.items() if k != "labels"})])
def test_torchscript_broken_sidecar(tmp_path: Path, sidecar: str) -> None:
    path = make_torchscript(tmp_path / "ts")
    path.with_suffix(".json").write_text(sidecar, encoding="utf-8")
    with pytest.raises(ModelError, match="model.json"):
        load_segmentation_model(str(path), device="cpu")


def test_torchscript_corrupt_file(tmp_path: Path) -> None:
    path = make_torchscript(tmp_path / "ts")
    path.write_bytes(b"not torchscript")
    with pytest.raises(ModelError, match="model.ts"):
        load_segmentation_model(str(path), device="cpu")


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="nowhere"):
        load_segmentation_model(str(tmp_path / "nowhere"), device="cpu")


def test_folder_of_unknown_kind(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="neither a MONAI bundle"):
        load_segmentation_model(str(tmp_path), device="cpu")
