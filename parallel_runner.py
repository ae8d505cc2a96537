"""Run the experiment suite of ``configs.py`` on the GPUs (or the CPU) and write its tables, plots and report.

    python parallel_runner.py                     # the default suite (MiniBench, offline, CPU)
    python parallel_runner.py --only coop_b2n     # some tasks of the pipeline
    python parallel_runner.py --dry-run           # list the jobs, what a run would do with each, and the downloads
    python parallel_runner.py --gpus 0 1 --slots-per-gpu 2
    python parallel_runner.py --rerun-failed      # retry the jobs that failed in an earlier run
    python parallel_runner.py --tables-only       # rebuild tables, plots and report.md from the output folder
    python parallel_runner.py --cold              # a fresh interpreter per job (no warm worker)

Each job is ``train.py`` in its own process group with ``CUDA_VISIBLE_DEVICES`` set to its GPU, in its own folder
(``stdout.log``, ``stderr.log``, ``log.txt``, ``config.yaml``, ``result.json``). By default a job is a child forked
from a warm worker that has imported torch, open_clip and vltune once, which saves each job seconds of start-up;
``--cold`` (or ``base['executor']['warm'] = False``) starts a fresh ``python train.py`` per job instead.
Weights that are not on disk yet (a Dassl name's OpenAI file, an open_clip pretrained tag) are downloaded once,
here, before the first job starts. Evaluations start as soon as their own train job has succeeded. A finished job is
not run again, so an interrupted suite continues where it stopped.
Ctrl-C ends the jobs this runner started and records them as cancelled. Mail goes out on a worker thread and never
holds up a job or changes the exit code; at the end the runner waits at most ``mail.final_wait_s`` for it (a
Ctrl-C ends that wait at once). Exit code: 0 when every job succeeded, 1 when any failed, was cancelled or skipped,
2 on a bad experiment file or an output folder that cannot be written (read-only, disk full), 130 when interrupted.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import sys
import threading
import time
from typing import Any

REPO = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, REPO)

import vltune  # noqa: E402,F401  (compat shim first)
from vltune.plugins import load_builtins, plugin_packages  # noqa: E402
from vltune.runner.executor import CPU, Executor, InlineExecutor, LocalExecutor  # noqa: E402
from vltune.runner.jobs import Job, expand, fetch_weights_once, refresh_identities  # noqa: E402
from vltune.runner.lock import LockedError, RunnerLock  # noqa: E402
from vltune.runner.scheduler import Lane, Scheduler, SuiteResult  # noqa: E402
from vltune.runner.schema import Experiments, SuiteError, load_experiments  # noqa: E402
from vltune.runner.seed_configs import plot_note as seed_plot_note  # noqa: E402
from vltune.runner.slurm_executor import SLURM_DEVICE  # noqa: E402
from vltune.runner.warm import DEFAULT_PRELOAD, WarmExecutor  # noqa: E402

logger = logging.getLogger("parallel_runner")


#: what the warm worker imports once: the libraries, and the plugin packages train.py loads (they fill the trainer
#: and dataset registries)
PRELOAD = (*DEFAULT_PRELOAD, *plugin_packages())

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.split("\n")[1:]))
    p.add_argument("--config", default=os.path.join(REPO, "configs.py"), help="experiment file (default: configs.py)")
    p.add_argument("--only", nargs="+", metavar="TASK", help="run only these tasks of the pipeline")
    p.add_argument("--dry-run", action="store_true", help="print the jobs and what a run would do, then exit")
    p.add_argument("--rerun-failed", action="store_true", help="run again the jobs an earlier run recorded failed")
    p.add_argument("--force", action="store_true", help="rerun every selected job from an emptied folder")
    p.add_argument("--rerun-stale", action="store_true",
                   help="empty and rerun only the jobs whose folders hold a finished run of a different config")
    p.add_argument("--gpus", nargs="+", metavar="ID", help="run every pipeline on these GPU ids ('cpu': no GPU)")
    p.add_argument("--executor", choices=("local", "ray", "slurm"),
                   help="where jobs run (default: base['executor']['kind'])")
    p.add_argument("--ray-address", help="the Ray cluster for --executor ray (default: base['executor']['address'])")
    p.add_argument("--slots-per-gpu", type=int, default=0, metavar="N", help="jobs per GPU at once")
    p.add_argument("--tables-only", action="store_true", help="rebuild tables/plots/report from the output folder")
    p.add_argument("--debug", action="store_true", help="run jobs one by one in this process (no subprocesses)")
    p.add_argument("--cold", action="store_true",
                   help="start a fresh interpreter per job instead of forking it from the warm worker")
    p.add_argument("--no-mail", action="store_true", help="send no mail even if configs.py enables it")
    p.add_argument("--plain", action="store_true", help="plain progress lines even on a terminal")
    return p


def parse_gpus(values: list[str] | None) -> list[int] | None:
    if values is None:
        return None
    ids = [v for value in values for v in value.split(",") if v]
    if ids in (["cpu"], ["none"]):
        return []
    try:
        return [int(v) for v in ids]
    except ValueError:
        raise SuiteError(f"--gpus takes GPU ids (e.g. --gpus 0 1) or 'cpu'; got {' '.join(values)}") from None


def lanes_of(experiments: Experiments) -> list[Lane]:
    return [Lane(devices=list(s.gpu_ids) or [CPU], slots=s.slots_per_gpu, tasks=list(s.tasks))
            for s in experiments.pipeline]


def slurm_lanes(experiments: Experiments) -> list[Lane]:
    """With SLURM the pipeline's GPU ids mean nothing on the driver: each stage is one lane of ``array_parallelism``
    virtual slots (``slurm:<stage>``), how many of its jobs may be queued or running at once."""
    slots = experiments.base.executor.array_parallelism
    return [Lane(devices=[f"{SLURM_DEVICE}:{i}"], slots=slots, tasks=list(s.tasks))
            for i, s in enumerate(experiments.pipeline)]


def make_executor(experiments: Experiments, args: argparse.Namespace) -> tuple[Executor, list[Lane]]:
    """The executor and its lanes: local (the pipeline's stages on their devices; warm unless ``--cold`` or
    ``base['executor']['warm']`` is False), Ray (one lane in pipeline order; Ray places the jobs, as many at once
    as the cluster holds) or SLURM (``slurm_lanes``; SLURM places the jobs)."""
    settings = experiments.base.executor
    kind = args.executor or settings.kind
    if args.debug:
        return InlineExecutor(), lanes_of(experiments)
    if kind == "slurm":
        from vltune.runner.slurm_executor import SlurmExecutor

        sbatch = ("partition", "account", "time", "gpus_per_job", "cpus_per_task", "mem_gb", "requeue",
                  "additional_parameters", "poll_s")
        executor = SlurmExecutor(repo=REPO, **{key: getattr(settings, key) for key in sbatch})
        return executor, slurm_lanes(experiments)
    if kind != "ray":
        if args.cold or not settings.warm:
            return LocalExecutor(), lanes_of(experiments)
        log = os.path.join(experiments.base.output_root, "warm_worker.log")
        return WarmExecutor(preload=PRELOAD, log=log), lanes_of(experiments)
    from vltune.runner.ray_executor import RAY_DEVICE, RayExecutor

    executor = RayExecutor(args.ray_address or settings.address, settings.max_retries,
                           max(s.slots_per_gpu for s in experiments.pipeline), repo=REPO)
    tasks = [t for stage in experiments.pipeline for t in stage.tasks]
    return executor, [Lane(devices=[RAY_DEVICE], slots=executor.cluster_slots(), tasks=tasks)]


def placement_of(experiments: Experiments, lanes: list[Lane], executor: Executor | None,
                 args: argparse.Namespace) -> Any:
    """``base["schedule"]``'s placement: None for fixed slots (the scheduler's default), else a ``MemoryPlacement``
    (``vltune.runner.packing``)."""
    settings = experiments.base.schedule
    if settings.packing != "memory":
        return None
    kind, kind_name = args.executor or experiments.base.executor.kind, {"ray": "Ray", "slurm": "SLURM"}
    if kind in kind_name:
        raise SuiteError(f"base['schedule']: packing='memory' needs the local executor ({kind_name[kind]} places "
                         f"jobs itself); set packing='slots' or run without --executor {kind}")
    from vltune.runner.packing import memory_placement

    return memory_placement(settings, lanes, experiments.base.output_root, executor)


def prepare_minibench(experiments: Experiments) -> None:
    """Generate the MiniBench datasets and pretrain the mini CLIP on MiniUnion's train split when they are missing."""
    from vltune.clip.pretrain import build_minibench_clip
    from vltune.data.minibench import write_minibench

    base = experiments.base
    started = time.time()
    folders = write_minibench(base.data_root)
    if not os.path.isfile(base.weights):
        print(f"Pretraining the mini CLIP on MiniUnion's train split -> {base.weights} (about 2 min on 2 cores)",
              flush=True)
        build_minibench_clip(folders, base.weights, arch=base.backbone)
    print(f"MiniBench ready in {time.time() - started:.0f} s: {', '.join(sorted(folders))}", flush=True)


def print_plan(scheduler: Scheduler, experiments: Experiments) -> None:
    root = experiments.base.output_root
    index = {s.job.out: i for i, s in enumerate(scheduler.states)}
    word = {"pending": "run", "success": "done", "failed": "failed earlier", "skipped": "skip", "stale": "stale"}
    estimate = getattr(scheduler.placement, "estimate", None)  # memory packing: each job's expected peak
    for i, s in enumerate(scheduler.states):
        j = s.job
        dep = f"after #{index[j.depends_on]}" if j.depends_on in index else ""
        grid = f" {j.grid_name}" if j.grid_name else ""
        memory = ""
        if estimate is not None and s.status == "pending":
            est = estimate(j)
            memory = f" [{est.mb:.0f} MB, {est.source}]" if est else " [memory: probed before it starts]"
        print(f"#{i:<4d} {word.get(s.status, s.status):14s} {j.task:18s} {j.role:8s} {j.dataset:22s} seed{j.seed} "
              f"shots{j.shots}{grid} {dep:10s} {os.path.relpath(j.out, root)}{memory}")
    if estimate is not None:
        budgets = ", ".join(f"{d}: {mb:.0f} MB" for d, mb in scheduler.placement.budget.items())
        print(f"memory packing: budget per device {budgets}")
    counts = {k: sum(s.status == k for s in scheduler.states) for k in word}
    lanes = "; ".join(f"{'+'.join(map(str, lane.devices))} x{lane.slots}: {', '.join(lane.tasks)}"
                      for lane in scheduler.lanes)
    print(f"{len(scheduler.states)} jobs: {counts['pending']} to run, {counts['success']} done, {counts['failed']} "
          f"failed earlier (--rerun-failed retries them), {counts['skipped']} to skip, {counts['stale']} stale "
          f"(--rerun-stale reruns them) | lanes: {lanes}")
    if scheduler.stale_report():
        print(scheduler.stale_report())


class Notifier:
    """Mails a summary after each task and at the end; a mail problem is logged and never stops the run.

    The summary is built here (tables, plots) but sent by a :class:`~vltune.notify.MailQueue` worker thread:
    ``task_done`` runs inside the scheduler loop, and waiting there for an SMTP server would leave free slots idle
    (and let a signal meant for the jobs land in the middle of a mail).
    """

    def __init__(self, experiments: Experiments, enabled: bool) -> None:
        from vltune.notify import MailQueue

        self.settings = experiments.base.mail
        self.enabled = enabled and bool(self.settings and self.settings.enabled)
        self.root = experiments.base.output_root
        self.queue = MailQueue(self.settings) if self.enabled else None

    def send(self, title: str, rows: list, failures: list[dict]) -> None:
        """Build the summary of ``rows`` and queue it; returns without waiting for the server."""
        if self.queue is None:
            return
        try:
            from vltune.notify import summary_body, summary_subject
            from vltune.results.plots import write_plots
            from vltune.results.record import Record
            from vltune.results.report import render_report

            counts = {k: sum(1 for _, r in rows if (r or {}).get("status") == k)
                      for k in ("success", "failed", "skipped", "cancelled")}
            records = [Record.from_dict(r, os.path.join(j.out, "result.json")) for j, r in rows if r]
            plots = write_plots(records, self.root)
            body = summary_body(title, render_report(records), failures)
            subject = summary_subject(title, counts["success"], counts["failed"], counts["skipped"],
                                      counts["cancelled"])
            # The summary's figures: the training-loss curves (one per protocol and dataset) stay in report.md.
            attached = [os.path.join(self.root, p) for p in plots if not os.path.basename(p).startswith("train_loss_")]
            self.queue.submit(subject, body, attached)
        except Exception:  # noqa: BLE001  (mail is a courtesy: never let it end the suite)
            logger.exception("could not build or send the summary mail; the run goes on")

    def task_done(self, task: str, result: SuiteResult) -> None:
        self.send(task, [(j, r) for j, r in result.rows if j.task == task], result.failures(task))

    def finish(self) -> bool:
        """Wait at most ``mail.final_wait_s`` for the mails still queued; SIGINT, SIGTERM or SIGHUP end the wait at
        once (the user has already waited for the suite). True when every mail was sent or given up in time."""
        if self.queue is None or not self.queue.pending():
            return True
        wait_s = self.settings.final_wait_s
        where = self.queue.where
        stop = threading.Event()
        previous = {}
        if threading.current_thread() is threading.main_thread():  # signal handlers can only be set there
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                previous[sig] = signal.signal(sig, lambda signum, frame: stop.set())
        try:
            print(f"waiting up to {wait_s:g} s for the summary mail to {where} (Ctrl-C to skip)", flush=True)
            done = self.queue.wait(wait_s, stop)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if not done:
            why = "a signal ended the wait" if stop.is_set() else f"still pending after {wait_s:g} s (final_wait_s)"
            logger.warning("mail to %s: %d summary mail(s) not sent: %s; the runner exits without them", where,
                           self.queue.pending(), why)
        return done


def write_outputs(root: str, experiments: Experiments | None = None, only: list[str] | None = None) -> str:
    """Tables (md, csv, tex), plots and report.md from every record in the output folder; returns the report. A Skip
    Tuning-format configs.py also gets each task's accuracy and cost tables in its ``output.result`` and
    ``output.cost`` folders."""
    from vltune.results.report import rebuild

    report = rebuild(root)
    seed = experiments.seed if experiments is not None else None
    if seed is not None:
        written = seed.write_tables(root, only)
        folders = sorted({os.path.dirname(p) for p in written})
        if folders:
            print(f"output.result / output.cost tables: {', '.join(folders)}", flush=True)
        for t in seed.tasks.values():
            if t.plot != "line" and (only is None or t.name in only):
                print(seed_plot_note(t), flush=True)
    return report


# Errors of the output folder's file system: reported in one line with what to do, not as a traceback.
STORAGE_ERRNOS = {errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
                  errno.EPERM: "operation not permitted", errno.ENOSPC: "the disk is full",
                  errno.EDQUOT: "the disk quota is exceeded"}


def storage_error_line(e: OSError, root: str) -> str:
    """One line for an output folder that cannot be written: what failed, where, and what to do."""
    where = e.filename or root
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        todo = ("free space there (or set base['output']['root'] to another disk) and run again; finished jobs "
                "keep their results and are not rerun")
    else:
        todo = "make the folder writable or set base['output']['root'] to a writable folder, then run again"
    return f"error: cannot write {where} ({STORAGE_ERRNOS[e.errno]}): {todo}"


def _setup_logging(root: str) -> None:
    """Warnings to stderr, everything to ``<root>/runner.log``; replaces the handlers of an earlier call (tests
    call ``main`` more than once in one process)."""
    os.makedirs(root, exist_ok=True)
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.WARNING)
    file_handler = logging.FileHandler(os.path.join(root, "runner.log"))
    for name in ("parallel_runner", "vltune.notify", "vltune.runner"):
        log = logging.getLogger(name)
        for old in [h for h in log.handlers if getattr(h, "_vltune_runner", False)]:
            log.removeHandler(old)
            old.close()
        log.setLevel(logging.INFO)
        log.addHandler(handler)
        log.addHandler(file_handler)
        log.propagate = False
    handler._vltune_runner = file_handler._vltune_runner = True  # type: ignore[attr-defined]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    load_builtins()
    try:
        experiments = load_experiments(args.config, REPO, gpus=parse_gpus(args.gpus),
                                       slots_per_gpu=args.slots_per_gpu, executor=args.executor)
        root = experiments.base.output_root
        if args.tables_only:
            print(write_outputs(root, experiments, args.only))
            return 0
        jobs = expand(experiments, REPO, args.only)
        scheduler_args = dict(force=args.force, rerun_failed=args.rerun_failed, rerun_stale=args.rerun_stale)
        if args.dry_run:
            fetch_weights_once(jobs, dry_run=True)
            lanes = lanes_of(experiments)
            print_plan(Scheduler(jobs, lanes, InlineExecutor(), placement=placement_of(experiments, lanes, None, args),
                                 **scheduler_args), experiments)
            for line in experiments.seed.plan(root, args.only) if experiments.seed is not None else []:
                print(line)
            return 0
    except SuiteError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        _setup_logging(root)
        with RunnerLock(root):
            return run(experiments, jobs, args, scheduler_args)
    except (LockedError, SuiteError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno not in STORAGE_ERRNOS:
            raise
        print(storage_error_line(e, root), file=sys.stderr)
        return 2


def run(experiments: Experiments, jobs: list[Job], args: argparse.Namespace, scheduler_args: dict) -> int:
    """Run the jobs under the lock; write tables, plots and report; mail; return the exit code."""
    from vltune.runner.progress import Progress

    root = experiments.base.output_root
    if experiments.seed is not None:
        experiments.seed.clear(root, args.only, echo=lambda line: print(line, flush=True))
    if experiments.base.prepare == "minibench":
        prepare_minibench(experiments)
    fetch_weights_once(jobs)  # each missing weights file once, here, before any job starts
    refresh_identities(jobs)  # the mini CLIP or a download may have just appeared: identify it by its content
    notifier = Notifier(experiments, enabled=not args.no_mail)
    progress = Progress(live=False if args.plain else None)
    try:
        executor, lanes = make_executor(experiments, args)
    except ImportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    scheduler = Scheduler(jobs, lanes, executor, on_event=progress.event, on_task_done=notifier.task_done,
                          placement=placement_of(experiments, lanes, executor, args), **scheduler_args)
    done_before = sum(s.previous for s in scheduler.states)
    stale = scheduler.stale_report()
    if stale:
        print(f"warning: {stale}", file=sys.stderr, flush=True)
    if done_before:
        print(f"resuming: {done_before} of {len(jobs)} jobs have results from an earlier run", flush=True)
    started = time.time()
    progress.attach(scheduler)
    try:
        result = scheduler.run(tick=progress.tick)
    finally:
        progress.close()
        if isinstance(executor, WarmExecutor):
            executor.close()  # stop the warm worker and reap it (also on Ctrl-C and SIGTERM)
        if hasattr(executor, "summary"):
            print(executor.summary(), flush=True)  # e.g. SLURM: how many jobs were submitted, how many re-attached
    report = write_outputs(root, experiments, args.only)
    notifier.send("suite" + (" (interrupted)" if result.interrupted else ""), result.rows, result.failures())
    c = result.counts
    print(f"\n{report}\n{c['success']}/{len(jobs)} jobs succeeded, {c['failed']} failed, {c['skipped']} skipped, "
          f"{c['stale']} stale, {c['cancelled']} cancelled in {time.time() - started:.0f} s; "
          f"report: {os.path.join(root, 'report.md')}")
    for f in result.failures():
        print(f"  {f['status']}: {f['job']} (exit code {f['exit_code']}) -> {f['folder']}", file=sys.stderr)
    if stale:
        print(f"warning: {stale}", file=sys.stderr)
    notifier.finish()
    if result.interrupted:
        return 130
    return 0 if c["success"] == len(jobs) else 1


if __name__ == "__main__":
    sys.exit(main())
