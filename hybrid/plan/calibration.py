"""Calibration: the typed record of what `hybrid plan --calibrate` measured, and its one reader.

The file (JSON, written by hybrid/plan/calibrate.py) is read here once, checked field by field: a missing or
mistyped field is a CalibrationError naming the file, the field and the fix. Fields that files of earlier
releases lack (memcpy_gbs, h2d_gbs, memory_bytes, join, modules, dense_gbs, load) are optional here, and nowhere
else.
"""
from __future__ import annotations

from dataclasses import dataclass


class CalibrationError(ValueError):
    """The calibration file cannot be used; the message names the file, what is wrong and the fix."""


@dataclass(frozen=True)
class FormatRates:
    """One expert format's CPU kernels as measured: decode GB/s and its share of the read loop, prefill
    GFLOP/s per thread, how fast the Numba decoder widens the format (parameters/s), and the kernel path."""
    decode_gbs: float
    kernel_efficiency: float
    prefill_gflops_per_thread: float
    dequantize_params_per_s: float
    path: str


@dataclass(frozen=True)
class DeviceSide:
    """torch on the device (or the CPU stand-in): matvec GB/s, matmul GFLOP/s, float copy GB/s; staging
    memcpy and pinned host->device GB/s where measured; total memory on CUDA."""
    device: str
    dtype: str
    dtype_bytes: int
    matvec_gbs: float
    matmul_gflops: float
    copy_gbs: float
    memory_bytes: int | None = None
    memcpy_gbs: float | None = None
    h2d_gbs: float | None = None

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def stage_gbs(self) -> float:
        """Host-side staging copy rate (the memcpy into reused buffers; the float copy in older files)."""
        return self.memcpy_gbs if self.memcpy_gbs is not None else self.copy_gbs

    @property
    def link_gbs(self) -> float:
        """Host->device rate for hot-set copies: pinned copies on CUDA where measured, else the float copy."""
        return self.h2d_gbs if self.cuda and self.h2d_gbs else self.copy_gbs


@dataclass(frozen=True)
class Overheads:
    """Fixed costs of a decode step: per token, per dense layer and per MoE layer (seconds)."""
    token_s: float
    dense_layer_s: float
    moe_layer_s: float


@dataclass(frozen=True)
class ModuleRates:
    """Bytes/s of one attention layer, one shared-expert MLP and (models with dense layers) one dense MLP of a
    model's shape, timed on the device."""
    attn_gbs: float
    shared_gbs: float
    dense_gbs: float | None = None


@dataclass(frozen=True)
class MachineLoad:
    """The machine's 1-minute load average from other processes when the calibration started and ended (the
    end's figure less the calibration's own estimated share), its logical cores, and why the figures were taken
    under load ("" when the machine was idle; a file with a reason was saved with `--force`)."""
    before: float
    after: float
    cores: int
    busy: str

    @property
    def under_load(self) -> bool:
        return bool(self.busy)


@dataclass(frozen=True)
class Calibration:
    created: str
    cpu: str
    threads: int
    ram_bytes: int
    read_gbs: float                       # the prefetching read loop, mean over the formats' pools
    formats: dict[str, FormatRates]
    device: DeviceSide
    overheads: Overheads
    serial: float | None                  # overlap of device and CPU-expert work (None: not measured)
    modules: dict[str, ModuleRates]       # by hybrid.plan.calibrate_device.modules_key
    load: MachineLoad | None = None       # None: a file written before the load was recorded

    @classmethod
    def parse(cls, data: object, source: str) -> "Calibration":
        """The record of a calibration file's JSON value; CalibrationError naming `source` when it is not one."""
        r = _Reader(source)
        if not isinstance(data, dict) or data.get("version") != 1:
            raise CalibrationError(f"{source} is not a version-1 calibration; run `hybrid plan --calibrate` again")
        cpu, dev = r.section(data, "cpu_side"), r.section(data, "device_side")
        formats = {fmt: FormatRates(*(r.num(f, k, f"cpu_side.formats.{fmt}") for k in (
                       "decode_gbs", "kernel_efficiency", "prefill_gflops_per_thread", "dequantize_params_per_s")),
                                    path=r.text(f, "path", f"cpu_side.formats.{fmt}"))
                   for fmt, f in r.section(cpu, "formats", "cpu_side").items()}
        if not formats:
            raise CalibrationError(f"{source}: cpu_side.formats is empty; run `hybrid plan --calibrate` again")
        join, load = data.get("join"), data.get("load")
        return cls(created=r.text(data, "created"), cpu=r.text(data, "cpu"), threads=int(r.num(data, "threads")),
                   ram_bytes=int(r.num(data, "ram_bytes")), read_gbs=r.num(cpu, "read_gbs", "cpu_side"),
                   formats=formats, device=r.device(dev),
                   overheads=Overheads(*(r.num(r.section(data, "overheads"), k, "overheads")
                                         for k in ("token_s", "dense_layer_s", "moe_layer_s"))),
                   serial=r.num(join, "serial", "join") if join else None,
                   modules={key: ModuleRates(r.num(m, "attn_gbs", f"modules.{key}"),
                                             r.num(m, "shared_gbs", f"modules.{key}"),
                                             r.num(m, "dense_gbs", f"modules.{key}", optional=True))
                            for key, m in data.get("modules", {}).items()},
                   load=r.load(load) if load is not None else None)


class _Reader:
    """Field access that fails with the file, the field's path and the fix."""

    def __init__(self, source: str):
        self.source = source

    def _bad(self, where: str, what: str) -> CalibrationError:
        return CalibrationError(f"{self.source}: {where} {what}; run `hybrid plan --calibrate` again")

    def section(self, d: dict, key: str, where: str = "") -> dict:
        v = d.get(key)
        if not isinstance(v, dict):
            raise self._bad(f"{where}.{key}" if where else key, "is missing or not an object")
        return v

    def num(self, d: dict, key: str, where: str = "", optional: bool = False) -> float | None:
        v = d.get(key)
        if v is None and optional:
            return None
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise self._bad(f"{where}.{key}" if where else key, "is missing or not a number")
        return float(v)

    def text(self, d: dict, key: str, where: str = "") -> str:
        v = d.get(key)
        if not isinstance(v, str):
            raise self._bad(f"{where}.{key}" if where else key, "is missing or not a string")
        return v

    def load(self, load: object) -> MachineLoad:
        if not isinstance(load, dict):
            raise self._bad("load", "is not an object")
        return MachineLoad(self.num(load, "before", "load"), self.num(load, "after", "load"),
                           int(self.num(load, "cores", "load")), self.text(load, "busy", "load"))

    def device(self, dev: dict) -> DeviceSide:
        mem = self.num(dev, "memory_bytes", "device_side", optional=True)
        return DeviceSide(self.text(dev, "device", "device_side"), self.text(dev, "dtype", "device_side"),
                          int(self.num(dev, "dtype_bytes", "device_side")),
                          *(self.num(dev, k, "device_side") for k in ("matvec_gbs", "matmul_gflops", "copy_gbs")),
                          memory_bytes=int(mem) if mem is not None else None,
                          memcpy_gbs=self.num(dev, "memcpy_gbs", "device_side", optional=True),
                          h2d_gbs=self.num(dev, "h2d_gbs", "device_side", optional=True))
