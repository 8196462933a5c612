"""CPU features that decide how ONNX Runtime's int8 CPU kernels compute (x86 only).

Without VNNI (``avx512_vnni``, ``avx_vnni``) or AMX, ONNX Runtime's u8 x s8 GEMM
runs on ``vpmaddubsw``, which adds adjacent u8 x s8 products into int16 *with
saturation*: symmetric int8 activations (shifted to u8 128-255 for positive
values) times weights near +-127 can exceed 32,767 per pair. 7-bit weights
(|q| <= 64) make that impossible (ORT issue 16105). Linux only: elsewhere the
features are reported as unknown.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CpuFeatures", "cpu_features", "parse_cpuinfo", "WATCHED_FLAGS"]

WATCHED_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "amx_tile")


@dataclass(frozen=True)
class CpuFeatures:
    """Flags seen in /proc/cpuinfo (``known`` False when they could not be read)."""

    known: bool
    flags: frozenset[str] = frozenset()
    model_name: str = ""
    machine: str = ""

    @property
    def has_vnni(self) -> bool | None:
        """True if int8 dot products accumulate in int32 (VNNI/AMX); None when unknown."""
        if not self.known:
            return None
        return bool(self.flags & {"avx512_vnni", "avx_vnni", "amx_int8"})

    @property
    def int16_pair_saturation(self) -> bool | None:
        """True when ORT's x86 u8s8 kernels may saturate pairs (x86 without VNNI); None when unknown."""
        if not self.known:
            return None
        return self.machine in ("x86_64", "AMD64", "i686") and not self.has_vnni

    def describe(self) -> str:
        if not self.known:
            return f"CPU features unknown ({self.machine or 'unknown machine'}: no /proc/cpuinfo)"
        seen = [f for f in WATCHED_FLAGS if f in self.flags] or ["none of " + ", ".join(WATCHED_FLAGS)]
        vnni = "VNNI" if self.has_vnni else "no VNNI: int8 pairs add into int16 with saturation"
        return f"{self.model_name or self.machine}: {' '.join(seen)} ({vnni})"


def parse_cpuinfo(text: str, machine: str = "x86_64") -> CpuFeatures:
    """Features from the text of /proc/cpuinfo (the first processor's ``flags`` line)."""
    flags: frozenset[str] = frozenset()
    model = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "flags" and not flags:
            flags = frozenset(value.split())
        elif key == "model name" and not model:
            model = value.strip()
    return CpuFeatures(known=bool(flags), flags=flags, model_name=model, machine=machine)


def cpu_features(cpuinfo: str | Path = "/proc/cpuinfo") -> CpuFeatures:
    """This machine's features (unknown on non-Linux systems or when the file cannot be read)."""
    machine = platform.machine()
    if platform.system() != "Linux":
        return CpuFeatures(known=False, machine=machine)
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return CpuFeatures(known=False, machine=machine)
    return parse_cpuinfo(text, machine)
