"""Sampler latency: our whole jitted Heun sampler with guidance vs the PyTorch peer's UNet forward, same workload.

    .venv/bin/python bench/sampler_peers.py --workload edm64 --sample_steps 8
    .venv/bin/python bench/sampler_peers.py --workload small --sample_steps 4    # quick

Each measurement runs in its own process (as bench/peers.py, whose workloads, FLOP counter and child runner this
reuses), after the machine's matmul peak:
  * ours: `text_to_image.make_sampler` (one `jax.jit` of the whole Heun loop, N steps = 2N − 1 network
    evaluations) with classifier-free guidance, whose conditional and unconditional branches run as ONE forward
    of batch 2B; first call (compile + run) and the median of `--calls` calls; latency per network evaluation,
    per Heun step and per image; also our UNet forward alone at batch 2B (jitted), to separate the network from
    the loop around it.
  * diffusers PyTorch `UNet2DConditionModel` forward at batch 2B under `torch.inference_mode` with the same EDM
    preconditioning and guidance combination: what one guided evaluation costs the peer.
Ratios: ours per evaluation ÷ the peer's forward (< 1: ours faster); FLOPs per evaluation from one analytic
counter (bench/flops.py) — our attention blocks have no feed-forward, so ours does less work per evaluation.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import peer_models as pm  # noqa: E402
import peers  # noqa: E402

KINDS = ("ours_sample", "ours_fwd", "torch_fwd")
LABELS = {"ours_sample": "ours: jitted Heun sampler, guidance batched", "ours_fwd": "ours: UNet forward (jit)",
          "torch_fwd": "diffusers PyTorch: UNet forward (eager)"}


def _median_call(fn, n: int) -> list[float]:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def child_ours_sample(w, args) -> dict:
    import flops

    call, forward, fwd_args, n_params = pm.ours_sampler_setup(w, args.sample_steps)
    ops = flops.jax_forward_ops(forward, *fwd_args)
    t = time.perf_counter()
    call()
    first = time.perf_counter() - t
    return {"params": n_params, "fwd_flops": flops.total(ops), "first_s": first,
            "times": _median_call(call, args.calls), "nfe": 2 * args.sample_steps - 1, "device": peers._device_kind()}


def child_ours_fwd(w, args) -> dict:
    import flops
    import jax

    _, _, _, _, forward, fwd_args, n_params = pm.ours_setup(pm.pm_double(w))
    ops = flops.jax_forward_ops(forward, *fwd_args)
    f = jax.jit(forward)
    t = time.perf_counter()
    jax.block_until_ready(f(*fwd_args))
    first = time.perf_counter() - t
    return {"params": n_params, "fwd_flops": flops.total(ops), "first_s": first,
            "times": _median_call(lambda: jax.block_until_ready(f(*fwd_args)), args.calls), "nfe": 1}


def child_torch_fwd(w, args) -> dict:
    import flops
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    forward, model, n_params = pm.torch_forward_setup(w)
    t = time.perf_counter()
    with flops.TorchOpRecorder(model) as rec:
        forward()
    first = time.perf_counter() - t
    return {"params": n_params, "fwd_flops": flops.total(rec.ops), "first_s": first,
            "times": _median_call(forward, args.calls), "nfe": 1}


CHILDREN = {"peak": peers.child_peak, "ours_sample": child_ours_sample, "ours_fwd": child_ours_fwd,
            "torch_fwd": child_torch_fwd}


def report(w, args, results: dict, peaks: list[float]) -> dict:
    peak = statistics.mean(peaks)
    print(f"\n== sampler, workload {w.name}: {w.note}; {w.batch} images per call, guidance → forward batch "
          f"{2 * w.batch}; {args.sample_steps} Heun steps = {2 * args.sample_steps - 1} evaluations; {w.dtype}, "
          f"{os.cpu_count()} cores, device {results.get('ours_sample', {}).get('device', '?')}; matmul peak start "
          f"{peaks[0]:.0f} / end {peaks[-1]:.0f} GFLOP/s")
    summary = {}
    print(f"{'':46s} {'GFLOP/eval':>10s} {'first call s':>12s} {'s/call':>8s} {'ms/eval':>8s} {'s/image':>8s} "
          f"{'GFLOP/s':>8s} {'% peak':>6s} {'RSS GB':>6s}")
    for k, r in results.items():
        if "times" not in r:
            print(f"{LABELS[k]:46s} {r.get('error') or r.get('skipped')}")
            continue
        med = statistics.median(r["times"])
        per_eval = med / r["nfe"]
        gf = r["fwd_flops"] / 1e9
        s = {"median_s": med, "per_eval_s": per_eval, "first_s": r["first_s"], "gflop_per_eval": gf,
             "gflops": gf / per_eval, "rss_gb": r["peak_rss_bytes"] / 1e9,
             "per_image_s": med / w.batch if k == "ours_sample" else None}
        summary[k] = s
        per_img = f"{s['per_image_s']:.3f}" if s["per_image_s"] else "-"
        print(f"{LABELS[k]:46s} {gf:10.1f} {r['first_s']:12.1f} {med:8.3f} {per_eval * 1e3:8.1f} {per_img:>8s} "
              f"{s['gflops']:8.0f} {100 * s['gflops'] / peak:6.1f} {s['rss_gb']:6.2f}")
    t = summary.get("torch_fwd")
    if t:
        print("\nratios ours ÷ PyTorch forward (time < 1: ours faster):")
        for k in ("ours_sample", "ours_fwd"):
            if k in summary:
                o = summary[k]
                print(f"  {LABELS[k]}: time per evaluation {o['per_eval_s'] / t['per_eval_s']:.2f}, "
                      f"GFLOP/s {o['gflops'] / t['gflops']:.2f}, FLOPs per evaluation "
                      f"{o['gflop_per_eval'] / t['gflop_per_eval']:.2f}")
    if "ours_sample" in summary and "ours_fwd" in summary:
        o, f = summary["ours_sample"], summary["ours_fwd"]
        print(f"  sampler loop overhead: per evaluation {o['per_eval_s'] / f['per_eval_s']:.2f} × our bare forward")
    return {"workload": w.name, "sample_steps": args.sample_steps, "peaks_gflops": peaks, "results": summary}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", default="small", choices=sorted(pm.WORKLOADS))
    ap.add_argument("--sample_steps", type=int, default=8, help="Heun steps per sampler call")
    ap.add_argument("--calls", type=int, default=3, help="timed calls per measurement (median)")
    ap.add_argument("--only", default=",".join(KINDS), help=f"comma-separated subset of {','.join(KINDS)}")
    ap.add_argument("--mem_budget_gb", type=float, default=None)
    ap.add_argument("--child_timeout", type=float, default=1800.0)
    ap.add_argument("--json", default="")
    ap.add_argument("--child", default="", help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, default=0, help="images per sampler call (default: the workload's)")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="compute dtype")
    ap.add_argument("--steps", type=int, default=0, help=argparse.SUPPRESS)  # peers.run_child passes it
    ap.add_argument("--profile", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.sample_steps < 1 or args.calls < 1:
        ap.error(f"--sample_steps={args.sample_steps} and --calls={args.calls} must be >= 1")
    w = peers._workload(args)
    if args.child:
        return peers.child_main(args, CHILDREN)
    if args.mem_budget_gb is None:
        args.mem_budget_gb = max(peers._mem_available() / peers.GB - 2.0, 1.0)
    kinds = [k for k in args.only.split(",") if k]
    if set(kinds) - set(KINDS):
        ap.error(f"unknown --only entries {sorted(set(kinds) - set(KINDS))}")
    cmd_extra = ["--sample_steps", str(args.sample_steps), "--calls", str(args.calls)]
    with tempfile.TemporaryDirectory(prefix="sampler_peers_") as tmp:
        logdir = Path(tmp)
        run = lambda k: peers.run_child(k, args, logdir, script=__file__, extra=cmd_extra)  # noqa: E731
        peaks = [run("peak")["gflops"]]
        results = {}
        for k in kinds:
            results[k] = run(k)
            r = results[k]
            print(f"{LABELS[k]}: " + (f"median {statistics.median(r['times']):.3f} s per call, first "
                                      f"{r['first_s']:.1f} s" if "times" in r else str(r.get("error") or
                                                                                     r.get("skipped"))), flush=True)
            if "error" in r:
                print((logdir / f"{k}.log").read_text()[-3000:], file=sys.stderr)
        peaks.append(run("peak")["gflops"])
    summary = report(w, args, results, peaks)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
