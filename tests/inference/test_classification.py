"""Tests of the classification pipeline: the demo cxr-cls model, calibration, Grad-CAM, training."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from pydicom.data import get_testdata_file

from pacs_sentinel.errors import ModelError, SeriesError
from pacs_sentinel.inference.classification import (
    FEATURE_STATISTICS_FILE,
    ClassificationModel,
    FeatureStatistics,
    fit_temperature,
    Turn,
    image_from_dataset,
    load_classification_model,
    orientation_turn,
    without_padding,
)
from pacs_sentinel.qc.metrics import expected_calibration_error
from pacs_sentinel.inference.radiographs import FINDINGS, make_cxr_phantom
from pacs_sentinel.inference.train_cxr import auprc, auroc, sensitivity_at_specificity, train_cxr
from pacs_sentinel.results import ClassificationResult

DEMO_DIR = Path(__file__).parents[2] / "src" / "pacs_sentinel" / "inference" / "demo_models" / "cxr-cls"


@pytest.fixture(scope="module")
def model() -> ClassificationModel:
    torch.set_num_threads(2)
    return load_classification_model("demo:cxr-cls", device="cpu")


def test_demo_model_is_cached_and_described(model: ClassificationModel) -> None:
    assert load_classification_model("demo:cxr-cls", device="cpu") is model
    assert model.name == "cxr-cls" and model.version == "1.0.0"
    assert [label.name for label in model.labels] == list(FINDINGS)
    assert {label.code.value for label in model.labels} == {"786838002", "60046008", "8186001"}
    assert all(label.code.scheme == "SCT" for label in model.labels)
    assert model.temperature > 0 and model.temperature == model.card["temperature"]
    assert model.device == torch.device("cpu")
    assert set(model.card["metrics"]["per_finding"]) == set(FINDINGS)


def test_predicts_findings_on_phantoms(model: ClassificationModel) -> None:
    cases = [
        {},
        {"effusion": True},
        {"cardiomegaly": True},
        {"nodule": True},
        {"effusion": True, "cardiomegaly": True},
        {"nodule": True, "effusion": True, "cardiomegaly": True},
    ]
    correct, total = 0, 0
    for i, findings in enumerate(cases):
        phantom = make_cxr_phantom(900_000 + i, findings=findings)
        result = model.predict(phantom.image, phantom.pixel_spacing)
        assert isinstance(result, ClassificationResult)
        for j, name in enumerate(FINDINGS):
            correct += result.positive(j) == phantom.findings[name]
            total += 1
    assert correct / total >= 0.75  # a sanity check, not a benchmark


def test_result_fields_and_temperature(model: ClassificationModel) -> None:
    phantom = make_cxr_phantom(4, findings={"effusion": True, "cardiomegaly": True})
    result = model.predict(phantom.image)
    assert result.probabilities.shape == result.logits.shape == result.thresholds.shape == (len(FINDINGS),)
    assert result.temperature == model.temperature
    expected = 1.0 / (1.0 + np.exp(-result.logits / model.temperature))
    assert np.allclose(result.probabilities, expected, atol=1e-9)
    assert result.samples is None and result.sample_kinds == []
    assert result.model_name == "cxr-cls" and result.seconds > 0
    assert {"preprocess", "forward", "samples", "gradcam"} <= set(result.timing)
    assert set(result.reference) == set(FINDINGS)


def test_heatmaps_only_for_positive_findings_on_the_source_grid(model: ClassificationModel) -> None:
    phantom = make_cxr_phantom(6, findings={"effusion": True, "cardiomegaly": True}, shape=(300, 240))
    result = model.predict(phantom.image)
    positives = {j for j in range(len(FINDINGS)) if result.positive(j)}
    assert positives, "expected at least one positive finding"
    assert set(result.heatmaps) == positives
    for heatmap in result.heatmaps.values():
        assert heatmap.shape == (300, 240) and heatmap.dtype == np.float32
        assert heatmap.min() >= 0.0 and heatmap.max() <= 1.0 and heatmap.max() > 0.5
    assert model.predict(phantom.image, gradcam=False).heatmaps == {}


def test_mc_dropout_and_flips(model: ClassificationModel) -> None:
    phantom = make_cxr_phantom(8, findings={"nodule": True})
    result = model.predict(phantom.image, mc_dropout_samples=6, tta_flips=("x", "y", "z"))
    assert result.samples is not None and result.samples.shape == (8, len(FINDINGS))
    assert result.sample_kinds == ["mc-dropout"] * 6 + ["tta:flip-x", "tta:flip-y"]
    assert np.all((result.samples >= 0) & (result.samples <= 1))
    assert np.ptp(result.samples[:6], axis=0).max() > 1e-4  # the dropout samples differ
    # Sampling leaves the model deterministic afterwards.
    again = model.predict(phantom.image)
    assert np.allclose(again.logits, model.predict(phantom.image).logits)
    assert np.allclose(again.logits, result.logits)
    with pytest.raises(ModelError, match="flip"):
        model.predict(phantom.image, tta_flips=("w",))


def test_rejects_non_2d_input(model: ClassificationModel) -> None:
    with pytest.raises(ModelError, match="shape"):
        model.predict(np.zeros((4, 64, 64), dtype=np.float32))
    with pytest.raises(ModelError, match="NaN"):
        model.predict(np.full((64, 64), np.nan, dtype=np.float32))


def test_expected_calibration_error_by_hand() -> None:
    # Two bins used: [0.2, 0.3) with 0.2, 0.2 (observed 0/2 -> error 0.2) and [0.8, 0.9) with
    # 0.8, 0.8 (observed 2/2 -> error 0.2) -> 0.2. A third bin [0.5, 0.6): p 0.5, y 1 -> 0.5.
    p = np.array([0.2, 0.2, 0.8, 0.8, 0.5])
    y = np.array([0, 0, 1, 1, 1])
    assert expected_calibration_error(p, y) == pytest.approx((2 * 0.2 + 2 * 0.2 + 0.5) / 5)
    assert expected_calibration_error(np.array([1.0, 0.0]), np.array([1, 0])) == 0.0
    assert expected_calibration_error(np.array([[0.9, 0.1]]), np.array([[1, 0]])) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="shape"):
        expected_calibration_error(np.array([0.5]), np.array([1, 0]))


def test_fit_temperature_recovers_overconfidence() -> None:
    rng = np.random.default_rng(0)
    true_logits = rng.normal(0, 2, size=(4000, 3))
    labels = (rng.random((4000, 3)) < 1 / (1 + np.exp(-true_logits))).astype(float)
    assert fit_temperature(3.0 * true_logits, labels) == pytest.approx(3.0, rel=0.1)


def test_ranking_metrics() -> None:
    y = np.array([0, 0, 1, 1])
    assert auroc(y, np.array([0.1, 0.4, 0.35, 0.8])) == pytest.approx(0.75)
    assert auroc(y, np.array([0.5, 0.5, 0.5, 0.5])) == pytest.approx(0.5)
    assert auprc(y, np.array([0.1, 0.2, 0.8, 0.9])) == pytest.approx(1.0)
    assert auprc(y, np.array([0.9, 0.2, 0.8, 0.1])) == pytest.approx((1 / 2 + 2 / 4) / 2)
    negatives = np.linspace(0, 1, 100)
    scores = np.concatenate([negatives, [0.97, 0.5]])
    labels = np.concatenate([np.zeros(100), [1, 1]])
    assert sensitivity_at_specificity(labels, scores) == pytest.approx(0.5)


def test_image_from_dataset_applies_the_modality_lut() -> None:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    image = image_from_dataset(ds)
    assert image.shape == (ds.Rows, ds.Columns) and image.dtype == np.float32
    assert np.allclose(image, ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept))
    result = load_classification_model("demo:cxr-cls", device="cpu").predict(image)
    assert np.all((result.probabilities >= 0) & (result.probabilities <= 1))
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    with pytest.raises(SeriesError, match="colour"):
        image_from_dataset(ds)


def test_training_smoke_run_writes_a_loadable_model(tmp_path: Path) -> None:
    torch.set_num_threads(2)
    metrics = train_cxr(tmp_path, epochs=1, progress=False, n_train=32, n_val=8, n_cal=8, n_test=8, n_per_variant=0)
    assert set(metrics["per_finding"]) == set(FINDINGS)
    card = json.loads((tmp_path / "card.json").read_text())
    assert card["name"] == "cxr-cls" and card["temperature"] > 0 and card["training"]["epochs_run"] == 1
    assert (tmp_path / "MODEL_CARD.md").read_text().startswith("# Model card: cxr-cls")
    state = torch.load(tmp_path / "model.pt", weights_only=True)
    assert all(v.dtype == torch.float16 for v in state.values() if torch.is_floating_point(v))
    trained = load_classification_model(str(tmp_path), device="cpu")
    result = trained.predict(make_cxr_phantom(1).image, mc_dropout_samples=2)
    assert result.probabilities.shape == (len(FINDINGS),)
    # The feature statistics are fitted on the weights as written, on the same phantom sets.
    assert card["feature_statistics"]["n_train"] == 32 and (tmp_path / FEATURE_STATISTICS_FILE).is_file()
    assert result.feature_distance is not None and result.feature_distance_range == trained.feature_statistics.limits


def test_feature_statistics_fit_measure_and_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    scales = np.array([1.0, 2.0, 0.5, 4.0])
    train, validation = rng.normal(3.0, scales, (400, 4)), rng.normal(3.0, scales, (200, 4))
    stats = FeatureStatistics.fit(train, validation, shrinkage=0.0, low_quantile=0.99, high_factor=1.5)
    assert stats.distance(train.mean(axis=0)) == pytest.approx(0.0, abs=1e-9)
    # Mahalanobis: two standard deviations along any axis are the same distance.
    assert stats.distance(3.0 + np.array([0, 0, 0, 8.0])) == pytest.approx(stats.distance(3.0 + np.array([2.0, 0, 0, 0])),
                                                                          rel=0.15)
    distances = np.array([stats.distance(f) for f in validation])
    assert np.mean(distances <= stats.low) == pytest.approx(0.99, abs=0.006) and stats.high == pytest.approx(1.5 * stats.low)
    stats.save(tmp_path / "s.npz")
    again = FeatureStatistics.load(tmp_path / "s.npz")
    assert again.limits == pytest.approx(stats.limits) and again.distance(validation[0]) == pytest.approx(distances[0], rel=1e-5)
    np.savez(tmp_path / "bad.npz", mean=np.zeros(4), precision=np.eye(3), limits=np.array([1.0, 2.0]))
    with pytest.raises(ValueError, match="bad.npz"):
        FeatureStatistics.load(tmp_path / "bad.npz")


def test_the_demo_model_measures_how_unlike_its_training_images_an_image_is(model: ClassificationModel,
                                                                            tmp_path: Path) -> None:
    low, high = model.feature_statistics.limits
    for seed in range(3):  # held-out test phantoms: familiar
        image = make_cxr_phantom(140_000 + seed).image
        assert model.predict(image, gradcam=False).feature_distance < low
        # Upside down or with its grey levels inverted: beyond half way to "unlike anything trained on".
        for odd in (image[::-1].copy(), image.max() - image):
            assert model.predict(odd, gradcam=False).feature_distance > (low + high) / 2

    # A folder whose card names no statistics measures nothing; one whose file is missing is broken.
    for name, entry in (("none", None), ("missing", {"file": "absent.npz"})):
        folder = tmp_path / name
        folder.mkdir()
        card = json.loads((DEMO_DIR / "card.json").read_text())
        card.pop("feature_statistics")
        if entry:
            card["feature_statistics"] = entry
        (folder / "card.json").write_text(json.dumps(card))
        shutil.copy(DEMO_DIR / "model.pt", folder / "model.pt")
        if entry is None:
            plain = load_classification_model(str(folder), device="cpu")
            result = plain.predict(make_cxr_phantom(1).image, gradcam=False)
            assert result.feature_distance is None and result.feature_distance_range is None
        else:
            with pytest.raises(ModelError, match="feature statistics"):
                load_classification_model(str(folder), device="cpu")


def test_broken_models_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="demo:no-such-model"):
        load_classification_model("demo:no-such-model", device="cpu")
    missing = tmp_path / "missing"
    with pytest.raises(ModelError, match=str(missing)):
        load_classification_model(str(missing), device="cpu")

    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    shutil.copy(DEMO_DIR / "card.json", no_weights / "card.json")
    with pytest.raises(ModelError, match="no weights"):
        load_classification_model(str(no_weights), device="cpu")

    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    shutil.copy(DEMO_DIR / "card.json", corrupt / "card.json")
    (corrupt / "model.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match=str(corrupt / "model.pt")):
        load_classification_model(str(corrupt), device="cpu")

    wrong_task = tmp_path / "segmentation"
    wrong_task.mkdir()
    card = json.loads((DEMO_DIR / "card.json").read_text())
    (wrong_task / "card.json").write_text(json.dumps({**card, "task": "segmentation"}))
    shutil.copy(DEMO_DIR / "model.pt", wrong_task / "model.pt")
    with pytest.raises(ModelError, match="classification"):
        load_classification_model(str(wrong_task), device="cpu")

    bad_json = tmp_path / "bad-json"
    bad_json.mkdir()
    (bad_json / "card.json").write_text("{")
    shutil.copy(DEMO_DIR / "model.pt", bad_json / "model.pt")
    with pytest.raises(ModelError, match="invalid model card"):
        load_classification_model(str(bad_json), device="cpu")


def _stored_ways(image: np.ndarray):
    """The eight ways a radiograph drawn as ``L\\F`` can be stored, each with the PatientOrientation
    that describes it (rows run to the patient's left, columns to the feet)."""
    opposite = {"L": "R", "R": "L", "F": "H", "H": "F"}
    for transpose in (False, True):
        for flip_rows in (False, True):
            for flip_cols in (False, True):
                stored, rows, cols = image, "L", "F"
                if transpose:
                    stored, rows, cols = stored.T, cols, rows
                if flip_rows:
                    stored, cols = stored[::-1], opposite[cols]
                if flip_cols:
                    stored, rows = stored[:, ::-1], opposite[rows]
                yield np.ascontiguousarray(stored), [rows, cols]


def test_every_stored_orientation_is_turned_back_and_maps_return() -> None:
    image = np.arange(12, dtype=np.float32).reshape(3, 4)  # no symmetry: every turn is visible
    seen = set()
    for stored, orientation in _stored_ways(image):
        turn = orientation_turn(orientation, ["L", "F"])
        assert turn is not None, orientation
        assert np.array_equal(turn.apply(stored), image), orientation
        assert np.array_equal(turn.undo(image), stored), orientation
        assert turn.identity == (orientation == ["L", "F"])
        seen.add((turn.transpose, turn.flip_rows, turn.flip_cols))
        # The DICOM string form and oblique values (dominant letter first) read the same.
        assert orientation_turn("\\".join(orientation), ("L", "F")) == turn
        assert orientation_turn([orientation[0] + "P", orientation[1] + "A"], ["L", "F"]) == turn
    assert len(seen) == 8


@pytest.mark.parametrize("stored", [None, "", ["A", "F"], ["P", "H"], "L", ["L", "R"], ["X", "F"], ["L", "F", "A"]])
def test_orientations_that_cannot_be_turned_leave_the_image_as_stored(stored) -> None:
    # Missing, unreadable, both directions on one axis, or another plane (a lateral view).
    assert orientation_turn(stored, ["L", "F"]) is None
    assert orientation_turn(["R", "F"], None) is None


def test_a_radiograph_stored_another_way_round_is_classified_as_drawn(model: ClassificationModel) -> None:
    assert model.orientation == ["L", "F"]  # the demo card says how its phantoms were drawn
    phantom = make_cxr_phantom(6, findings={"effusion": True, "cardiomegaly": True}, shape=(300, 240))
    upright = model.predict(phantom.image, mc_dropout_samples=2, tta_flips=("x",), patient_orientation=["L", "F"])
    assert upright.heatmaps
    for stored, orientation in list(_stored_ways(phantom.image))[1:]:
        turned = model.predict(stored, mc_dropout_samples=2, tta_flips=("x",), patient_orientation=orientation)
        np.testing.assert_allclose(turned.probabilities, upright.probabilities, atol=1e-5)
        np.testing.assert_allclose(turned.samples, upright.samples, atol=1e-5)
        assert turned.feature_distance == pytest.approx(upright.feature_distance, rel=1e-4)
        turn = orientation_turn(orientation, ["L", "F"])
        assert set(turned.heatmaps) == set(upright.heatmaps)
        for index, heatmap in turned.heatmaps.items():
            assert heatmap.shape == stored.shape  # on the stored grid, where the overlay is drawn
            np.testing.assert_allclose(heatmap, turn.undo(upright.heatmaps[index]), atol=1e-4)
    # Without the tag, or for a model whose card names no orientation, the image is taken as stored.
    upside_down = phantom.image[::-1].copy()
    as_stored = model.predict(upside_down)
    assert not np.allclose(as_stored.probabilities, upright.probabilities, atol=1e-3)
    saved, model.orientation = model.orientation, None
    try:
        np.testing.assert_allclose(model.predict(upside_down, patient_orientation=["L", "H"]).probabilities,
                                   as_stored.probabilities, atol=1e-6)
    finally:
        model.orientation = saved
    assert Turn().identity


def test_padding_cut_from_the_edges_on_any_side() -> None:
    image = np.random.default_rng(0).random((40, 30)).astype(np.float32)
    padded = np.pad(image, ((3, 5), (0, 7)), constant_values=0.0)
    cropped, cut = without_padding(padded)
    assert cut == (3, 5, 0, 7) and np.array_equal(cropped, image)
    white = np.pad(image, 4, constant_values=4095.0)
    assert without_padding(white)[1] == (4, 4, 4, 4)
    assert without_padding(image)[1] == (0, 0, 0, 0)  # noise on every edge: nothing to cut
    # Two values on the edges are no padding; nor is a border that would leave less than half.
    mixed = padded.copy()
    mixed[0, 0] = 1.0
    assert without_padding(mixed)[1] == (0, 0, 0, 0)
    blank = np.pad(image[:10, :10], 20, constant_values=0.0)
    assert without_padding(blank)[1] == (0, 0, 0, 0)


@pytest.mark.parametrize("value", [0.0, None])  # black padding, or white (the image's maximum)
def test_a_radiograph_with_a_padding_border_is_classified_as_without(model: ClassificationModel, value) -> None:
    """Found from outside: a constant border (declared as Pixel Padding Value or not) changed the
    answer, from a nodule score of 0.47 to 0 at 4 pixels to a confident false nodule at 48."""
    phantom = make_cxr_phantom(6, findings={"effusion": True, "cardiomegaly": True})
    plain = model.predict(phantom.image, mc_dropout_samples=2, tta_flips=("x",))
    fill = float(phantom.image.max()) if value is None else value
    padded_image = np.pad(phantom.image, ((48, 16), (8, 32)), constant_values=fill)
    padded = model.predict(padded_image, mc_dropout_samples=2, tta_flips=("x",))
    np.testing.assert_allclose(padded.probabilities, plain.probabilities, atol=1e-5)
    np.testing.assert_allclose(padded.samples, plain.samples, atol=1e-5)
    assert set(padded.heatmaps) == set(plain.heatmaps) and padded.heatmaps
    for index, heatmap in padded.heatmaps.items():  # on the stored grid, 0 on the padding
        assert heatmap.shape == padded_image.shape
        np.testing.assert_allclose(heatmap[48:-16, 8:-32], plain.heatmaps[index], atol=1e-4)
        assert heatmap[:48].max() == 0.0
