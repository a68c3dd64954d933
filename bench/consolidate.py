"""
Consolidation steps at full size on a GPU, with random weights: time per step (the student's sampling and the
training apart) and peak GPU memory, at the paper's batch (256 prompts, 1024-token responses) with a knowledge
text of --know tokens in the teacher's prompt. Random weights rarely stop early, so responses are nearly all
full length: the numbers are worst-case costs, not results.

    python bench/consolidate.py                          # Qwen3-1.7B shape, batch 256, 2 steps
    python bench/consolidate.py --shape 4b --offload     # Qwen3-4B shape, AdamW in CPU memory: under 80 GB?
    python bench/consolidate.py --tiny                   # CPU smoke run
"""
import argparse
import statistics
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import games  # noqa: E402
import model as M  # noqa: E402
import oel  # noqa: E402
from bench.generate import QWEN3_1_7B, random_model, timed  # noqa: E402

SHAPES = {"1.7b": QWEN3_1_7B,
          "4b": replace(QWEN3_1_7B, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                        num_attention_heads=32)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=SHAPES, default="1.7b")
    p.add_argument("--offload", action="store_true", help="AdamW's master weights and moments in CPU memory")
    p.add_argument("--batch", type=int, default=256, help="prompts per step")
    p.add_argument("--micro", type=int, default=4, help="prompts per forward/backward")
    p.add_argument("--new", type=int, default=1024, help="tokens per sampled response")
    p.add_argument("--know", type=int, default=2048, help="knowledge tokens in the teacher's prompt")
    p.add_argument("--steps", type=int, default=2, help="steps (the first includes compilation)")
    p.add_argument("--tiny", action="store_true", help="CPU smoke run at the tiny shape")
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = SHAPES[args.shape]
    if args.tiny:
        cfg, args.batch, args.micro, args.new, args.know = replace(M.TINY, vocab_size=1024), 4, 2, 8, 64
    _, tok = M.load("tiny")
    student = random_model(cfg, device)  # float32: the trainable weights
    teacher = oel.frozen_copy(student, oel.infer_dtype(device))
    prompts = [("frozenlake", f"Observation 1:\n{env.reset(env.seed)}")
               for env in games.make_games("frozenlake", "train", 64, seed=0)]
    lesson = "- EXPERIENCE ITEM: Check which tiles are holes before moving, and prefer moves that keep you safe.\n"
    knowledge = lesson * max(1, args.know // len(tok.encode(lesson)))
    ocfg = oel.OELConfig(batch_size=args.batch, micro_batch=args.micro, max_new_tokens=args.new, steps=args.steps,
                         offload_optimizer=args.offload)

    sampling = []  # seconds of each step's sample_batch
    real_sample = oel.sample_batch

    def timed_sample(*a, **kw):
        out = []
        sampling.append(timed(lambda: out.append(real_sample(*a, **kw))))
        return out[0]

    oel.sample_batch = timed_sample
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    logs = oel.consolidate(student, teacher, tok, prompts, [knowledge], ocfg)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")

    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    n_params = sum(w.numel() for w in student.parameters())
    print(f"\n{name} | {args.shape if not args.tiny else 'tiny'} shape, {n_params / 1e9:.2f}B parameters | batch "
          f"{args.batch}, micro {args.micro}, {args.new}-token responses, {len(tok.encode(knowledge))} knowledge "
          f"tokens | AdamW state {'in CPU memory' if args.offload else 'beside the model'}")
    print(f"{'step':>4} | {'seconds':>7} | {'sampling':>8} | {'training':>8} | {'tokens':>7}")
    for log, s in zip(logs, sampling):
        print(f"{log['step']:>4} | {log['ms'] / 1e3:7.1f} | {s:8.1f} | {log['ms'] / 1e3 - s:8.1f} | {log['tokens']:>7}")
    last = logs[-1]["ms"] / 1e3
    print(f"last step {last:.1f} s, {logs[-1]['tokens'] / last:.0f} response tokens/s | peak GPU memory {peak:.1f} GiB"
          f" | median step {statistics.median(x['ms'] for x in logs) / 1e3:.1f} s")


if __name__ == "__main__":
    main()
