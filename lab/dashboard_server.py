"""`lab dashboard`: serve the Streamlit app in dashboard/app.py on one local address.

The app is the `dashboard` package, installed beside `lab` (pyproject.toml), and found through the
import system, so an editable and a regular install both work. The runs folder reaches the app
through $LAB_RUNS_DIR.

Streamlit always runs headless here: a non-headless Streamlit stops at its first-run "Email:" prompt
on a machine without ~/.streamlit (and exits with code 255 when there is no terminal), opens a
browser of its own, shows an "install skills" pop-up and prints an advert. The settings that matter
are passed as flags, which override every config file and the user's home; the same values sit in
dashboard/.streamlit/config.toml for a plain `streamlit run dashboard/app.py`.
"""

from __future__ import annotations

import errno
import importlib.util
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from lab.runs.storage import RUNS_DIR_ENV, default_runs_dir

# Streamlit options every `lab dashboard` runs with (besides the address and port).
SETTINGS = {
    "server.headless": "true",  # no "Email:" prompt, no browser opened, no skills pop-up or advert
    "server.showEmailPrompt": "false",
    "browser.gatherUsageStats": "false",  # nothing leaves the machine
    "server.fileWatcherType": "none",  # the app's files do not change while it runs
    "client.toolbarMode": "minimal",
}


class DashboardError(ValueError):
    """One-line problem starting the dashboard (printed by the CLI as `lab: error: ...`)."""


def app_path() -> Path:
    spec = importlib.util.find_spec("dashboard")
    app = Path(spec.origin).parent / "app.py" if spec and spec.origin else None
    if app is None or not app.is_file():
        raise DashboardError("the dashboard app (the `dashboard` package) is not installed; "
                             "reinstall grokking-lab from its checkout: pip install -e .")
    return app


def check_port_free(host: str, port: int) -> None:
    """Raise DashboardError naming the port if something already listens there (or it cannot be bound)."""
    if not 0 < port < 65536:
        raise DashboardError(f"--port {port} is not a valid port (1-65535)")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        # As the server itself binds (uvicorn/tornado set it): a port whose last server just stopped keeps
        # its closed connections in TIME_WAIT for a minute, which is no reason to refuse a restart. A server
        # listening there still makes bind fail.
        if os.name == "posix":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                raise DashboardError(f"port {port} on {host} is already in use; pick another with --port N") from None
            raise DashboardError(f"cannot listen on {host}:{port} ({err.strerror or err})") from None


def command(host: str, port: int) -> list[str]:
    """The `streamlit run` command line `lab dashboard` starts."""
    flags = [arg for key, value in SETTINGS.items() for arg in (f"--{key}", value)]
    return [
        sys.executable, "-m", "streamlit", "run", str(app_path()),
        "--server.address", host,
        "--server.port", str(port),
        "--browser.serverAddress", host,
        *flags,
    ]


def serve(runs_dir: str | os.PathLike | None = None, port: int = 8501, host: str = "127.0.0.1",
          headless: bool = True) -> int:
    """Run the dashboard in the foreground until Ctrl-C or SIGTERM; returns the exit code.

    `headless` is accepted for callers of the old signature and ignored: the server is always headless."""
    host = host or "127.0.0.1"
    check_port_free(host, port)
    env = dict(os.environ)
    folder = (Path(runs_dir) if runs_dir else default_runs_dir()).resolve()
    env[RUNS_DIR_ENV] = str(folder)
    print(f"dashboard: http://{host}:{port}  (runs folder: {folder}; Ctrl-C to stop)", file=sys.stderr, flush=True)
    # No standard input for Streamlit: nothing it could ask would be answered by a service or a CI job.
    process = subprocess.Popen(command(host, port), env=env, stdin=subprocess.DEVNULL)
    # SIGTERM (a service manager, a test's teardown) must stop the server too, not orphan it.
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        return process.wait()
    except KeyboardInterrupt:
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
