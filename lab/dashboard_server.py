"""`lab dashboard`: serve the Streamlit app in dashboard/app.py on one local address.

The app is a top-level folder of the repository (`dashboard/`, next to the `lab` package), not part
of the package: with the editable install the README asks for, it is found from this file as
`lab/../dashboard/app.py`. The runs folder reaches the app through $LAB_RUNS_DIR.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from lab.runs import RUNS_DIR_ENV

# lab/dashboard_server.py -> lab/ -> repository root -> dashboard/app.py (editable install; see above)
APP = Path(__file__).resolve().parent.parent / "dashboard" / "app.py"


class DashboardError(ValueError):
    """One-line problem starting the dashboard (printed by the CLI as `lab: error: ...`)."""


def app_path() -> Path:
    if not APP.is_file():
        raise DashboardError(
            f"{APP}: the dashboard app is missing; `lab dashboard` needs the repository checkout "
            "installed editable (pip install -e .)"
        )
    return APP


def check_port_free(host: str, port: int) -> None:
    """Raise DashboardError naming the port if something already listens there (or it cannot be bound)."""
    if not 0 < port < 65536:
        raise DashboardError(f"--port {port} is not a valid port (1-65535)")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                raise DashboardError(f"port {port} on {host} is already in use; pick another with --port N") from None
            raise DashboardError(f"cannot listen on {host}:{port} ({err.strerror or err})") from None


def command(host: str, port: int, headless: bool) -> list[str]:
    return [
        sys.executable, "-m", "streamlit", "run", str(app_path()),
        "--server.address", host,
        "--server.port", str(port),
        "--server.headless", "true" if headless else "false",
        "--browser.gatherUsageStats", "false",
        "--browser.serverAddress", host,
        "--server.fileWatcherType", "none",
        "--client.toolbarMode", "minimal",
    ]


def serve(runs_dir: str | os.PathLike | None = None, port: int = 8501, host: str = "127.0.0.1",
          headless: bool = False) -> int:
    """Run the dashboard in the foreground until Ctrl-C; returns the exit code."""
    host = host or "127.0.0.1"
    check_port_free(host, port)
    env = dict(os.environ)
    folder = Path(runs_dir or env.get(RUNS_DIR_ENV) or "runs").resolve()
    env[RUNS_DIR_ENV] = str(folder)
    print(f"dashboard: http://{host}:{port}  (runs folder: {folder}; Ctrl-C to stop)", file=sys.stderr)
    process = subprocess.Popen(command(host, port, headless), env=env)
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
