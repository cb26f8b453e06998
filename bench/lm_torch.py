#!/usr/bin/python3
"""PyTorch twin of the C example `qkv-lm train`, for the loss and speed comparison.

It reads the file `qkv-lm train --export-init FILE` writes: qkv's initial weights under
their names, the token stream ("data.tokens"), the training windows of every step in order
("data.order", [steps, batch]) and the settings (metadata). So both runs start from the same
weights and see the same windows in the same order; dropout is off in both.

Model (as examples/lm/model.c): token embedding -> blocks of x + attn(rmsnorm(x)) and
x + swiglu(rmsnorm(x)) -> rmsnorm -> logits x E^T (tied). Attention is causal, with rotary
position embedding (GPT-NeoX halves) on q and k and grouped key/value heads. AdamW with
decay on the matrices only, linear warm-up then cosine decay to min_lr, gradient clipping
at norm 1.0.

Prints `train_seconds=X` (the training steps alone) and, last, `val_loss=X` (nats per token
over every validation window).
Example: bench/lm_torch.py --init build/lm-init.safetensors --threads 2
"""
import argparse
import json
import math
import struct
import sys
import time

import threadenv

threadenv.apply(sys.argv)

import torch  # noqa: E402  (after the thread environment)
from torch import nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

DTYPES = {"F32": torch.float32, "I64": torch.int64, "U8": torch.uint8}


def read_safetensors(path):
    with open(path, "rb") as f:
        raw = f.read()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    meta = header.pop("__metadata__", {})
    data = raw[8 + n:]
    tensors = {}
    for name, h in header.items():
        a, b = h["data_offsets"]
        if a == b:
            tensors[name] = torch.empty(h["shape"], dtype=DTYPES[h["dtype"]])
            continue
        t = torch.frombuffer(bytearray(data[a:b]), dtype=DTYPES[h["dtype"]])
        tensors[name] = t.reshape(h["shape"])
    return tensors, meta


def rms_norm(x, weight, eps=1e-5):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def rotary_tables(head_dim, length, base=10000.0):
    inv = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(length, dtype=torch.float64), inv)
    angles = torch.cat([angles, angles], -1)
    return angles.cos().float(), angles.sin().float()


def rotate(x, cos, sin):
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x * cos + rotated * sin


class Block(nn.Module):
    def __init__(self, dim, heads, kv_heads, ffn):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.attn_norm = nn.Parameter(torch.ones(dim))
        self.ffn_norm = nn.Parameter(torch.ones(dim))
        self.q = nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.v = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.o = nn.Linear(dim, dim, bias=False)
        self.w1 = nn.Linear(dim, ffn, bias=False)
        self.w2 = nn.Linear(ffn, dim, bias=False)
        self.w3 = nn.Linear(dim, ffn, bias=False)

    def attention(self, x, cos, sin, mask):
        b, t, _ = x.shape
        q = self.q(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.k(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        group = self.heads // self.kv_heads
        k = k.repeat_interleave(group, 1)
        v = v.repeat_interleave(group, 1)
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim) + mask
        y = torch.softmax(scores, -1) @ v
        return self.o(y.transpose(1, 2).reshape(b, t, -1))

    def forward(self, x, cos, sin, mask):
        x = x + self.attention(rms_norm(x, self.attn_norm), cos, sin, mask)
        h = rms_norm(x, self.ffn_norm)
        return x + self.w2(F.silu(self.w1(h)) * self.w3(h))


class LM(nn.Module):
    def __init__(self, vocab, dim, heads, kv_heads, layers, ffn, context):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, kv_heads, ffn) for _ in range(layers))
        self.norm = nn.Parameter(torch.ones(dim))
        cos, sin = rotary_tables(dim // heads, context)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, ids):
        t = ids.shape[1]
        mask = torch.full((t, t), float("-inf")).triu(1)
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x, self.cos[:t], self.sin[:t], mask)
        return rms_norm(x, self.norm) @ self.embed.weight.t()

    def load_qkv(self, w):
        """Copies qkv's tensors in under qkv's names."""
        names = {"q": "attn.q_proj", "k": "attn.k_proj", "v": "attn.v_proj",
                 "o": "attn.out_proj", "w1": "ffn.w1", "w2": "ffn.w2", "w3": "ffn.w3"}
        with torch.no_grad():
            self.embed.weight.copy_(w["embed.weight"])
            self.norm.copy_(w["norm.weight"])
            for i, b in enumerate(self.blocks):
                b.attn_norm.copy_(w[f"blocks.{i}.attn_norm.weight"])
                b.ffn_norm.copy_(w[f"blocks.{i}.ffn_norm.weight"])
                for ours, theirs in names.items():
                    getattr(b, ours).weight.copy_(w[f"blocks.{i}.{theirs}.weight"])


def lr_at(step, base, min_lr, warmup, total):
    """qkv_lr_warmup_cosine: linear warm-up from 0, then cosine down to min_lr."""
    if step < warmup:
        return base * step / warmup
    p = min(max((step - warmup) / max(total - warmup, 1), 0.0), 1.0)
    return min_lr + (base - min_lr) * (1 + math.cos(math.pi * p)) / 2


def windows(tokens, first, idx, context):
    rows = torch.stack([tokens[(first + w) * context:(first + w) * context + context + 1]
                        for w in idx])
    return rows[:, :-1], rows[:, 1:]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--init", required=True)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    w, meta = read_safetensors(args.init)
    tokens, order = w["data.tokens"], w["data.order"]
    vocab, dim = w["embed.weight"].shape
    layers = sum(1 for k in w if k.endswith(".attn_norm.weight"))
    context = int(meta["context"])
    model = LM(vocab, dim, int(meta["heads"]), int(meta["kv_heads"]), layers,
               int(meta["ffn"]), context)
    model.load_qkv(w)
    params = list(model.parameters())
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    base, min_lr = float(meta["lr"]), float(meta["min_lr"])
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": float(meta["weight_decay"])},
                             {"params": no_decay, "weight_decay": 0.0}], lr=base)
    steps, warmup = order.shape[0], int(meta["warmup"])
    start = time.perf_counter()
    for step in range(steps):
        x, y = windows(tokens, 0, order[step].tolist(), context)
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x).reshape(-1, vocab), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, base, min_lr, warmup, steps)
        opt.step()
    seconds = time.perf_counter() - start
    print(f"train_seconds={seconds:.2f}")
    n_train, n_valid = int(meta["train_windows"]), int(meta["valid_windows"])
    batch = order.shape[1]
    total, count = 0.0, 0
    with torch.no_grad():
        for off in range(0, n_valid, batch):
            x, y = windows(tokens, n_train, range(off, min(off + batch, n_valid)), context)
            total += F.cross_entropy(model(x).reshape(-1, vocab), y.reshape(-1),
                                     reduction="sum").item()
            count += y.numel()
    print(f"val_loss={total / count:.4f}")


if __name__ == "__main__":
    main()
