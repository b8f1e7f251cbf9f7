"""Triton's autotuning results as fla config files for one GPU model (`dcablate kernels export-tuning`).

**What Triton leaves.** An autotuner asked to keep its results (fla's are: `FLA_CACHE_RESULTS=1`, its
default; `TRITON_CACHE_AUTOTUNING=1` for any other) writes, for every tuning key it meets, a file
`<Triton cache>/<hash>/<kernel name>.autotune.json` holding `{"key": [...], "configs_timings": [[config,
[t50, t20, t80]], ...]}`: the key is the values of the kernel's `key` arguments followed by the dtype of every
tensor argument (`Autotuner.run`), the timings are milliseconds (median, 20th and 80th percentile).

**What fla reads.** A kernel under `fla_cache_autotune` reads `<FLA_CONFIG_DIR>/<kernel name>.json`:
`{"autotune_entries": {md5: {"autotune_key": [...], "config": {...}}}, ...}` where md5 is
`AutotuneKey.key_hash` of the key fla builds for the call (`AutotuneKey.build`). fla builds that key exactly as
Triton's autotuner does (the same arguments in the same order, then the same dtype strings), so a result's
`key` is the entry's `autotune_key` unchanged (tests/kernels/test_tuned_export.py checks both builders on a
real kernel).

**The conversion.** Per result, the best config is the one Triton itself would pick: the smallest timing
(compared as Triton compares them, median first). Only kernels that take a config are exported (`fla_kernels.py`:
those fla looks up, and the norm, SSD state and SwiGLU kernels under Triton's plain `autotune` whose autotuners
dcablate fills, `seed.py`), and a result must fit that kernel: its key as many values as the kernel has `key`
names followed by dtype strings, its configs tuning the same parameters. A result that timed one candidate compared nothing (a key
`seed.py` narrowed to its fixed candidate, or candidates pruned to one) and is left out: shipping it would
present an untimed default as a measured best. Same-named kernels of other fla ops with the same key and
parameters cannot be told apart by their results; dcablate never calls them, so a cache shared with other
fla programs could at worst contribute a config from the same candidates. Entries already in the output folder
are kept; for a key measured again the newer measurement (the result file's time) wins. Every entry records
its timing, when it was measured and the Triton version; every file the fla and Triton versions and the GPU.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import math
import os
import time
from pathlib import Path

from dcablate.errors import UserError
from dcablate.kernels.tuned import MANIFEST, ROOT, sanitize_gpu_name

SUFFIX = ".autotune.json"
FLA_DIST = "flash-linear-attention"


def installed(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def utc(seconds: float) -> str:
    """A file time as `2025-12-04T19:12:33Z` (strings of this form sort as the times do)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


@dataclasses.dataclass
class Result:
    """One `*.autotune.json`: the kernel, its tuning key and the best of its timed configs."""

    kernel: str
    key: list
    config: dict  # fla's form: kwargs, num_warps, num_stages, num_ctas, maxnreg, ir_override
    timing_ms: list
    measured: str
    path: Path
    tuned: list  # the kwargs names of every config timed (a failed one, or one left untimed, has an inf timing)


def as_fla_config(config: dict) -> dict:
    """A Triton `Config.__dict__` (as the autotuner saved it) in fla's config form; the kwargs keep their order
    (fla compares a cached config with the candidates key by key)."""
    return {"kwargs": dict(config.get("kwargs") or {}), "num_warps": config.get("num_warps", 4),
            "num_stages": config.get("num_stages", 3), "num_ctas": config.get("num_ctas", 1),
            "maxnreg": config.get("maxnreg"), "ir_override": config.get("ir_override")}


def _timing(t) -> tuple:
    """A saved timing as Triton compares them: a list (median, 20th, 80th percentile) or one number."""
    values = t if isinstance(t, list) else [t]
    if not values or not all(isinstance(v, (int, float)) for v in values):
        raise ValueError("a timing is not a number or list of numbers")
    return tuple(float(v) for v in values)


ALL_FAILED = "every config failed to run"


def read_result(path: Path) -> Result:
    """The result file `path`; ValueError when it is not one Triton's autotuner writes, or every config failed."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"unreadable ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("key"), list) or not isinstance(
            data.get("configs_timings"), list) or not data["configs_timings"]:
        raise ValueError("not an autotuning result (key, configs_timings)")
    timed = []
    for pair in data["configs_timings"]:
        if not (isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], dict)):
            raise ValueError("a configs_timings entry is not [config, timing]")
        timed.append((pair[0], _timing(pair[1])))
    config, timing = min(timed, key=lambda ct: ct[1])  # first of the fastest, as Triton's min() picks
    if not math.isfinite(timing[0]):
        raise ValueError(ALL_FAILED)
    return Result(path.name[:-len(SUFFIX)], data["key"], as_fla_config(config), list(timing),
                  utc(path.stat().st_mtime), path,
                  [sorted((c.get("kwargs") or {})) for c, t in timed if math.isfinite(t[0])])


def misfit(result: Result, kernel) -> str | None:
    """Why `result` cannot be a result of fla's `kernel` (a `CachedAutotuner` or plain `Autotuner`), or None when it
    fits."""
    from dcablate.kernels.tuned.fla_kernels import fits_keys

    if not fits_keys(result.key, kernel):
        return f"its key {result.key} is not {len(kernel.keys)} values of {kernel.keys} and then dtypes"
    params = {tuple(sorted(c.kwargs)) for c in kernel.configs}
    other = [names for names in result.tuned if tuple(names) not in params]
    if other:
        return f"it tunes {other[0] or 'no parameters'}, fla's kernel {sorted(map(list, params))}"
    return None


@dataclasses.dataclass
class Report:
    """What an export did, for the command's lines."""

    out_dir: Path
    gpu: str
    fla_version: str
    triton_version: str | None
    results: int = 0
    exported: int = 0  # kernels with results now
    added: int = 0
    replaced: int = 0
    kept: int = 0
    kernels: dict = dataclasses.field(default_factory=dict)  # kernel -> entries in its file now
    not_looked_up: dict = dataclasses.field(default_factory=dict)  # kernel -> results left out
    misfits: dict = dataclasses.field(default_factory=dict)  # kernel -> why (first case)
    unreadable: dict = dataclasses.field(default_factory=dict)  # path -> why
    unimportable: dict = dataclasses.field(default_factory=dict)  # kernel -> why its fla module did not import
    single: dict = dataclasses.field(default_factory=dict)  # kernel -> results that timed one candidate only

    def lines(self) -> list[str]:
        total = sum(self.kernels.values())
        out = [f"exported {self.results} autotuning result{'s' if self.results != 1 else ''} of {self.exported} fla "
               f"kernel{'s' if self.exported != 1 else ''} for {self.gpu} into {self.out_dir}: {self.added} new "
               f"key{'s' if self.added != 1 else ''}, {self.replaced} measured again (the newer kept), "
               f"{self.kept} kept as they were; {total} keys of {len(self.kernels)} kernels in all "
               f"(fla {self.fla_version}, Triton {self.triton_version})"]
        if self.not_looked_up:
            n = sum(self.not_looked_up.values())
            out.append(f"left out {n} result{'s' if n != 1 else ''} of kernels that take no config file (neither fla "
                       f"nor dcablate looks one up): {', '.join(sorted(self.not_looked_up))}")
        if self.single:
            n = sum(self.single.values())
            out.append(f"left out {n} result{'s' if n != 1 else ''} that timed one candidate and compared nothing "
                       f"(dcablate's fixed norm candidates, or candidates pruned to one): "
                       f"{', '.join(f'{k} {v}' for k, v in sorted(self.single.items()))}")
        for kernel, why in sorted(self.misfits.items()):
            out.append(f"left out results of {kernel} that do not fit fla {self.fla_version}'s kernel: {why}")
        for kernel, why in sorted(self.unimportable.items()):
            out.append(f"left out results of {kernel}: its fla module does not import here ({why})")
        for path, why in sorted(self.unreadable.items()):
            out.append(f"left out {path}: {why}")
        return out


def _read_existing(out_dir: Path, gpu: str, fla_version: str) -> dict[str, dict]:
    """Kernel name -> autotune entries already in `out_dir`; a UserError when they were made for another GPU or
    fla version (they are never mixed) or a file there is not a kernel config file."""
    manifest = out_dir / MANIFEST
    if manifest.is_file():
        try:
            m = json.loads(manifest.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UserError(f"{manifest}: unreadable ({e}); export into another --out") from None
        if m.get("gpu_name") not in (None, gpu):
            raise UserError(f"--out {out_dir}: holds kernel configs for {m.get('gpu_name')}, not {gpu}; export into "
                            f"another --out")
        if m.get("fla_version") not in (None, fla_version):
            raise UserError(f"--out {out_dir}: holds kernel configs tuned with fla {m.get('fla_version')}, this is fla "
                            f"{fla_version}; export into another --out (configs are never mixed across fla versions)")
    existing = {}
    for path in sorted(out_dir.glob("*.json")) if out_dir.is_dir() else []:
        if path.name == MANIFEST:
            continue
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UserError(f"{path}: unreadable ({e}); export into another --out") from None
        if not isinstance(data, dict) or not isinstance(data.get("autotune_entries", {}), dict):
            raise UserError(f"{path}: not a kernel config file (no autotune_entries); export into another --out")
        if data.get("fla_version") not in (None, fla_version):
            raise UserError(f"{path}: tuned with fla {data['fla_version']}, this is fla {fla_version}; export into "
                            f"another --out (configs are never mixed across fla versions)")
        existing[path.stem] = dict(data.get("autotune_entries") or {})
    return existing


def _write_json(path: Path, data: dict) -> None:
    """Write `path` whole or not at all."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def result_files(caches: list[Path]) -> list[Path]:
    return sorted(p for c in caches for p in Path(c).rglob(f"*{SUFFIX}") if p.is_file())


def export(caches: list[Path], out_dir: Path, gpu_name: str, triton_version: str | None = None) -> Report:
    """Convert every autotuning result under the Triton cache folders `caches` of a kernel fla looks up into
    `out_dir/<kernel>.json`, merged with what `out_dir` holds (the newer measurement of a key wins), and write
    `out_dir/manifest.json`; what it did. UserError for a missing folder, no results, no fla, or an `out_dir`
    made for another GPU or fla version."""
    from dcablate.kernels.tuned.fla_kernels import cached_kernel_modules, tuned_kernels

    fla_version = installed(FLA_DIST)
    if fla_version is None:
        raise UserError("exporting tuned kernel configs reads fla's kernels: pip install 'dcablate[cuda]'")
    gpu = sanitize_gpu_name(gpu_name)
    for c in caches:
        if not Path(c).is_dir():
            raise UserError(f"Triton cache {c}: no such folder")
    files = result_files(caches)
    if not files:
        raise UserError(f"no *{SUFFIX} files under {', '.join(map(str, caches))}: Triton writes them when an "
                        f"autotuner keeps its results (fla's do; TRITON_CACHE_AUTOTUNING=1 for all); train on CUDA "
                        f"first, e.g. a sweep (its kernel warm-up) or benchmarks/tune_kernels.py")
    existing = _read_existing(out_dir, gpu, fla_version)
    # the Triton that measured them: this machine's, unless exported elsewhere (results carry no version)
    report = Report(out_dir, gpu, fla_version, triton_version or installed("triton"))
    names = {f.name[:-len(SUFFIX)] for f in files}
    kernels, failed = tuned_kernels(names)
    from fla.ops.utils.cache import AutotuneKey

    newest: dict[str, dict[str, tuple[Result, dict]]] = {}
    for path in files:
        name = path.name[:-len(SUFFIX)]
        try:  # a file that is no autotuning result is named as such, whatever kernel its name suggests
            result = read_result(path)
        except ValueError as e:
            if name in kernels or str(e) != ALL_FAILED:
                report.unreadable[str(path)] = str(e)
                continue
            # another program's kernel whose every config failed: a result all the same, of no kernel fla reads
        if name not in kernels:
            modules = cached_kernel_modules().get(name, ())
            if modules:  # fla looks it up, but its module does not import here
                report.unimportable[name] = "; ".join(f"{m}: {failed.get(m, 'no such kernel')}" for m in modules)
            else:
                report.not_looked_up[name] = report.not_looked_up.get(name, 0) + 1
            continue
        if len(result.tuned) < 2:
            report.single[name] = report.single.get(name, 0) + 1
            continue
        whys = [misfit(result, k) for k in kernels[name]]
        if all(whys):
            report.misfits.setdefault(name, whys[0])
            continue
        report.results += 1
        entry = {"autotune_key": result.key, "config": result.config, "timing_ms": result.timing_ms,
                 "measured": result.measured, "triton_version": report.triton_version}
        h = AutotuneKey.key_hash(result.key)
        seen = newest.setdefault(name, {}).get(h)
        if seen is None or (result.measured, str(path)) > (seen[0].measured, str(seen[0].path)):
            newest[name][h] = (result, entry)
    if not report.results:
        def listed(d: dict) -> str:
            return "; ".join(f"{k}: {w}" for k, w in sorted(d.items()))

        if report.unreadable and not (report.single or report.unimportable or report.not_looked_up or report.misfits):
            why = f"no file is an autotuning result ({listed(report.unreadable)})"
        elif report.single and not (report.unimportable or report.not_looked_up or report.misfits):
            why = f"every result timed one candidate and compared nothing ({listed(report.single)})"
        elif report.unimportable:
            why = f"fla's modules of the kernels found do not import here ({listed(report.unimportable)})"
        elif report.not_looked_up:
            names = ", ".join(sorted(report.not_looked_up))
            why = f"results only of kernels that take no config file ({names})"
        else:
            why = f"no result fits fla's kernels ({listed(report.misfits)})"
        raise UserError(f"nothing to export from {', '.join(map(str, caches))}: {why}")
    try:
        _write_all(out_dir, newest, existing, report, gpu, fla_version)
    except OSError as e:
        raise UserError(f"--out {out_dir}: cannot write there ({e.strerror or e}); export into another --out") from None
    return report


def _write_all(out_dir: Path, newest: dict, existing: dict, report: Report, gpu: str, fla_version: str) -> None:
    """Merge `newest` (kernel -> key hash -> (result, entry)) into `existing` and write the files and manifest."""
    out_dir.mkdir(parents=True, exist_ok=True)
    report.exported = len(newest)
    for name, found in sorted(newest.items()):
        entries = existing.get(name, {})
        for h, (_, entry) in found.items():
            old = entries.get(h)
            if old is None:
                report.added += 1
            elif entry["measured"] > str(old.get("measured", "")):
                report.replaced += 1
            else:
                continue
            entries[h] = entry
        existing[name] = entries
        _write_json(out_dir / f"{name}.json", {
            "kernel_name": name, "gpu_name": gpu, "fla_version": fla_version, "triton_version": report.triton_version,
            "autotune_entries": dict(sorted(entries.items()))})
    report.kept = sum(len(e) for e in existing.values()) - report.added - report.replaced
    report.kernels = {name: len(e) for name, e in sorted(existing.items()) if e}
    _write_json(out_dir / MANIFEST, {"gpu_name": gpu, "fla_version": fla_version,
                                     "triton_version": report.triton_version, "exported": utc(time.time()),
                                     "kernels": report.kernels})


def default_out(gpu_name: str) -> Path:
    """Where the package keeps the configs of `gpu_name`: dcablate/kernels/tuned/<sanitised name>/."""
    return ROOT / sanitize_gpu_name(gpu_name)
