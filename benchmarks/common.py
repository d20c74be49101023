"""Shared helpers for the benchmark scripts: timing, peak memory, ceilings and receipts.

Stable API (other benchmark scripts import it):
  time_cuda(fn, warmup=1, reps=5) -> median milliseconds (CUDA events)
  peak_gib(fn) -> float      peak allocated during ``fn()`` minus allocated before, in GiB
  device_name() -> str
  versions() -> dict
  measure_ceilings() -> dict  {"bf16_matmul_tflops": ..., "copy_tb_s": ...}
  write_receipt(topic, rows, out_dir, extra=None) -> dict of written paths (json, md, png)
  ClockLog(): the SM clock, power and throttle reasons every 100 ms (nvidia-smi), in the background;
              .during(t0, t1) summarises what it saw between two time.time() stamps
  kernel_times(prof) -> ({kernel: [calls, ms]}, (first start, last end) in ms or None)
  kernel_groups(kt, groups) -> {group: ms}   those summed by name fragments (the rest: "other")
  profile_groups(fn, groups) -> {group: ms, "span": ms}   one profiled call of fn, grouped
  triton_kernels(*modules) -> [compiled kernel]   every kernel Triton compiled in this process for
              the @triton.jit functions of ``modules`` (read from Triton's own JIT cache)
  kernel_resources(kernel) -> {"kernel", "regs", "spills", "shared", "warps", "stages", "constexprs"}

A receipt's ``extra`` may carry ``kernel_status`` (``megatron_dsa.kernels.format_status()``):
the markdown then ends with that table, so the receipt says which kernels ran.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import shutil
import statistics
import subprocess
import tempfile
from collections import defaultdict
from typing import Callable, Dict, List, Optional

import torch

__all__ = [
    "time_cuda", "peak_gib", "device_name", "versions", "measure_ceilings", "write_receipt",
    "run_guarded", "ClockLog", "kernel_times", "kernel_groups", "profile_groups", "triton_kernels",
    "kernel_resources",
]


def time_cuda(fn: Callable[[], object], warmup: int = 1, reps: int = 5) -> float:
    """Median time of ``fn()`` in milliseconds, measured with CUDA events after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return float(statistics.median(times))


def peak_gib(fn: Callable[[], object]) -> float:
    """Peak allocated memory during ``fn()`` minus what was allocated before (GiB)."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del out
    return (peak - before) / 2**30


def run_guarded(fn: Callable[[], dict]) -> dict:
    """Run ``fn`` and turn OOM / other failures into a status field."""
    try:
        res = fn()
        res.setdefault("status", "ok")
        return res
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return {"status": "oom"}
    except Exception as e:  # noqa: BLE001 - a benchmark records the failure and goes on
        torch.cuda.empty_cache()
        msg = f"{type(e).__name__}: {e}".splitlines()[0][:200]
        if "out of memory" in msg.lower():
            return {"status": "oom"}
        return {"status": f"error: {msg}"}


class ClockLog:
    """nvidia-smi polling the SM clock, power and clock-event reasons every ``period_ms`` in the
    background (no-op where nvidia-smi is missing). A timed row that ran at a lowered clock (the
    GPU at its power cap: reason bit 0x4, SW power cap) then says so in its receipt: a kernel that
    draws more power than its peers can be slowed by the cap where they are not."""

    FIELDS = "timestamp,clocks.sm,power.draw,clocks_event_reasons.active"

    def __init__(self, period_ms: int = 100):
        self._f = tempfile.NamedTemporaryFile("w+", suffix=".csv", delete=False)
        try:
            line_buffered = ["stdbuf", "-oL"] if shutil.which("stdbuf") else []
            self._p = subprocess.Popen(
                line_buffered + ["nvidia-smi", f"--query-gpu={self.FIELDS}", "--format=csv,noheader,nounits",
                 f"-lms={period_ms}"], stdout=self._f, stderr=subprocess.DEVNULL)
        except OSError:
            self._p = None

    def samples(self):
        """[(unix time, sm MHz, power W, reasons int)] logged so far."""
        out = []
        self._f.flush()
        with open(self._f.name) as f:
            for line in f:
                parts = [x.strip() for x in line.split(",")]
                if len(parts) != 4:
                    continue
                try:
                    # nvidia-smi prints local time; a naive datetime's timestamp() reads it as such
                    ts = datetime.datetime.strptime(parts[0], "%Y/%m/%d %H:%M:%S.%f")
                    out.append((ts.timestamp(), float(parts[1]), float(parts[2]), int(parts[3], 16)))
                except ValueError:
                    continue
        return out

    def during(self, t0: float, t1: float, samples=None) -> Optional[dict]:
        """SM clock range, peak power and OR of the reason bits sampled within [t0, t1] (widened
        to the nearest sample so a short span still gets one), or None without samples.
        ``samples``: a :meth:`samples` result to reuse when summarising many spans."""
        s = self.samples() if samples is None else samples
        if not s:
            return None
        inside = [x for x in s if t0 <= x[0] <= t1]
        if not inside:
            inside = [min(s, key=lambda x: abs(x[0] - 0.5 * (t0 + t1)))]
        reasons = 0
        for x in inside:
            reasons |= x[3]
        return {"sm_mhz": [min(x[1] for x in inside), max(x[1] for x in inside)],
                "power_w_max": max(x[2] for x in inside), "clock_reasons": hex(reasons)}

    def close_process(self):
        """Stop polling (the samples logged so far stay readable)."""
        if self._p is not None:
            self._p.terminate()
            self._p.wait()
            self._p = None

    def close(self):
        self.close_process()
        self._f.close()
        os.unlink(self._f.name)


def kernel_times(prof):
    """Per CUDA kernel name ``[calls, device ms]`` from a finished ``torch.profiler.profile``,
    and the span from the first kernel's start to the last one's end (ms), or None."""
    kern = defaultdict(lambda: [0, 0.0])
    first = last = None
    for e in prof.events():
        if e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        kern[e.name][0] += 1
        kern[e.name][1] += e.device_time_total / 1e3
        t0, t1 = e.time_range.start / 1e3, e.time_range.end / 1e3
        first = t0 if first is None else min(first, t0)
        last = t1 if last is None else max(last, t1)
    return dict(kern), ((first, last) if first is not None else None)


def kernel_groups(kt: dict, groups: Dict[str, tuple]) -> Dict[str, float]:
    """``kernel_times``' ``{kernel: [calls, ms]}`` summed into named groups: a kernel goes to the
    first group one of whose name fragments its name contains, else to ``"other"`` (ms, rounded)."""
    out = {g: 0.0 for g in groups}
    out["other"] = 0.0
    for name, (_calls, ms) in kt.items():
        g = next((g for g, frags in groups.items() if any(f in name for f in frags)), "other")
        out[g] += ms
    return {g: round(v, 4) for g, v in out.items()}


def profile_groups(fn: Callable[[], object], groups: Dict[str, tuple]) -> Dict[str, float]:
    """Device ms of one call of ``fn`` per kernel group (``kernel_groups``), and ``span`` (the
    first kernel's start to the last one's end), from ``torch.profiler``."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    kt, span = kernel_times(prof)
    out = kernel_groups(kt, groups)
    out["span"] = round(span[1] - span[0], 4) if span else 0.0
    return out


def _jit_function(obj):
    """The ``triton.runtime.jit.JITFunction`` behind ``obj`` (unwrapping ``triton.autotune`` /
    ``triton.heuristics``), or None."""
    from triton.runtime.jit import JITFunction

    for _ in range(4):
        if isinstance(obj, JITFunction):
            return obj
        obj = getattr(obj, "fn", None)
        if obj is None:
            return None
    return None


def triton_kernels(*modules) -> list:
    """Every kernel Triton has compiled in this process for the ``@triton.jit`` functions defined
    in ``modules`` (one per specialization: constexprs, warps, stages), in the order they were
    compiled per function. Read from each function's own JIT cache: ``JITFunction.device_caches``
    maps a device to a tuple whose first item is ``{specialization key: CompiledKernel}``. A
    kernel that was never launched (or an ``@triton.jit`` helper inlined into one) is not there."""
    out, seen = [], set()
    for mod in modules:
        for obj in list(vars(mod).values()):
            fn = _jit_function(obj)
            if fn is None or getattr(fn.fn, "__module__", None) != mod.__name__:
                continue  # not a kernel, or one imported from elsewhere
            caches = getattr(fn, "device_caches", None)
            per_device = [c[0] for c in caches.values()] if caches is not None else list(getattr(fn, "cache", {}).values())
            for cache in per_device:
                for ker in list(cache.values()):
                    if id(ker) in seen or not hasattr(ker, "metadata"):
                        continue  # (an asynchronous compile still in flight has no metadata yet)
                    seen.add(id(ker))
                    out.append(ker)
    return out


def _plain(v):
    v = getattr(v, "value", v)  # tl.constexpr
    return v if v is None or isinstance(v, (bool, int, float, str)) else str(v)


def kernel_resources(kernel) -> dict:
    """Name, registers per thread, spilled registers, shared memory (bytes), warps, stages and
    the ``tl.constexpr`` arguments of one compiled Triton kernel (see :func:`triton_kernels`)."""
    try:
        kernel._init_handles()  # registers / spills are known once the binary is loaded
    except Exception:  # noqa: BLE001 - e.g. more shared memory than this GPU has
        pass
    md = kernel.metadata
    d = {"kernel": getattr(md, "name", None) or getattr(kernel, "name", "?"),
         "regs": getattr(kernel, "n_regs", None), "spills": getattr(kernel, "n_spills", None),
         "shared": getattr(md, "shared", None), "warps": getattr(md, "num_warps", None),
         "stages": getattr(md, "num_stages", None)}
    src = getattr(kernel, "src", None)
    fn = getattr(src, "fn", None)
    consts = {}
    if fn is not None:
        for path, v in sorted(getattr(src, "constants", {}).items(), key=lambda kv: str(kv[0])):
            i = path[0] if isinstance(path, tuple) and len(path) == 1 else path
            if isinstance(i, int) and i < len(fn.params) and fn.params[i].is_constexpr:
                consts[fn.arg_names[i]] = _plain(v)
            elif isinstance(i, str):  # older Triton: keyed by name
                consts[i] = _plain(v)
    d["constexprs"] = consts
    return d


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def versions() -> Dict[str, str]:
    v = {"torch": torch.__version__}
    for mod, key in (("triton", "triton"), ("megatron_dsa", "megatron_dsa"),
                     ("megatron.core", "megatron_core"), ("tilelang", "tilelang"),
                     ("cudnn", "cudnn_frontend")):
        try:
            m = __import__(mod, fromlist=["_"])
            v[key] = str(getattr(m, "__version__", "unknown"))
        except Exception:  # noqa: BLE001
            v[key] = "absent"
    return v


def measure_ceilings(n: int = 8192, copy_gib: float = 1.0) -> Dict[str, float]:
    """bf16 matmul TFLOP/s (n^3) and device copy TB/s (bytes read + written), measured here."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = time_cuda(lambda: a @ b, warmup=2, reps=10)
    tflops = 2 * n**3 / (ms * 1e-3) / 1e12
    del a, b
    x = torch.randn(int(copy_gib * 2**30 // 4), device="cuda")
    y = torch.empty_like(x)
    ms = time_cuda(lambda: y.copy_(x), warmup=2, reps=10)
    tbs = 2 * x.numel() * 4 / (ms * 1e-3) / 1e12
    del x, y
    torch.cuda.empty_cache()
    return {"bf16_matmul_tflops": round(tflops, 1), "copy_tb_s": round(tbs, 2)}


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", s).strip("_").lower()


def _fmt(x, nd=3):
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def _plot_png(path: str, rows: List[dict], title: str) -> bool:
    """Time and peak memory vs S per impl (and pass); needs matplotlib, else returns False."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:  # noqa: BLE001
        return False
    series: Dict[str, list] = {}
    for r in rows:
        case = r.get("case", {})
        if "S" not in case or r.get("status") != "ok":
            continue
        name = r["impl"] + (f" [{case['pass']}]" if case.get("pass") else "")
        series.setdefault(name, []).append((case["S"], r.get("ms"), r.get("peak_gib")))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    try:
        for name, pts in sorted(series.items()):
            for j, ax in enumerate(axes):
                # (a log axis takes positive values only: a row without the value is left out)
                xy = sorted((p[0], p[j + 1]) for p in pts if isinstance(p[j + 1], (int, float)) and p[j + 1] > 0)
                if xy:
                    ax.plot([x for x, _ in xy], [y for _, y in xy], marker="o", label=name)
        for ax, lab in zip(axes, ("time (ms)", "peak extra memory (GiB)")):
            if ax.lines:
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
            ax.set_xlabel("S (keys = queries)")
            ax.set_ylabel(lab)
            ax.grid(True, which="both", alpha=0.3)
        if axes[0].lines:
            axes[0].legend(fontsize=7)
        fig.suptitle(title, fontsize=9)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        return True
    except Exception:  # noqa: BLE001 - the plot is a convenience; the JSON and markdown stand
        return False
    finally:
        plt.close(fig)


def write_receipt(topic: str, rows: List[dict], out_dir: str, extra: Optional[dict] = None,
                  ceilings: Optional[dict] = None) -> Dict[str, str]:
    """Write ``<topic>-<device>-<date>.{json,md,png}`` under ``out_dir``; returns the paths."""
    doc = {"topic": topic, "date": datetime.date.today().isoformat(), "device": device_name(),
           "versions": versions(), "ceilings": ceilings if ceilings is not None else {},
           "rows": rows}
    if extra:
        doc.update(extra)
    return _write_doc(doc, out_dir)


def merge_receipts(json_paths: List[str], out_dir: str) -> Dict[str, str]:
    """One receipt from several JSON receipts of one topic taken on one device (e.g. sequence
    lengths split over back-to-back calls). Device, date and versions must agree; each part's
    ceilings are kept under ``parts``."""
    docs = []
    for p in json_paths:
        with open(p) as f:
            docs.append(json.load(f))
    for key in ("topic", "device", "date", "versions"):
        if len({json.dumps(d[key], sort_keys=True) for d in docs}) != 1:
            raise ValueError(f"receipts disagree on {key}")
    doc = dict(docs[0])
    doc["rows"] = [r for d in docs for r in d["rows"]]
    doc["parts"] = [{"file": os.path.basename(p), "ceilings": d.get("ceilings", {}),
                     "rows": len(d["rows"])} for p, d in zip(json_paths, docs)]
    return _write_doc(doc, out_dir)


def _clock_cells(ck: Optional[dict]) -> List[str]:
    if not ck:
        return ["-", "-"]
    lo, hi = ck["sm_mhz"]
    return [f"{lo:.0f}" if lo == hi else f"{lo:.0f}-{hi:.0f}", f"{ck['power_w_max']:.0f}"]


def _write_doc(doc: dict, out_dir: str) -> Dict[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    topic, date, dev, rows = doc["topic"], doc["date"], doc["device"], doc["rows"]
    stem = os.path.join(out_dir, f"{topic}-{_slug(dev)}-{date}")
    paths = {"json": stem + ".json", "md": stem + ".md"}
    with open(paths["json"], "w") as f:
        json.dump(doc, f, indent=1)
    keys = sorted({k for r in rows for k in r.get("case", {})})
    lines = [f"# {topic} on {dev} ({date})", "",
             f"versions: `{json.dumps(doc['versions'])}`  ", f"ceilings: `{json.dumps(doc['ceilings'])}`", ""]
    if doc.get("parts"):
        lines[-1:-1] = [f"  \nmerged from back-to-back runs on one machine: " + "; ".join(
            f"{p['rows']} rows, ceilings {json.dumps(p['ceilings'])}" for p in doc["parts"])]
    # optional per-row checks a benchmark adds (e.g. rel_dq_vs_ours: agreement of a peer's output)
    checks = sorted({k for r in rows for k in r if k.startswith("rel_")})
    # the SM clock range and peak power seen during a row's timed calls (ClockLog), where recorded
    clock = any("clock" in r for r in rows)
    clock_head = " SM MHz | W max |" if clock else ""
    lines += ["| impl | " + " | ".join(keys) + " | ms | TFLOP/s | peak GiB | status |"
              + "".join(f" {k} |" for k in checks) + clock_head,
              "|---" * (len(keys) + 5 + len(checks) + 2 * clock) + "|"]
    for r in rows:
        c = r.get("case", {})
        lines.append("| " + " | ".join([r["impl"]] + [_fmt(c.get(k)) for k in keys]
                                        + [_fmt(r.get("ms")), _fmt(r.get("tflops"), 1),
                                           _fmt(r.get("peak_gib")), r.get("status", "")]
                                        + [f"{r[k]:.1e}" if isinstance(r.get(k), float) else _fmt(r.get(k))
                                           for k in checks]
                                        + (_clock_cells(r.get("clock")) if clock else [])) + " |")
    bd = [r for r in rows if r.get("breakdown_ms")]
    if bd:  # device ms of one call per kernel group (profile_groups), where a benchmark recorded it
        cols = list(dict.fromkeys(k for r in bd for k in r["breakdown_ms"]))
        lines += ["", "Device time of one call by kernel group (ms, `torch.profiler`):", "",
                  "| impl | " + " | ".join(keys) + " | " + " | ".join(cols) + " |",
                  "|---" * (1 + len(keys) + len(cols)) + "|"]
        for r in bd:
            c = r.get("case", {})
            lines.append("| " + " | ".join([r["impl"]] + [_fmt(c.get(k)) for k in keys]
                                            + [_fmt(r["breakdown_ms"].get(k)) for k in cols]) + " |")
    if doc.get("kernel_status"):
        lines += ["", "Kernels `backend=\"auto\"` runs here (`megatron_dsa.kernels.format_status()`):", "",
                  str(doc["kernel_status"])]
    with open(paths["md"], "w") as f:
        f.write("\n".join(lines) + "\n")
    if _plot_png(stem + ".png", rows, f"{topic} on {dev} ({date})"):
        paths["png"] = stem + ".png"
    return paths
