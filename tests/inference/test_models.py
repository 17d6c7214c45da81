"""Tests of the demo segmentation model: registry, preprocessing, predict, training smoke run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from pacs_sentinel.dicom_io.series import Volume
from pacs_sentinel.errors import ModelError
from pacs_sentinel.inference.models import (
    DEMO_MODELS_DIR,
    build_demo_unet,
    load_segmentation_model,
    preprocess_array,
    resolve_device,
)
from pacs_sentinel.inference.phantoms import CTPhantom, make_ct_phantom
from pacs_sentinel.inference.training import train_demo
from pacs_sentinel.results import Code, SegmentationResult

LIVER_TYPE = Code("10200004", "SCT", "Liver")


def as_volume(phantom: CTPhantom) -> Volume:
    return Volume(array=phantom.hu.astype(np.float32), spacing=phantom.spacing, origin=phantom.origin,
                  direction=np.eye(3), datasets=[])


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


@pytest.fixture(scope="module")
def organ_seg():
    if not (DEMO_MODELS_DIR / "organ-seg" / "model.pt").exists():
        pytest.fail("the shipped organ-seg weights are missing; run `sentinel train-demo organ-seg`")
    return load_segmentation_model("demo:organ-seg", device="cpu")


def test_demo_unet_shape() -> None:
    net = build_demo_unet()
    out = net(torch.zeros(1, 1, 16, 32, 32))
    assert out.shape == (1, 2, 16, 32, 32)
    assert any(isinstance(m, torch.nn.Dropout) for m in net.modules())


def test_registry_loads_once(organ_seg) -> None:
    assert load_segmentation_model("demo:organ-seg", device="cpu") is organ_seg
    assert organ_seg.name == "organ-seg" and organ_seg.version == organ_seg.card["version"]
    assert [label.property_type for label in organ_seg.labels] == [LIVER_TYPE]
    assert organ_seg.labels[0].tracking_id == "liver"


def test_card_has_the_contract_fields(organ_seg) -> None:
    card = organ_seg.card
    for key in ("name", "version", "task", "architecture", "spacing_mm", "intensity_window", "roi_size",
                "labels", "training", "metrics", "reference"):
        assert key in card, key
    ref = card["reference"]["Liver"]
    assert ref["volume_ml_p01"] <= ref["volume_ml_p05"] <= ref["volume_ml_p50"] <= ref["volume_ml_p95"] <= ref["volume_ml_p99"]
    assert card["metrics"]["dice_mean"] >= 0.9


def test_predict_on_held_out_phantom(organ_seg) -> None:
    phantom = make_ct_phantom(987_654)
    result = organ_seg.predict(as_volume(phantom))
    assert isinstance(result, SegmentationResult)
    assert result.probabilities.shape == result.mask.shape == (1, *phantom.hu.shape)
    assert result.probabilities.dtype == np.float32 and result.mask.dtype == bool
    assert 0.0 <= result.probabilities.min() and result.probabilities.max() <= 1.0
    assert dice(result.mask[0], phantom.liver) > 0.85
    assert result.model_name == "organ-seg" and result.model_version == organ_seg.version
    assert result.reference["Liver"]["volume_ml_p99"] > 0
    assert result.seconds > 0
    stricter = organ_seg.predict(as_volume(phantom), threshold=0.9)
    assert stricter.mask.sum() <= result.mask.sum()
    assert result.uncertainty is None and set(result.timing) == {"preprocess", "forward", "samples", "inverse"}


def test_predict_any_grid(organ_seg) -> None:
    phantom = make_ct_phantom(3, shape=(20, 256, 256), spacing=(0.8, 0.8, 0.8))
    result = organ_seg.predict(as_volume(phantom))
    assert result.mask.shape == (1, 20, 256, 256)


def test_predict_follows_orientation(organ_seg) -> None:
    """A series stored right-to-left (row direction -x) gets the mirrored mask."""
    phantom = make_ct_phantom(21)
    normal = organ_seg.predict(as_volume(phantom))
    flipped = Volume(array=phantom.hu[:, :, ::-1].astype(np.float32), spacing=phantom.spacing,
                     origin=phantom.origin, direction=np.diag([-1.0, 1.0, 1.0]), datasets=[])
    mirrored = organ_seg.predict(flipped)
    assert dice(mirrored.mask[0][:, :, ::-1], normal.mask[0]) > 0.99


def test_training_sees_the_predict_preprocessing(organ_seg) -> None:
    phantom = make_ct_phantom(5)
    trained_on = preprocess_array(phantom.hu, phantom.spacing, organ_seg.card)
    assert trained_on.shape == (1, 1, 48, 80, 80)
    assert torch.equal(trained_on, organ_seg.prepare(as_volume(phantom)).image)


def test_device_and_precision(organ_seg) -> None:
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ModelError, match="CUDA"):
            load_segmentation_model("demo:organ-seg", device="cuda")
    half = load_segmentation_model("demo:organ-seg", device="cpu", mixed_precision=False)
    assert half.network is organ_seg.network and half.mixed_precision is not organ_seg.mixed_precision


def test_unknown_spec_is_a_model_error() -> None:
    with pytest.raises(ModelError, match="demo:no-such-model"):
        load_segmentation_model("demo:no-such-model")


def test_missing_or_broken_weights(tmp_path: Path) -> None:
    shutil.copy(DEMO_MODELS_DIR / "organ-seg" / "card.json", tmp_path / "card.json")
    with pytest.raises(ModelError, match="no weights"):
        load_segmentation_model(str(tmp_path))
    (tmp_path / "model.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="model.pt"):
        load_segmentation_model(str(tmp_path))
    (tmp_path / "card.json").write_text("{", encoding="utf-8")
    with pytest.raises(ModelError, match="card"):
        load_segmentation_model(str(tmp_path / "."))


def test_train_demo_smoke(tmp_path: Path) -> None:
    metrics = train_demo("organ-seg", out_dir=tmp_path, epochs=1, n_train=2, n_val=1, n_test=1, n_per_variant=1,
                         progress=False)
    assert set(metrics["dice_by_variant"]) >= {"normal", "metal-artifact", "unusual-anatomy"}
    assert set(metrics["recall_by_variant"]) == set(metrics["dice_by_variant"]) and 0 <= metrics["recall_mean"] <= 1
    card = json.loads((tmp_path / "card.json").read_text(encoding="utf-8"))
    assert card["training"]["n_train"] == 2 and "Liver" in card["reference"]
    assert card["training"]["best_epoch"] == 1 and card["training"]["epochs_run"] == 1
    assert (tmp_path / "MODEL_CARD.md").read_text(encoding="utf-8").startswith("# Model card: organ-seg")
    model = load_segmentation_model(str(tmp_path), device="cpu")
    result = model.predict(as_volume(make_ct_phantom(1, shape=(8, 32, 32), spacing=(10.0, 12.5, 12.5))))
    assert result.mask.shape == (1, 8, 32, 32)


def test_unknown_demo_cannot_be_trained(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="organ-seg"):
        train_demo("cxr-cls-unknown", out_dir=tmp_path)
