"""``sentinel demo``: the whole product on embedded defaults, end to end.

Makes three synthetic CT studies (one clean, two that QC should flag) and a chest
radiograph with two findings, starts a local
receiving PACS (an in-process storage SCP) and the daemon, pushes the studies over
DICOM, waits for the results and prints what came back.
"""

from __future__ import annotations

import shutil
import socket
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pydicom

from pacs_sentinel.daemon.config import Config, default_config_text, parse_config
from pacs_sentinel.daemon.jobs import FINISHED_STATES, MIGRATIONS, JobStore
from pacs_sentinel.daemon.logs import configure_logging
from pacs_sentinel.daemon.service import Sentinel
from pacs_sentinel.daemon.table import format_table, score_text
from pacs_sentinel.dicom_io.index import Database
from pacs_sentinel.dicom_io.scp import ScpSettings, StorageScp
from pacs_sentinel.dicom_io.scu import Peer, send_files
from pacs_sentinel.dicom_io.spool import Spool
from pacs_sentinel.errors import SentinelError
from pacs_sentinel.inference.phantoms import make_ct_phantom, write_ct_series
from pacs_sentinel.inference.radiographs import make_cxr_phantom, write_dx_image

#: Longest wait for all results, in seconds.
DEMO_TIMEOUT_SECONDS = 600
PACS_AE_TITLE = "DEMOPACS"


@dataclass(frozen=True)
class DemoStudy:
    """One synthetic study of the demo: an abdomen CT (organ-seg) or a chest radiograph (cxr-cls)."""

    title: str
    variant: str
    seed: int
    kind: str = "ct"


DEMO_STUDIES = (
    DemoStudy("clean abdomen CT", "normal", 1001),
    DemoStudy("heavy metal artefact", "metal-artifact", 1002),
    DemoStudy("unusual anatomy", "unusual-anatomy", 1003),
    DemoStudy("chest radiograph", "normal", 1004, kind="dx"),
)

#: Findings drawn into the demo radiograph (the classifier should report both).
DEMO_CXR_FINDINGS = {"nodule": False, "effusion": True, "cardiomegaly": True}


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def demo_config(workdir: Path, *, port: int, pacs_port: int) -> Config:
    """The embedded default configuration, pointed at the demo's folders and local PACS."""
    data = tomllib.loads(default_config_text())
    data["node"].update({"port": port, "data_dir": str(workdir / "sentinel")})
    data["study"]["quiet_seconds"] = 2
    data["destinations"] = [{"name": "demo-pacs", "ae_title": PACS_AE_TITLE, "host": "127.0.0.1", "port": pacs_port}]
    data["outbox"]["retry_initial_seconds"] = 2.0
    data["logging"]["level"] = "warning"
    return parse_config(data)


def run_demo(workdir: Path) -> int:
    """Run the demo in ``workdir`` (created; an earlier demo's data there is replaced).

    Returns:
        0 when every study got its results back, 1 otherwise.
    """
    workdir = workdir.resolve()
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    started = time.monotonic()
    print(f"PACS Sentinel demo in {workdir}")

    studies: dict[str, tuple[DemoStudy, list[Path]]] = {}
    for index, study in enumerate(DEMO_STUDIES, start=1):
        patient_name = f"Demo^{study.title.title().replace(' ', '')}"
        if study.kind == "dx":
            radiograph = make_cxr_phantom(study.seed, findings=DEMO_CXR_FINDINGS, variant=study.variant)
            files = [write_dx_image(radiograph, workdir / "studies" / "chest", patient_id=f"DEMO{index:03d}",
                                    patient_name=patient_name, study_description=f"Demo: {study.title}",
                                    seed=study.seed)]
        else:
            phantom = make_ct_phantom(study.seed, variant=study.variant)
            files = write_ct_series(
                phantom, workdir / "studies" / study.variant, patient_id=f"DEMO{index:03d}",
                patient_name=patient_name, study_description=f"Demo: {study.title}", seed=study.seed,
            )
        study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
        studies[study_uid] = (study, files)
    print(f"synthesized {len(studies)} studies ({sum(len(f) for _, f in studies.values())} instances)")

    configure_logging("console", "warning", stream=sys.stderr)
    pacs_db = Database(workdir / "pacs" / "pacs.db")
    pacs_spool = Spool(workdir / "pacs", pacs_db)
    pacs = StorageScp(ScpSettings(PACS_AE_TITLE, "127.0.0.1", free_port()), pacs_spool)
    pacs.start()
    config = demo_config(workdir, port=free_port(), pacs_port=pacs.port)
    sentinel = Sentinel(config)
    sentinel.start()
    try:
        peer = Peer(config.node.ae_title, "127.0.0.1", sentinel.scp.port)
        sent_at = {}
        for study_uid, (study, files) in studies.items():
            sent_at[study_uid] = time.monotonic()
            results = send_files(files, peer, calling_ae="DEMOCT")
            if not all(r.delivered for r in results):
                raise SentinelError(f"pushing {study.title} failed: {[r.error for r in results if not r.delivered]}")
        print(f"pushed to {config.node.ae_title}@127.0.0.1:{sentinel.scp.port}; waiting for results...")
        store = JobStore(Database(config.node.data_dir / "sentinel.db", migrations=MIGRATIONS))
        deadline = time.monotonic() + DEMO_TIMEOUT_SECONDS
        finished_at: dict[str, float] = {}
        while time.monotonic() < deadline and len(finished_at) < len(studies):
            for study_uid in studies:
                jobs = store.jobs(study_uid=study_uid)
                if study_uid not in finished_at and jobs and all(j.state in FINISHED_STATES for j in jobs):
                    finished_at[study_uid] = time.monotonic()
            time.sleep(0.2)
    finally:
        sentinel.stop()
        pacs.stop()

    rows = []
    pngs = []
    ok = True
    for study_uid, (study, _) in studies.items():
        jobs = store.jobs(study_uid=study_uid)
        job = jobs[0] if jobs else None
        returned = pacs_spool.study_files(study_uid)
        modalities = []
        for series_files in returned.values():
                modalities += [str(pydicom.dcmread(p, stop_before_pixels=True).Modality) for p in series_files]
        if job is not None and job.output_dir:
            pngs += sorted(Path(job.output_dir).glob("*.png"))
        took = finished_at.get(study_uid)
        ok &= job is not None and job.state.value == "DONE"
        rows.append([
            study.title,
            job.state.value if job else "no job",
            (job.verdict or "-") if job else "-",
            score_text(job.quality_score if job else None),
            (", ".join(job.reasons) or "-") if job else "-",
            ", ".join(f"{modalities.count(m)} {m}" for m in sorted(set(modalities))) or "none",
            "-" if took is None else f"{took - sent_at[study_uid]:.1f} s",
        ])
    print()
    print(format_table(["study", "state", "verdict", "score", "reasons", "objects returned", "time"], rows))
    print()
    print("overlay images:")
    for png in pngs:
        print(f"  {png}")
    print(f"results received by the demo PACS are in {workdir / 'pacs' / 'spool'}")
    print(f"demo finished in {time.monotonic() - started:.1f} s")
    return 0 if ok else 1
