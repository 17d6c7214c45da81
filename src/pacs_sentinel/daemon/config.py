"""Load ``config.toml`` and validate it into typed objects.

Every problem is reported with the dotted name of the key it concerns
(``node.port: Input should be a valid integer``), and unknown keys are errors, so that a
typo in a hospital's configuration is caught by ``sentinel check-config`` and not by the
first study of the night.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pacs_sentinel.errors import ConfigError

if TYPE_CHECKING:
    from pacs_sentinel.dicom_io.scp import TlsSettings

AE_TITLE_MAX = 16


def _check_ae_title(value: str) -> str:
    if not value or len(value) > AE_TITLE_MAX or not value.isascii() or "\\" in value or value != value.strip():
        raise ValueError(f"{value!r} is not a valid AE title (1-16 ASCII characters, no backslash, no padding)")
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class AllowedPeer(_Strict):
    """``[[node.allowed_peers]]``: a caller allowed to associate with us."""

    ae_title: str
    host: str | None = None

    _ae = field_validator("ae_title")(_check_ae_title)


class TlsConfig(_Strict):
    """``[node.tls]``: DICOM over TLS for the listener (absent: plain TCP)."""

    cert_file: Path
    key_file: Path
    ca_file: Path | None = None
    require_client_cert: bool = False

    @field_validator("cert_file", "key_file", "ca_file", mode="before")
    @classmethod
    def _path(cls, value: Any) -> Any:
        return Path(value) if isinstance(value, str) else value

    def settings(self) -> TlsSettings:
        """The listener's :class:`~pacs_sentinel.dicom_io.scp.TlsSettings` of these keys."""
        from pacs_sentinel.dicom_io.scp import TlsSettings  # the DICOM stack only when TLS is used

        return TlsSettings(self.cert_file, self.key_file, self.ca_file, self.require_client_cert)

    @model_validator(mode="after")
    def _client_certs_need_a_ca(self) -> TlsConfig:
        if self.require_client_cert and self.ca_file is None:
            raise ValueError("require_client_cert = true needs ca_file (the CA that signs client certificates)")
        return self


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
    max_pdu_size: int = Field(262144, ge=0)
    min_free_disk_mb: int = Field(1024, ge=0)
    fsync: Literal["always", "never"] = "always"
    receive_processes: int = Field(1, ge=1, le=32)
    allowed_peers: list[AllowedPeer] = Field(default_factory=list)
    tls: TlsConfig | None = None

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
    quiet_seconds_by_calling_ae: dict[str, float] = Field(default_factory=dict)
    max_wait_seconds: float = Field(1800.0, gt=0)
    late_arrival: Literal["rerun", "ignore"] = "rerun"

    @field_validator("quiet_seconds_by_calling_ae")
    @classmethod
    def _positive(cls, value: dict[str, float]) -> dict[str, float]:
        for ae_title, seconds in value.items():
            _check_ae_title(ae_title)
            if seconds <= 0:
                raise ValueError(f"quiet seconds for {ae_title!r} must be greater than 0, got {seconds}")
        return value


class DestinationConfig(_Strict):
    """``[[destinations]]``: a DICOM node that receives our results."""

    name: str
    ae_title: str
    host: str
    port: int = Field(ge=1, le=65535)

    _ae = field_validator("ae_title")(_check_ae_title)


class PipelineReportsConfig(_Strict):
    """``[pipelines.reports]``: what is sent for a result that needs review."""

    on_review: Literal["send", "withhold-seg"] = "send"


class PipelineConfig(_Strict):
    """``[[pipelines]]``: which series go to which model.

    A ``seg-qc`` pipeline runs no model of its own: it judges the SEGs other systems send
    (``match`` selects the image series they reference). Its ``agreement_model``, or else the
    model of every ``segmentation`` pipeline whose labels match a segment's code, supplies the
    label statistics and, with ``agreement = true``, the prediction the agreement signal
    compares the segment with.
    """

    name: str
    kind: Literal["segmentation", "classification", "seg-qc"] = "segmentation"
    model: str | None = None
    agreement_model: str | None = None
    agreement: bool = True
    match: dict[str, list[str]] = Field(default_factory=lambda: {"Modality": ["CT"]})
    match_regex: dict[str, str] = Field(default_factory=dict)
    series_selection: Literal["most-images", "thinnest", "thinnest-axial"] = "most-images"
    threshold: float = Field(0.5, gt=0, lt=1)
    mc_dropout_samples: int = Field(4, ge=0, le=64)
    tta_flips: list[Literal["x", "y", "z"]] = Field(default_factory=list)
    sw_overlap: float = Field(0.25, ge=0, lt=1)
    min_slices: int = Field(8, ge=1)
    series_number_base: int = Field(900, ge=1)
    reports: PipelineReportsConfig = PipelineReportsConfig()

    @model_validator(mode="after")
    def _model_fits_kind(self) -> PipelineConfig:
        if self.kind == "seg-qc":
            if self.model is not None:
                raise ValueError("a seg-qc pipeline runs no model of its own: leave out model "
                                 "(name the model for the agreement signal in agreement_model)")
        else:
            if self.model is None:
                raise ValueError(f"a {self.kind} pipeline needs model")
            if self.agreement_model is not None:
                raise ValueError("agreement_model is for seg-qc pipelines only")
        return self

    @field_validator("match", "match_regex")
    @classmethod
    def _known_attributes(cls, value: dict[str, Any]) -> dict[str, Any]:
        from pydicom.datadict import tag_for_keyword

        for keyword in value:
            if tag_for_keyword(keyword) is None:
                raise ValueError(f"{keyword!r} is not a DICOM attribute keyword")
        return value

    @field_validator("match_regex")
    @classmethod
    def _valid_patterns(cls, value: dict[str, str]) -> dict[str, str]:
        import re

        for keyword, pattern in value.items():
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"{keyword}: {pattern!r} is not a valid regular expression ({exc})") from None
        return value


class QCRefitConfig(_Strict):
    """``[qc.refit]``: the scheduled refit of the QC fusion on reviewers' feedback (daemon/refit.py)."""

    enabled: bool = False
    hour: int = Field(2, ge=0, le=23)
    minute: int = Field(30, ge=0, le=59)
    min_new_cases: int = Field(20, ge=1)
    eval_n_per_family: int = Field(2, ge=1)
    eval_perturbations: int = Field(1, ge=0)


class QCConfig(_Strict):
    """``[qc]``: the verdict threshold on the quality score.

    ``accept_threshold`` fixes it; for segmentation, ``target_review_rate`` (share of in-range
    results sent to review: those a volume or location outside the model card's range sends
    anyway are not counted) or ``max_risk`` (failure rate among accepted results) derive it from
    the calibration set's risk-coverage curve (``sentinel qc-threshold`` prints the operating
    point). At most one of the three may be set; classification and seg-qc always use ``accept_threshold``
    (the calibration curve is of the model's own masks).
    """

    accept_threshold: float = Field(0.5, ge=0, le=1)
    target_review_rate: float | None = Field(None, gt=0, lt=1)
    max_risk: float | None = Field(None, ge=0, lt=1)
    refit: QCRefitConfig = QCRefitConfig()

    @model_validator(mode="after")
    def _one_threshold_rule(self) -> QCConfig:
        given = [k for k in ("accept_threshold", "target_review_rate", "max_risk") if k in self.model_fields_set
                 and getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"set only one of accept_threshold, target_review_rate and max_risk (got {', '.join(given)})")
        return self


class ReportsConfig(_Strict):
    """``[reports]``: how result objects are written and checked."""

    # The key is ``validate``, a name pydantic's BaseModel already uses: the attribute is
    # ``validate_``, and dumps write the key as it is spelled in config.toml.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, serialize_by_alias=True,
                              validate_by_alias=True, validate_by_name=True)

    seg_type: Literal["BINARY", "LABELMAP"] = "BINARY"
    validate_: Literal["dciodvfy", "roundtrip", "off"] = Field("dciodvfy", alias="validate")


class ReviewWebConfig(_Strict):
    """``[review.web]``: the review worklist page the daemon serves."""

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    token: str = ""

    @field_validator("host")
    @classmethod
    def _host(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("a host name or address is required")
        return value.strip()


class ReviewConfig(_Strict):
    """``[review]``: the review worklist, its web page and what the PACS is told."""

    viewer_url: str = ""
    send_kos: bool = False
    web: ReviewWebConfig = ReviewWebConfig()

    @field_validator("viewer_url")
    @classmethod
    def _viewer_template(cls, value: str) -> str:
        import string

        try:
            fields = {name for _, name, _, _ in string.Formatter().parse(value) if name is not None}
        except ValueError as exc:
            raise ValueError(f"{value!r} is not a valid URL template ({exc})") from None
        unknown = sorted(fields - {"StudyInstanceUID"})
        if unknown:
            raise ValueError(f"{value!r}: unknown placeholder(s) {', '.join(unknown)}; "
                             "only {StudyInstanceUID} is filled in")
        return value


class OutboxConfig(_Strict):
    """``[outbox]``: retries of results a destination has not acknowledged yet."""

    retry_initial_seconds: float = Field(10.0, gt=0)
    retry_max_seconds: float = Field(600.0, gt=0)
    max_attempts: int = Field(50, ge=1)


class InferenceConfig(_Strict):
    """``[inference]``: where models run."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int = Field(0, ge=0)
    mixed_precision: bool = True


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
    reports: ReportsConfig = ReportsConfig()
    review: ReviewConfig = ReviewConfig()
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
    """``("pipelines", 0, "match")`` -> ``"pipelines[0].match"``."""
    text = ""
    for item in location:
        if isinstance(item, int):
            text += f"[{item}]"
        else:
            text += f".{item}" if text else str(item)
    return text or "(top level)"


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
        base_dir: Relative paths (``node.data_dir``, ``node.tls.*_file``) are resolved
            against this folder.

    Returns:
        The typed configuration.

    Raises:
        ConfigError: With one message per problem, each naming its dotted key.
    """
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_messages(exc)) from None
    if base_dir is not None:
        node = config.node
        if not node.data_dir.is_absolute():
            node = node.model_copy(update={"data_dir": (base_dir / node.data_dir).resolve()})
        if node.tls is not None:
            tls = node.tls.model_copy(update={
                name: (base_dir / path).resolve()
                for name in ("cert_file", "key_file", "ca_file")
                if (path := getattr(node.tls, name)) is not None and not path.is_absolute()
            })
            node = node.model_copy(update={"tls": tls})
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
