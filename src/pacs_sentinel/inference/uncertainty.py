"""Stochastic samples of one prediction for QC: Monte Carlo dropout and test-time flips.

Both kinds are **batched**: the ``N`` dropout samples are ``N`` copies of the input in one
batch (each batch item draws its own dropout mask), and the flipped inputs go through the
network together in another batch. A batch of ``N`` costs less than ``N`` passes because the
per-pass overhead (sliding-window bookkeeping, kernel launches, small-tensor inefficiency) is
paid once; ``bench/inference.py`` measures the speed-up.

Only dropout layers sample; normalisation layers stay in eval mode so the samples differ by
dropout alone. The dropout masks are **the same on every device**: for the standard layers
(``nn.Dropout``, ``nn.Dropout1d/2d/3d``) they are drawn on the CPU from a fixed seed and moved to
the network's device, instead of from the device's own generator (CUDA's differs from the
CPU's, so a GPU would otherwise draw other masks and give the same study another QC score:
``bench/gpu.py`` measured classification QC scores up to 0.71 apart). Other dropout layers
(alpha dropout, TorchScript copies) fall back to the device's generator, seeded the same way.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch

from pacs_sentinel.inference.preprocess import ModelGeometry
from pacs_sentinel.results import UncertaintySamples

#: Patient axes a test-time flip may mirror.
FLIP_AXES = ("x", "y", "z")


def dropout_modules(network: torch.nn.Module) -> list[torch.nn.Module]:
    """The dropout layers of ``network`` (eager ``nn.Dropout*`` or their TorchScript copies)."""
    found = []
    for module in network.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd):
            found.append(module)
        elif isinstance(module, torch.jit.ScriptModule) and "Dropout" in str(getattr(module, "original_name", "")):
            found.append(module)
    return found


#: Seed of the dropout masks: the same study gives the same samples, so the same QC verdict.
MC_DROPOUT_SEED = 20251123


@contextlib.contextmanager
def seeded_dropout() -> Iterator[None]:
    """Draw dropout masks from a fixed seed without disturbing the process's random state."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(MC_DROPOUT_SEED)
        yield


#: Layer type -> number of trailing (spatial) dimensions one mask value covers: channel-wise
#: dropout zeroes whole feature maps. Only these types, with their own ``forward``, sample portably.
PORTABLE_DROPOUT: dict[type, int] = {torch.nn.Dropout: 0, torch.nn.Dropout1d: 1, torch.nn.Dropout2d: 2,
                                     torch.nn.Dropout3d: 3}


def _portable_forward(layer: torch.nn.Module, generator: torch.Generator) -> Callable[[torch.Tensor], torch.Tensor]:
    """A dropout forward whose mask comes from ``generator`` (CPU), whatever device the input is on."""
    spatial = PORTABLE_DROPOUT[type(layer)]
    p = float(layer.p)

    def forward(x: torch.Tensor) -> torch.Tensor:
        if p <= 0.0:
            return x
        if p >= 1.0:
            return x * 0
        shape = tuple(x.shape[:x.dim() - spatial]) + (1,) * spatial if 0 < spatial < x.dim() else tuple(x.shape)
        keep = torch.rand(shape, generator=generator) >= p
        return x * keep.to(device=x.device, dtype=x.dtype) * (1.0 / (1.0 - p))

    return forward


def is_portable(layer: torch.nn.Module) -> bool:
    """Whether ``layer``'s MC dropout masks are drawn device-independently (see the module docs)."""
    kind = type(layer)
    return kind in PORTABLE_DROPOUT and "forward" not in layer.__dict__


@contextlib.contextmanager
def mc_dropout(network: torch.nn.Module) -> Iterator[int]:
    """Make only the dropout layers of ``network`` sample for the duration.

    Masks come from a fixed seed, drawn in call order: a study sent twice gets the same samples
    and therefore the same quality score and verdict, on the CPU and on a GPU alike (standard
    layers; see the module docs for the others).

    Yields:
        How many dropout layers sample (0: the model cannot do MC dropout).
    """
    layers = dropout_modules(network)
    portable = [layer for layer in layers if is_portable(layer)]
    native = [layer for layer in layers if not is_portable(layer)]
    modes = [layer.training for layer in native]
    generator = torch.Generator().manual_seed(MC_DROPOUT_SEED)
    try:
        for layer in portable:
            layer.forward = _portable_forward(layer, generator)  # an instance attribute shadows the method
        for layer in native:
            layer.train(True)
        with seeded_dropout() if native else contextlib.nullcontext():  # portable masks leave the RNG alone
            yield len(layers)
    finally:
        for layer in portable:
            layer.__dict__.pop("forward", None)
        for layer, mode in zip(native, modes):
            layer.train(mode)


def flip_dims(geometry: ModelGeometry, flips: Sequence[str]) -> list[tuple[str, int]]:
    """``(kind, tensor dim)`` of each requested flip on a ``(batch, channel, a, b, c)`` tensor.

    Raises:
        ValueError: A flip that is not ``"x"``, ``"y"`` or ``"z"``.
    """
    out = []
    for axis in flips:
        if axis not in FLIP_AXES:
            raise ValueError(f"unknown test-time flip {axis!r}; expected one of {', '.join(FLIP_AXES)}")
        out.append((f"tta:flip-{axis}", 2 + geometry.array_axis(axis)))
    return out


def draw_samples(
    probabilities: Callable[[torch.Tensor], torch.Tensor],
    network: torch.nn.Module,
    image: torch.Tensor,
    geometry: ModelGeometry,
    *,
    mc_dropout_samples: int,
    tta_flips: Sequence[str],
    batch_size: int | None = None,
) -> tuple[torch.Tensor, list[str]]:
    """Run MC dropout and test-time-flip samples of one input, batched.

    Args:
        probabilities: Maps a ``(batch, 1, *grid)`` input to ``(batch, labels, *grid)``
            probabilities, in whatever mode the network is in.
        network: The module :func:`mc_dropout` switches.
        image: The ``(1, 1, *grid)`` network input.
        geometry: Maps flip axes to array axes.
        mc_dropout_samples: Number of dropout samples (0: none; also none when the network
            has no dropout layer).
        tta_flips: Patient axes to mirror, one sample each.
        batch_size: Samples per forward pass; default all of a kind in one pass (1 gives
            the sequential baseline the benchmark compares with).

    Returns:
        ``(samples, labels, *grid)`` probabilities (flipped samples flipped back, so every
        sample is aligned with the unflipped input) and the kind of each sample.
    """
    chunks: list[torch.Tensor] = []
    kinds: list[str] = []
    if mc_dropout_samples > 0:
        with mc_dropout(network) as active:
            if active:
                step = batch_size or mc_dropout_samples
                for start in range(0, mc_dropout_samples, step):
                    n = min(step, mc_dropout_samples - start)
                    chunks.append(probabilities(image.expand(n, *image.shape[1:])))
                    kinds.extend(["mc-dropout"] * n)
    flips = flip_dims(geometry, tta_flips)
    if flips:
        step = batch_size or len(flips)
        for start in range(0, len(flips), step):
            group = flips[start:start + step]
            batch = torch.cat([torch.flip(image, dims=(dim,)) for _, dim in group])
            out = probabilities(batch)
            chunks.extend(torch.flip(out[i:i + 1], dims=(dim,)) for i, (_, dim) in enumerate(group))
            kinds.extend(kind for kind, _ in group)
    if not chunks:
        return image.new_zeros((0,)), []
    return torch.cat(chunks), kinds


def as_uncertainty(samples: torch.Tensor, kinds: list[str], deterministic: torch.Tensor, threshold: float,
                   spacing_mm: tuple[float, float, float], seconds: float) -> UncertaintySamples:
    """Package samples for QC: float16-rounded maps and the thresholded deterministic mask (working grid).

    The maps keep float16 precision but are handed over as float32: numpy has no vectorized
    float16 arithmetic, and the QC's thresholds and means on float16 arrays cost more than
    the rest of its uncertainty signals (the values, and so the signals, are the same).
    """
    return UncertaintySamples(
        probabilities=samples.to(torch.float16).to(torch.float32).cpu().numpy(),
        kinds=list(kinds),
        mask=(deterministic >= threshold).cpu().numpy().astype(bool),
        spacing=(float(spacing_mm[0]), float(spacing_mm[1]), float(spacing_mm[2])),
        seconds=float(seconds),
    )
