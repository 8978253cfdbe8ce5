"""A disk that fills up during `hybrid-quant convert` (issue 19 item 1): a clear message with the space still
needed, exit 2, no SIGBUS, and a rerun resumes to the same bytes as an uninterrupted conversion."""
import errno
import hashlib
import os
import subprocess
import sys
import textwrap
import uuid

import pytest

from quant.convert import JOURNAL, MANIFEST, ConvertError, convert

SHAPE = {"hidden_size": 512, "moe_intermediate_size": 256, "n_routed_experts": 16, "num_experts_per_tok": 4,
         "num_hidden_layers": 5}      # 4 MoE layers of 16 experts: 1 MiB each in int4, the dense part ~9 MiB


@pytest.fixture(scope="module")
def src_and_ref(tmp_path_factory):
    from hybrid.models.tiny import make_tiny
    d = tmp_path_factory.mktemp("enospc")
    src = make_tiny(d / "src", weights="bf16", tokenizer=False, overrides=SHAPE)
    return src, convert(src, d / "ref", "int4", quiet=True)


def _tree(d):
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file()}


def test_injected_enospc_gives_the_space_message_and_resumes(src_and_ref, tmp_path, monkeypatch):
    src, ref = src_and_ref
    real, calls = os.posix_fallocate, []

    def fill_up_on_second_layer(fd, offset, size):
        calls.append(size)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, offset, size)

    monkeypatch.setattr(os, "posix_fallocate", fill_up_on_second_layer)
    out = tmp_path / "out"
    with pytest.raises(ConvertError, match=r"disk filled up during the conversion: the conversion needs about "
                                           r"[0-9.]+ GiB more .* rerun the same command to resume") as e:
        convert(src, out, "int4", quiet=True)
    assert "GiB free" in str(e.value)
    assert (out / JOURNAL).exists() and not (out / MANIFEST).exists()
    monkeypatch.setattr(os, "posix_fallocate", real)
    convert(src, out, "int4", quiet=True)
    assert _tree(out) == _tree(ref)


# Run in a child: before the fix a full disk under the memory map killed the process with SIGBUS. A "filler"
# (standing in for another process) takes all free space just before the second MoE layer is written, after
# the start-up check has passed, leaving room for the file's header but not its data.
_CHILD = textwrap.dedent("""
    import os, sys
    from quant.store import LayerStore
    from quant.cli import main
    real, seen = LayerStore.build_file.__func__, []
    def build_file(cls, path, *a, **k):
        seen.append(path)
        if len(seen) == 2:
            with open(os.path.join(os.path.dirname(path), "..", "..", "filler"), "wb") as f:
                try:
                    while True:
                        f.write(b"x" * (1 << 16))
                        f.flush()
                except OSError:                   # full: leave 256 KiB, less than one layer file
                    f.truncate(os.fstat(f.fileno()).st_size - (256 << 10))
        return real(cls, path, *a, **k)
    LayerStore.build_file = classmethod(build_file)
    sys.exit(main(sys.argv[1:]))
""")


@pytest.fixture
def small_disk(tmp_path):
    """A 24 MiB tmpfs (needs root and mount; skipped elsewhere, where the injected test above still runs)."""
    mnt = tmp_path / f"disk-{uuid.uuid4().hex[:8]}"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_filling_up_mid_run_is_a_message_not_sigbus(src_and_ref, small_disk):
    src, ref = src_and_ref
    out = small_disk / "store"
    cmd = ["convert", "--input", str(src), "--output", str(out), "--format", "int4", "--quiet"]
    r = subprocess.run([sys.executable, "-c", _CHILD, *cmd], capture_output=True, text=True)
    assert r.returncode == 2, (r.returncode, r.stderr)        # before the fix: -7 (SIGBUS), no message
    assert "hybrid-quant: error:" in r.stderr and "Traceback" not in r.stderr
    assert "disk filled up during the conversion" in r.stderr and "GiB more but the disk has" in r.stderr
    assert "rerun the same command to resume" in r.stderr
    assert not (out / MANIFEST).exists()
    (small_disk / "filler").unlink()                           # the user frees space and reruns
    r = subprocess.run([sys.executable, "-m", "quant", *cmd], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert _tree(out) == _tree(ref)


def test_verify_catches_a_flipped_byte(src_and_ref, tmp_path):
    """A class that already behaved (issue 19): a flipped byte in a finished store fails `verify`."""
    import shutil
    from quant.verify import verify
    _, ref = src_and_ref
    store = tmp_path / "store"
    shutil.copytree(ref, store)
    layer = sorted((store / "experts").glob("*.safetensors"))[0]
    data = bytearray(layer.read_bytes())
    data[-100] ^= 0x01
    layer.write_bytes(bytes(data))
    report = verify(store)
    assert not report["ok"], report


def test_verify_against_compares_every_source_shard(src_and_ref, tmp_path):
    """Issue 28 item 6: a flipped byte in a source shard the numeric check does not sample is found through
    the sha256 the manifest holds for every source shard."""
    import shutil
    from quant.verify import verify
    src, ref = src_and_ref
    copy = tmp_path / "src"
    shutil.copytree(src, copy)
    assert verify(ref, against=copy)["ok"]
    shard = sorted(copy.glob("*.safetensors"))[-1]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0x01
    shard.write_bytes(bytes(data))
    report = verify(ref, against=copy)
    assert not report["ok"] and report["source_errors"] == [
        f"{shard.name}: differs from the shard the store was converted from (sha256)"], report
