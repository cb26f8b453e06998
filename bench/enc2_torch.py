#!/usr/bin/python3
"""Speed reference "enc2" in PyTorch: the model qkv's bench compares against.

enc2: vocabulary 8192, sequence length 128, batch 32, d_model 256, 4 heads, 2 pre-LN
encoder layers (gelu, ffn 1024, dropout 0.1), token + learned position embedding,
key padding mask from random lengths in [32, 128], final LayerNorm, masked mean pool,
Linear to 4 classes, cross-entropy, Adam lr 1e-3. The model is bench/classify_torch.py's.

A training step is zero_grad + forward + backward + Adam step; an inference batch is
a forward under model.eval() and torch.no_grad(). Both are timed after --warmup
untimed runs and reported as the median over --steps. train_gflops uses the analytic
FLOP count of flops_per_step (matmuls only, forward x 3 for forward + backward).
"""
import argparse
import resource
import statistics
import sys
import time

import threadenv

threadenv.apply(sys.argv)

import torch  # noqa: E402  (after the thread environment)
from torch import nn  # noqa: E402

from classify_torch import Classifier  # noqa: E402

VOCAB, SEQ_LEN, BATCH, D_MODEL, HEADS, LAYERS, FFN, CLASSES = 8192, 128, 32, 256, 4, 2, 1024, 4
DROPOUT, LR, MIN_LEN = 0.1, 1e-3, 32


def forward_flops(batch=BATCH, seq=SEQ_LEN, d=D_MODEL, layers=LAYERS, ffn=FFN,
                  classes=CLASSES):
    """2*M*N*K for every matmul of one forward pass (padding counted as computed)."""
    def mm(m, n, k):
        return 2 * m * n * k
    tokens = batch * seq
    per_layer = (mm(tokens, 3 * d, d)         # q, k, v projections
                 + mm(tokens, seq, d)         # Q K^T, all heads together
                 + mm(tokens, d, seq)         # softmax(.) V
                 + mm(tokens, d, d)           # output projection
                 + mm(tokens, ffn, d)         # FFN up
                 + mm(tokens, d, ffn))        # FFN down
    return layers * per_layer + mm(batch, classes, d)


def make_batch(gen):
    lengths = torch.randint(MIN_LEN, SEQ_LEN + 1, (BATCH,), generator=gen)
    ids = torch.randint(1, VOCAB, (BATCH, SEQ_LEN), generator=gen)
    mask = torch.arange(SEQ_LEN).unsqueeze(0) >= lengths.unsqueeze(1)
    ids[mask] = 0
    labels = torch.randint(0, CLASSES, (BATCH,), generator=gen)
    return ids, mask, labels


def median_ms(fn, warmup, steps):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=threadenv.from_argv([]))
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bf16", action="store_true",
                    help='forward under torch.autocast("cpu", dtype=torch.bfloat16)')
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    model = Classifier(VOCAB, CLASSES, SEQ_LEN, D_MODEL, HEADS, LAYERS, FFN, DROPOUT)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    ids, mask, labels = make_batch(torch.Generator().manual_seed(args.seed))

    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16)

    def train_step():
        opt.zero_grad()
        with autocast:
            loss = nn.functional.cross_entropy(model(ids, mask), labels)
        loss.backward()
        opt.step()

    def infer_batch():
        # torch 1.13's fused encoder-layer path (taken without grad in eval mode) checks only
        # CUDA's autocast flag and fails on bf16 under CPU autocast: keep grad on to avoid it.
        with (torch.enable_grad() if args.bf16 else torch.no_grad()), autocast:
            model(ids, mask)

    model.train()
    train_ms = median_ms(train_step, args.warmup, args.steps)
    model.eval()
    infer_ms = median_ms(infer_batch, args.warmup, args.steps)

    flops = 3 * forward_flops()
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    print(f"threads={args.threads} torch={torch.__version__} bf16={int(args.bf16)}")
    print(f"params={sum(p.numel() for p in model.parameters())}")
    print(f"flops_per_step={flops}")
    print(f"train_step_ms={train_ms:.2f}")
    print(f"infer_batch_ms={infer_ms:.2f}")
    print(f"train_gflops={flops / (train_ms * 1e-3) / 1e9:.2f}")
    print(f"peak_rss_mb={peak_kb / 1024:.1f}")


if __name__ == "__main__":
    main()
