"""A throwaway PostgreSQL server for tests: initdb in a temporary directory, a Unix socket there,
no TCP port, trust authentication; stopped and removed at the end.

    with postgres.server() as db:
        url = db.database("mine")  # postgresql://postgres@/mine?host=/tmp/mnist_jax_pg_...

PostgreSQL refuses to run as root, and CI runs as root: there the server runs as the `postgres`
user (runuser), in a directory it owns and every user can traverse (pytest's own temporary
directories are 0700). Debian's binaries are not on PATH: `pg_config --bindir` names them.
"""

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path


class Unavailable(RuntimeError):
    """No PostgreSQL server can start here; the message says why."""


def bindir() -> Path:
    """The directory of PostgreSQL's server binaries (initdb, pg_ctl), or Unavailable."""
    try:
        found = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, check=True)  # fmt: skip
    except (OSError, subprocess.CalledProcessError) as e:
        raise Unavailable(f"PostgreSQL's binaries not found (pg_config --bindir: {e}); install them: apt-get install -y postgresql (.ci/run does)") from None  # fmt: skip
    path = Path(found.stdout.strip())
    if not (path / "initdb").exists():  # libpq-dev's pg_config alone: a client, no server
        raise Unavailable(f"PostgreSQL's server binaries not found: no initdb in {path} (pg_config --bindir); install them: apt-get install -y postgresql (.ci/run does)")  # fmt: skip
    return path


class Server:
    def __init__(self, root: Path, bin: Path):
        self.root, self.bin = root, bin

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@/{database}?host={self.root}"

    def database(self, name: str) -> str:
        """A new, empty database on this server: its URL (tests sharing the server keep apart)."""
        subprocess.run([self.bin / "createdb", "-h", self.root, "-U", "postgres", name], check=True)
        return self.url(name)


@contextlib.contextmanager
def server() -> Iterator[Server]:
    bin = bindir()
    as_postgres = []
    if os.geteuid() == 0:  # "root execution of the PostgreSQL server is not permitted"
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            raise Unavailable("running as root and there is no postgres user to run PostgreSQL as") from None  # fmt: skip
        as_postgres = ["runuser", "-u", "postgres", "--"]
    root = Path(tempfile.mkdtemp(prefix="mnist_jax_pg_"))
    root.chmod(0o755)
    if as_postgres:
        os.chown(root, user.pw_uid, user.pw_gid)
    run = lambda *args, check=True: subprocess.run([*as_postgres, *map(str, args)], check=check, capture_output=True, text=True)  # noqa: E731  # fmt: skip
    data = root / "data"
    try:
        try:
            run(bin / "initdb", "-D", data, "-A", "trust", "-U", "postgres", "--no-sync")
            # -l: the server's output to a file (a pipe would be held open by the server).
            run(bin / "pg_ctl", "-D", data, "-l", root / "server.log", "-w", "start",
                "-o", f"-k {root} -c listen_addresses='' -c fsync=off")  # fmt: skip
        except subprocess.CalledProcessError as e:
            log = root / "server.log"
            raise Unavailable(f"PostgreSQL did not start: {e}\n{e.stdout}{e.stderr}" + (log.read_text() if log.exists() else "")) from None  # fmt: skip
        yield Server(root, bin)
    finally:
        run(bin / "pg_ctl", "-D", data, "-m", "immediate", "stop", check=False)
        shutil.rmtree(root, ignore_errors=True)
