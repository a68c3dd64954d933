"""
Generation throughput of model.generate against transformers' generate (dynamic and static cache), on a random-weight
model of Qwen3-1.7B's exact shape in bf16: greedy, fixed-length prompts, no early stop.

    python bench/generate.py                    # GPU: prompt 512, 256 new tokens, batch 1/16/64
    python bench/generate.py --tiny             # CPU smoke run at a tiny shape
    python bench/generate.py --profile          # the kernels of one batch-1 decode step
    python bench/generate.py --other .ab/m.py   # also time another version of model.py (see --help), same weights

prefill = time of a 1-token generate call; decode tok/s = B * (N - 1) / (time(N tokens) - prefill).
Targets on one H100: >= 500 tok/s at B=1 and >= 7,600 tok/s at B=64.
"""
import argparse
import importlib.util
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import model as M  # noqa: E402

QWEN3_1_7B = M.ModelConfig(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                           num_attention_heads=16, num_key_value_heads=8, head_dim=128, rope_theta=1e6,
                           tie_word_embeddings=True)


class NoStop:
    """Stands in for the tokenizer: no stop tokens, so every row runs to max_new_tokens."""
    stop_ids, pad_id = [], 0

    def decode(self, ids):
        return ""


def random_model(cfg, device, dtype=torch.float32):
    """A Transformer of shape cfg on device with random weights: matrices N(0, 0.02), norms 1."""
    torch.manual_seed(0)
    with torch.device(device):
        model = M.Transformer(cfg).to(dtype)
    with torch.no_grad():
        for w in model.parameters():
            if w.dim() == 2:
                w.normal_(0, 0.02)
    return model


def timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def profile_step(model, dtype, device, step_fn, S=768, reps=10):
    """What one batch-1 decode step runs (the compiled step_fn, outside its CUDA graph): the number of kernels, their
    summed time, and the ones that take longest. Compare the sum with the measured step time: the gap is launches."""
    cuda = device == "cuda"
    cache = M.KVCache(model.config, torch.zeros(1, dtype=torch.long, device=device), S, dtype)
    tok, col = torch.zeros(1, dtype=torch.long, device=device), torch.tensor([S // 2], device=device)
    with torch.no_grad():
        for _ in range(3):
            step_fn(model, cache, tok, col)
        acts = [torch.profiler.ProfilerActivity.CUDA if cuda else torch.profiler.ProfilerActivity.CPU]
        with torch.profiler.profile(activities=acts) as prof:
            for _ in range(reps):
                step_fn(model, cache, tok, col)
            if cuda:
                torch.cuda.synchronize()
    kind = torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU
    kernels = [e for e in prof.events() if e.device_type == kind and (cuda or e.cpu_parent is None)]
    busy = sum(e.time_range.elapsed_us() for e in kernels) / reps / 1e3
    print(f"\nbatch-1 step, cache {S}: {len(kernels) / reps:.0f} {'kernels' if cuda else 'top-level ops'}, "
          f"{busy:.3f} ms of {'kernel' if cuda else 'op'} time per step")
    print(prof.key_averages().table(sort_by="self_device_time_total" if cuda else "self_cpu_time_total", row_limit=12))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny shape, short prompt, float32")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64], help="batch sizes")
    p.add_argument("--prompt", type=int, default=512, help="prompt length")
    p.add_argument("--new", type=int, default=256, help="new tokens per row")
    p.add_argument("--no-hf", action="store_true", help="skip the transformers baselines")
    p.add_argument("--profile", action="store_true", help="only profile one batch-1 decode step")
    p.add_argument("--other", metavar="MODEL_PY", help="also time this version of model.py, e.g. an older one: "
                   "`mkdir -p .ab && git show REV:model.py > .ab/model_REV.py` (.ab is git-ignored: carry it)")
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg, dtype = QWEN3_1_7B, torch.bfloat16
    if args.tiny:
        cfg, dtype, args.batch, args.prompt, args.new = replace(M.TINY, vocab_size=1024), torch.float32, [1, 4], 32, 16

    ours = random_model(cfg, device, dtype).eval()
    if args.profile:
        return profile_step(ours, dtype, device, M.decode_logits_compiled_b1)

    def ours_run(idx, n, eager=False):  # eager: the uncompiled step, still recorded as a CUDA graph
        saved = M.decode_logits_compiled, M.decode_logits_compiled_b1
        if eager:
            M.decode_logits_compiled = M.decode_logits_compiled_b1 = M.decode_logits
        try:
            return M.generate(ours, NoStop(), idx.tolist(), max_new_tokens=n, temperature=0)
        finally:
            M.decode_logits_compiled, M.decode_logits_compiled_b1 = saved

    def same_tokens(run):  # greedy tokens of run against ours, on fresh prompts (the first batch size: one compile)
        idx = torch.randint(0, cfg.vocab_size, (args.batch[0], 16), device=device)
        with torch.no_grad():
            same = [c.tokens for c in ours_run(idx, 8)] == [c.tokens for c in run(idx, 8)]
        return "equal" if same else "DIFFER (bf16 rounding?)"

    systems = {"ours": ours_run, "ours eager": lambda idx, n: ours_run(idx, n, eager=True)}
    if args.other:
        name = Path(args.other).stem
        spec = importlib.util.spec_from_file_location(name, args.other)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        with torch.device(device):
            other = mod.Transformer(mod.ModelConfig(**asdict(cfg))).to(dtype).eval()
        sd = ours.state_dict()  # same weights, in its layout: ours, or the Hub's (separate projections)
        other.load_state_dict(sd if set(sd) == set(other.state_dict()) else M.hub_state_dict(ours))
        systems[name] = lambda idx, n: mod.generate(other, NoStop(), idx.tolist(), max_new_tokens=n, temperature=0)
        print(f"{args.other}: greedy tokens {same_tokens(systems[name])}")
    if not args.no_hf:
        import transformers
        hf_cfg = transformers.AutoConfig.for_model(**cfg.to_hf())
        with torch.device(device):
            hf = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=dtype).eval()
        hf.load_state_dict(M.hub_state_dict(ours), strict=False)  # lm_head is tied
        hf.generation_config.pad_token_id = 0
        for name, extra in (("hf dynamic", {}), ("hf static", {"cache_implementation": "static"})):
            systems[name] = lambda idx, n, extra=extra: hf.generate(
                idx, attention_mask=torch.ones_like(idx), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                eos_token_id=None, **extra)

    header = (f"{'batch':>5} | {'system':10} | {'warm-up s':>9} | {'prefill ms':>10} | {'decode tok/s':>12} | "
              f"{'end-to-end tok/s':>16}")
    line = "{:5d} | {:10} | {:9.1f} | {:10.1f} | {:12.0f} | {:16.0f}".format
    print(header, flush=True)  # each row as it is measured, so a timed-out call keeps what it measured
    rows = []
    for B in args.batch:
        idx = torch.randint(0, cfg.vocab_size, (B, args.prompt), device=device)
        for name, run in systems.items():
            with torch.no_grad():
                warm = timed(lambda: (run(idx, 1), run(idx, args.new)))  # compilation, autotuning, CUDA graphs
                prefill = timed(lambda: run(idx, 1))
                total = timed(lambda: run(idx, args.new))
            rows.append((B, name, warm, prefill * 1e3, B * (args.new - 1) / max(total - prefill, 1e-9),
                         B * args.new / total))
            print(line(*rows[-1]), flush=True)

    print(f"\n{device} {torch.cuda.get_device_name() if device == 'cuda' else ''} | layers {cfg.num_hidden_layers} "
          f"hidden {cfg.hidden_size} vocab {cfg.vocab_size} {str(dtype)[6:]} | prompt {args.prompt}, new {args.new}")
    print(header)
    for row in rows:
        print(line(*row))


if __name__ == "__main__":
    main()
