""".ci/triton_compiled.py: compiled kernels packed on one machine are found by Triton's own cache on the next,
at another cache path, without the intermediate IRs."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / ".ci" / "triton_compiled.py"


def put_kernel(cache: Path, key: str, name: str, monkeypatch) -> dict:
    """A kernel written the way Triton's compiler writes one: each level of IR, the binary, the metadata and
    the group file naming them (by absolute path)."""
    from triton.runtime.cache import FileCacheManager

    monkeypatch.setenv("TRITON_CACHE_DIR", str(cache))
    manager = FileCacheManager(key)
    group = {f"{name}.{ext}": manager.put(f"{ext} of {name}" * 50, f"{name}.{ext}")
             for ext in ("source", "ttir", "ttgir", "llir", "ptx")}
    group[f"{name}.cubin"] = manager.put(b"\x7fELF" + bytes(range(256)), f"{name}.cubin", binary=True)
    group[f"{name}.json"] = manager.put(json.dumps({"name": name}), f"{name}.json", binary=False)
    manager.put_group(f"{name}.json", group)
    return group


def run(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True)


def test_packed_kernels_load_from_another_cache(tmp_path, monkeypatch):
    pytest.importorskip("triton")
    from triton.runtime.cache import FileCacheManager

    first, second = tmp_path / "machine1", tmp_path / "machine2"
    put_kernel(first, "abc123", "chunk_fwd", monkeypatch)
    (first / "def456").mkdir()
    (first / "def456" / "chunk_fwd.autotune.json").write_text('{"configs_timings": []}')
    packed = run("pack", first, tmp_path / "compiled.tar.xz")
    assert packed.returncode == 0 and "1 kernels" in packed.stdout, packed.stdout + packed.stderr

    assert run("unpack", tmp_path / "compiled.tar.xz", second).returncode == 0
    monkeypatch.setenv("TRITON_CACHE_DIR", str(second))
    group = FileCacheManager("abc123").get_group("chunk_fwd.json")
    assert group is not None and sorted(group) == ["chunk_fwd.cubin", "chunk_fwd.json"]
    assert all(Path(p).parent == second.resolve() / "abc123" for p in group.values())
    assert Path(group["chunk_fwd.cubin"]).read_bytes() == b"\x7fELF" + bytes(range(256))
    assert (second / "def456" / "chunk_fwd.autotune.json").is_file()
    assert not list(second.rglob("*.ptx")) and not list(second.rglob("*.ttgir"))


def test_an_archive_over_the_limit_is_not_written(tmp_path, monkeypatch):
    pytest.importorskip("triton")
    put_kernel(tmp_path / "cache", "abc123", "chunk_fwd", monkeypatch)
    packed = run("pack", tmp_path / "cache", tmp_path / "compiled.tar.xz", "--max-mib", "0")
    assert packed.returncode == 0 and "not written" in packed.stdout
    assert not (tmp_path / "compiled.tar.xz").exists()
