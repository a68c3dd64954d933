"""
The whole OEL loop (train.py) on a random-weight model of Qwen3-1.7B's exact shape, for a GPU without network
access: it checks that every stage runs at full size and measures each stage's time and the peak GPU memory.
Random weights learn nothing: the numbers are costs, not results.

    python bench/train_smoke.py                 # GPU: Qwen3-1.7B shape, bf16 sampling, short run
    python bench/train_smoke.py --tiny          # CPU smoke run at the tiny shape

The tokenizer is the tiny preset's (the random model's extra vocabulary rows are never sampled by name, and the
sampler may emit ids the tokenizer decodes to nothing: fine for costs, since no stop token is expected).
"""
import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import model as M  # noqa: E402
import train  # noqa: E402
from bench.generate import QWEN3_1_7B, random_model  # noqa: E402


def random_checkpoint(cfg, path):
    """A random-weight checkpoint of shape cfg with the tiny tokenizer, in Hub layout."""
    _, tok = M.load("tiny")
    model = random_model(cfg, "cuda" if torch.cuda.is_available() else "cpu")  # a 2B-parameter init is slow on a CPU
    M.save(model.to(torch.bfloat16), tok, path)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="CPU smoke run at the tiny shape")
    p.add_argument("--out", default="runs/train_smoke", help="run folder (wiped first)")
    args = p.parse_args()
    cfg = replace(M.TINY, vocab_size=1024) if args.tiny else QWEN3_1_7B
    ckpt = f"{args.out}_model"
    if not os.path.exists(os.path.join(ckpt, "config.json")) or M.ModelConfig.from_hf(ckpt) != cfg:
        shutil.rmtree(ckpt, ignore_errors=True)  # absent, or left by a run at the other shape
        random_checkpoint(cfg, ckpt)
    shutil.rmtree(args.out, ignore_errors=True)
    sizes = ["--n_train", "64", "--n_test", "64", "--n_ood", "0", "--K", "4", "--n", "8", "--steps", "5",
             "--batch_size", "16", "--micro_batch", "4", "--max_new_tokens", "256", "--extract_max_new_tokens", "256"]
    if args.tiny:
        sizes = ["--n_train", "4", "--n_test", "4", "--n_ood", "0", "--K", "2", "--n", "2", "--steps", "2",
                 "--batch_size", "2", "--micro_batch", "2", "--max_new_tokens", "16", "--extract_max_new_tokens", "16"]
    t0 = time.time()
    train.main(["--model", ckpt, "--out_dir", args.out, "--rounds", "1", *sizes])
    total = time.time() - t0
    logs = json.load(open(os.path.join(args.out, "r0", "train_log.json")))
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
    stamp = lambda f: os.path.getmtime(os.path.join(args.out, f))
    stages = [("base eval", stamp("base/eval.json") - t0), ("deploy", stamp("r0/deploy.jsonl") - stamp("base/eval.json")),
              ("extract", stamp("r0/pool.json") - stamp("r0/deploy.jsonl")),
              ("consolidate", stamp("r0/train_log.json") - stamp("r0/pool.json")),
              ("eval", stamp("r0/eval.json") - stamp("r0/train_log.json"))]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"\n{device} | layers {cfg.num_hidden_layers} hidden {cfg.hidden_size} vocab {cfg.vocab_size} | {' '.join(sizes)}")
    print(f"{'stage':>12} | {'seconds':>8}")
    for name, s in stages:
        print(f"{name:>12} | {s:8.1f}")
    print(f"{'total':>12} | {total:8.1f}\nmedian step {sorted(x['ms'] for x in logs)[len(logs) // 2]:.0f} ms | "
          f"peak GPU memory {peak:.1f} GiB")


if __name__ == "__main__":
    main()
