#!/usr/bin/python3
"""The cost model of docs/distributed.md: step time of data-parallel training under weak
scaling (a fixed share of samples per machine), from one machine's compute time and the link.

Per step and rank, in the deterministic mode (reduce-scatter by MPI_Ialltoallv, then
MPI_Iallgatherv), with G the gradient's bytes in k buckets, N ranks, B the link's bandwidth
(bytes/s each way) and a its latency per message:
  each phase    T_half = (N - 1) / N * G / B + k * (N - 1) * a
  exchange      T_comm = 2 * T_half: 2 (N - 1) / N x G bytes sent by every rank
  hidden        the reduce-scatter of the buckets that are final before the backward ends
                runs during it: window W = backward = 2/3 of the compute time T_c (one
                micro-batch a rank); the all-gather starts after the backward, and so do the
                buckets final only at its end (a fraction f_tail of G: the first layer's, the
                token embedding's, and at least the last bucket)
  exposed       T_ag + f_tail T_half + max(0, (1 - f_tail) T_half - W)
  step          T_c + exposed
Communication dominates where exposed > T_c.

`dist_model.py table --compute-ms T` prints the table of the document for a machine whose
enc2 step (32 samples) takes T ms; `dist_model.py check --grad-mb G --comm-ms C --step-ms S
--wait-ms W` sets the measured 2-rank figures of bench/dist.sh beside the model's.
"""
import argparse
import math

MIB = 1 << 20
ENC2_PARAMS = 3710980
# The token embedding's share of enc2's gradient, final only when the backward ends; in the
# larger models (wider by sqrt(10) per 10x, the same vocabulary) it shrinks to about
# 0.57 sqrt(s) / s.
MODELS = [("enc2", 1, 0.57), ("enc2 x10", 10, 0.18), ("enc2 x100", 100, 0.057)]
# Links: bandwidth in bytes/s each way, latency per message (TCP over 10 Gbit/s Ethernet;
# RDMA through UCX at 100 Gbit/s).
LINKS = [("10 Gbit/s", 1.25e9, 25e-6), ("100 Gbit/s", 12.5e9, 3e-6)]


def step(n, grad_bytes, f_tail, t_compute, bandwidth, latency, bucket=MIB):
    """(step seconds, exposed communication seconds) at n ranks."""
    if n == 1:
        return t_compute, 0.0
    k = math.ceil(grad_bytes / bucket)
    f_tail = max(f_tail, min(1.0, bucket / grad_bytes))  # the last bucket waits for the end
    half = (n - 1) / n * grad_bytes / bandwidth + k * (n - 1) * latency
    window = 2 / 3 * t_compute
    exposed = half + f_tail * half + max(0.0, (1 - f_tail) * half - window)
    return t_compute + exposed, exposed


def dominates_at(grad_bytes, f_tail, t_compute, bandwidth, latency, bucket=MIB):
    """The smallest power-of-two rank count where the exposed communication exceeds the
    compute, or None up to 2^20."""
    for e in range(1, 21):
        _, exposed = step(2 ** e, grad_bytes, f_tail, t_compute, bandwidth, latency, bucket)
        if exposed > t_compute:
            return 2 ** e
    return None


def table(t_compute):
    print(f"machine: enc2 step of 32 samples in {t_compute * 1e3:.0f} ms; 1 MiB buckets")
    print("| model | gradient | link | step at 1 | 8 machines | 64 | 512 | "
          "communication > compute from |")
    print("|---|---|---|---|---|---|---|---|")
    for name, scale, f_tail in MODELS:
        g = 4 * ENC2_PARAMS * scale
        tc = t_compute * scale
        for link, bw, lat in LINKS:
            cells = []
            for n in (8, 64, 512):
                total, exposed = step(n, g, f_tail, tc, bw, lat)
                cells.append(f"{total * 1e3:.0f} ms ({100 * exposed / total:.0f}% comm)")
            d = dominates_at(g, f_tail, tc, bw, lat)
            # The same with buckets large enough that latency stays below bandwidth.
            big = dominates_at(g, f_tail, tc, bw, lat, bucket=max(MIB, g))
            print(f"| {name} | {g / 1e6:.0f} MB | {link} | {tc * 1e3:.0f} ms | "
                  + " | ".join(cells)
                  + f" | {d or '> 1M'} (one bucket: {big or '> 1M'}) |")


def check(grad_mb, comm_ms, step_ms, wait_ms):
    g = grad_mb * 1e6
    # The blocking all-reduce alone gives the shared-memory link: 2 (N-1)/N G / B at N = 2.
    bandwidth = g / (comm_ms * 1e-3)
    compute = (step_ms - wait_ms) * 1e-3
    total, exposed = step(2, g, 0.57, compute, bandwidth, 0.0)
    print(f"model at 2 ranks: link {bandwidth / 1e9:.2f} GB/s (from comm_ms), compute "
          f"{compute * 1e3:.0f} ms (step - wait): exposed {exposed * 1e3:.1f} ms, step "
          f"{total * 1e3:.0f} ms; measured wait {wait_ms:.1f} ms, step {step_ms:.0f} ms")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="what", required=True)
    t = sub.add_parser("table")
    t.add_argument("--compute-ms", type=float, required=True)
    c = sub.add_parser("check")
    for flag in ("--grad-mb", "--comm-ms", "--step-ms", "--wait-ms"):
        c.add_argument(flag, type=float, required=True)
    args = ap.parse_args()
    if args.what == "table":
        table(args.compute_ms * 1e-3)
    else:
        check(args.grad_mb, args.comm_ms, args.step_ms, args.wait_ms)


if __name__ == "__main__":
    main()
