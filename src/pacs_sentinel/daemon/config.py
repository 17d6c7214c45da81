"""Load ``config.toml`` and validate it into typed objects.

Every problem is reported with the dotted name of the key it concerns
(``node.port: Input should be a valid integer``), and unknown keys are errors, so that a
typo in a hospital's configuration is caught by ``sentinel check-config`` and not by the
first study of the night.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from pacs_sentinel.errors import ConfigError

AE_TITLE_MAX = 16


def _check_ae_title(value: str) -> str:
    if not value or len(value) > AE_TITLE_MAX or not value.isascii() or "\\" in value or value != value.strip():
        raise ValueError(f"{value!r} is not a valid AE title (1-16 ASCII characters, no backslash, no padding)")
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class NodeConfig(_Strict):
    """``[node]``: who we are on the network and where we keep our data."""

    ae_title: str = "SENTINEL"
    host: str = "127.0.0.1"
    port: int = Field(11112, ge=1, le=65535)
    data_dir: Path = Path("var")
    max_associations: int = Field(10, ge=1)
    acse_timeout: float = Field(30.0, gt=0)
    dimse_timeout: float = Field(60.0, gt=0)
    network_timeout: float = Field(60.0, gt=0)

    _ae = field_validator("ae_title")(_check_ae_title)

    @field_validator("data_dir", mode="before")
    @classmethod
    def _path(cls, value: Any) -> Any:
        if isinstance(value, str):
            return Path(value)
        return value


class StudyConfig(_Strict):
    """``[study]``: when a study counts as complete."""

    quiet_seconds: float = Field(10.0, gt=0)


class DestinationConfig(_Strict):
    """``[[destinations]]``: a DICOM node that receives our results."""

    name: str
    ae_title: str
    host: str
    port: int = Field(ge=1, le=65535)

    _ae = field_validator("ae_title")(_check_ae_title)


class PipelineConfig(_Strict):
    """``[[pipelines]]``: which series go to which model."""

    name: str
    kind: Literal["segmentation", "classification", "seg-qc"] = "segmentation"
    model: str
    match: dict[str, list[str]] = Field(default_factory=lambda: {"Modality": ["CT"]})
    threshold: float = Field(0.5, gt=0, lt=1)
    min_slices: int = Field(8, ge=1)
    series_number_base: int = Field(900, ge=1)

    @field_validator("match")
    @classmethod
    def _known_attributes(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        from pydicom.datadict import tag_for_keyword

        for keyword in value:
            if tag_for_keyword(keyword) is None:
                raise ValueError(f"{keyword!r} is not a DICOM attribute keyword")
        return value


class QCConfig(_Strict):
    """``[qc]``: the verdict threshold on the quality score."""

    accept_threshold: float = Field(0.5, ge=0, le=1)


class OutboxConfig(_Strict):
    """``[outbox]``: retries of results a destination has not acknowledged yet."""

    retry_initial_seconds: float = Field(10.0, gt=0)
    retry_max_seconds: float = Field(600.0, gt=0)
    max_attempts: int = Field(50, ge=1)


class InferenceConfig(_Strict):
    """``[inference]``: where models run."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int = Field(0, ge=0)


class LoggingConfig(_Strict):
    """``[logging]``: how the daemon logs."""

    format: Literal["console", "json"] = "console"
    level: Literal["debug", "info", "warning", "error"] = "info"


class Config(_Strict):
    """The whole configuration file."""

    node: NodeConfig = NodeConfig()
    study: StudyConfig = StudyConfig()
    destinations: list[DestinationConfig] = Field(default_factory=list)
    pipelines: list[PipelineConfig] = Field(default_factory=list)
    qc: QCConfig = QCConfig()
    outbox: OutboxConfig = OutboxConfig()
    inference: InferenceConfig = InferenceConfig()
    logging: LoggingConfig = LoggingConfig()

    @field_validator("pipelines")
    @classmethod
    def _unique_pipeline_names(cls, value: list[PipelineConfig]) -> list[PipelineConfig]:
        names = [p.name for p in value]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"pipeline names must be unique, repeated: {', '.join(duplicates)}")
        return value

    @field_validator("destinations")
    @classmethod
    def _unique_destination_names(cls, value: list[DestinationConfig]) -> list[DestinationConfig]:
        names = [d.name for d in value]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"destination names must be unique, repeated: {', '.join(duplicates)}")
        return value


def _dotted(location: tuple[int | str, ...]) -> str:
    parts: list[str] = []
    for item in location:
        if isinstance(item, int):
            parts[-1 if parts else 0 :] = [f"{parts[-1]}[{item}]" if parts else f"[{item}]"]
        else:
            parts.append(str(item))
    return ".".join(parts) or "(top level)"


def _messages(error: ValidationError) -> list[str]:
    problems = []
    for item in error.errors():
        key = _dotted(tuple(item["loc"]))
        if item["type"] == "extra_forbidden":
            problems.append(f"{key}: unknown key")
        else:
            problems.append(f"{key}: {item['msg']}")
    return problems


def parse_config(data: dict[str, Any], *, base_dir: Path | None = None) -> Config:
    """Validate a parsed TOML document.

    Args:
        data: The TOML document as a dict.
        base_dir: Relative ``node.data_dir`` paths are resolved against this folder.

    Returns:
        The typed configuration.

    Raises:
        ConfigError: With one message per problem, each naming its dotted key.
    """
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_messages(exc)) from None
    if base_dir is not None and not config.node.data_dir.is_absolute():
        node = config.node.model_copy(update={"data_dir": (base_dir / config.node.data_dir).resolve()})
        config = config.model_copy(update={"node": node})
    return config


def load_config(path: Path | str) -> Config:
    """Read and validate a configuration file (relative paths are relative to the file).

    Raises:
        ConfigError: The file is missing, is not valid TOML, or does not validate.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read configuration file: {exc.strerror}"]) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: not valid TOML: {exc}"]) from None
    return parse_config(data, base_dir=path.resolve().parent)


def default_config_text() -> str:
    """The embedded default configuration (the repository's ``config.toml``)."""
    from importlib.resources import files

    return files("pacs_sentinel.daemon").joinpath("default_config.toml").read_text(encoding="utf-8")
