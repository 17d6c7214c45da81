"""Configuration loading and validation: every problem names its key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pacs_sentinel.daemon.config import default_config_text, load_config, parse_config
from pacs_sentinel.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def _problems(data: dict) -> list[str]:  # type: ignore[type-arg]
    with pytest.raises(ConfigError) as caught:
        parse_config(data)
    return caught.value.problems


def test_shipped_config_is_valid_and_is_the_embedded_default() -> None:
    config = load_config(REPO / "config.toml")
    assert config.node.ae_title == "SENTINEL"
    assert config.node.data_dir == (REPO / "var").resolve()
    assert [p.model for p in config.pipelines] == ["demo:organ-seg", "demo:cxr-cls"]
    assert default_config_text() == (REPO / "config.toml").read_text(encoding="utf-8")


def test_unknown_key_is_named() -> None:
    assert _problems({"node": {"aetitle": "X"}}) == ["node.aetitle: unknown key"]


def test_unknown_key_in_a_list_entry_is_named_with_its_index() -> None:
    problems = _problems({"destinations": [{"name": "p", "ae_title": "P", "host": "h", "port": 1, "prot": 2}]})
    assert problems == ["destinations[0].prot: unknown key"]


def test_wrong_type_is_named() -> None:
    problems = _problems({"node": {"port": "eleven"}})
    assert len(problems) == 1 and problems[0].startswith("node.port:")


def test_every_problem_is_reported_at_once() -> None:
    problems = _problems({"node": {"port": 0, "ae_title": "A" * 17}, "study": {"quiet_seconds": "10"}, "extra": 1})
    keys = sorted(p.split(":")[0] for p in problems)
    assert keys == ["extra", "node.ae_title", "node.port", "study.quiet_seconds"]


def test_match_keyword_must_be_a_dicom_attribute() -> None:
    problems = _problems({"pipelines": [{"name": "a", "model": "demo:organ-seg", "match": {"Modalty": ["CT"]}}]})
    assert len(problems) == 1 and problems[0].startswith("pipelines[0].match:") and "Modalty" in problems[0]


def test_relative_data_dir_is_relative_to_the_file(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[node]\ndata_dir = "spool-here"\n')
    assert load_config(path).node.data_dir == tmp_path / "spool-here"


def test_invalid_toml_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[node\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(path)


def _check_config(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pacs_sentinel", "check-config", "-c", str(path)],
                          capture_output=True, text=True, timeout=120)


def test_check_config_command_accepts_the_shipped_config() -> None:
    result = _check_config(REPO / "config.toml")
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout


def test_check_config_command_prints_every_problem(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[node]\nport = "x"\nbogus = 1\n\n[[pipelines]]\nname = "p"\nmodel = "demo:no-such-model"\n')
    result = _check_config(path)
    assert result.returncode == 1
    assert "node.port:" in result.stderr and "node.bogus: unknown key" in result.stderr


def test_check_config_command_names_the_file_once(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[node\n")
    result = _check_config(path)
    assert result.returncode == 1
    assert result.stderr.count(str(path)) == 1 and "not valid TOML" in result.stderr
    missing = _check_config(tmp_path / "absent.toml")
    assert missing.returncode == 1
    assert missing.stderr.count("absent.toml") == 1 and "cannot read configuration file" in missing.stderr


def test_check_config_command_names_a_missing_model(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[[pipelines]]\nname = "p"\nmodel = "demo:no-such-model"\n')
    result = _check_config(path)
    assert result.returncode == 1
    assert "pipelines[0].model:" in result.stderr and "no-such-model" in result.stderr


def test_check_config_explains_which_pipeline_takes_which_series(tmp_path: Path) -> None:
    from pydicom.data import get_testdata_file

    from pacs_sentinel.inference.phantoms import make_ct_phantom, write_ct_series

    study = tmp_path / "study"
    write_ct_series(make_ct_phantom(1, shape=(10, 64, 64)), study / "ct", seed=1)
    (study / "mr.dcm").write_bytes(Path(get_testdata_file("MR_small.dcm")).read_bytes())
    config = tmp_path / "c.toml"
    config.write_text('''
[[pipelines]]
name = "organ-seg"
model = "demo:organ-seg"
match = { Modality = ["CT"] }

[[pipelines]]
name = "brain"
model = "demo:organ-seg"
match = { Modality = ["MR"] }
match_regex = { SeriesDescription = "brain|head" }
''')
    result = subprocess.run([sys.executable, "-m", "pacs_sentinel", "check-config", "-c", str(config),
                             "--explain", str(study)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "pipeline 'organ-seg': runs on series" in out and "10 image(s)" in out
    assert "but the series has 10 image(s)" not in out
    assert "pipeline 'brain': no matching series" in out
    assert "SeriesDescription is absent, does not match /brain|head/" in out
    assert "Modality is 'CT', not one of ['MR']" in out
    assert "model loaded" not in out  # results only on standard output


def test_match_regex_must_compile() -> None:
    problems = _problems({"pipelines": [{"name": "a", "model": "m", "match_regex": {"SeriesDescription": "(ax"}}]})
    assert len(problems) == 1 and problems[0].startswith("pipelines[0].match_regex:")


def test_seg_qc_pipeline_runs_no_model_of_its_own() -> None:
    config = parse_config({"pipelines": [{"name": "q", "kind": "seg-qc", "agreement_model": "demo:organ-seg"}]})
    pipeline = config.pipelines[0]
    assert pipeline.model is None and pipeline.agreement_model == "demo:organ-seg" and pipeline.agreement is True
    problems = _problems({"pipelines": [{"name": "q", "kind": "seg-qc", "model": "demo:organ-seg"}]})
    assert len(problems) == 1 and problems[0].startswith("pipelines[0]: ") and "agreement_model" in problems[0]


def test_model_is_required_outside_seg_qc_and_agreement_keys_only_there() -> None:
    assert _problems({"pipelines": [{"name": "s", "kind": "segmentation"}]}) == [
        "pipelines[0]: Value error, a segmentation pipeline needs model"]
    problems = _problems({"pipelines": [{"name": "s", "model": "demo:organ-seg", "agreement_model": "demo:organ-seg"}]})
    assert problems == ["pipelines[0]: Value error, agreement_model is for seg-qc pipelines only"]
    assert _problems({"pipelines": [{"name": "q", "kind": "seg-qc", "agreement": "yes"}]}) == [
        "pipelines[0].agreement: Input should be a valid boolean"]


def test_check_config_loads_the_agreement_model_and_explains_seg_qc(tmp_path: Path) -> None:
    import numpy as np

    from pacs_sentinel.dicom_io.series import load_series_files
    from pacs_sentinel.inference.phantoms import make_ct_phantom, write_ct_series
    from tests.conftest import make_third_party_seg

    bad = tmp_path / "bad.toml"
    bad.write_text('[[pipelines]]\nname = "q"\nkind = "seg-qc"\nagreement_model = "demo:no-such-model"\n')
    result = _check_config(bad)
    assert result.returncode == 1
    assert "pipelines[0].agreement_model:" in result.stderr and "no-such-model" in result.stderr

    study = tmp_path / "study"
    ct = write_ct_series(make_ct_phantom(1, shape=(10, 64, 64)), study / "ct", seed=1)
    volume = load_series_files(ct)
    seg = make_third_party_seg(volume.datasets, [np.ones(volume.array.shape, dtype=bool)], [("10200004", "SCT", "Liver")])
    seg.save_as(study / "seg.dcm", enforce_file_format=True)
    config = tmp_path / "c.toml"
    config.write_text('[[pipelines]]\nname = "vendor-qc"\nkind = "seg-qc"\nagreement_model = "demo:organ-seg"\n'
                      'match = { Modality = ["CT"] }\n\n'
                      '[[pipelines]]\nname = "mr-qc"\nkind = "seg-qc"\nmatch = { Modality = ["MR"] }\n')
    result = subprocess.run([sys.executable, "-m", "pacs_sentinel", "check-config", "-c", str(config),
                             "--explain", str(study)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"pipeline 'vendor-qc': judges SEG {seg.SOPInstanceUID} on series {volume.series_uid}" in result.stdout
    assert "pipeline 'mr-qc': no third-party SEG references a matching series (1 third-party SEG(s))" in result.stdout


def test_check_config_finds_what_would_stop_the_daemon(tmp_path: Path) -> None:
    """Problems the schema cannot see, each named by its key: a data folder that is a file, TLS
    files that are not there or do not load, a listen address that does not resolve, the review
    page on the DICOM port."""
    not_a_folder = tmp_path / "a-file"
    not_a_folder.write_text("x")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate")
    cases = {
        f'[node]\ndata_dir = "{not_a_folder}"\n': f"node.data_dir: {not_a_folder} exists and is not a folder",
        f'[node]\ndata_dir = "{tmp_path / "var"}"\n[node.tls]\ncert_file = "{tmp_path / "absent.crt"}"\n'
        f'key_file = "{garbage}"\n': "node.tls.cert_file: ",
        f'[node]\ndata_dir = "{tmp_path / "var"}"\n[node.tls]\ncert_file = "{garbage}"\nkey_file = "{garbage}"\n':
            "node.tls: the certificate, key or CA file does not load",
        f'[node]\nhost = "not a host!!"\ndata_dir = "{tmp_path / "var"}"\n': "node.host: 'not a host!!' is not an address",
        f'[node]\nport = 11112\ndata_dir = "{tmp_path / "var"}"\n[review.web]\nenabled = true\nport = 11112\n':
            "review.web.port: 11112 is node.port too",
    }
    for text, expected in cases.items():
        path = tmp_path / "c.toml"
        path.write_text(text)
        result = _check_config(path)
        assert result.returncode == 1 and expected in result.stderr, (text, result.stderr)
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "var").exists()  # checking creates nothing


def test_check_config_warns_of_settings_that_are_valid_but_probably_not_meant(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(f'[node]\ndata_dir = "{tmp_path / "var"}"\n[study]\nquiet_seconds = 30\nmax_wait_seconds = 5\n')
    result = _check_config(path)
    assert result.returncode == 0 and "OK (0 pipeline(s), 0 destination(s))" in result.stdout
    assert "warning: no [[pipelines]]: every study will be rejected" in result.stderr
    assert "warning: no [[destinations]]: results are kept under data_dir and sent nowhere" in result.stderr
    assert "warning: study.max_wait_seconds (5) is shorter than the quiet time (30 s)" in result.stderr
    assert "warning" not in _check_config(REPO / "config.toml").stderr
