"""`hybrid plan --calibrate` on a busy machine (issue 28): the load is read before and after and stored, figures
taken under load are refused (or saved with --force, marked, and plans that use them warn), and a thread or
memory shortage is one line. The load and the measurements are simulated (monkeypatch): no real calibration."""
import errno
import json

import pytest

import hybrid.plan.calibrate as calibrate_mod
from hybrid.cli import main
from hybrid.plan.calibrate import calibrate, load_calibration
from hybrid.plan.calibration import CalibrationError

FP8 = {"decode_gbs": 34.0, "decode_ms_per_call": 2.0, "kernel_efficiency": 0.75, "prefill_gflops": 300.0,
       "prefill_gflops_per_thread": 150.0, "dequantize_params_per_s": 3e8, "path": "avx512"}
PLAN = ["--format", "fp8", "--context", "1k", "--ram", "2TiB"]      # Kimi K2 on the canned machine


def fake_stages(monkeypatch, share: float = 0.75, path: str = "avx512", fail=None) -> list:
    """Replace the measuring functions by canned figures (the fp8 kernels at `share` of the read loop on `path`);
    `fail`: an exception the device stage raises. Returns the names of the stages run, in order."""
    ran = []

    def stage(name, value):
        def measure(*args, **kwargs):
            ran.append(name)
            if fail is not None and name == "device":
                raise fail
            return value
        return measure
    cpu = {"pool_gib": 0.1, "threads": 2, "read_gbs": 45.0, "formats": {"fp8": {**FP8, "kernel_efficiency": share,
                                                                                  "path": path}}}
    device = {"device": "cpu", "dtype": "float32", "dtype_bytes": 4, "memory_bytes": None, "matvec_gbs": 20.0,
              "matmul_gflops": 500.0, "copy_gbs": 5.0, "memcpy_gbs": 8.0}
    monkeypatch.setattr(calibrate_mod, "measure_cpu", stage("cpu", cpu))
    monkeypatch.setattr(calibrate_mod, "measure_device", stage("device", device))
    monkeypatch.setattr(calibrate_mod, "measure_overheads", stage("overheads", {
        "token_s": 1e-4, "dense_layer_s": 2e-4, "moe_layer_s": 5e-4}))
    monkeypatch.setattr(calibrate_mod, "measure_join", stage("join", {"serial": 0.9}))
    monkeypatch.setattr(calibrate_mod, "measure_modules", stage("modules", {"key": "k", "attn_gbs": 10.0,
                                                                            "shared_gbs": 12.0}))
    monkeypatch.setattr(calibrate_mod.os, "cpu_count", lambda: 2)
    return ran


def load_averages(monkeypatch, *loads: float) -> None:
    """os.getloadavg returns these 1-minute figures in turn (the last one from then on)."""
    seq = list(loads)
    monkeypatch.setattr(calibrate_mod.os, "getloadavg", lambda: (seq.pop(0) if len(seq) > 1 else seq[0], 0.0, 0.0))


def run(tmp_path, force: bool = False, log=None) -> object:
    return calibrate(tmp_path / "cal.json", threads=2, formats=("fp8",), configs=[], force=force,
                     log=log or (lambda s: None))


def test_an_idle_calibration_records_and_prints_the_load(tmp_path, monkeypatch):
    ran = fake_stages(monkeypatch)
    load_averages(monkeypatch, 0.1, 0.3)
    lines = []
    cal = load_calibration(run(tmp_path, log=lines.append))
    assert ran == ["cpu", "device", "overheads", "join"]
    assert cal.load.before == 0.1 and cal.load.cores == 2 and not cal.load.under_load
    assert 0 <= cal.load.after <= 0.3        # the end's figure less the calibration's own share
    assert "load average at start 0.10 on 2 cores" in lines[0]
    assert any(s.startswith("load average at end ") for s in lines)


def test_a_machine_busy_at_the_start_is_refused_before_anything_is_measured(tmp_path, monkeypatch, capsys):
    ran = fake_stages(monkeypatch)
    load_averages(monkeypatch, 5.3)
    assert main(["plan", "--calibrate", "--threads", "2", "--calibration", str(tmp_path / "cal.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("hybrid: error: the machine is busy (load average 5.30 from other processes at the start")
    assert "--force" in err and "when the machine is idle" in err and "nothing was saved" in err
    assert ran == [] and not (tmp_path / "cal.json").exists()


@pytest.mark.parametrize("loads, share, path, why", [
    ((0.2, 4.0), 0.75, "avx512", "load average 4.00 from other processes at the end"),  # own share: ~0 s run
    ((0.2, 0.2), 0.04, "avx512", "the CPU kernels read at fp8 4 % of the read loop"),
])
def test_figures_taken_under_load_are_refused(tmp_path, monkeypatch, loads, share, path, why):
    ran = fake_stages(monkeypatch, share, path)
    load_averages(monkeypatch, *loads)
    with pytest.raises(CalibrationError, match="the machine is busy") as e:
        run(tmp_path)
    assert why in str(e.value) and "add --force" in str(e.value)
    assert not (tmp_path / "cal.json").exists()
    if share < 0.2:                          # implausible kernel shares stop the run before the device is timed
        assert ran == ["cpu"]


def test_the_plain_kernels_low_share_is_not_load(tmp_path, monkeypatch):
    fake_stages(monkeypatch, 0.05, "plain")
    load_averages(monkeypatch, 0.2)
    assert not load_calibration(run(tmp_path)).load.under_load


def test_force_saves_figures_taken_under_load_and_plans_warn(tmp_path, monkeypatch, capsys):
    fake_stages(monkeypatch)
    load_averages(monkeypatch, 5.3, 6.0)
    lines = []
    path = run(tmp_path, force=True, log=lines.append)
    cal = load_calibration(path)
    assert cal.load.under_load and "load average 5.30 from other processes at the start" in cal.load.busy
    assert cal.load.before == 5.3 and cal.load.after > 4
    assert any(s.startswith("warning: saving figures taken under load") for s in lines)
    for args in (["--machine", "local"], ["--gpus", "H100", "--cpu", "genoa"]):
        assert main(["plan", *args, "--calibration", str(path), *PLAN]) == 0
        err = capsys.readouterr().err
        assert f"hybrid: warning: the calibration {path} was taken under load (load average 5.30" in err
        assert "rerun `hybrid plan --calibrate` when the machine is idle" in err


def test_an_idle_calibration_gives_no_warning_and_older_files_load(tmp_path, monkeypatch, capsys):
    fake_stages(monkeypatch)
    load_averages(monkeypatch, 0.0)
    path = run(tmp_path)
    assert main(["plan", "--machine", "local", "--calibration", str(path), *PLAN]) == 0
    assert "warning" not in capsys.readouterr().err
    data = json.loads(path.read_text())
    del data["load"]                          # as written before the load was recorded
    path.write_text(json.dumps(data))
    assert load_calibration(path).load is None
    data["load"] = {"before": 0.1, "after": "high", "cores": 2, "busy": ""}
    path.write_text(json.dumps(data))
    with pytest.raises(CalibrationError, match=r"load.after is missing or not a number"):
        load_calibration(path)


@pytest.mark.parametrize("error, ran_out", [
    (RuntimeError("can't start new thread"), "the system refused a new thread (can't start new thread)"),
    (OSError(errno.EAGAIN, "Resource temporarily unavailable"), "the system refused a new thread"),
    (MemoryError(), "out of memory"),
    (OSError(errno.ENOMEM, "Cannot allocate memory"), "out of memory"),
])
def test_a_resource_shortage_is_one_line_and_saves_nothing(tmp_path, monkeypatch, capsys, error, ran_out):
    fake_stages(monkeypatch, fail=error)
    load_averages(monkeypatch, 0.0)
    assert main(["plan", "--calibrate", "--threads", "2", "--calibration", str(tmp_path / "cal.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"hybrid: error: calibration stopped while measuring the device: {ran_out}")
    assert err.endswith("nothing was saved") and not (tmp_path / "cal.json").exists()


def test_other_errors_while_measuring_pass_unchanged(tmp_path, monkeypatch):
    fake_stages(monkeypatch, fail=RuntimeError("CUDA error: device-side assert"))
    load_averages(monkeypatch, 0.0)
    with pytest.raises(RuntimeError, match="device-side assert"):
        run(tmp_path)
