"""Carry Triton's compiled kernels from one GPU machine to the next, so a fresh machine loads them instead of
compiling them again (fla's kernels and ours: minutes of a fresh machine's kernel warm-up).

    python3 .ci/triton_compiled.py pack CACHE_DIR OUT.tar.xz [--max-mib 5]
    python3 .ci/triton_compiled.py unpack IN.tar.xz CACHE_DIR

`pack` keeps what loading a kernel reads (each kernel's metadata `.json` and binary `.cubin`, the launchers'
shared objects, autotuning results, dcablate's launch choices and warm marks) and drops the intermediate IRs
(`.ttir`, `.ttgir`, `.llir`, `.ptx`, `.source`), which are most of the cache's size and which only a compile
writes. Triton finds a kernel through its group file (`__grp__NAME.json`), which lists every file of the kernel by
absolute path and counts a kernel missing when one is gone; so `pack` writes each group with the files it kept,
relative to the cache, and `unpack` makes them absolute under the cache it fills. A kernel whose source, options,
Triton version or GPU architecture differ has another hash, so an entry that does not apply is never read.
An archive over `--max-mib` (what a device call can carry beside the rest) is not written; the script says so.
"""

from __future__ import annotations

import io
import json
import lzma
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

DROPPED = {".ttir", ".ttgir", ".llir", ".ptx", ".source", ".amdgcn", ".hsaco_asm"}
GROUP_PREFIX = "__grp__"


def kept(path: Path) -> bool:
    return (path.suffix not in DROPPED and not path.name.startswith(".")
            and not path.name.endswith((".lock", ".tar.xz", ".tgz")))  # an archive carried in is no kernel


def pack(cache: Path, out: Path, max_mib: float) -> int:
    buffer = io.BytesIO()
    files = kernels = 0
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for path in sorted(p for p in cache.rglob("*") if p.is_file() and kept(p)):
            name = path.relative_to(cache).as_posix()
            if path.name.startswith(GROUP_PREFIX):
                group = json.loads(path.read_text())
                children = {child: Path(p) for child, p in group.get("child_paths", {}).items()}
                children = {child: p for child, p in children.items() if kept(p) and p.is_file()}
                if not children or not any(c.endswith(".json") for c in children):
                    continue
                group["child_paths"] = {c: p.relative_to(cache).as_posix() for c, p in children.items()}
                data = json.dumps(group).encode()
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
                kernels += 1
            else:
                tar.add(path, arcname=name)
            files += 1
    archive = compress(buffer.getvalue())
    size = len(archive) / 2**20
    if size > max_mib:
        print(f"compiled kernels: {kernels} kernels, {files} files, {size:.1f} MiB compressed: over --max-mib "
              f"{max_mib}, not written")
        return 0
    out.write_bytes(archive)
    print(f"compiled kernels: {kernels} kernels, {files} files, {size:.1f} MiB compressed -> {out}")
    return 0


def compress(raw: bytes) -> bytes:
    """xz on every core where the `xz` tool is there (tens of MiB of binaries, at the end of a timed call)."""
    if shutil.which("xz"):
        done = subprocess.run(["xz", "-T0", "-6", "-c"], input=raw, capture_output=True)
        if done.returncode == 0:
            return done.stdout
    return lzma.compress(raw, preset=6)


def unpack(archive: Path, cache: Path) -> int:
    cache.mkdir(parents=True, exist_ok=True)
    root = cache.resolve()
    with tarfile.open(archive, mode="r:xz") as tar:
        tar.extractall(cache, filter="data")
        names = tar.getnames()
    for name in names:
        path = root / name
        if path.name.startswith(GROUP_PREFIX) and path.is_file():
            group = json.loads(path.read_text())
            group["child_paths"] = {c: str(root / p) for c, p in group["child_paths"].items()}
            path.write_text(json.dumps(group))
    print(f"compiled kernels: {len(names)} files from {archive} into {cache}")
    return 0


def main(argv: list[str]) -> int:
    if len(argv) >= 3 and argv[0] == "pack":
        max_mib = float(argv[argv.index("--max-mib") + 1]) if "--max-mib" in argv else 5.0
        return pack(Path(argv[1]), Path(argv[2]), max_mib)
    if len(argv) == 3 and argv[0] == "unpack":
        return unpack(Path(argv[1]), Path(argv[2]))
    print("usage:\n" + "\n".join(__doc__.strip().splitlines()[3:5]), file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
