"""The learned confidence estimator: input contract, determinism, and that it ranks masks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pacs_sentinel.inference.phantoms import make_ct_phantom
from pacs_sentinel.qc.cases import EVALUATION_SEED_OFFSET
from pacs_sentinel.qc.corruptions import HELD_OUT_FAMILIES, MASK_FAMILIES, dice, perturb_mask
from pacs_sentinel.qc.estimator import (
    BOX_MM,
    GRID,
    build_estimator_network,
    estimator_input,
    estimator_signal,
    load_estimator,
)
from pacs_sentinel.qc.train_estimator import estimator_from, train_estimator
from pacs_sentinel.results import Reason

SEED = 7_000_000 + EVALUATION_SEED_OFFSET  # far from every training and calibration seed


@pytest.fixture(scope="module")
def phantom():
    return make_ct_phantom(SEED)


def test_input_is_two_channels_on_a_fixed_grid_in_range(phantom) -> None:
    x = estimator_input(phantom.hu, phantom.liver, phantom.spacing)
    assert x.shape == (2, GRID, GRID, GRID) and x.dtype == np.float32
    assert 0.0 <= x.min() and x.max() <= 1.0
    # Area averaging keeps the mask's volume: voxel fractions times the output voxel volume.
    out_voxel_ml = np.prod([round(BOX_MM / s) * s / GRID for s in phantom.spacing]) / 1000.0
    assert float(x[1].sum()) * out_voxel_ml == pytest.approx(phantom.liver_volume_ml, rel=0.02)
    # The image channel shows the organ brighter inside the mask than around it.
    assert x[0][x[1] > 0.9].mean() > x[0][(x[1] == 0) & (x[0] > 0.1)].mean()


def test_input_is_the_same_whatever_the_stored_orientation(phantom) -> None:
    flipped = np.diag([-1.0, 1.0, 1.0])  # column index runs towards patient right
    a = estimator_input(phantom.hu, phantom.liver, phantom.spacing)
    b = estimator_input(phantom.hu[:, :, ::-1], phantom.liver[:, :, ::-1], phantom.spacing, flipped)
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_bad_inputs_are_clear_errors(phantom) -> None:
    with pytest.raises(ValueError, match="non-empty"):
        estimator_input(phantom.hu, np.zeros_like(phantom.liver), phantom.spacing)
    with pytest.raises(ValueError, match="same 3D shape"):
        estimator_input(phantom.hu[:-1], phantom.liver, phantom.spacing)


def test_network_maps_a_batch_to_one_logit_each() -> None:
    torch.manual_seed(0)
    network = build_estimator_network().eval()
    out = network(torch.rand(3, 2, GRID, GRID, GRID))
    assert out.shape == (3, 1)
    estimator = estimator_from(network)
    predicted = estimator.predict_inputs(np.random.default_rng(0).random((3, 2, GRID, GRID, GRID)))
    assert predicted.shape == (3,) and ((predicted > 0) & (predicted < 1)).all()


def test_shipped_estimator_is_deterministic_and_ranks_masks(phantom) -> None:
    estimator = load_estimator()
    assert estimator.card["training"]["held_out_families"]  # the card says what it never saw
    good = estimator.predict(phantom.hu.astype(np.float32), phantom.liver, phantom.spacing)
    again = estimator.predict(phantom.hu.astype(np.float32), phantom.liver, phantom.spacing)
    assert good == again
    assert good > 0.8
    rng = np.random.default_rng(0)
    wrong = perturb_mask(phantom.liver, "wrong-organ", rng, phantom.hu, phantom.spacing)
    half = perturb_mask(phantom.liver, "partial-miss", np.random.default_rng(3), phantom.hu, phantom.spacing)
    assert dice(wrong, phantom.liver) < 0.5
    assert not estimator_signal(good).fired
    assert estimator_signal(estimator.predict(phantom.hu, wrong, phantom.spacing)).fired  # predicted below 0.7
    assert estimator.predict(phantom.hu, half, phantom.spacing) < good
    assert estimator.predict(phantom.hu, np.zeros_like(phantom.liver), phantom.spacing) == 0.0


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
        assert set(metrics) == {"validation", "training"} and metrics["validation"]["n"] > 0
        runs.append(torch.load(tmp_path / name / "model.pt", weights_only=True))
    for key in runs[0]:
        assert torch.equal(runs[0][key], runs[1][key]), key  # same seed, same weights
    estimator = load_estimator(tmp_path / "a")
    assert estimator.card["training"]["held_out_families"] == list(HELD_OUT_FAMILIES)
    assert "held out" in (tmp_path / "a" / "MODEL_CARD.md").read_text()
    phantom = make_ct_phantom(SEED + 1)
    assert 0.0 < estimator.predict(phantom.hu, phantom.liver, phantom.spacing) < 1.0
