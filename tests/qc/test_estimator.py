"""The learned confidence estimator: input contract, determinism, and that it ranks masks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from pacs_sentinel.inference.phantoms import make_ct_phantom
from pacs_sentinel.qc.cases import EVALUATION_SEED_OFFSET
from pacs_sentinel.qc.agreement import dice
from pacs_sentinel.qc.corruptions import HELD_OUT_FAMILIES, MASK_FAMILIES, perturb_mask
from pacs_sentinel.qc.estimator import (
    BOX_MM,
    ESTIMATOR_ARCHITECTURE,
    GRID,
    INPUT_CHANNELS,
    WINDOW_HU,
    QualityEstimator,
    build_estimator_network,
    estimator_input,
    estimator_signal,
    load_estimator,
)
from pacs_sentinel.qc.train_estimator import (
    _augment,
    estimator_from,
    train_estimator,
    training_image_families,
    training_mask_families,
    without_probabilities,
)
from pacs_sentinel.results import Code, Reason, SegmentLabel

SEED = 7_000_000 + EVALUATION_SEED_OFFSET  # far from every training and calibration seed


@pytest.fixture(scope="module")
def phantom():
    return make_ct_phantom(SEED)


def test_input_is_three_channels_on_a_fixed_grid_in_range(phantom) -> None:
    x = estimator_input(phantom.hu, phantom.liver, phantom.spacing)
    assert x.shape == (INPUT_CHANNELS, GRID, GRID, GRID) == (3, GRID, GRID, GRID) and x.dtype == np.float32
    assert 0.0 <= x.min() and x.max() <= 1.0
    # Area averaging keeps the mask's volume: voxel fractions times the output voxel volume.
    out_voxel_ml = np.prod([round(BOX_MM / s) * s / GRID for s in phantom.spacing]) / 1000.0
    assert float(x[1].sum()) * out_voxel_ml == pytest.approx(phantom.liver_volume_ml, rel=0.02)
    # The image channel shows the organ brighter inside the mask than around it.
    assert x[0][x[1] > 0.9].mean() > x[0][(x[1] == 0) & (x[0] > 0.1)].mean()


def test_probability_channel_is_the_map_or_else_the_mask(phantom) -> None:
    without = estimator_input(phantom.hu, phantom.liver, phantom.spacing)
    np.testing.assert_array_equal(without[2], without[1])  # no map: the mask stands in
    # A map that is 0.8 on the organ and 0.1 in a shell around it: averaged down like the mask.
    probabilities = 0.8 * phantom.liver.astype(np.float32)
    probabilities[ndimage.binary_dilation(phantom.liver, iterations=4) & ~phantom.liver] = 0.1
    x = estimator_input(phantom.hu, phantom.liver, phantom.spacing, probabilities=probabilities)
    np.testing.assert_array_equal(x[:2], without[:2])
    assert x[2].max() == pytest.approx(0.8, abs=1e-5)
    assert 0.0 < x[2][without[1] == 0].max() <= 0.1 + 1e-6  # the shell outside the mask shows
    # Estimators 1.x take two channels: the same image and mask.
    np.testing.assert_array_equal(estimator_input(phantom.hu, phantom.liver, phantom.spacing, channels=2), x[:2])
    flipped = np.diag([-1.0, 1.0, 1.0])
    y = estimator_input(phantom.hu[:, :, ::-1], phantom.liver[:, :, ::-1], phantom.spacing, flipped,
                        probabilities[:, :, ::-1])
    np.testing.assert_allclose(x, y, atol=1e-6)  # the map is reoriented with the image

def test_input_is_the_same_whatever_the_stored_orientation(phantom) -> None:
    flipped = np.diag([-1.0, 1.0, 1.0])  # column index runs towards patient right
    a = estimator_input(phantom.hu, phantom.liver, phantom.spacing)
    b = estimator_input(phantom.hu[:, :, ::-1], phantom.liver[:, :, ::-1], phantom.spacing, flipped)
    np.testing.assert_allclose(a, b, atol=1e-6)


def _reference_input(image, mask, spacing, probabilities):
    """The estimator input by its definition (axial LPS): a BOX_MM box centred on the mask's
    bounding box, padded with zeros (air, no mask, no probability), image windowed to [0, 1],
    probabilities clipped, area-averaged to GRID^3."""
    box = [(int(np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != k))).min()),
            int(np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != k))).max()) + 1) for k in range(3)]
    size = [max(1, int(round(BOX_MM / s))) for s in spacing]
    low = [int(round((lo + hi - 1) / 2.0 - n / 2.0)) for (lo, hi), n in zip(box, size)]
    src = tuple(slice(max(0, lo), min(d, lo + n)) for lo, n, d in zip(low, size, image.shape))
    pad = [(max(0, -lo), max(0, lo + n - d)) for lo, n, d in zip(low, size, image.shape)]
    low_hu, high_hu = WINDOW_HU
    planes = [np.pad(np.clip((image[src].astype(np.float32) - low_hu) / (high_hu - low_hu), 0, 1), pad),
              np.pad(mask[src].astype(np.float32), pad)]
    planes.append(planes[1] if probabilities is None else np.pad(np.clip(probabilities[src], 0, 1), pad))
    stacked = torch.from_numpy(np.stack(planes).astype(np.float32))[None]
    return torch.nn.functional.interpolate(stacked, size=(GRID,) * 3, mode="area")[0].numpy()


def test_input_matches_its_definition_also_where_the_box_leaves_the_image() -> None:
    rng = np.random.default_rng(1)
    for case in range(12):
        shape = tuple(int(n) for n in rng.integers(20, 70, 3))
        image = rng.normal(0.0, 300.0, shape).astype(np.int16 if case % 3 == 0 else np.float32)
        z, y, x = np.ogrid[:shape[0], :shape[1], :shape[2]]
        centre = [int(rng.integers(0, n)) for n in shape]  # often near an edge
        mask = (z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2 < int(rng.integers(2, 15)) ** 2
        spacing = tuple(float(s) for s in rng.uniform(0.5, 6.0, 3))
        probabilities = rng.uniform(-0.1, 1.1, shape).astype(np.float32) if case % 2 else None
        # Averaged one axis at a time instead of over the built box: equal up to float32 rounding.
        np.testing.assert_allclose(estimator_input(image, mask, spacing, None, probabilities),
                                   _reference_input(image, mask, spacing, probabilities), rtol=0, atol=1e-5)


def test_input_never_builds_the_box_at_the_image_resolution() -> None:
    """The 256 mm box at native resolution is 16M voxels per channel on a 1 mm CT and 600M on
    a 0.3 mm one: the input is averaged down from the image region without building it, so
    a fine-resolution series cannot exhaust the memory (and crash-loop the worker)."""
    import tracemalloc

    shape, spacing = (40, 48, 48), (0.5, 0.5, 0.5)  # box of 512^3 voxels
    image = np.full(shape, 60.0, dtype=np.float32)
    mask = np.zeros(shape, dtype=bool)
    mask[10:30, 12:36, 12:36] = True
    tracemalloc.start()
    try:
        inputs = estimator_input(image, mask, spacing, None, mask.astype(np.float32))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * image.nbytes, f"{peak / 1e6:.0f} MB allocated for a {image.nbytes / 1e6:.1f} MB image"
    # The mask fills 20x24x24 of the 512^3 box: its average is that share.
    assert inputs[1].mean() == pytest.approx(20 * 24 * 24 / 512 ** 3, rel=1e-4)


def test_bad_inputs_are_clear_errors(phantom) -> None:
    with pytest.raises(ValueError, match="non-empty"):
        estimator_input(phantom.hu, np.zeros_like(phantom.liver), phantom.spacing)
    with pytest.raises(ValueError, match="same 3D shape"):
        estimator_input(phantom.hu[:-1], phantom.liver, phantom.spacing)
    with pytest.raises(ValueError, match="probabilities"):
        estimator_input(phantom.hu, phantom.liver, phantom.spacing, probabilities=np.zeros((2, 2, 2)))
    with pytest.raises(ValueError, match="2 or 3 channels"):
        estimator_input(phantom.hu, phantom.liver, phantom.spacing, channels=4)


def test_network_maps_a_batch_to_one_logit_each() -> None:
    torch.manual_seed(0)
    network = build_estimator_network().eval()
    out = network(torch.rand(4, INPUT_CHANNELS, GRID, GRID, GRID))
    assert out.shape == (4, 1)
    estimator = estimator_from(network)
    predicted = estimator.predict_inputs(np.random.default_rng(0).random((4, INPUT_CHANNELS, GRID, GRID, GRID)))
    assert predicted.shape == (4,) and ((predicted > 0) & (predicted < 1)).all()


def test_a_two_channel_estimator_is_fed_two_channels(phantom) -> None:
    torch.manual_seed(0)
    architecture = dict(ESTIMATOR_ARCHITECTURE, in_shape=[2, GRID, GRID, GRID])
    estimator = QualityEstimator(build_estimator_network(architecture), {"version": "1.0.0",
                                                                        "architecture": architecture})
    assert estimator.channels == 2
    probabilities = phantom.liver.astype(np.float32)
    value = estimator.predict(phantom.hu, phantom.liver, phantom.spacing, probabilities=probabilities)
    assert value == estimator.predict(phantom.hu, phantom.liver, phantom.spacing)  # the map is not used
    assert 0.0 < value < 1.0


def test_probability_dropout_puts_the_mask_in_the_third_channel() -> None:
    torch.manual_seed(0)
    batch = torch.rand(64, 3, 4, 4, 4)
    dropped = _augment(batch, 0.0, probability_dropout=1.0)
    assert torch.equal(dropped[:, 2], dropped[:, 1])
    kept = _augment(batch, 0.0, probability_dropout=0.0)
    assert not torch.equal(kept[:, 2], kept[:, 1])
    some = _augment(batch, 0.0, probability_dropout=0.3)
    share = (some[:, 2] == some[:, 1]).all(dim=(1, 2, 3)).float().mean()
    assert 0.1 < float(share) < 0.5
    np.testing.assert_array_equal(without_probabilities(batch)[:, 2], batch[:, 1])


def test_shipped_estimator_is_deterministic_and_ranks_masks(phantom) -> None:
    estimator = load_estimator()
    assert estimator.card["training"]["held_out_families"]  # the card says what it never saw
    assert estimator.channels == 3 and estimator.version.startswith("2.")
    good = estimator.predict(phantom.hu.astype(np.float32), phantom.liver, phantom.spacing)
    again = estimator.predict(phantom.hu.astype(np.float32), phantom.liver, phantom.spacing)
    assert good == again
    assert good > 0.8
    confident = phantom.liver.astype(np.float32)  # a model sure of exactly this mask
    assert estimator.predict(phantom.hu, phantom.liver, phantom.spacing, probabilities=confident) > 0.8
    rng = np.random.default_rng(0)
    wrong = perturb_mask(phantom.liver, "wrong-organ", rng, phantom.hu, phantom.spacing)
    half = perturb_mask(phantom.liver, "partial-miss", np.random.default_rng(3), phantom.hu, phantom.spacing)
    assert dice(wrong, phantom.liver) < 0.5
    assert not estimator_signal(good).fired
    assert estimator_signal(estimator.predict(phantom.hu, wrong, phantom.spacing)).fired  # predicted below 0.7
    assert estimator.predict(phantom.hu, half, phantom.spacing) < good
    assert estimator.predict(phantom.hu, np.zeros_like(phantom.liver), phantom.spacing) == 0.0


def _label(value: str, scheme: str, meaning: str) -> SegmentLabel:
    return SegmentLabel(meaning, Code("123037004", "SCT", "Anatomical Structure"), Code(value, scheme, meaning), meaning)


def test_the_estimator_judges_only_the_structure_and_modality_it_was_trained_on() -> None:
    shipped = load_estimator()
    liver, legacy_liver = _label("10200004", "SCT", "Liver"), _label("T-62000", "SRT", "Liver")
    spleen = _label("78961009", "SCT", "Spleen")
    assert shipped.covers(liver, "CT") and shipped.covers(legacy_liver, "CT")
    assert shipped.covers(liver, None)  # no source datasets (a phantom, in HU): CT
    assert not shipped.covers(spleen, "CT")  # a good spleen is not a bad liver
    assert not shipped.covers(liver, "MR")  # its image channel is a window in HU
    # A card that names no scope (before QC 2.6.0) is the demo's: the liver on CT.
    card = {k: v for k, v in shipped.card.items() if k != "scope"}
    older = QualityEstimator(build_estimator_network(card["architecture"]), card)
    assert older.covers(liver, "CT") and not older.covers(spleen, "CT") and not older.covers(liver, "PT")
    kidney_on_mr = QualityEstimator(build_estimator_network(card["architecture"]),
                                    {**card, "scope": {"modalities": ["mr"], "structures": [["64033007", "SCT", "Kidney"]]}})
    assert kidney_on_mr.covers(_label("64033007", "SCT", "Kidney"), "MR") and not kidney_on_mr.covers(liver, "MR")


def test_signal_fires_below_a_predicted_dice_of_0_7() -> None:
    assert estimator_signal(0.6).fired and estimator_signal(0.6).reason is Reason.LOW_PREDICTED_DICE
    assert not estimator_signal(0.85).fired
    assert estimator_signal(0.7).subscore == pytest.approx(0.5)


@pytest.mark.parametrize("family", [f for f in MASK_FAMILIES if f not in ("none", "empty")])
def test_every_perturbation_changes_the_mask_reproducibly(phantom, family) -> None:
    a = perturb_mask(phantom.liver, family, np.random.default_rng(5), phantom.hu, phantom.spacing)
    b = perturb_mask(phantom.liver, family, np.random.default_rng(5), phantom.hu, phantom.spacing)
    assert np.array_equal(a, b)
    assert dice(a, phantom.liver) < 0.99


def test_training_is_seeded_and_writes_a_loadable_estimator_with_its_card(tmp_path) -> None:
    torch.set_num_threads(1)
    runs = []
    for name in ("a", "b"):
        metrics = train_estimator(tmp_path / name, seed=3, epochs=1, n_train=2, n_val=1, progress=False)
        assert set(metrics) == {"validation", "validation_without_probabilities", "training"}
        assert metrics["validation"]["n"] > 0
        runs.append(torch.load(tmp_path / name / "model.pt", weights_only=True))
    for key in runs[0]:
        assert torch.equal(runs[0][key], runs[1][key]), key  # same seed, same weights
    estimator = load_estimator(tmp_path / "a")
    assert estimator.card["training"]["held_out_families"] == list(HELD_OUT_FAMILIES)
    # It judges what it was trained on: the segmentation model's label, in its modality.
    assert estimator.card["scope"] == {"modalities": ["CT"], "structures": [["10200004", "SCT", "Liver"]]}
    assert "held out" in (tmp_path / "a" / "MODEL_CARD.md").read_text()
    phantom = make_ct_phantom(SEED + 1)
    assert 0.0 < estimator.predict(phantom.hu, phantom.liver, phantom.spacing) < 1.0


def test_the_estimator_learns_every_listed_mask_family_and_never_a_held_out_one() -> None:
    # Issue 5 lists the perturbation families the estimator is trained on; the held-out
    # family that qc-eval measures generalisation on is an image corruption none of them sees.
    listed = ["dilation", "erosion", "shift", "islands", "holes", "partial-miss", "leakage", "wrong-organ"]
    assert training_mask_families() == ["none", *listed]
    assert not set(training_image_families()) & set(HELD_OUT_FAMILIES)
    assert not set(training_mask_families()) & set(HELD_OUT_FAMILIES)
    shipped = load_estimator().card["training"]
    assert shipped["mask_families"] == training_mask_families()
    assert not set(shipped["image_families"]) & set(HELD_OUT_FAMILIES)
