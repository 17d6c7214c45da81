"""Uncertainty samples: MC dropout (batched) and test-time flips, on the working grid."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pacs_sentinel.errors import ModelError
from pacs_sentinel.inference.models import load_segmentation_model
from pacs_sentinel.inference.phantoms import make_ct_phantom
from pacs_sentinel.inference.training import phantom_volume
from pacs_sentinel.inference.uncertainty import MC_DROPOUT_SEED, draw_samples, mc_dropout

from .fakes import sphere_volume, threshold_model

def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


SMALL = {"shape": (24, 80, 80), "spacing": (10.0, 5.0, 5.0)}


@pytest.fixture(scope="module")
def organ_seg():
    return load_segmentation_model("demo:organ-seg", device="cpu")


@pytest.fixture(scope="module")
def phantom_volume_small():
    return phantom_volume(make_ct_phantom(4242, **SMALL))


def test_no_samples_no_uncertainty(organ_seg, phantom_volume_small) -> None:
    result = organ_seg.predict(phantom_volume_small, mc_dropout_samples=0)
    assert result.uncertainty is None
    assert result.timing["samples"] >= 0.0 and result.timing["forward"] > 0.0


def test_mc_dropout_samples(organ_seg, phantom_volume_small) -> None:
    result = organ_seg.predict(phantom_volume_small, mc_dropout_samples=4)
    samples = result.uncertainty
    assert samples is not None and samples.kinds == ["mc-dropout"] * 4
    prepared = organ_seg.prepare(phantom_volume_small)
    grid = tuple(prepared.image.shape[2:])
    assert samples.probabilities.shape == (4, 1, *grid) and samples.probabilities.dtype == np.float32
    # float16 precision, float32 storage: every value survives a round trip through float16.
    assert np.array_equal(samples.probabilities, samples.probabilities.astype(np.float16))
    assert samples.mask.shape == (1, *grid) and samples.mask.dtype == bool
    assert samples.spacing == (5.0, 5.0, 5.0) and samples.seconds > 0
    p = samples.probabilities.astype(np.float32)
    for i in range(1, 4):
        assert np.abs(p[i] - p[0]).max() > 0.05  # dropout was active: the samples differ
    deterministic = organ_seg.probabilities(prepared.image)[0].numpy()
    assert np.abs(p.mean(axis=0) - deterministic).mean() < 0.02
    assert np.array_equal(samples.mask, deterministic >= 0.5)
    # Only dropout was switched, and it is switched back off.
    assert not any(m.training for m in organ_seg.network.modules())


def test_batched_and_sequential_samples_agree_in_kind(organ_seg, phantom_volume_small) -> None:
    image = organ_seg.prepare(phantom_volume_small).image
    for batch_size in (None, 1):
        samples, kinds = draw_samples(organ_seg.probabilities, organ_seg.network, image, organ_seg.geometry,
                                      mc_dropout_samples=3, tta_flips=("x", "z"), batch_size=batch_size)
        assert samples.shape[0] == 5 and kinds == ["mc-dropout"] * 3 + ["tta:flip-x", "tta:flip-z"]


def test_flips_of_a_symmetric_model_are_identical() -> None:
    model = threshold_model()
    volume, _ = sphere_volume((20, 40, 40), (3.0, 1.5, 1.5), np.eye(3))
    result = model.predict(volume, tta_flips=("x", "y", "z"))
    samples = result.uncertainty
    assert samples is not None and samples.kinds == ["tta:flip-x", "tta:flip-y", "tta:flip-z"]
    deterministic = model.probabilities(model.prepare(volume).image)[0].numpy().astype(np.float16)
    for sample in samples.probabilities:
        assert np.array_equal(sample, deterministic)


def test_flips_are_aligned_with_the_unflipped_prediction(organ_seg, phantom_volume_small) -> None:
    """The demo model never saw mirrored anatomy, so a flipped sample differs; but it is
    flipped back: it overlaps the unflipped mask better than its own mirror image does."""
    samples = organ_seg.predict(phantom_volume_small, tta_flips=("x",)).uncertainty
    assert samples is not None
    reference = samples.mask[0]
    aligned = samples.probabilities[0, 0].astype(np.float32) >= 0.5
    mirrored = np.flip(aligned, 2)  # demo working axes: z, y, x; the liver sits on the right
    assert dice(aligned, reference) > dice(mirrored, reference) + 0.15


def test_model_without_dropout_gives_no_mc_samples() -> None:
    model = threshold_model()
    volume, _ = sphere_volume((10, 20, 20), (3.0, 3.0, 3.0), np.eye(3))
    assert model.predict(volume, mc_dropout_samples=4).uncertainty is None


def test_unknown_flip_is_a_model_error() -> None:
    model = threshold_model()
    volume, _ = sphere_volume((10, 20, 20), (3.0, 3.0, 3.0), np.eye(3))
    with pytest.raises(ModelError, match="'w'"):
        model.predict(volume, tta_flips=("w",))


def test_mc_dropout_context_restores_modes() -> None:
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 1, 1), torch.nn.BatchNorm3d(1), torch.nn.Dropout(0.5),
                              torch.nn.AlphaDropout(0.5)).eval()
    x = torch.ones(1, 1, 4, 4, 4)
    with torch.no_grad():
        before = net(x)
        with mc_dropout(net) as active:
            assert active == 2 and not net[1].training
            assert net[3].training  # no portable form: the device's generator, seeded
            assert not torch.equal(net(x), before)
        assert torch.equal(net(x), before)
    assert not any(m.training for m in net.modules())
    assert "forward" not in net[2].__dict__


def test_mc_dropout_masks_are_drawn_on_the_cpu_from_the_fixed_seed() -> None:
    """The masks come from a CPU generator in call order, element-wise or per feature map, so a
    GPU draws the same ones (tests/inference/test_cuda.py compares the devices where there is one)."""
    net = torch.nn.Sequential(torch.nn.Dropout(0.25), torch.nn.Dropout3d(0.5)).eval()
    x = torch.randn(3, 4, 2, 5, 5)
    torch.manual_seed(99)
    with torch.no_grad(), mc_dropout(net):
        out = net(x)
    generator = torch.Generator().manual_seed(MC_DROPOUT_SEED)
    first = (torch.rand(x.shape, generator=generator) >= 0.25).float() / 0.75
    second = (torch.rand((3, 4, 1, 1, 1), generator=generator) >= 0.5).float() / 0.5
    assert torch.allclose(out, x * first * second)
    assert 0 < int((second == 0).sum()) < 12  # whole channels dropped, not all of them
    with torch.no_grad(), mc_dropout(net):
        assert torch.equal(net(x), out)  # same seed, same samples, whatever the global RNG did


def test_mc_dropout_samples_are_reproducible_and_leave_the_global_rng_alone() -> None:
    import torch

    from pacs_sentinel.inference.models import load_segmentation_model
    from pacs_sentinel.inference.phantoms import make_ct_phantom
    from pacs_sentinel.inference.training import phantom_volume

    model = load_segmentation_model("demo:organ-seg")
    volume = phantom_volume(make_ct_phantom(3, shape=(24, 64, 64)))
    torch.manual_seed(1)
    first = model.predict(volume, mc_dropout_samples=3).uncertainty
    after_first = torch.rand(1)
    torch.manual_seed(1)
    second = model.predict(volume, mc_dropout_samples=3).uncertainty
    assert first is not None and second is not None
    assert (first.probabilities == second.probabilities).all()
    assert torch.equal(torch.rand(1), after_first)  # the caller's random stream is untouched
