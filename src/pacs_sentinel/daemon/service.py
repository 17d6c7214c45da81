"""The daemon's lifecycle: wire the SCP, spool, scheduler, worker and outbox together."""

from __future__ import annotations

import errno
import fcntl
import os
import threading
from functools import partial
from pathlib import Path
from datetime import datetime, timedelta, timezone

import structlog
import torch
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.date import DateTrigger

from pacs_sentinel.daemon import jobs as jobs_module
from pacs_sentinel.daemon.arrivals import ArrivalWatcher, StudyArrival, completion_time
from pacs_sentinel.daemon.config import Config
from pacs_sentinel.daemon.feedback import FeedbackRecorder
from pacs_sentinel.daemon.jobs import JobStore
from pacs_sentinel.daemon.logs import configure_logging
from pacs_sentinel.daemon.outbox import Outbox
from pacs_sentinel.daemon.review import ReviewStore
from pacs_sentinel.daemon.routing import matching_pipelines, read_candidates, rejection_reason
from pacs_sentinel.daemon.seg_qc import third_party_segs
from pacs_sentinel.daemon.worker import Worker
from pacs_sentinel.dicom_io.index import Database
from pacs_sentinel.dicom_io.scp import Receiver, ScpSettings
from pacs_sentinel.dicom_io.spool import Spool
from pacs_sentinel.errors import SentinelError

log = structlog.get_logger(__name__)

OUTBOX_INTERVAL_SECONDS = 1.0
#: How often the index is checked for new instances (the quiet timers' resolution).
ARRIVAL_POLL_SECONDS = 0.5


#: The file in ``data_dir`` a running node holds locked (it names the node's process id).
LOCK_FILE = "sentinel.lock"


class DataDirLock:
    """An exclusive lock on a data folder: one node per spool, index and job queue.

    Two nodes on one ``data_dir`` would each take the other's running jobs for interrupted
    ones and run them again (and deliver twice). The lock is a ``flock`` on
    :data:`LOCK_FILE`, so the kernel releases it when the process ends, however it ends.
    """

    def __init__(self, data_dir: Path) -> None:
        self.path = Path(data_dir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock.

        Raises:
            SentinelError: Another process holds it (its process id in the message), or the
                lock file cannot be opened.
        """
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise SentinelError(f"cannot open the lock file {self.path}: {exc.strerror or exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):  # e.g. ENOLCK on some NFS
                raise SentinelError(f"cannot lock {self.path}: {exc.strerror or exc} (the data_dir's file system "
                                    "must support flock)") from exc
            raise SentinelError(f"data_dir {self.path.parent} is in use by another PACS Sentinel (process {holder}; "
                                f"lock {self.path}): one node per data_dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        self._fd = fd

    def release(self) -> None:
        """Give the lock up (idempotent)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class Sentinel:
    """One running PACS Sentinel node."""

    def __init__(self, config: Config) -> None:
        """Open the node's data folder (locked against a second node) and build its parts.

        Raises:
            SentinelError: ``data_dir`` cannot be created or is in use by another node.
        """
        self.config = config
        data_dir = config.node.data_dir
        try:
            data_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SentinelError(f"cannot create data_dir {data_dir}: {exc.strerror or exc}") from exc
        self.lock = DataDirLock(data_dir)
        self.lock.acquire()
        try:
            self._build(config, data_dir)
        except BaseException:
            self.lock.release()
            raise

    def _build(self, config: Config, data_dir: Path) -> None:
        self.database = Database(data_dir / "sentinel.db", migrations=jobs_module.MIGRATIONS)
        self.spool = Spool(data_dir, self.database)
        self.jobs = JobStore(self.database)
        self.review = ReviewStore(self.database)
        self.feedback = FeedbackRecorder(self.database, self.spool, self.jobs,
                                         [p.name for p in config.pipelines if p.kind == "segmentation"])
        self.web = None
        if config.review.web.enabled:
            from pacs_sentinel.daemon.web import ReviewWebServer

            self.web = ReviewWebServer(self.review, config.review)  # ConfigError: exposed without a token
        self.outbox = Outbox(self.database, config.destinations, config.outbox, calling_ae=config.node.ae_title)
        self.scheduler = BackgroundScheduler(timezone="UTC", job_defaults={"misfire_grace_time": None})
        self.worker = Worker(config, self.jobs, self.spool, on_results=self.deliver_now)
        node = config.node
        tls = node.tls
        settings = ScpSettings(
            node.ae_title, node.host, node.port, node.max_associations,
            node.acse_timeout, node.dimse_timeout, node.network_timeout,
            max_pdu_size=node.max_pdu_size,
            min_free_disk_mb=node.min_free_disk_mb,
            fsync=node.fsync,
            allowed_peers=tuple((peer.ae_title, peer.host) for peer in node.allowed_peers),
            tls=tls.settings() if tls else None,
        )
        # New instances are noticed by polling the index (ArrivalWatcher), so the receiver
        # may run in several listener processes.
        self.scp = Receiver(settings, data_dir, self.database.path, processes=node.receive_processes,
                            database=self.database,
                            log_setup=partial(configure_logging, config.logging.format, config.logging.level))
        self.arrivals = ArrivalWatcher(self.database, self._schedule_completion)
        self._started = threading.Event()

    def start(self) -> None:
        """Reconcile state left by a previous run, then start serving.

        Raises:
            SentinelError: The node cannot start (e.g. its DICOM port is taken, the listen
                address does not resolve, a TLS file cannot be read); whatever had started is
                stopped again, the data folder unlocked.
        """
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        if self.config.inference.threads:
            torch.set_num_threads(self.config.inference.threads)
        self.spool.reconcile()
        requeued = self.jobs.requeue_interrupted()
        if requeued:
            log.warning("interrupted jobs re-queued", count=requeued)
        self.scheduler.start()
        self.scheduler.add_job(self.outbox.flush, "interval", seconds=OUTBOX_INTERVAL_SECONDS, id="outbox",
                               max_instances=1, coalesce=True)
        self.arrivals.start_from_now()
        for arrival in self.arrivals.all_studies(self.jobs.stale_studies()):
            self._schedule_completion(arrival)
        self.scheduler.add_job(self.arrivals.poll, "interval", seconds=ARRIVAL_POLL_SECONDS, id="arrivals",
                               max_instances=1, coalesce=True)
        from pacs_sentinel.daemon import refit

        refit.schedule(self.scheduler, self.config, self.database)  # [qc.refit] enabled: the nightly job
        node = self.config.node
        if self.scp.settings.tls is not None:  # loaded here too, for a message that names the files
            try:
                self.scp.settings.tls.server_context()
            except (OSError, ValueError) as exc:
                raise SentinelError(f"cannot load node.tls (cert_file {node.tls.cert_file}, key_file "
                                    f"{node.tls.key_file}): {exc}") from exc
        try:
            self.scp.start()
        except OSError as exc:  # the port is taken, the address does not resolve, a TLS file is unreadable
            raise SentinelError(f"cannot listen for DICOM on {node.host}:{node.port}: {exc}") from exc
        if self.web is not None:
            self.web.start()
        # Last: the worker's one-time warm-up runs only once the node can receive.
        self.worker.start()
        self._started.set()
        log.info("sentinel started", ae_title=self.config.node.ae_title, port=self.scp.port,
                 data_dir=str(self.config.node.data_dir), pipelines=[p.name for p in self.config.pipelines],
                 destinations=[d.name for d in self.config.destinations])

    def stop(self) -> None:
        """Stop receiving, finish the current job, stop timers."""
        self.scp.stop()
        if self.web is not None:
            self.web.stop()
        self.worker.stop()
        if self.scheduler.running:
            self.scheduler.shutdown(wait=False)
        self.lock.release()
        log.info("sentinel stopped")

    def deliver_now(self) -> None:
        """Run the outbox at once instead of at its next interval."""
        job = self.scheduler.get_job("outbox")
        if job is not None:
            job.modify(next_run_time=datetime.now(tz=timezone.utc))

    def _schedule_completion(self, arrival: StudyArrival) -> None:
        """(Re)start the study's completion timer after an arrival."""
        run_at = datetime.fromtimestamp(completion_time(arrival, self.config.study), tz=timezone.utc)
        self.scheduler.add_job(self.study_quiet, DateTrigger(run_date=run_at), args=[arrival.study_uid],
                               id=f"quiet:{arrival.study_uid}", replace_existing=True)

    def _retry_later(self, study_uid: str) -> None:
        run_at = datetime.now(tz=timezone.utc) + timedelta(seconds=self.config.study.quiet_seconds)
        self.scheduler.add_job(self.study_quiet, DateTrigger(run_date=run_at), args=[study_uid],
                               id=f"quiet:{study_uid}", replace_existing=True)

    def study_quiet(self, study_uid: str) -> None:
        """The study got no new instance for ``quiet_seconds``: record corrections, queue its jobs."""
        bound = log.bind(study_uid=study_uid)
        try:
            self.feedback.check_study(study_uid)
        except Exception:  # feedback must never stop a study from being processed
            bound.exception("cannot check the study for corrected segmentations")
        try:
            series_files = self.spool.study_files(study_uid)
            candidates = read_candidates(series_files)
            segs = third_party_segs(self.config, self.spool, self.jobs, study_uid, series_files)
            pipelines = matching_pipelines(self.config.pipelines, candidates, segs)
            if not pipelines:
                job_id = self.jobs.reject_study(study_uid, rejection_reason(self.config.pipelines, candidates, segs))
                if job_id is not None:
                    bound.warning("study rejected: no pipeline matches", job_id=job_id)
                return
            inputs = {name: max(self.spool.series_last_received(uid) for uid in series_uids)
                      for name, series_uids in pipelines.items()}
            created = self.jobs.queue_study(study_uid, inputs,
                                            rerun_late_arrivals=self.config.study.late_arrival == "rerun")
            if created:
                bound.info("study complete, jobs queued", job_ids=created, pipelines=list(pipelines))
                self.worker.wake()
        except Exception:
            bound.exception("cannot queue study; retrying later")
            self._retry_later(study_uid)
