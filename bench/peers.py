"""Train-step speed and memory of our UNet against diffusers' PyTorch and Flax UNets at equal shapes.

    .venv/bin/python bench/peers.py --workload small      # seconds: a check of the harness
    .venv/bin/python bench/peers.py --workload edm64      # eDiff-I-like 64², batch 8
    .venv/bin/python bench/peers.py --workload attn64     # attention at 64² too, batch 4
    python3 bench/peers.py --workload edm64 --dtype bfloat16 --batch 64   # on a GPU: mixed precision

Peers need diffusers 0.39.0 (the last release with Flax UNets), never a library dependency: `.venv/bin/pip install
--no-deps -r bench/requirements-peers.txt` (its huggingface-hub<2 pin conflicts with transformers 5; unused here).
One run measures, each in its own process (so peak RSS and kernel time are per framework):

  1. the machine's fp32 matmul peak (XLA, 2048³, best of 3 × 5 products), at the start and at the end;
  2. our real jitted train step (bench/peer_models.py: EDM loss, backward, AdamW, EMA);
  3. diffusers' PyTorch UNet2DConditionModel (eager), and its FlaxUNet2DConditionModel (jitted) with and without
     memory-efficient attention — the same loss, optimizer and EMA (documented in bench/peer_models.py).

Per step: parameters; model FLOPs = 3 × the forward's conv / matmul / attention (QKᵀ, AV) FLOPs from one analytic
counter over the layer shapes each framework runs (bench/flops.py; for ours cross-checked against XLA's
cost_analysis of the lowered forward); compile (JAX) or first-step (torch) time; median step time over `--steps`
steps after one warm-up step; images/s; achieved GFLOP/s and its fraction of the matmul peak; peak RSS
(getrusage of the child); kernel (system) and user CPU seconds per step; XLA's temporary-buffer size.

On a GPU (JAX's default backend, PyTorch's CUDA device) the peak product is a bfloat16 8192³ matmul when --dtype
is bfloat16, and each child also reports its device's peak memory (JAX: the allocator's peak_bytes_in_use; PyTorch:
max_memory_allocated).

Memory guard: a JAX child compiles first and skips (with the reason) when XLA's temporaries exceed the memory
budget (memory available at the start less a margin, or --mem_budget_gb); every child is also killed when its
resident memory passes that budget, so no run can push the machine into swap or the OOM killer.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import peer_models as pm  # noqa: E402

KINDS = ("ours", "ours_dense", "torch", "flax", "flax_mem")
DEFAULT_KINDS = ("ours", "torch", "flax", "flax_mem")
LABELS = {"ours": "ours (ediffi-jax, jax.jit)", "ours_dense": "ours, model.attention=dense",
          "torch": "diffusers PyTorch (eager)",
          "flax": "diffusers Flax (jit)", "flax_mem": "diffusers Flax, mem-efficient attn"}
GB = 1e9
DEADLINE_RESERVE_S = 25.0  # --deadline: what the end-of-run matmul peak and the report need


# ----------------------------------------------------------------------------------------------------------
# Children
# ----------------------------------------------------------------------------------------------------------
def _cpu() -> tuple[float, float]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime, r.ru_stime


def _timed_steps(run_one, steps: int) -> dict:
    times = []
    u0, s0 = _cpu()
    for _ in range(steps):
        t = time.perf_counter()
        run_one()
        times.append(time.perf_counter() - t)
    u1, s1 = _cpu()
    return {"step_times": times, "user_s_per_step": (u1 - u0) / steps, "sys_s_per_step": (s1 - s0) / steps}


def _on_accelerator() -> bool:
    import jax

    return jax.default_backend() != "cpu"


def _device_kind() -> str:
    import jax

    return jax.devices()[0].device_kind


def _device_peak_bytes() -> float | None:
    """Peak device memory of this process (JAX's allocator) or None on a CPU."""
    import jax

    if not _on_accelerator():
        return None
    stats = jax.devices()[0].memory_stats() or {}
    return float(stats["peak_bytes_in_use"]) if "peak_bytes_in_use" in stats else None


def child_peak(w, args) -> dict:
    import jax
    import jax.numpy as jnp

    acc = _on_accelerator()
    n = 8192 if acc else 2048
    dtype = jnp.dtype(w.dtype if acc else "float32")
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    a, b = (jax.random.normal(k, (n, n)).astype(dtype) for k in (k1, k2))
    f = jax.jit(lambda a, b: a @ b)
    jax.block_until_ready(f(a, b))
    best = 0.0
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(5):
            out = f(a, b)
        jax.block_until_ready(out)
        best = max(best, 5 * 2 * n**3 / (time.perf_counter() - t))
    return {"gflops": best / 1e9, "n": n, "dtype": dtype.name, "device": _device_kind()}


def _phase(msg: str) -> None:
    """Progress of a child on its stderr (its log), so a child killed at its timeout shows how far it got."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _jax_child(w, args, setup, trim: bool = False) -> dict:
    import flops
    import jax

    t0 = time.perf_counter()
    step, state, batch_args, key, forward, fwd_args, n_params = setup()
    t_init = time.perf_counter() - t0
    _phase(f"set up in {t_init:.1f} s ({n_params:,} parameters on {_device_kind()})")
    ops = flops.jax_forward_ops(forward, *fwd_args)
    xla_fwd = flops.xla_flops(jax.jit(forward).lower(*fwd_args))
    t0 = time.perf_counter()
    lowered = step.lower(state, *batch_args, key)
    xla_step = flops.xla_flops(lowered)
    _phase(f"FLOPs counted, step lowered in {time.perf_counter() - t0:.1f} s; compiling")
    compiled = lowered.compile()
    t_compile = time.perf_counter() - t0
    _phase(f"compiled in {t_compile:.1f} s")
    trimmed = 0
    if trim:  # ours: what ediffi-train does once its step is compiled (ediffi_jax/host_memory.py)
        from ediffi_jax.host_memory import release_free_heap

        trimmed = release_free_heap()
    mem = compiled.memory_analysis()
    temp = float(getattr(mem, "temp_size_in_bytes", 0) or 0)
    out = {"params": n_params, "fwd_ops": flops.breakdown(ops), "fwd_flops": flops.total(ops),
           "xla_fwd_flops": xla_fwd, "xla_step_flops": xla_step, "init_s": t_init, "compile_s": t_compile,
           "temp_bytes": temp, "torch_imported": "torch" in sys.modules, "trimmed_bytes": trimmed}
    budget = args.mem_budget_gb * GB
    if temp > budget and not _on_accelerator():  # host memory guard (a device reports its own OOM)
        out["skipped"] = (f"XLA temporaries {temp / GB:.1f} GB exceed the memory budget {budget / GB:.1f} GB: "
                          f"not run")
        return out
    del fwd_args
    holder = {"s": state}

    def one():
        holder["s"], loss = compiled(holder["s"], *batch_args, key)
        loss = loss["loss"] if isinstance(loss, dict) else loss
        jax.block_until_ready(loss)
        holder["loss"] = float(loss)

    t0 = time.perf_counter()
    one()
    out["first_step_s"] = time.perf_counter() - t0
    _phase(f"first step {out['first_step_s']:.2f} s; timing {args.steps} steps")
    out.update(_timed_steps(one, args.steps))
    out["loss"] = holder["loss"]
    out["device"], out["device_peak_bytes"] = _device_kind(), _device_peak_bytes()
    if args.profile:
        out["profile"] = _profile(one, 2, args.profile)
    return out


def _profile(run_one, steps: int, logdir: str) -> dict:
    """XLA CPU thunks of `steps` steps under jax.profiler: wall ms per step summed by op (numeric suffixes dropped),
    so convolutions, matmul fusions and elementwise fusions can be told apart. Thunks may overlap (threads)."""
    import collections
    import glob
    import gzip
    import re

    import jax

    jax.profiler.start_trace(logdir, create_perfetto_trace=True)
    t = time.perf_counter()
    for _ in range(steps):
        run_one()
    wall = (time.perf_counter() - t) / steps
    jax.profiler.stop_trace()
    trace = json.load(gzip.open(sorted(glob.glob(f"{logdir}/**/perfetto_trace.json.gz", recursive=True))[-1]))
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    skip = ("ThunkExecutor", "PjitFunction", "CommonPjRt", "$", "end: ", "Allocate", "Handle", "Parse", "Python",
            "Wait", "ThreadpoolListener")
    by_op: dict[str, float] = collections.Counter()
    for e in events:
        name = e.get("name", "")
        if e.get("ph") == "X" and not name.startswith(skip):
            by_op[re.sub(r"(\.\d+)+$", "", name)] += e.get("dur", 0.0) / 1e3 / steps  # µs → ms per step
    return {"wall_ms": wall * 1e3, "op_ms": dict(collections.Counter(by_op).most_common(15))}


def child_ours(w, args) -> dict:
    return _jax_child(w, args, lambda: pm.ours_setup(w), trim=True)


def child_ours_dense(w, args) -> dict:
    return _jax_child(w, args, lambda: pm.ours_setup(w, attention="dense"), trim=True)


def child_flax(w, args) -> dict:
    return _jax_child(w, args, lambda: pm.flax_setup(w, mem_efficient=False))


def child_flax_mem(w, args) -> dict:
    return _jax_child(w, args, lambda: pm.flax_setup(w, mem_efficient=True))


def child_torch(w, args) -> dict:
    import flops
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    dev = pm.torch_device()
    t0 = time.perf_counter()
    step, model, n_params = pm.torch_setup(w)
    t_init = time.perf_counter() - t0
    t0 = time.perf_counter()
    with flops.TorchOpRecorder(model) as rec:  # hooks on the warm-up step only
        step()
    t_first = time.perf_counter() - t0
    holder = {}
    out = {"params": n_params, "fwd_ops": flops.breakdown(rec.ops), "fwd_flops": flops.total(rec.ops),
           "init_s": t_init, "first_step_s": t_first, "threads": torch.get_num_threads(),
           "jax_imported": "jax" in sys.modules}
    out.update(_timed_steps(lambda: holder.__setitem__("loss", step()), args.steps))
    out["loss"] = holder["loss"]
    cuda = dev.type == "cuda"
    out["device"] = torch.cuda.get_device_name(dev) if cuda else "cpu"
    out["device_peak_bytes"] = float(torch.cuda.max_memory_allocated(dev)) if cuda else None
    return out


CHILDREN = {"peak": child_peak, "ours": child_ours, "ours_dense": child_ours_dense, "torch": child_torch,
            "flax": child_flax, "flax_mem": child_flax_mem}


def child_main(args, children: dict | None = None) -> None:
    """Runs child `args.child` of `children` (default: this script's CHILDREN); prints its RESULT line."""
    w = _workload(args)
    try:
        res = (children or CHILDREN)[args.child](w, args)
    except Exception as e:  # reported in the table, the run goes on
        import traceback

        traceback.print_exc()
        res = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}
    print("RESULT " + json.dumps(res), flush=True)


# ----------------------------------------------------------------------------------------------------------
# Parent
# ----------------------------------------------------------------------------------------------------------
def _mem_available() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return float(line.split()[1]) * 1024
    return 0.0


def _rss(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return 0.0


def _workload(args) -> pm.Workload:
    """The named workload with the command line's steps, batch and dtype."""
    w = pm.WORKLOADS[args.workload]
    return pm.dataclasses.replace(w, steps=args.steps, batch=args.batch or w.batch, dtype=args.dtype)


def run_child(kind: str, args, logdir: Path, script: str = __file__, extra: tuple[str, ...] = ()) -> dict:
    """Runs `script --child kind` (its own process), watching its memory; returns its RESULT line's dict."""
    env = dict(os.environ)
    if kind.startswith("torch"):
        env["USE_FLAX"] = "0"  # diffusers would otherwise import jax too
    elif kind.startswith("flax"):
        env["USE_TORCH"] = "0"  # ... and torch
    cmd = [sys.executable, script, "--child", kind, "--workload", args.workload, "--steps", str(args.steps),
           "--mem_budget_gb", f"{args.mem_budget_gb:.3f}", "--dtype", args.dtype, *extra]
    if args.batch:
        cmd += ["--batch", str(args.batch)]
    if args.profile and not kind.startswith("torch"):
        cmd += ["--profile", str(Path(args.profile) / kind)]
    log = open(logdir / f"{kind}.log", "w")
    t0 = time.perf_counter()
    limit = args.child_timeout
    if getattr(args, "deadline_at", None) is not None:  # --deadline: a model child leaves time for the final peak
        reserve = 0.0 if kind == "peak" else DEADLINE_RESERVE_S
        limit = max(min(limit, args.deadline_at - reserve - t0), 1.0)
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
    killed = {}

    def watchdog():
        while p.returncode is None and not killed.get("done"):
            rss = _rss(p.pid)
            if rss > args.mem_budget_gb * GB:
                killed["rss"] = rss
                p.kill()
                return
            if time.perf_counter() - t0 > limit:
                killed["timeout"] = True
                p.kill()
                return
            time.sleep(0.2)

    th = threading.Thread(target=watchdog, daemon=True)
    th.start()
    stdout = p.stdout.read()
    _, status, ru = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    killed["done"] = True
    log.close()
    res = {}
    for line in stdout.splitlines():
        if line.startswith("RESULT "):
            res = json.loads(line[len("RESULT "):])
    if "rss" in killed:
        res = {"skipped": f"killed: resident memory passed the {args.mem_budget_gb:.1f} GB budget"}
    elif "timeout" in killed:
        res = {"skipped": f"killed after {limit:.0f} s"}
    elif not res:
        tail = (logdir / f"{kind}.log").read_text().strip().splitlines()[-3:]
        res = {"error": f"exit {p.returncode}: " + " | ".join(tail)}
    res["peak_rss_bytes"] = ru.ru_maxrss * 1024
    res["child_wall_s"] = time.perf_counter() - t0
    return res


def _fmt_row(cells, widths) -> str:
    return "  ".join(str(c).rjust(wd) if i else str(c).ljust(wd) for i, (c, wd) in enumerate(zip(cells, widths)))


def report(w, results: dict, peaks: list[float], load: tuple, peak_name: str = "XLA fp32 2048³") -> dict:
    peak = statistics.mean(peaks)
    devices = sorted({r["device"] for r in results.values() if r.get("device")}) or ["cpu"]
    print(f"\n== workload {w.name}: {w.note}")
    print(f"   {w.image_size}², channels {'/'.join(map(str, w.block_channels))}, {w.layers_per_block} res blocks per "
          f"level, attention at {'/'.join(map(str, w.attn_res))}, {w.head_dim}-dim heads, context "
          f"{w.context_len}×{w.context_dim}, batch {w.batch}, {w.dtype}, {os.cpu_count()} cores, "
          f"device {' / '.join(devices)}")
    print(f"   load average at start {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; at end "
          + " ".join(f"{v:.2f}" for v in os.getloadavg()))
    print(f"   matmul peak ({peak_name}): start {peaks[0]:.0f}, end {peaks[-1]:.0f} GFLOP/s; "
          f"fractions below use their mean {peak:.0f}")
    head = ["framework", "params", "fwd GFLOP conv/lin/attn", "GFLOP/step", "init s", "compile s", "1st step s",
            "s/step median (min-max)", "img/s", "GFLOP/s", "% peak", "RSS GB", "device GB", "XLA temp GB",
            "sys s/step", "cpu/wall"]
    rows, summary = [], {}
    for kind, r in results.items():
        name = LABELS[kind]
        if "error" in r or ("skipped" in r and "step_times" not in r):
            reason = r.get("error") or r.get("skipped")
            extra = f" (params {r['params']:,}, XLA temp {r['temp_bytes'] / GB:.1f} GB)" if "temp_bytes" in r else ""
            rows.append(None)
            summary[kind] = {"label": name, "skipped": reason + extra}
            continue
        fo = r["fwd_ops"]
        model_flops = pm.model_flops_per_step(r["fwd_flops"])
        ts = r["step_times"]
        med = statistics.median(ts)
        gf = model_flops / med / 1e9
        s = {"label": name, "params": r["params"], "model_gflop": model_flops / 1e9, "median_s": med,
             "min_s": min(ts), "max_s": max(ts), "images_per_s": w.batch / med, "gflops": gf,
             "frac_peak": gf / peak, "rss_gb": r["peak_rss_bytes"] / GB, "sys_s": r["sys_s_per_step"],
             "cpu_util": (r["user_s_per_step"] + r["sys_s_per_step"]) / med,
             "temp_gb": r.get("temp_bytes", float("nan")) / GB, "compile_s": r.get("compile_s"),
             "device": r.get("device"), "device_gb": (r.get("device_peak_bytes") or float("nan")) / GB,
             "first_step_s": r["first_step_s"], "init_s": r["init_s"], "loss": r.get("loss"),
             "fwd_breakdown_gflop": {k: v / 1e9 for k, v in fo.items()}}
        if "xla_fwd_flops" in r:
            s["xla_fwd_gflop"], s["xla_step_gflop"] = r["xla_fwd_flops"] / 1e9, r["xla_step_flops"] / 1e9
        summary[kind] = s
        rows.append([name, f"{r['params'] / 1e6:.2f}M",
                     "/".join(f"{fo.get(k, 0) / 1e9:.1f}" for k in ("conv", "linear", "attention")),
                     f"{model_flops / 1e9:.0f}", f"{r['init_s']:.1f}",
                     "-" if r.get("compile_s") is None else f"{r['compile_s']:.1f}", f"{r['first_step_s']:.2f}",
                     f"{med:.3f} ({min(ts):.3f}-{max(ts):.3f})", f"{w.batch / med:.2f}", f"{gf:.0f}",
                     f"{100 * gf / peak:.0f}%", f"{r['peak_rss_bytes'] / GB:.2f}",
                     "-" if not r.get("device_peak_bytes") else f"{r['device_peak_bytes'] / GB:.2f}",
                     "-" if "temp_bytes" not in r else f"{r['temp_bytes'] / GB:.2f}", f"{r['sys_s_per_step']:.3f}",
                     f"{s['cpu_util']:.2f}"])
    body = [r for r in rows if r]
    widths = [max(len(str(x[i])) for x in [head] + body) for i in range(len(head))]
    print(_fmt_row(head, widths))
    for r in body:
        print(_fmt_row(r, widths))
    for s in summary.values():
        if "skipped" in s:
            print(f"{s['label']}: SKIPPED — {s['skipped']}")
    o = summary.get("ours")
    if o and "median_s" in o:
        if "xla_fwd_gflop" in o:
            fsum = sum(o["fwd_breakdown_gflop"].values())
            print(f"\nFLOP counter check (ours): analytic forward {fsum:.2f} GFLOP, XLA cost_analysis of the lowered "
                  f"forward {o['xla_fwd_gflop']:.2f} (ratio {o['xla_fwd_gflop'] / fsum:.3f}; XLA leaves out conv taps "
                  f"on padding); XLA's count of the whole lowered train step {o['xla_step_gflop']:.1f} GFLOP = "
                  f"{o['xla_step_gflop'] / fsum:.2f} × forward (model FLOPs use 3×)")
        for k in ("flax", "flax_mem"):
            s = summary.get(k)
            if s and "xla_fwd_gflop" in s:
                fsum = sum(s["fwd_breakdown_gflop"].values())
                print(f"FLOP counter check ({k}): analytic forward {fsum:.2f} GFLOP, XLA lowered forward "
                      f"{s['xla_fwd_gflop']:.2f} (ratio {s['xla_fwd_gflop'] / fsum:.3f}; XLA counts a loop body once)")
        print("\nratios ours ÷ peer (step time < 1: ours faster; images/s, GFLOP/s > 1: ours faster; RSS < 1: ours "
              "smaller):")
        for k, s in summary.items():
            if k == "ours":
                continue
            if "median_s" not in s:
                print(f"  vs {s['label']}: — (skipped)")
                continue
            print(f"  vs {s['label']}: step time {o['median_s'] / s['median_s']:.2f}, images/s "
                  f"{o['images_per_s'] / s['images_per_s']:.2f}, achieved GFLOP/s {o['gflops'] / s['gflops']:.2f}, "
                  f"model FLOPs/step {o['model_gflop'] / s['model_gflop']:.2f}, peak RSS "
                  f"{o['rss_gb'] / s['rss_gb']:.2f}, "
                  + ("" if o["device_gb"] != o["device_gb"] or s["device_gb"] != s["device_gb"]  # NaN: no device
                     else f"device memory {o['device_gb'] / s['device_gb']:.2f}, ")
                  + f"sys s/step {o['sys_s'] / max(s['sys_s'], 1e-9):.2f}")
    for k, r in results.items():
        if "profile" in r:
            p = r["profile"]
            print(f"\nprofile of {LABELS[k]}: {p['wall_ms']:.0f} ms/step traced; XLA thunks, ms/step (may overlap):")
            print("  " + ", ".join(f"{name} {ms:.0f}" for name, ms in p["op_ms"].items()))
    print("\nwhat differs, ours vs the peers:")
    for d in pm.differences(w):
        print(f"  - {d}")
    return {"workload": w.name, "batch": w.batch, "dtype": w.dtype, "devices": devices, "peaks_gflops": peaks,
            "load_start": load, "load_end": os.getloadavg(), "results": summary}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", default="small", choices=sorted(pm.WORKLOADS))
    ap.add_argument("--steps", type=int, default=None, help="timed steps per framework (default: the workload's)")
    ap.add_argument("--batch", type=int, default=0, help="batch size (default: the workload's)")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                    help="compute dtype of every framework (parameters stay float32; see bench/peer_models.py)")
    ap.add_argument("--only", default=",".join(DEFAULT_KINDS),
                    help=f"comma-separated subset of {','.join(KINDS)} (default: {','.join(DEFAULT_KINDS)})")
    ap.add_argument("--mem_budget_gb", type=float, default=None,
                    help="per-child memory budget (default: memory available at the start − 2 GB)")
    ap.add_argument("--child_timeout", type=float, default=1800.0)
    ap.add_argument("--deadline", type=float, default=0.0,
                    help="whole-run wall budget in seconds: a child is cut so the run still ends with its report "
                    "(for a leased accelerator's per-call limit; 0 = none)")
    ap.add_argument("--json", default="", help="also write the summary here")
    ap.add_argument("--profile", default="", help="trace 2 more steps of our JAX children into this directory and "
                    "print where the time goes (not counted in the timings)")
    ap.add_argument("--logdir", default="", help="keep each child's log (stderr) here (default: a temporary folder)")
    ap.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.steps = args.steps or pm.WORKLOADS[args.workload].steps
    args.deadline_at = time.perf_counter() + args.deadline if args.deadline > 0 else None
    w = _workload(args)
    if args.child:
        return child_main(args)
    if args.mem_budget_gb is None:
        args.mem_budget_gb = max(_mem_available() / GB - 2.0, 1.0)
    kinds = [k for k in args.only.split(",") if k]
    bad = set(kinds) - set(KINDS)
    if bad:
        ap.error(f"unknown --only entries {sorted(bad)}")
    load = os.getloadavg()
    print(f"workload {w.name}; {args.steps} timed steps; memory budget per child {args.mem_budget_gb:.1f} GB; "
          f"load {load[0]:.2f}", flush=True)
    with tempfile.TemporaryDirectory(prefix="peers_") as tmp:
        logdir = Path(args.logdir or tmp)
        logdir.mkdir(parents=True, exist_ok=True)
        first = run_child("peak", args, logdir)
        peaks = [first["gflops"]]
        peak_name = f"XLA {first['dtype']} {first['n']}³ on {first['device']}"
        print(f"matmul peak at start ({peak_name}): {peaks[0]:.0f} GFLOP/s", flush=True)
        results = {}
        for k in kinds:
            results[k] = run_child(k, args, logdir)
            r = results[k]
            if "step_times" in r:
                med = statistics.median(r["step_times"])
                gf = pm.model_flops_per_step(r["fwd_flops"]) / 1e9
                state = (f"{med:.3f} s/step, {w.batch / med:.2f} img/s, {gf:.0f} GFLOP/step = {gf / med:.0f} GFLOP/s, "
                         f"peak RSS {r['peak_rss_bytes'] / GB:.2f} GB")
            else:
                state = r.get("skipped") or r.get("error")
            print(f"{LABELS[k]}: {state} (child {r['child_wall_s']:.0f} s)", flush=True)
            if "error" in r or "skipped" in r:
                print((logdir / f"{k}.log").read_text()[-3000:], file=sys.stderr)
        end = run_child("peak", args, logdir)
        peaks.append(end.get("gflops", peaks[0]))  # a peak cut by --deadline: the start figure stands for both
    summary = report(w, results, peaks, load, peak_name)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
