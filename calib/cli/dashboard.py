"""``calib dashboard``: start the Streamlit workbench on the loopback interface."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import typer

from calib.cli._common import echo
from calib.errors import CalibError

__all__ = ["register", "app_path", "dashboard_command"]

STORE_ENV = "CALIB_STORE"


def register(app: typer.Typer) -> None:
    app.command(name="dashboard", epilog="Example: calib dashboard --store calib-runs --port 8501")(dashboard_cmd)


def app_path() -> Path:
    """``calib/_apps/dashboard.py`` of an installed wheel, else ``apps/dashboard.py`` of the source checkout."""
    package = Path(__file__).resolve().parents[1]
    tried = [package / "_apps" / "dashboard.py", package.parent / "apps" / "dashboard.py"]
    for p in tried:
        if p.is_file():
            return p
    raise CalibError(f"the dashboard app is not installed here (looked for {tried[0]} and {tried[1]})",
                     hint="reinstall calib from its wheel, or run it from a source checkout (pip install -e '.[app]')")


def dashboard_command(store: Path, port: int) -> list[str]:
    """The ``streamlit run`` command line: loopback only, headless, no usage statistics."""
    return [sys.executable, "-m", "streamlit", "run", str(app_path()),
            "--server.address", "127.0.0.1", "--server.port", str(port), "--server.headless", "true",
            "--browser.gatherUsageStats", "false", "--client.toolbarMode", "minimal", "--server.fileWatcherType", "none",
            "--", "--store", str(store)]


def dashboard_cmd(
    store: Path = typer.Option(Path("calib-runs"), "--store", "-s", help="Run store folder (made by 'calib run')."),
    port: int = typer.Option(8501, "--port", "-p", help="Port on 127.0.0.1 to serve on."),
) -> None:
    """Open the dashboard: runs, per-layer drift, data drift, the calibration set and run comparison."""
    import importlib.util

    if importlib.util.find_spec("streamlit") is None:
        raise CalibError("the dashboard needs Streamlit, which is not installed",
                         hint="pip install 'calib[app]'")
    if not 0 < port < 65536:
        raise CalibError(f"--port {port}: expected 1-65535")
    _check_port_free(port)
    store = store.expanduser().resolve()
    if not store.is_dir():
        echo(f"no run store at {store} yet: the dashboard will say how to make a run")
    env = dict(os.environ, **{STORE_ENV: str(store)})
    cmd = dashboard_command(store, port)
    echo(f"calib dashboard: http://127.0.0.1:{port}  (store {store}; Ctrl+C to stop)")
    code = subprocess.call(cmd, env=env)  # Ctrl-C reaches Streamlit too; the CLI then exits 130
    if code:
        raise CalibError(f"the dashboard (Streamlit) stopped with exit code {code}")


def _check_port_free(port: int) -> None:
    """Streamlit exits 0 when its port is taken: find out first, and say so in one line."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Tornado does: TIME_WAIT is not "in use"
        try:
            s.bind(("127.0.0.1", port))
        except OSError as e:
            raise CalibError(f"--port {port}: 127.0.0.1:{port} is in use ({e.strerror})",
                             hint="stop what serves there or pass another --port") from None
