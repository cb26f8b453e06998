#!/usr/bin/python3
"""Speed reference "enc2" under PyTorch DistributedDataParallel (gloo), the twin of
`mpirun -np N bench/enc2 --micro-batches 0`.

The model, batch and optimizer are bench/enc2_torch.py's. The global batch of 32 is split
into --ranks contiguous shares, one per process; each process runs zero_grad + forward +
backward + Adam step on its share, and DDP all-reduces the gradients in buckets while the
backward runs (gloo, over the loopback interface). Processes are started with
torch.multiprocessing.spawn, without torchrun. A step is timed on every rank after --warmup
untimed steps; the figure is rank 0's median over --steps (all ranks wait for each other in
every step, so their times agree).

Prints ranks=, threads=, train_step_ms= and comm_ms= (the median time of one blocking
all-reduce of all the gradients, as a standalone figure).
"""
import argparse
import os
import statistics
import sys
import time

import threadenv

threadenv.apply(sys.argv)

import torch  # noqa: E402  (after the thread environment)
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402

from classify_torch import Classifier  # noqa: E402
from enc2_torch import (BATCH, CLASSES, D_MODEL, DROPOUT, FFN, HEADS, LAYERS,  # noqa: E402
                        LR, SEQ_LEN, VOCAB, make_batch)


def timed(fn, warmup, steps):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def worker(rank, args):
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", rank=rank, world_size=args.ranks)
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    model = Classifier(VOCAB, CLASSES, SEQ_LEN, D_MODEL, HEADS, LAYERS, FFN, DROPOUT)
    ddp = DistributedDataParallel(model)
    opt = torch.optim.Adam(ddp.parameters(), lr=LR)
    ids, mask, labels = make_batch(torch.Generator().manual_seed(args.seed))
    share = BATCH // args.ranks
    rows = slice(rank * share, (rank + 1) * share)
    ids, mask, labels = ids[rows], mask[rows], labels[rows]

    def train_step():
        opt.zero_grad()
        nn.functional.cross_entropy(ddp(ids, mask), labels).backward()
        opt.step()

    grads = [torch.zeros_like(p) for p in model.parameters()]

    def all_reduce():
        for g in grads:
            dist.all_reduce(g)

    ddp.train()
    train_ms = timed(train_step, args.warmup, args.steps)
    comm_ms = timed(all_reduce, 1, args.steps)
    if rank == 0:
        print(f"ranks={args.ranks} threads={args.threads} torch={torch.__version__}")
        print(f"params={sum(p.numel() for p in model.parameters())}")
        print(f"train_step_ms={train_ms:.2f}")
        print(f"comm_ms={comm_ms:.2f}")
    dist.destroy_process_group()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.ranks < 1 or BATCH % args.ranks:
        sys.exit(f"enc2_ddp_torch: --ranks must divide the batch of {BATCH}")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    mp.spawn(worker, args=(args,), nprocs=args.ranks, join=True)


if __name__ == "__main__":
    main()
