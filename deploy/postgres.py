"""PostgreSQL from the machine's binaries, in a data directory we own, without Docker.

Data survives stop/start (``initdb`` only runs on an empty directory). We run as root on
these machines and Postgres refuses root, so the cluster belongs to the ``postgres`` OS
account and every server command runs as it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pwd
import shlex
import shutil
import stat
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from deploy.processes import _tail, process_args, read_pid, stop_pid

PG_USER = "loyalty"
PG_PASSWORD = "loyalty"
PG_DATABASE = "loyalty"
#: OS account that owns the cluster when we run as root (Postgres refuses to run as root).
PG_OS_USER = "postgres"

# --------------------------------------------------------------------------------------
# PostgreSQL
# --------------------------------------------------------------------------------------


def find_pg_bin() -> Path:
    """Locate PostgreSQL server binaries (initdb, pg_ctl, psql).

    Order: env ``PG_BIN``; ``/usr/lib/postgresql/15/bin``; the newest other
    ``/usr/lib/postgresql/*/bin``; ``pg_config --bindir``. If none is found and we are root
    on a Debian/Ubuntu machine, ``apt-get install postgresql-15`` (falling back to the
    distribution's default ``postgresql``) — the machine's own packages are the robust
    choice here: they are reachable from this kind of machine, need no Docker, and create
    the ``postgres`` OS user we run the server as.
    """
    candidates: list[Path] = []
    if os.environ.get("PG_BIN"):
        candidates.append(Path(os.environ["PG_BIN"]))
    candidates.append(Path("/usr/lib/postgresql/15/bin"))
    versions = sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
        reverse=True,
    )
    candidates.extend(versions)
    if shutil.which("pg_config"):
        with contextlib.suppress(subprocess.CalledProcessError, OSError):
            out = subprocess.run(
                ["pg_config", "--bindir"], check=True, capture_output=True, text=True
            ).stdout.strip()
            candidates.append(Path(out))
    for c in candidates:
        if (c / "initdb").exists() and (c / "pg_ctl").exists():
            return c
    if os.geteuid() == 0 and shutil.which("apt-get"):
        print("postgres: binaries not found, installing with apt-get (one-off)", flush=True)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-q"], check=True, env=env)
        ok = (
            subprocess.run(
                ["apt-get", "install", "-y", "-q", "--no-install-recommends", "postgresql-15"],
                env=env,
            ).returncode
            == 0
        )
        if not ok:
            subprocess.run(
                ["apt-get", "install", "-y", "-q", "--no-install-recommends", "postgresql"],
                check=True,
                env=env,
            )
        return find_pg_bin_no_install()
    raise RuntimeError(
        "PostgreSQL server binaries not found; install postgresql-15 (apt-get install "
        "postgresql-15), set PG_BIN to their directory, or set DATABASE_URL"
    )


def find_pg_bin_no_install() -> Path:
    for c in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (c / "initdb").exists():
            return c
    raise RuntimeError("PostgreSQL binaries still missing after apt-get install")


def _as_pg_user(cmd: Sequence[str]) -> list[str]:
    """Postgres refuses to run as root: when we are root, run the command as the
    ``postgres`` OS user (created by the distribution package)."""
    if os.geteuid() != 0:
        return list(cmd)
    try:
        pwd.getpwnam(PG_OS_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/bin/false", PG_OS_USER],
            check=True,
        )
    if shutil.which("runuser"):
        return ["runuser", "-u", PG_OS_USER, "--", *cmd]
    return ["su", "-s", "/bin/sh", PG_OS_USER, "-c", shlex.join(cmd)]


def _make_traversable(path: Path) -> None:
    """Let the ``postgres`` user reach ``path``: add o+x to every ancestor that lacks it.

    Only directories we own are touched (e.g. a 0700 pytest tmp dir); without this,
    initdb fails with a confusing "permission denied" on the data dir.
    """
    if os.geteuid() != 0:
        return
    for parent in [path, *path.parents]:
        try:
            st = parent.stat()
        except OSError:
            continue
        if not st.st_mode & stat.S_IXOTH and st.st_uid == os.geteuid():
            os.chmod(parent, st.st_mode | stat.S_IXOTH)


def _chown_pg(path: Path) -> None:
    if os.geteuid() != 0:
        return
    pw = pwd.getpwnam(PG_OS_USER)
    os.chown(path, pw.pw_uid, pw.pw_gid)


def _pg_socket_dir(data_dir: Path) -> Path:
    """Unix socket dir next to the data dir (never /var/run, which may not exist or be
    writable). Unix socket paths are limited to ~107 bytes, so fall back to /tmp."""
    sock = data_dir.parent / "pg-socket"
    if len(str(sock)) > 80:
        digest = hashlib.sha1(str(data_dir).encode()).hexdigest()[:10]  # stable across runs
        sock = Path("/tmp") / f"pg-socket-{digest}"
    return sock


def _pg_run(pg_bin: Path, args: Sequence[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        _as_pg_user([str(pg_bin / args[0]), *args[1:]]),
        text=True,
        capture_output=True,
        **kw,
    )


def _pg_settings(data_dir: Path, port: int) -> str:
    """Settings we own, rewritten on every start (port may change between runs).

    Tuned for a dev box: bigger shared_buffers and connection limit, no huge WAL
    checkpoints; but ``fsync`` and ``synchronous_commit`` stay at their durable defaults
    because the benchmark reports durability and must measure the real thing.
    """
    return "\n".join(
        [
            "# written by deploy/local.py on every start; edit there",
            f"port = {port}",
            "listen_addresses = '127.0.0.1'",
            f"unix_socket_directories = '{_pg_socket_dir(data_dir)}'",
            "max_connections = 200",
            "shared_buffers = 512MB",
            "work_mem = 16MB",
            "maintenance_work_mem = 128MB",
            "max_wal_size = 2GB",
            "checkpoint_timeout = 15min",
            "fsync = on",
            "synchronous_commit = on",
            "log_destination = 'stderr'",
            "logging_collector = off",
            "log_min_messages = warning",
            "",
        ]
    )


def _pg_data_initialised(data_dir: Path) -> bool:
    return (data_dir / "PG_VERSION").exists()


def postgres_running(data_dir: Path) -> bool:
    """True when the postmaster that ``postmaster.pid`` names runs on ``data_dir`` (its
    ``-D``): after a crash the file stays, and its pid may by now name any process, which
    ``make status`` then called Postgres and ``make down`` stopped."""
    args = process_args(postgres_pid(data_dir))
    given = args[args.index("-D") + 1] if "-D" in args[:-1] else None
    return given is not None and Path(given).resolve() == Path(data_dir).resolve()


def postgres_pid(data_dir: Path) -> int | None:
    """The postmaster's pid from ``postmaster.pid``, or None."""
    return read_pid(Path(data_dir) / "postmaster.pid")


def _postgres_port(data_dir: Path) -> int | None:
    # postmaster.pid line 4 is the port
    try:
        return int((Path(data_dir) / "postmaster.pid").read_text().splitlines()[3])
    except (OSError, ValueError, IndexError):
        return None


def pg_dsn(port: int, host: str = "127.0.0.1", database: str = PG_DATABASE) -> str:
    return f"postgresql://{PG_USER}:{PG_PASSWORD}@{host}:{port}/{database}"


def start_postgres(data_dir: Path, port: int, log_path: Path | None = None) -> str:
    """Start (initialising if empty) a PostgreSQL cluster in ``data_dir`` on 127.0.0.1:port.

    Idempotent: if it is already running, its DSN (with the port it actually runs on)
    is returned. Ensures role ``loyalty``/``loyalty`` (superuser, local dev only) and
    database ``loyalty`` exist. Returns ``postgresql://loyalty:loyalty@127.0.0.1:PORT/loyalty``.
    """
    data_dir = Path(data_dir).resolve()
    pg_bin = find_pg_bin()
    if postgres_running(data_dir):
        running_port = _postgres_port(data_dir) or port
        _ensure_pg_role_and_db(pg_bin, data_dir, running_port)
        return pg_dsn(running_port)

    data_dir.parent.mkdir(parents=True, exist_ok=True)
    data_dir.mkdir(exist_ok=True)
    _make_traversable(data_dir.parent)
    sock = _pg_socket_dir(data_dir)
    sock.mkdir(parents=True, exist_ok=True)
    _chown_pg(sock)
    _chown_pg(data_dir)
    os.chmod(data_dir, 0o700)

    if not _pg_data_initialised(data_dir):
        if any(data_dir.iterdir()):
            raise RuntimeError(f"{data_dir} is not empty and not a Postgres data directory")
        r = _pg_run(
            pg_bin,
            [
                "initdb",
                "-D",
                str(data_dir),
                "-U",
                "postgres",
                "--auth-local=trust",  # unix socket: only reachable by local users
                "--auth-host=scram-sha-256",
                "--encoding=UTF8",
                "--locale=C.UTF-8",
            ],
        )
        if r.returncode != 0:
            raise RuntimeError(f"initdb failed:\n{r.stdout}\n{r.stderr}")
        with open(data_dir / "postgresql.conf", "a") as f:
            f.write("\ninclude_if_exists = 'local_dev.conf'\n")

    (data_dir / "local_dev.conf").write_text(_pg_settings(data_dir, port))
    _chown_pg(data_dir / "local_dev.conf")

    log_path = Path(log_path) if log_path else data_dir.parent / "postgres.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_path.touch(exist_ok=True)
    _chown_pg(log_path)
    r = _pg_run(
        pg_bin,
        ["pg_ctl", "-D", str(data_dir), "-l", str(log_path), "-w", "-t", "60", "start"],
        stdin=subprocess.DEVNULL,
    )
    if r.returncode != 0:
        raise RuntimeError(
            f"pg_ctl start failed:\n{r.stdout}\n{r.stderr}\n--- {log_path}:\n{_tail(log_path)}"
        )
    _ensure_pg_role_and_db(pg_bin, data_dir, port)
    return pg_dsn(port)


def _ensure_pg_role_and_db(pg_bin: Path, data_dir: Path, port: int) -> None:
    """Create role and database if missing; connects as ``postgres`` over the socket."""
    sock = str(_pg_socket_dir(data_dir))
    psql = [
        "psql",
        "-h",
        sock,
        "-p",
        str(port),
        "-U",
        "postgres",
        "-d",
        "postgres",
        "-v",
        "ON_ERROR_STOP=1",
        "-qtA",
    ]
    sql_role = (
        "DO $$ BEGIN "
        f"IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{PG_USER}') THEN "
        f"CREATE ROLE {PG_USER} LOGIN SUPERUSER PASSWORD '{PG_PASSWORD}'; END IF; END $$;"
    )
    r = _pg_run(pg_bin, [*psql, "-c", sql_role])
    if r.returncode != 0:
        raise RuntimeError(f"creating role failed: {r.stderr}")
    r = _pg_run(pg_bin, [*psql, "-c", f"SELECT 1 FROM pg_database WHERE datname='{PG_DATABASE}'"])
    if r.stdout.strip() != "1":
        r = _pg_run(pg_bin, [*psql, "-c", f"CREATE DATABASE {PG_DATABASE} OWNER {PG_USER}"])
        if r.returncode != 0 and "already exists" not in r.stderr:
            raise RuntimeError(f"creating database failed: {r.stderr}")


def stop_postgres(data_dir: Path, timeout: int = 60) -> None:
    """Stop the cluster in ``data_dir`` (fast mode: roll back sessions, clean shutdown).

    The data directory is kept. No-op when it is not running.
    """
    data_dir = Path(data_dir).resolve()
    if not postgres_running(data_dir):
        return
    pg_bin = find_pg_bin()
    r = _pg_run(
        pg_bin, ["pg_ctl", "-D", str(data_dir), "-m", "fast", "-w", "-t", str(timeout), "stop"]
    )
    if r.returncode != 0 and postgres_running(data_dir):
        stop_pid(postgres_pid(data_dir), timeout=10)
