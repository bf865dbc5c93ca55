"""`fieldgate serve --workers N`: N processes serving one listening socket, so a gateway can use
more than one core.

The parent binds the socket, migrates and makes the admin token once (gateway/cli.py), then
hands the socket to uvicorn's own supervisor, `uvicorn.supervisors.Multiprocess` (uvicorn 0.54
was read for this): it spawns the workers, pings them, restarts one that dies (logging it),
stops everything when one fails before it started serving (exit status 3, `STARTUP_FAILURE`:
the same failure would repeat on every restart), and on SIGTERM/SIGINT sends each worker
SIGTERM and waits for it, so every worker drains as one `serve` does (commits what it
acknowledged). `Supervisor` adds two rules: workers that die before serving, five times in a
row, whatever their exit status, stop the parent too; and uvicorn's SIGHUP (restart every
worker), SIGTTIN and SIGTTOU (one worker more or less) are refused, because each would leave
an MQTT session of the shared subscription unserved (`Supervisor._refuse`).

Workers are spawned, not forked: the app is made in the child from `WorkerConfig`, which
carries the settings (pickled) and makes the app in `load`. What each worker needs of its own:

- an index (0, 1, ...) that a replacement takes over: claimed with a file lock in the run's
  directory (`claim_index`), which the kernel releases when a worker dies, however it dies;
- an MQTT client id of its own, fixed per index (`<client_id>-w<k>`: a restarted worker resumes
  its session), on a shared subscription (`$share/<group>/...`: each message goes to one worker);
- metrics written to files in the run's directory (prometheus_client's multiprocess mode), so
  /metrics, answered by any one worker, shows the sum of all (gateway/metrics.py);
- the maintenance job and dead-letter pruning run in worker 0 only (gateway/app.py).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import socket
import sys
import tempfile
from collections.abc import Iterator

import uvicorn
from fastapi import FastAPI
from uvicorn.config import STARTUP_FAILURE
from uvicorn.supervisors import Multiprocess

from gateway import metrics
from gateway.settings import Settings

log = logging.getLogger("fieldgate")

DEFAULT_SHARED_GROUP = "fieldgate"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


def configure_logging(log_level: str) -> None:
    """The log format and levels of `serve`, in the parent and in each worker."""
    logging.basicConfig(level=log_level.upper(), format=LOG_FORMAT)
    # Tortoise logs "Tortoise-ORM shutdown" at INFO each time it closes, the migration's included.
    logging.getLogger("tortoise").setLevel(max(logging.WARNING, logging.getLogger().level))


def shared_group(settings: Settings) -> str:
    """The shared subscription group workers subscribe in: FIELDGATE_MQTT_SHARED_GROUP, else
    `fieldgate` (without one, every worker would get every message)."""
    return settings.mqtt_shared_group or DEFAULT_SHARED_GROUP


def worker_settings(settings: Settings, index: int) -> Settings:
    """Worker `index`'s settings: its own MQTT client id, fixed per index so that a restarted
    worker resumes its session, on the shared subscription."""
    return settings.model_copy(
        update={
            "mqtt_client_id": f"{settings.mqtt_client_id}-w{index}",
            "mqtt_shared_group": shared_group(settings),
        }
    )


def claim_index(directory: str) -> tuple[int, int]:
    """The lowest worker index no living worker holds, and the descriptor of its lock file
    (kept open for the life of the process: the kernel releases the lock when it ends)."""
    index = 0
    while True:
        fd = os.open(os.path.join(directory, f"worker-{index}.lock"), os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            index += 1
            continue
        return index, fd


def worker_app(settings: Settings, index: int, base_url: str) -> FastAPI:
    """The app one worker serves: the database is migrated and the admin token made (by the
    parent); background jobs that must run once per gateway run in worker 0 only."""
    from gateway.app import create_app

    app = create_app(settings)
    app.state.migrated = True
    app.state.admin_token_checked = True
    app.state.base_url = base_url
    app.state.worker = index
    return app


def worker_stopped(index: int) -> None:
    """At a worker's end (its lifespan, drained): what it did, which tells how the load was
    spread; its living-worker gauges leave the sums."""
    log.info(
        "worker %d (pid %d) stopped: %d HTTP requests, %d readings stored, %d MQTT messages",
        index,
        os.getpid(),
        metrics.own_total(metrics.HTTP_REQUESTS),
        metrics.own_total(metrics.READINGS_ACCEPTED),
        metrics.own_total(metrics.MQTT_MESSAGES_RECEIVED),
    )
    metrics.process_stopped()


class WorkerConfig(uvicorn.Config):
    """uvicorn's config, pickled to each spawned worker, that makes the worker's app there:
    `load` runs in the worker before it serves (uvicorn.Server._serve)."""

    def __init__(
        self, settings: Settings, *, workers: int, base_url: str, run_dir: str, log_level: str
    ) -> None:
        from gateway.server import GuardedHttpProtocol, server_options

        self.fieldgate_settings = settings
        self.fieldgate_log_level = log_level
        self.base_url = base_url
        self.run_dir = run_dir
        super().__init__(
            "gateway.workers:worker_app",  # made in `load`; a string pickles
            workers=workers,
            log_level=log_level,
            http=GuardedHttpProtocol,  # replaced in `load` by one with the settings' limits
            **server_options(settings),
        )

    def configure_logging(self) -> None:
        super().configure_logging()
        configure_logging(self.fieldgate_log_level)

    def load(self) -> None:
        """Make this worker's app. A failure here would fail again on every restart: it exits
        with uvicorn's STARTUP_FAILURE, on which the parent stops instead of restarting it."""
        from gateway.server import protocol_for

        try:
            index, self._index_lock = claim_index(self.run_dir)
            metrics.forget_dead_processes()
            settings = worker_settings(self.fieldgate_settings, index)
            self.http = protocol_for(settings)
            self.app = worker_app(settings, index, self.base_url)
        except Exception:
            log.exception("a worker (pid %d) could not be made", os.getpid())
            sys.exit(STARTUP_FAILURE)
        super().load()


class Supervisor(Multiprocess):
    """uvicorn's supervisor, which stops when a worker exits with STARTUP_FAILURE and restarts
    any other that dies, plus: a worker that dies before it ever served (say, it fails while
    importing) counts as failing at start too; after `MAX_START_FAILURES` of those in a row
    (no worker started serving in between) the parent stops instead of restarting forever."""

    MAX_START_FAILURES = 5

    def __init__(self, config: WorkerConfig, sockets: list[socket.socket]) -> None:
        super().__init__(config, sockets)
        self.start_failures = 0
        self.gave_up = False
        self._served: set[int | None] = set()  # pids of workers seen serving

    # The number of workers and their indexes are fixed for a run. Mosquitto 2.0 keeps queuing
    # a share of a shared subscription for a member whose session is offline (measured: half
    # the messages, one of two members away), so a worker index that stops being served
    # strands its share until its session expires: uvicorn's SIGTTOU (one worker less) would
    # do that at once, SIGTTIN (one more) at the next start with the configured N, and SIGHUP
    # starts each replacement before its predecessor ends, so the replacement takes a new index.

    def handle_ttou(self) -> None:
        self._refuse("SIGTTOU")

    def handle_ttin(self) -> None:
        self._refuse("SIGTTIN")

    def handle_hup(self) -> None:
        self._refuse("SIGHUP")

    def _refuse(self, signal_name: str) -> None:
        log.warning(
            "%s ignored: the workers are fixed for a run (each holds its MQTT session on the "
            "shared subscription); restart fieldgate serve to change them (README)",
            signal_name,
        )

    def keep_subprocess_alive(self) -> None:
        for process in self.processes:
            if process.pid not in self._served and process.is_ready(timeout=1):
                self._served.add(process.pid)
                self.start_failures = 0
        before = list(self.processes)
        super().keep_subprocess_alive()
        for old, new in zip(before, self.processes, strict=True):
            if old is new or old.pid in self._served:
                continue
            self.start_failures += 1  # replaced before it ever served
            if self.start_failures >= self.MAX_START_FAILURES and not self.should_exit.is_set():
                log.error(
                    "workers died %d times in a row before serving (their errors are above); "
                    "stopping",
                    self.start_failures,
                )
                self.gave_up = True
                self.should_exit.set()


@contextlib.contextmanager
def run_directory() -> Iterator[str]:
    """A directory for one run of the workers (their index locks and metrics files), removed
    afterwards; PROMETHEUS_MULTIPROC_DIR names it for the workers, which inherit it."""
    directory = tempfile.mkdtemp(prefix="fieldgate-workers-")
    previous = os.environ.get(metrics.MULTIPROC_ENV)
    os.environ[metrics.MULTIPROC_ENV] = directory
    try:
        yield directory
    finally:
        if previous is None:
            os.environ.pop(metrics.MULTIPROC_ENV, None)
        else:
            os.environ[metrics.MULTIPROC_ENV] = previous
        shutil.rmtree(directory, ignore_errors=True)


def serve_workers(
    settings: Settings, *, workers: int, sock: socket.socket, base_url: str, log_level: str
) -> bool:
    """Serve with `workers` processes on `sock` until SIGTERM/SIGINT; False when a worker failed
    before it started serving (its log says why), which stopped the others."""
    if settings.mqtt_url:
        log.info(
            "%d workers share the MQTT subscription as group %r%s, client ids %s-w0..w%d",
            workers,
            shared_group(settings),
            "" if settings.mqtt_shared_group else " (FIELDGATE_MQTT_SHARED_GROUP is not set)",
            settings.mqtt_client_id,
            workers - 1,
        )
    with run_directory() as directory:
        config = WorkerConfig(
            settings, workers=workers, base_url=base_url, run_dir=directory, log_level=log_level
        )
        supervisor = Supervisor(config, sockets=[sock])
        supervisor.run()
        failed = any(p.exitcode == STARTUP_FAILURE for p in supervisor.processes)
    return not (failed or supervisor.gave_up)
