"""The models on a CUDA device give what they give on the CPU: masks, probabilities, MC dropout
samples and therefore QC scores and verdicts (bench/gpu.py measures the speed).

These tests need a CUDA device and skip without one, CI included: the CI machines have no GPU.
They were run on an NVIDIA H100 (see docs/benchmarks.md, "GPU").
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pacs_sentinel.inference.classification import load_classification_model
from pacs_sentinel.inference.models import load_segmentation_model
from pacs_sentinel.inference.phantoms import make_ct_phantom
from pacs_sentinel.inference.radiographs import make_cxr_phantom
from pacs_sentinel.inference.training import phantom_volume
from pacs_sentinel.qc.classification import evaluate_classification
from pacs_sentinel.qc.evaluate import evaluate_segmentation

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")


@pytest.mark.parametrize("amp", [False, True], ids=["float32", "autocast-float16"])
def test_segmentation_and_its_qc_match_the_cpu(amp: bool) -> None:
    volume = phantom_volume(make_ct_phantom(11, shape=(32, 96, 96), spacing=(7.5, 4.2, 4.2)))
    cpu = load_segmentation_model("demo:organ-seg", device="cpu").predict(volume, mc_dropout_samples=4)
    gpu = load_segmentation_model("demo:organ-seg", device="cuda").with_mixed_precision(amp).predict(
        volume, mc_dropout_samples=4)
    assert np.abs(gpu.probabilities - cpu.probabilities).max() < (1e-2 if amp else 1e-3)
    changed = np.logical_xor(gpu.mask, cpu.mask).sum() / max(int(cpu.mask.sum()), 1)
    assert changed < 1e-3
    assert cpu.uncertainty is not None and gpu.uncertainty is not None
    cpu_qc, gpu_qc = evaluate_segmentation(volume, cpu), evaluate_segmentation(volume, gpu)
    for a, b in zip(cpu_qc.segments, gpu_qc.segments):
        assert b.verdict == a.verdict
        assert abs(b.quality_score - a.quality_score) < 0.01
        assert abs(b.signals["sample_dice"] - a.signals["sample_dice"]) < 0.01


@pytest.mark.parametrize("amp", [False, True], ids=["float32", "autocast-float16"])
def test_classification_samples_and_qc_match_the_cpu(amp: bool) -> None:
    cpu_model = load_classification_model("demo:cxr-cls", device="cpu")
    gpu_model = load_classification_model("demo:cxr-cls", device="cuda", mixed_precision=amp)
    for seed in range(90000, 90012):
        image = make_cxr_phantom(seed).image
        cpu = cpu_model.predict(image, mc_dropout_samples=8, tta_flips=("x",), gradcam=False)
        gpu = gpu_model.predict(image, mc_dropout_samples=8, tta_flips=("x",), gradcam=False)
        assert np.abs(gpu.samples - cpu.samples).max() < (1e-2 if amp else 1e-3)
        cpu_qc = evaluate_classification(cpu, image=image)
        gpu_qc = evaluate_classification(gpu, image=image)
        for a, b in zip(cpu_qc.findings, gpu_qc.findings):
            assert b.verdict == a.verdict and abs(b.quality_score - a.quality_score) < 0.02
