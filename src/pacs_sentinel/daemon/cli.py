"""The ``sentinel`` command line.

Errors of the product (:class:`~pacs_sentinel.errors.SentinelError`) become one-line
messages on standard error and exit status 2; success is 0.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from pacs_sentinel import __version__
from pacs_sentinel.errors import ConfigError, SentinelError

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_ERROR = 2


def _cmd_run(args: argparse.Namespace) -> int:
    from pacs_sentinel.daemon.config import load_config
    from pacs_sentinel.daemon.logs import configure_logging
    from pacs_sentinel.daemon.service import Sentinel

    config = load_config(args.config)
    configure_logging(config.logging.format, config.logging.level)
    sentinel = Sentinel(config)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    sentinel.start()
    stop.wait()
    sentinel.stop()
    return EXIT_OK


def _node_problems(config) -> list[str]:  # type: ignore[no-untyped-def]
    """What would stop ``sentinel run`` that the schema cannot see: a data folder that is a
    file or cannot be created or written, a listen address that does not resolve, the review
    page on the DICOM port, TLS files that do not load. (A port another program holds is found
    only by ``sentinel run``, which then exits with a one-line message.)"""
    import os
    import socket

    problems = []
    data_dir = config.node.data_dir
    existing = next((p for p in (data_dir, *data_dir.parents) if p.exists()), None)
    if data_dir.exists() and not data_dir.is_dir():
        problems.append(f"node.data_dir: {data_dir} exists and is not a folder")
    elif existing is None or not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        where = "is not writable" if existing == data_dir else f"cannot be created in {existing}"
        problems.append(f"node.data_dir: {data_dir} {where}")
    try:
        socket.getaddrinfo(config.node.host, config.node.port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:  # socket.gaierror is an OSError
        problems.append(f"node.host: {config.node.host!r} is not an address this machine can listen on: {exc}")
    web = config.review.web
    if web.enabled and web.port == config.node.port:
        problems.append(f"review.web.port: {web.port} is node.port too; the review page and DICOM need their own ports")
    tls = config.node.tls
    if tls is not None:
        unreadable = [f"node.tls.{key}: {path} is not a readable file"
                      for key, path in (("cert_file", tls.cert_file), ("key_file", tls.key_file), ("ca_file", tls.ca_file))
                      if path is not None and not (Path(path).is_file() and os.access(path, os.R_OK))]
        problems += unreadable
        if not unreadable:
            try:
                tls.settings().server_context()
            except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError: not a certificate or key
                problems.append(f"node.tls: the certificate, key or CA file does not load: {exc}")
    return problems


def _config_warnings(config) -> list[str]:  # type: ignore[no-untyped-def]
    """Valid settings that are probably not what was meant (``check-config`` still exits 0)."""
    warnings = []
    if not config.pipelines:
        warnings.append("no [[pipelines]]: every study will be rejected")
    if not config.destinations:
        warnings.append("no [[destinations]]: results are kept under data_dir and sent nowhere")
    study = config.study
    quiet = [study.quiet_seconds, *study.quiet_seconds_by_calling_ae.values()]
    if study.max_wait_seconds < max(quiet):
        warnings.append(f"study.max_wait_seconds ({study.max_wait_seconds:g}) is shorter than the quiet time "
                        f"({max(quiet):g} s): studies are taken as complete before they have been quiet")
    return warnings


def _cmd_check_config(args: argparse.Namespace) -> int:
    from pacs_sentinel.daemon.config import load_config
    from pacs_sentinel.inference.models import load_segmentation_model

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        name = str(Path(args.config))
        for problem in exc.problems:
            # A problem with the file as a whole (unreadable, not TOML) already names it.
            print(problem if problem.startswith(f"{name}: ") else f"{name}: {problem}", file=sys.stderr)
        return EXIT_FAILURE
    problems = _node_problems(config)
    try:
        from pacs_sentinel.daemon.web import check_web_access

        check_web_access(config.review.web)
    except ConfigError as exc:
        problems += exc.problems
    for index, pipeline in enumerate(config.pipelines):
        try:
            if pipeline.kind == "segmentation":
                load_segmentation_model(pipeline.model, device=config.inference.device)
            elif pipeline.kind == "classification":
                from pacs_sentinel.inference.classification import load_classification_model

                load_classification_model(pipeline.model, device=config.inference.device)
            elif pipeline.kind == "seg-qc":
                if pipeline.agreement_model is not None:
                    try:
                        load_segmentation_model(pipeline.agreement_model, device=config.inference.device)
                    except SentinelError as exc:
                        problems.append(f"pipelines[{index}].agreement_model: {exc}")
            else:
                problems.append(f"pipelines[{index}].kind: {pipeline.kind!r} is not supported by this version")
        except SentinelError as exc:
            problems.append(f"pipelines[{index}].model: {exc}")
    for problem in problems:
        print(f"{args.config}: {problem}", file=sys.stderr)
    if problems:
        return EXIT_FAILURE
    for warning in _config_warnings(config):
        print(f"{args.config}: warning: {warning}", file=sys.stderr)
    print(f"{args.config}: OK ({len(config.pipelines)} pipeline(s), {len(config.destinations)} destination(s))")
    if args.explain:
        from pacs_sentinel.daemon.routing import explain

        print()
        print(explain(config.pipelines, Path(args.explain)))
    return EXIT_OK


def _cmd_status(args: argparse.Namespace) -> int:
    from pacs_sentinel.daemon.config import load_config
    from pacs_sentinel.daemon.jobs import MIGRATIONS, JobStore
    from pacs_sentinel.daemon.outbox import dead_letters, outbox_summary
    from pacs_sentinel.daemon.table import format_table, score_text
    from pacs_sentinel.dicom_io.index import Database
    from pacs_sentinel.dicom_io.scu import Peer, echo

    config = load_config(args.config)
    # An unreachable destination is a row of the table below: pynetdicom's own error records
    # would only print in the middle of it.
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)
    print("destinations:")
    rows = []
    for destination in config.destinations:
        peer = Peer(destination.ae_title, destination.host, destination.port)
        result = echo(peer, calling_ae=config.node.ae_title)
        health = f"OK ({result.seconds * 1000:.0f} ms)" if result.ok else f"UNREACHABLE: {result.error}"
        rows.append([destination.name, f"{peer.ae_title}@{peer.host}:{peer.port}", health])
    print(format_table(["name", "address", "C-ECHO"], rows) if rows else "  (none configured)")

    db_path = config.node.data_dir / "sentinel.db"
    if not db_path.exists():
        print(f"\nno database at {db_path}: the daemon has not run with this configuration yet")
        return EXIT_OK
    database = Database(db_path, migrations=MIGRATIONS)
    summary = outbox_summary(database)
    print("\noutbox:")
    rows = [[name, counts.get("pending", 0), counts.get("sent", 0), counts.get("dead-letter", 0),
             counts.get("superseded", 0)] for name, counts in sorted(summary.items())]
    print(format_table(["destination", "pending", "sent", "dead letters", "superseded"], rows) if rows else "  (empty)")
    letters = dead_letters(database)
    if letters:
        print("\ndead letters (given up; requeue with `sentinel outbox retry [ITEM ...]`):")
        print(format_table(["item", "job", "destination", "SOP instance", "attempts", "last error"],
                           [[d["id"], d["job_id"], d["destination"], d["sop_instance_uid"], d["attempts"],
                             d["last_error"]] for d in letters]))
    store = JobStore(database)
    rows = [
        [job.id, job.study_uid, job.pipeline or "-", job.state.value, job.verdict or "-",
         score_text(job.quality_score),
         "; ".join(part for part in (", ".join(job.reasons), job.error or "") if part) or "-"]
        for job in store.jobs(limit=args.limit)
    ]
    print("\njobs (newest first):")
    print(format_table(["job", "study", "pipeline", "state", "verdict", "score", "reasons / error"], rows)
          if rows else "  (none)")
    counts = dict(database.connection().execute(
        "SELECT status, COUNT(*) FROM review_items WHERE status != 'resolved' GROUP BY status").fetchall())
    print(f"\nreview worklist: {counts.get('open', 0)} open, {counts.get('claimed', 0)} claimed "
          "(sentinel review list)")
    return EXIT_OK


def _review_store(config_path: str):  # type: ignore[no-untyped-def]
    """The configuration and the worklist of the daemon that runs with ``config_path``."""
    from pacs_sentinel.daemon.config import load_config
    from pacs_sentinel.daemon.jobs import MIGRATIONS
    from pacs_sentinel.daemon.review import ReviewStore
    from pacs_sentinel.dicom_io.index import Database

    config = load_config(config_path)
    db_path = config.node.data_dir / "sentinel.db"
    if not db_path.exists():
        raise SentinelError(f"no database at {db_path}: the daemon has not run with this configuration yet")
    return config, ReviewStore(Database(db_path, migrations=MIGRATIONS))


def _when(timestamp: float | None) -> str:
    import datetime

    if timestamp is None:
        return "-"
    return datetime.datetime.fromtimestamp(timestamp, tz=datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _cmd_outbox_retry(args: argparse.Namespace) -> int:
    from pacs_sentinel.daemon.config import load_config
    from pacs_sentinel.daemon.jobs import MIGRATIONS
    from pacs_sentinel.daemon.outbox import requeue_dead_letters
    from pacs_sentinel.dicom_io.index import Database

    config = load_config(args.config)
    db_path = config.node.data_dir / "sentinel.db"
    if not db_path.exists():
        print(f"no database at {db_path}: the daemon has not run with this configuration yet", file=sys.stderr)
        return EXIT_ERROR
    names = [destination.name for destination in config.destinations]
    if args.destination is not None and args.destination not in names:
        raise SentinelError(f"no destination {args.destination!r} in {args.config} "
                            f"(destinations: {', '.join(names) or 'none'})")
    count = requeue_dead_letters(Database(db_path, migrations=MIGRATIONS), item_ids=args.items,
                                 destination=args.destination)
    print(f"{count} dead letter(s) requeued" + ("; the daemon sends them at its next outbox flush" if count else ""))
    return EXIT_OK


def _cmd_review(args: argparse.Namespace) -> int:
    import os

    from pacs_sentinel.daemon.review import explain_reason, parse_since, viewer_link
    from pacs_sentinel.daemon.table import format_table, score_text

    config, store = _review_store(args.config)
    if args.action == "list":
        since = parse_since(args.since) if args.since else None
        items = store.items(status=args.status, pipeline=args.pipeline, since=since, limit=args.limit)
        if not items:
            print("no review items match")
            return EXIT_OK
        print(format_table(
            ["item", "status", "score", "pipeline", "study", "reasons", "created", "reviewer", "decision"],
            [[i.id, i.status.value, score_text(i.quality_score), i.pipeline,
              i.study_uid, ", ".join(i.reasons) or "-", _when(i.created_at), i.reviewer or "-",
              i.decision.value if i.decision else "-"] for i in items],
            max_width=64))
        return EXIT_OK
    reviewer = args.reviewer if getattr(args, "reviewer", None) else os.environ.get("USER", "")
    if args.action == "claim":
        item = store.claim(args.item, reviewer)
        print(f"review item {item.id} claimed by {item.reviewer}")
        return EXIT_OK
    if args.action == "resolve":
        item = store.resolve(args.item, args.decision, reviewer, args.comment)
        print(f"review item {item.id} resolved by {item.reviewer}: {item.decision.value if item.decision else '-'}")
        return EXIT_OK
    item = store.get(args.item)
    rows = [
        ["item", item.id], ["status", item.status.value], ["study", item.study_uid],
        ["series", item.series_uid or "-"], ["pipeline", item.pipeline], ["job", f"{item.job_id} (run {item.runs})"],
        ["model", f"{item.model or '-'} {item.model_version or ''}".strip()], ["QC version", item.qc_version or "-"],
        ["quality score", score_text(item.quality_score)],
        ["created", _when(item.created_at)], ["claimed", _when(item.claimed_at)],
        ["resolved", _when(item.resolved_at)], ["reviewer", item.reviewer or "-"],
        ["decision", item.decision.value if item.decision else "-"], ["comments", item.comments or "-"],
    ]
    link = viewer_link(config.review.viewer_url, item.study_uid)
    if link:
        rows.append(["viewer", link])
    print(format_table(["field", "value"], rows, max_width=200))
    print("\nreasons:")
    for reason in item.reasons or ["(none)"]:
        print(f"  - {explain_reason(reason)}")
    overlays = item.overlay_paths()
    if overlays:
        print("\noverlays:")
        for path in overlays:
            print(f"  {path}")
    return EXIT_OK


def _cmd_report(args: argparse.Namespace) -> int:
    import time

    from pacs_sentinel.daemon import monitoring
    from pacs_sentinel.daemon.review import parse_since
    from pacs_sentinel.daemon.table import format_table, score_text

    config, store = _review_store(args.config)
    now = time.time()
    since = parse_since(args.since, now=now)
    report = monitoring.build_report(store.database, since, now)
    window = report.window
    share = f" ({100 * report.flagged / len(window):.1f} %)" if window else ""
    print(f"{_when(since)} .. {_when(now)}: {len(window)} job(s) with a result, "
          f"{report.flagged} flagged for review{share}")
    if not window:
        return EXIT_OK
    for title, stats in report.slices.items():
        print(f"\nper {title}:")
        print(format_table([title, "jobs", "flagged", "flag rate", "mean score"],
                           [[s.name, s.jobs, s.flagged, f"{100 * s.flag_rate:.1f} %",
                             score_text(s.mean_score)] for s in stats]))
    print("\ndrift warnings:" if report.warnings else "\ndrift warnings: none")
    for warning in report.warnings:
        print(f"  WARNING {warning}")
    chart = Path(args.chart) if args.chart else config.node.data_dir / "reports" / "flag-rate.png"
    bucket, series = monitoring.flag_rate_series(window, since, now)
    monitoring.render_flag_rate_chart(series, chart, bucket=bucket)
    print(f"\nchart (flag rate per {bucket}): {chart}")
    return EXIT_OK


def _cmd_feedback_export(args: argparse.Namespace) -> int:
    from pacs_sentinel.daemon.export import export_feedback
    from pacs_sentinel.daemon.review import parse_since
    from pacs_sentinel.dicom_io.spool import Spool

    config, store = _review_store(args.config)
    since = parse_since(args.since) if args.since else None
    summary = export_feedback(store.database, Spool(config.node.data_dir, store.database), Path(args.out), since=since)
    for note in summary.notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"exported {summary.cases} case(s), {summary.with_images} with NIfTI images and masks: {summary.csv_path}")
    return EXIT_OK


def _cmd_send(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from pacs_sentinel.dicom_io.scu import Peer, send_files

    try:
        peer = Peer.parse(args.to)
    except ValueError as exc:
        raise SentinelError(str(exc)) from None
    root = Path(args.path)
    if not root.exists():
        raise SentinelError(f"{root}: no such file or folder")
    files = sorted(p for p in (root.rglob("*") if root.is_dir() else [root]) if p.is_file())
    if not files:
        raise SentinelError(f"{root}: no files to send")
    # Every file that is not delivered gets its own line below, with the reason: pynetdicom's own
    # error records (an encoding failure comes with a traceback) would only repeat it.
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)
    with tqdm(total=len(files), unit="file", desc=f"sending to {peer.ae_title}", disable=args.quiet) as bar:
        results = send_files(files, peer, calling_ae=args.calling_ae, on_result=lambda _: bar.update())
    failed = [r for r in results if not r.delivered]
    for result in failed:
        print(f"{result.path}: not delivered ({result.error})", file=sys.stderr)
    print(f"sent {len(results) - len(failed)} of {len(results)} file(s) to {args.to}")
    return EXIT_FAILURE if failed else EXIT_OK


def _cmd_demo(args: argparse.Namespace) -> int:
    from pacs_sentinel.daemon.demo import run_demo

    return run_demo(Path(args.workdir))


def _cmd_train_demo(args: argparse.Namespace) -> int:
    out_dir = Path(args.out) if args.out else None
    if args.name == "cxr-cls":
        from pacs_sentinel.inference.train_cxr import train_cxr

        metrics = train_cxr(out_dir, seed=args.seed, epochs=args.epochs, progress=not args.quiet)
    elif args.name == "cxr-features":
        from pacs_sentinel.inference.train_cxr import fit_feature_statistics

        metrics = fit_feature_statistics(out_dir, seed=args.seed, progress=not args.quiet)
    elif args.name in ("qc-estimator", "qc-fusion"):
        import torch

        from pacs_sentinel.qc.calibrate import fit_fusion
        from pacs_sentinel.qc.estimator import load_estimator
        from pacs_sentinel.qc.train_estimator import train_estimator

        torch.set_num_threads(1)  # CPU-friendly on a shared machine; the recipe takes minutes
        metrics = {}
        estimator = None
        if args.name == "qc-estimator":
            metrics["estimator"] = train_estimator(out_dir, seed=args.seed, epochs=args.epochs, progress=not args.quiet)
            estimator = load_estimator(out_dir)
        # The fusion is fitted on the estimator's signal: refit it whenever the estimator changes.
        fusion_path = out_dir / "fusion.json" if out_dir else None
        metrics["fusion"] = fit_fusion(fusion_path, seed=args.seed, progress=not args.quiet, estimator=estimator)
    else:
        from pacs_sentinel.inference.training import train_demo

        metrics = train_demo(args.name, out_dir=out_dir, seed=args.seed, epochs=args.epochs, progress=not args.quiet)
    for key, value in sorted(metrics.items()):
        print(f"{key}: {value}")
    return EXIT_OK


def _cmd_qc_threshold(args: argparse.Namespace) -> int:
    from pacs_sentinel.qc.evaluate import shipped_fusion
    from pacs_sentinel.qc.fusion import calibrated_threshold, calibration_curve
    from pacs_sentinel.qc.metrics import operating_point

    from pacs_sentinel.daemon.config import QCConfig, load_config
    from pacs_sentinel.daemon.worker import threshold_setting

    # The options as they stand (checked by calibrated_threshold below, with its messages), else
    # the configuration's [qc] table.
    qc = QCConfig.model_construct(target_review_rate=args.target_review_rate, max_risk=args.max_risk)
    if qc.target_review_rate is None and qc.max_risk is None and args.config:
        qc = load_config(args.config).qc
    target, risk = qc.target_review_rate, qc.max_risk
    fusion = shipped_fusion()
    scores, failed = calibration_curve(fusion)
    try:
        if target is not None or risk is not None:
            point = calibrated_threshold(fusion, target_review_rate=target, max_risk=risk)
        else:
            point = operating_point(scores, failed, qc.accept_threshold)
    except ValueError as exc:
        raise SentinelError(str(exc)) from None
    asked = threshold_setting(qc)
    print(f"calibration set: {len(scores)} cases, {int(failed.sum())} failures (Dice < 0.7), "
          f"cross-validated scores of QC {fusion.qc_version}; results that a volume or location outside the "
          "model card's range sends to review anyway are not counted (the threshold does not decide them)")
    print("risk-coverage curve (operating points):")
    for rate in (0.05, 0.10, 0.15, 0.20, 0.30, 0.40, 0.50):
        print(f"  target review rate {rate:.2f}: {calibrated_threshold(fusion, target_review_rate=rate).describe()}")
    print(f"operating point for {asked}:")
    print(f"  {point.describe()}")
    if risk is not None and point.risk > risk + 1e-12:
        print(f"  note: no threshold reaches max_risk {risk} on the calibration set", file=sys.stderr)
    if target is not None and point.review_rate > target + 0.01:
        print(f"  note: at least {100 * point.review_rate:.1f} % of the calibration cases have the lowest "
              f"score; a lower target review rate is not reachable on it", file=sys.stderr)
    return EXIT_OK


def _cmd_qc_eval(args: argparse.Namespace) -> int:
    import torch

    from pacs_sentinel.qc.evaluation import run_qc_eval

    if args.n_per_family < 1 or args.perturbations < 0 or args.radiographs < 0 or args.held_out < 0:
        raise SentinelError("--n-per-family must be at least 1; --perturbations, --radiographs and --held-out "
                            "at least 0")
    torch.set_num_threads(1)
    from pacs_sentinel.daemon.worker import shipped_segmentation_threshold

    threshold, setting = shipped_segmentation_threshold()
    section, _ = run_qc_eval(n_per_family=args.n_per_family, perturbations_per_image=args.perturbations,
                             n_radiographs=args.radiographs, seed=args.seed, n_held_out=args.held_out,
                             out_dir=Path(args.out), progress=not args.quiet, accept_threshold=threshold,
                             threshold_source=f": the shipped config.toml's {setting}")
    print(section)
    return EXIT_OK


def _cmd_qc_refit(args: argparse.Namespace) -> int:
    import torch

    from pacs_sentinel.daemon.refit import run_refit

    config, store = _review_store(args.config)
    torch.set_num_threads(1)
    outcome = run_refit(config, store.database, min_new_cases=config.qc.refit.min_new_cases if args.scheduled else None)
    for line in outcome.describe():
        print(line)
    return EXIT_OK


def _cmd_models(args: argparse.Namespace) -> int:
    from pacs_sentinel.daemon.config import load_config
    from pacs_sentinel.daemon.models import model_rows, qc_version_rows
    from pacs_sentinel.daemon.table import format_table

    config = load_config(args.config)
    print("models of the configured pipelines:")
    rows = model_rows(config)
    print(format_table(["pipeline", "kind", "model", "version", "source", "held-out metrics (model card)"], rows,
                       max_width=200) if rows else "  (no pipelines)")
    print("\nQC versions (* = active, used for the next job):")
    print(format_table(["", "QC version", "origin", "date", "evaluation"], qc_version_rows(config), max_width=400))
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``sentinel`` (also used by the documentation test)."""
    parser = argparse.ArgumentParser(prog="sentinel", description="PACS Sentinel: a DICOM AI node with QC.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the daemon")
    run.add_argument("-c", "--config", default="config.toml", help="configuration file (default: config.toml)")
    run.set_defaults(func=_cmd_run)

    check = sub.add_parser("check-config", help="validate a configuration file and its models")
    check.add_argument("-c", "--config", default="config.toml", help="configuration file (default: config.toml)")
    check.add_argument("--explain", metavar="PATH",
                       help="a study folder (or file): show which pipeline would take which series, and why not")
    check.set_defaults(func=_cmd_check_config)

    status = sub.add_parser("status", help="destinations' health (C-ECHO), the outbox and the newest jobs")
    status.add_argument("-c", "--config", default="config.toml", help="configuration file (default: config.toml)")
    status.add_argument("--limit", type=int, default=50, help="how many jobs to list (default: 50)")
    status.set_defaults(func=_cmd_status)

    outbox = sub.add_parser("outbox", help="results waiting for their destination: requeue dead letters")
    outbox_actions = outbox.add_subparsers(dest="action", required=True, metavar="ACTION")
    retry = outbox_actions.add_parser("retry", help="put dead letters back in the queue (e.g. after the destination "
                                                    "was fixed); the running daemon sends them at its next flush")
    retry.add_argument("items", nargs="*", type=int, help="outbox item numbers (default: every dead letter)")
    retry.add_argument("--destination", help="only the dead letters for this destination (its name in the config)")
    retry.add_argument("-c", "--config", default="config.toml", help="configuration file (default: config.toml)")
    retry.set_defaults(func=_cmd_outbox_retry)

    send = sub.add_parser("send", help="send DICOM files (a file or a folder) to a DICOM node")
    send.add_argument("path", help="a DICOM file or a folder of them")
    send.add_argument("--to", required=True, help="destination as AE@host:port")
    send.add_argument("--calling-ae", default="SENTINEL", help="our AE title (default: SENTINEL)")
    send.add_argument("--quiet", action="store_true", help="no progress bar")
    send.set_defaults(func=_cmd_send)

    review = sub.add_parser("review", help="the review worklist: list, show, claim and resolve flagged results")
    actions = review.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = actions.add_parser("list", help="review items, lowest quality score first")
    listing.add_argument("--status", choices=["open", "claimed", "resolved"], help="only items in this status")
    listing.add_argument("--pipeline", help="only items of this pipeline")
    listing.add_argument("--since", help="only items created since: a duration (7d, 12h, 30m) or an ISO date")
    listing.add_argument("--limit", type=int, default=200, help="at most this many (default: 200)")
    show = actions.add_parser("show", help="one item: score, reasons in words, overlays, viewer link")
    claim = actions.add_parser("claim", help="claim an open item")
    resolve = actions.add_parser("resolve", help="resolve an item with a decision")
    for action in (show, claim, resolve):
        action.add_argument("item", type=int, help="the item's number (from `review list`)")
    for action in (claim, resolve):
        action.add_argument("--reviewer", help="who (default: $USER)")
    resolve.add_argument("--decision", required=True, choices=["ai-correct", "ai-corrected", "ai-rejected"],
                         help="what the AI result was: correct, corrected by the reviewer, or rejected")
    resolve.add_argument("--comment", help="free text kept with the decision")
    for action in (listing, show, claim, resolve):
        action.add_argument("-c", "--config", default="config.toml", help="configuration file (default: config.toml)")
        action.set_defaults(func=_cmd_review)

    report = sub.add_parser("report", help="volumes, flag rates and scores per pipeline, sender, station, "
                                           "manufacturer and reason; drift warnings; a flag-rate chart")
    report.add_argument("-c", "--config", default="config.toml", help="configuration file (default: config.toml)")
    report.add_argument("--since", default="7d", help="window: a duration (7d, 12h) or an ISO date (default: 7d)")
    report.add_argument("--chart", help="where to write the PNG chart (default: <data_dir>/reports/flag-rate.png)")
    report.set_defaults(func=_cmd_report)

    feedback = sub.add_parser("feedback", help="reviewers' decisions and corrections as a data set")
    feedback_actions = feedback.add_subparsers(dest="action", required=True, metavar="ACTION")
    export = feedback_actions.add_parser("export", help="write decided and corrected cases as NIfTI + CSV")
    export.add_argument("--out", required=True, help="export folder (cases.csv and one folder per case)")
    export.add_argument("--since", help="only decisions recorded since: a duration (30d) or an ISO date")
    export.add_argument("-c", "--config", default="config.toml", help="configuration file (default: config.toml)")
    export.set_defaults(func=_cmd_feedback_export)

    demo = sub.add_parser("demo", help="run the whole product on synthetic studies and print the results")
    demo.add_argument("--workdir", default="sentinel-demo", help="working folder (default: ./sentinel-demo)")
    demo.set_defaults(func=_cmd_demo)

    train = sub.add_parser("train-demo", help="train a shipped demo model on synthetic phantoms")
    train.add_argument("name", choices=["organ-seg", "cxr-cls", "cxr-features", "qc-estimator", "qc-fusion"],
                       help="which demo model (cxr-features: refit only cxr-cls's feature statistics, which its "
                            "QC measures unfamiliar images against; qc-estimator: the QC's confidence estimator, "
                            "then its fusion; qc-fusion: refit only the QC fusion on its calibration set)")
    train.add_argument("--out", help="output folder (default: the shipped model folder)")
    train.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    train.add_argument("--epochs", type=int, default=None, help="training epochs (default: the recipe's)")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.set_defaults(func=_cmd_train_demo)

    threshold = sub.add_parser("qc-threshold",
                               help="derive the QC verdict threshold from the calibration set's risk-coverage curve")
    threshold.add_argument("-c", "--config", default=None,
                           help="take target_review_rate / max_risk / accept_threshold from this file's [qc]")
    group = threshold.add_mutually_exclusive_group()
    group.add_argument("--target-review-rate", type=float, help="share of results to send to review, e.g. 0.15")
    group.add_argument("--max-risk", type=float, help="highest failure rate (Dice < 0.7) among accepted results")
    threshold.set_defaults(func=_cmd_qc_threshold)

    qc_eval = sub.add_parser("qc-eval", help="measure QC failure detection on held-out phantoms (and the classifier's)")
    qc_eval.add_argument("--n-per-family", type=int, default=16, help="phantoms per image family (default: 16)")
    qc_eval.add_argument("--perturbations", type=int, default=2, help="perturbed masks per phantom (default: 2)")
    qc_eval.add_argument("--radiographs", type=int, default=200,
                         help="radiograph phantoms for the classification metrics (default: 200; 0 skips)")
    qc_eval.add_argument("--held-out", type=int, default=96,
                         help="extra phantoms of the held-out families, for their subset only (default: 96; "
                              "0: the main draw's only)")
    qc_eval.add_argument("--seed", type=int, default=0, help="seed of the phantom sets (default: 0)")
    qc_eval.add_argument("--out", default="docs", help="folder for the PNG figures (default: docs)")
    qc_eval.add_argument("--quiet", action="store_true", help="no progress bar")
    qc_eval.set_defaults(func=_cmd_qc_eval)

    qc_refit = sub.add_parser("qc-refit", help="recalibrate the QC fusion on reviewers' feedback now: a new QC "
                                               "version, activated only when no worse on held-out evaluation")
    qc_refit.add_argument("-c", "--config", default="config.toml", help="configuration file (default: config.toml)")
    qc_refit.add_argument("--scheduled", action="store_true",
                          help="as the nightly job: only when [qc.refit] min_new_cases new cases were decided")
    qc_refit.set_defaults(func=_cmd_qc_refit)

    models = sub.add_parser("models", help="the pipelines' models and the QC versions, with evaluation figures")
    models.add_argument("-c", "--config", default="config.toml", help="configuration file (default: config.toml)")
    models.set_defaults(func=_cmd_models)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``sentinel``; returns the exit status."""
    args = build_parser().parse_args(argv)
    from pacs_sentinel.daemon.logs import configure_logging

    # Commands other than `run` (which configures logging from the file) keep standard
    # output for their own results: only warnings and errors, on standard error.
    configure_logging("console", "warning", stream=sys.stderr)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"sentinel: {problem}", file=sys.stderr)
        return EXIT_ERROR
    except SentinelError as exc:
        print(f"sentinel: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130
