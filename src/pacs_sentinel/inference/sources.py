"""Where segmentation models come from: demo models, MONAI bundles and TorchScript files.

A model spec (``[[pipelines]].model``) names one of:

``demo:<name>``
    A demo model shipped in ``inference/demo_models/<name>/`` (a *card folder*).
A card folder
    ``card.json`` (the product's model card: ``architecture`` of the demo U-Net, ``spacing_mm``,
    ``intensity_window``, ``roi_size``, optional ``orientation`` (default ``"SPL"``), ``labels``,
    ``reference``) and ``model.pt`` (its ``state_dict``).
A MONAI bundle folder
    ``configs/inference.json`` (or ``.yaml``), ``configs/metadata.json`` and
    ``models/model.pt`` (a ``state_dict`` of ``network_def``) or ``models/model.ts``
    (TorchScript). Read as MONAI reads it (:class:`monai.bundle.ConfigParser`): the network is
    ``network_def``; the orientation comes from an ``Orientationd`` transform's ``axcodes``, the
    spacing from ``Spacingd``'s ``pixdim``, the intensity window from ``ScaleIntensityRanged``
    (``a_min``, ``a_max``, ``b_min``, ``b_max``, ``clip``) in ``preprocessing``; the window size
    and overlap from the ``inferer``'s ``roi_size``, ``sw_batch_size`` and ``overlap``; sigmoid
    instead of softmax when ``postprocessing`` has ``Activationsd`` with ``sigmoid: true``.
    Labels are ``metadata.json``'s ``network_data_format.outputs.pred.channel_def``. A plain
    bundle has no SNOMED codes: each label is coded SCT 91723000 "Anatomical Structure" /
    SCT 123037004 "Body structure" with the channel name as segment name, unless
    ``metadata.json`` has a ``sentinel`` block with ``labels`` (and ``reference``) in the
    sidecar format below.
A TorchScript file (``*.ts``, ``*.pt``, ``*.pth``) with a sidecar JSON of the same stem
    (``model.ts`` + ``model.json``).

Sidecar JSON of a TorchScript model (``model.ts`` -> ``model.json``)::

    {
      "name": "spleen-ct",                 # required
      "version": "0.3.1",                  # required
      "orientation": "RAS",                # axis codes of the network's array axes; default "RAS"
      "spacing_mm": [1.5, 1.5, 2.0],       # required, along those axes
      "intensity_window": [-57, 164],      # input range (HU) scaled to intensity_range; optional
      "intensity_range": [0.0, 1.0],       # optional, default [0, 1]
      "clip": true,                        # optional, default true
      "roi_size": [96, 96, 96],            # required, sliding-window size along the axes
      "sw_batch_size": 1,                  # optional
      "sw_overlap": 0.25,                  # optional default overlap
      "activation": "softmax",             # "softmax" (channel 0 = background) or "sigmoid"
      "labels": [                          # required, one per foreground label
        {"name": "Spleen",
         "channel": 1,                     # optional; default i + 1 (softmax) or i (sigmoid)
         "property_category": ["91723000", "SCT", "Anatomical Structure"],
         "property_type": ["78961009", "SCT", "Spleen"],
         "tracking_id": "spleen"}          # optional; default: the name in lower case
      ],
      "reference": {"Spleen": {"volume_ml_p01": 80.0, "volume_ml_p99": 420.0}}   # optional
    }

Every failure to find, parse or load a model is a :class:`~pacs_sentinel.errors.ModelError`
whose message names the offending path.
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pacs_sentinel.errors import ModelError
from pacs_sentinel.inference.preprocess import ModelGeometry
from pacs_sentinel.results import Code, SegmentLabel

#: Folder of the demo models shipped with the package, one sub-folder per model name.
DEMO_MODELS_DIR = Path(__file__).parent / "demo_models"
WEIGHTS_FILE = "model.pt"
CARD_FILE = "card.json"
#: Orientation of a card folder's network when its card does not say: the demo models' axes
#: run inferior->superior, anterior->posterior, right->left (axial DICOM order).
CARD_DEFAULT_ORIENTATION = "SPL"

#: Coding of a label whose source gives no SNOMED codes (plain MONAI bundle).
GENERIC_CATEGORY = Code("91723000", "SCT", "Anatomical Structure")
GENERIC_TYPE = Code("123037004", "SCT", "Body structure")



@dataclass
class ModelDefinition:
    """Everything needed to run a model, whatever its source.

    Attributes:
        name: Model name.
        version: Version of the weights.
        labels: One label per foreground output.
        channels: Output channel of each label.
        geometry: What the network expects (orientation, spacing, window, ...).
        network: The loaded ``torch`` module (CPU, eval mode).
        card: A card-like dict describing the model (the demo ``card.json`` as is).
        reference: Reference statistics per label name, for QC.
        source: ``"card"``, ``"bundle"`` or ``"torchscript"``.
        path: The resolved file or folder the model was read from.
    """

    name: str
    version: str
    labels: list[SegmentLabel]
    channels: list[int]
    geometry: ModelGeometry
    network: torch.nn.Module
    card: dict[str, Any]
    reference: dict[str, dict[str, float]] = field(default_factory=dict)
    source: str = "card"
    path: Path = Path()


def resolve_spec(spec: str) -> Path:
    """The file or folder a spec names: ``demo:<name>`` is a shipped demo model, else a path.

    Raises:
        ModelError: Unknown demo name, or a path that does not exist.
    """
    if spec.startswith("demo:"):
        name = spec.removeprefix("demo:")
        known = sorted(p.name for p in DEMO_MODELS_DIR.iterdir() if p.is_dir()) if DEMO_MODELS_DIR.is_dir() else []
        if name not in known:
            raise ModelError(f"unknown demo model {spec!r}; known demo models: {', '.join(known) or 'none'}")
        return DEMO_MODELS_DIR / name
    path = Path(spec).expanduser()
    if not path.exists():
        raise ModelError(f"model {spec}: {path} does not exist")
    return path.resolve()


def load_definition(spec: str) -> ModelDefinition:
    """Read the model a spec names onto the CPU (not cached; see ``load_segmentation_model``).

    Raises:
        ModelError: With the offending path: unknown or missing source, unreadable or invalid
            configuration, sidecar or card, weights missing or not fitting the network.
    """
    path = resolve_spec(spec)
    if path.is_file():
        return load_torchscript(path)
    if (path / "configs").is_dir():
        return load_bundle(path)
    if (path / CARD_FILE).is_file() or (path / WEIGHTS_FILE).is_file():
        return load_card_folder(path, spec=spec)
    raise ModelError(
        f"model {spec}: {path} is neither a MONAI bundle (configs/inference.json), a model card folder "
        f"({CARD_FILE} + {WEIGHTS_FILE}) nor a TorchScript file"
    )


# --------------------------------------------------------------------------- helpers


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "segment"


def _code(value: Any, what: str) -> Code:
    if not (isinstance(value, (list, tuple)) and len(value) == 3 and all(isinstance(v, str) for v in value)):
        raise ValueError(f"{what} must be [value, scheme, meaning], found {value!r}")
    return Code(*value)


def labels_from_entries(entries: Any, activation: str) -> tuple[list[SegmentLabel], list[int]]:
    """Labels and output channels from ``labels`` entries (card, sidecar, ``sentinel`` block).

    Raises:
        ValueError: A malformed entry (the message names it).
    """
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"labels must be a non-empty list, found {entries!r}")
    labels, channels = [], []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or "name" not in entry:
            raise ValueError(f"labels[{i}] must be an object with a name, found {entry!r}")
        labels.append(SegmentLabel(
            name=str(entry["name"]),
            property_category=(_code(entry["property_category"], f"labels[{i}].property_category")
                               if "property_category" in entry else GENERIC_CATEGORY),
            property_type=(_code(entry["property_type"], f"labels[{i}].property_type")
                           if "property_type" in entry else GENERIC_TYPE),
            tracking_id=str(entry.get("tracking_id", _slug(str(entry["name"])))),
        ))
        channels.append(int(entry.get("channel", i + 1 if activation == "softmax" else i)))
    return labels, channels


def _triple(value: Any, what: str, kind: type = float) -> tuple:
    if isinstance(value, (int, float)):
        value = [value] * 3
    if not isinstance(value, (list, tuple)) or len(value) != 3:
        raise ValueError(f"{what} must have three values, found {value!r}")
    return tuple(kind(v) for v in value)


def _load_state_dict(network: torch.nn.Module, weights: Path, what: str) -> None:
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        network.load_state_dict(state)
    except Exception as exc:  # torch raises many types for a corrupt or mismatched file
        raise ModelError(f"model {what}: cannot load weights {weights}: {exc}") from exc


def _load_torchscript_module(path: Path, what: str) -> torch.nn.Module:
    try:
        with warnings.catch_warnings():  # torch 2.x deprecates TorchScript, still the format models ship in
            warnings.simplefilter("ignore", DeprecationWarning)
            return torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:  # torch raises many types for a file that is not TorchScript
        raise ModelError(f"model {what}: cannot load TorchScript {path}: {exc}") from exc


# --------------------------------------------------------------------------- card folder


def card_folder_files(folder: Path, spec: str | None = None) -> tuple[Path, Path]:
    """The ``card.json`` and ``model.pt`` of a card folder (demo model or our own layout).

    Raises:
        ModelError: One of them is missing; the message names the spec and the path, and for
            a shipped demo model says how to recreate the weights.
    """
    what = spec or str(folder)
    card_path, weights_path = Path(folder) / CARD_FILE, Path(folder) / WEIGHTS_FILE
    if not card_path.is_file():
        raise ModelError(f"model {what}: no model card at {card_path}")
    if not weights_path.is_file():
        hint = f" (run `sentinel train-demo {Path(folder).name}`)" if spec and spec.startswith("demo:") else ""
        raise ModelError(f"model {what}: no weights at {weights_path}{hint}")
    return card_path, weights_path


def load_card_folder(folder: Path, *, spec: str | None = None) -> ModelDefinition:
    """Load a card folder (``card.json`` + ``model.pt`` of the demo U-Net architecture).

    Raises:
        ModelError: Missing or invalid card, missing or mismatched weights.
    """
    from pacs_sentinel.inference.models import build_demo_unet  # the architecture lives with the model

    what = spec or str(folder)
    card_path, weights_path = card_folder_files(folder, spec)
    try:
        card = _read_json(card_path)
        for key in ("spacing_mm", "intensity_window", "roi_size", "version", "name", "labels", "architecture"):
            if key not in card:
                raise KeyError(key)
        geometry = ModelGeometry(
            axcodes=str(card.get("orientation", CARD_DEFAULT_ORIENTATION)),
            spacing_mm=_triple(card["spacing_mm"], "spacing_mm"),
            intensity_window=tuple(float(v) for v in card["intensity_window"]),  # type: ignore[arg-type]
            roi_size=_triple(card["roi_size"], "roi_size", int),
            sw_batch_size=int(card.get("sw_batch_size", 1)),
            sw_overlap=float(card.get("sw_overlap", 0.25)),
        )
        labels, channels = labels_from_entries(card["labels"], geometry.activation)
        network = build_demo_unet(**card["architecture"])
    except ModelError as exc:
        raise ModelError(f"model {what}: invalid model card: {exc}") from exc
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"model {what}: invalid model card {card_path}: {exc!r}") from exc
    _load_state_dict(network, weights_path, what)
    return ModelDefinition(name=str(card["name"]), version=str(card["version"]), labels=labels, channels=channels,
                           geometry=geometry, network=network.eval(), card=card,
                           reference={k: dict(v) for k, v in card.get("reference", {}).items()},
                           source="card", path=folder)


# --------------------------------------------------------------------------- TorchScript + sidecar


def load_torchscript(path: Path) -> ModelDefinition:
    """Load a TorchScript file and its sidecar JSON (``<stem>.json``, schema in the module docstring).

    Raises:
        ModelError: Missing or invalid sidecar, or a file TorchScript cannot load.
    """
    sidecar_path = path.with_suffix(".json")
    if not sidecar_path.is_file():
        raise ModelError(f"model {path}: no sidecar JSON at {sidecar_path} (spacing, orientation, labels)")
    sidecar = _read_json(sidecar_path)
    try:
        for key in ("name", "version", "spacing_mm", "roi_size", "labels"):
            if key not in sidecar:
                raise KeyError(key)
        window = sidecar.get("intensity_window")
        geometry = ModelGeometry(
            axcodes=str(sidecar.get("orientation", "RAS")),
            spacing_mm=_triple(sidecar["spacing_mm"], "spacing_mm"),
            intensity_window=None if window is None else (float(window[0]), float(window[1])),
            intensity_range=tuple(float(v) for v in sidecar.get("intensity_range", (0.0, 1.0))),  # type: ignore[arg-type]
            clip=bool(sidecar.get("clip", True)),
            roi_size=_triple(sidecar["roi_size"], "roi_size", int),
            sw_batch_size=int(sidecar.get("sw_batch_size", 1)),
            sw_overlap=float(sidecar.get("sw_overlap", 0.25)),
            activation=str(sidecar.get("activation", "softmax")),
        )
        labels, channels = labels_from_entries(sidecar["labels"], geometry.activation)
        reference = {str(k): {str(s): float(v) for s, v in stats.items()} for k, stats in sidecar.get("reference", {}).items()}
    except (ValueError, KeyError, TypeError, AttributeError, IndexError) as exc:
        raise ModelError(f"model {path}: invalid sidecar {sidecar_path}: {exc!r}") from exc
    network = _load_torchscript_module(path, str(path))
    card = {"name": str(sidecar["name"]), "version": str(sidecar["version"]), "source": "torchscript", **sidecar}
    return ModelDefinition(name=str(sidecar["name"]), version=str(sidecar["version"]), labels=labels,
                           channels=channels, geometry=geometry, network=network.eval(), card=card,
                           reference=reference, source="torchscript", path=path)


# --------------------------------------------------------------------------- MONAI bundle


def _find_transforms(config: Any, prefix: str) -> list[tuple[str, str]]:
    """``(id, target name)`` of every ``_target_`` object under a raw bundle config section."""
    found: list[tuple[str, str]] = []
    if isinstance(config, dict):
        target = config.get("_target_")
        if isinstance(target, str):
            found.append((prefix, target.rsplit(".", 1)[-1]))
        for key, value in config.items():
            found.extend(_find_transforms(value, f"{prefix}#{key}"))
    elif isinstance(config, list):
        for i, value in enumerate(config):
            found.extend(_find_transforms(value, f"{prefix}#{i}"))
    return found


def load_bundle(folder: Path) -> ModelDefinition:
    """Load a MONAI bundle folder the way MONAI reads it (:class:`monai.bundle.ConfigParser`).

    Raises:
        ModelError: Missing config, metadata or weights; a config MONAI cannot parse; weights
            that do not fit ``network_def``.
    """
    from monai.bundle import ConfigParser

    configs = folder / "configs"
    config_path = next((configs / n for n in ("inference.json", "inference.yaml", "inference.yml")
                        if (configs / n).is_file()), None)
    if config_path is None:
        raise ModelError(f"model {folder}: MONAI bundle without {configs / 'inference.json'} (or .yaml)")
    metadata_path = configs / "metadata.json"
    if not metadata_path.is_file():
        raise ModelError(f"model {folder}: MONAI bundle without {metadata_path}")
    weights = next((folder / "models" / n for n in ("model.pt", "model.ts") if (folder / "models" / n).is_file()), None)
    if weights is None:
        raise ModelError(f"model {folder}: MONAI bundle without weights ({folder / 'models' / 'model.pt'} or model.ts)")
    metadata = _read_json(metadata_path)
    parser = ConfigParser()
    try:
        parser.read_meta(str(metadata_path))
        parser.read_config(str(config_path))
        parser["bundle_root"] = str(folder)
    except Exception as exc:  # JSON/YAML errors, a missing YAML reader...
        raise ModelError(f"model {folder}: cannot read bundle config {config_path}: {exc}") from exc

    def parsed(id_: str) -> Any:
        try:
            return parser.get_parsed_content(id_, instantiate=True)
        except Exception as exc:  # ConfigParser raises many types for a bad expression or target
            raise ModelError(f"model {folder}: cannot evaluate {id_!r} in {config_path}: {exc}") from exc

    try:
        axcodes, spacing, window, out_range, clip = "RAS", None, None, (0.0, 1.0), True
        for id_, target in _find_transforms(parser.get("preprocessing", {}), "preprocessing"):
            if target in ("Orientationd", "Orientation"):
                axcodes = str(parsed(f"{id_}#axcodes"))
            elif target in ("Spacingd", "Spacing"):
                spacing = _triple(parsed(f"{id_}#pixdim"), f"{id_}#pixdim")
            elif target in ("ScaleIntensityRanged", "ScaleIntensityRange"):
                window = (float(parsed(f"{id_}#a_min")), float(parsed(f"{id_}#a_max")))
                raw = parser.get(id_)
                out_range = (float(parsed(f"{id_}#b_min")) if "b_min" in raw else 0.0,
                             float(parsed(f"{id_}#b_max")) if "b_max" in raw else 1.0)
                clip = bool(parsed(f"{id_}#clip")) if "clip" in raw else False
        activation = "softmax"
        for id_, target in _find_transforms(parser.get("postprocessing", {}), "postprocessing"):
            if target in ("Activationsd", "Activations") and "sigmoid" in parser.get(id_) and parsed(f"{id_}#sigmoid"):
                activation = "sigmoid"
        inferer = parser.get("inferer", {}) or {}
        if "roi_size" not in inferer:
            raise ModelError(f"model {folder}: {config_path} has no inferer#roi_size (a SlidingWindowInferer)")
        geometry = ModelGeometry(
            axcodes=axcodes,
            spacing_mm=spacing or (1.0, 1.0, 1.0),
            intensity_window=window,
            intensity_range=out_range,
            clip=clip,
            roi_size=_triple(parsed("inferer#roi_size"), "inferer#roi_size", int),
            sw_batch_size=int(parsed("inferer#sw_batch_size")) if "sw_batch_size" in inferer else 1,
            sw_overlap=float(parsed("inferer#overlap")) if "overlap" in inferer else 0.25,
            activation=activation,
        )
        sentinel = metadata.get("sentinel") or {}
        if "labels" in sentinel:
            labels, channels = labels_from_entries(sentinel["labels"], activation)
        else:
            channel_def = metadata["network_data_format"]["outputs"]["pred"]["channel_def"]
            entries = []
            for channel, name in sorted(channel_def.items(), key=lambda kv: int(kv[0])):
                if activation == "softmax" and (int(channel) == 0 or str(name).lower() == "background"):
                    continue
                entries.append({"name": str(name), "channel": int(channel)})
            labels, channels = labels_from_entries(entries, activation)
        reference = {str(k): {str(s): float(v) for s, v in stats.items()}
                     for k, stats in sentinel.get("reference", {}).items()}
    except ModelError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError, IndexError) as exc:
        raise ModelError(f"model {folder}: invalid bundle ({config_path}, {metadata_path}): {exc!r}") from exc

    if weights.suffix == ".ts":
        network = _load_torchscript_module(weights, str(folder))
    else:
        if "network_def" not in parser.get():
            raise ModelError(f"model {folder}: {config_path} has no network_def for the state dict {weights}")
        network = parsed("network_def")
        if not isinstance(network, torch.nn.Module):
            raise ModelError(f"model {folder}: network_def in {config_path} is not a torch module")
        _load_state_dict(network, weights, str(folder))
    name = str(metadata.get("name", folder.name))
    version = str(metadata.get("version", "0"))
    card = {"name": name, "version": version, "source": "monai-bundle", "metadata": metadata,
            "orientation": geometry.axcodes, "spacing_mm": list(geometry.spacing_mm),
            "intensity_window": list(window) if window else None, "roi_size": list(geometry.roi_size)}
    return ModelDefinition(name=name, version=version, labels=labels, channels=channels, geometry=geometry,
                           network=network.eval(), card=card, reference=reference, source="bundle", path=folder)
