"""
Online Experiential Learning (OEL, arXiv 2603.16856): extraction, knowledge, distillation, the round loop.

The algorithm, round r = 0 .. R-1, starting from the model M_r (M_0 = the given checkpoint):
1. Deploy: M_r plays `n_train` training games (fresh seeds every round) with no knowledge in its
   prompt. Trajectories -> r{r}/deploy.jsonl. Extraction and consolidation touch no environment.
2. Extract: the extractor (M_r itself, or `extractor` for the consistency ablation) reads one
   trajectory at a time (every turn's observation and full output, and the result) plus, optionally,
   the knowledge so far, and writes 1-2 lessons on lines starting with `- EXPERIENCE ITEM:`. Only
   those lines are kept (thinking stripped first) and appended; the knowledge is capped at
   `knowledge_budget` tokens by dropping the oldest items whole. K independent accumulations over
   n trajectories each (drawn per run seed, round and k) give a pool of K knowledge texts. Every
   version is saved as r{r}/knowledge/r{r}_k{k}_{i}.md (i = trajectories read so far).
3. Consolidate (on-policy context distillation): prompts are the turn states of the deploy
   trajectories. The student (current weights, no knowledge) samples one response per prompt at
   temperature 0.7; the teacher (M_r frozen, one knowledge text drawn from the pool in its prompt)
   scores the same response tokens. Loss: reverse KL(student || teacher) per response token over the
   full vocabulary at temperature 0.7, averaged over tokens (kernels.fused_linear_kl). AdamW, constant
   lr, grad clip 1.0. The result M_{r+1} is saved in Hub layout to r{r}/model.
4. Evaluate: pass rate, steps and response tokens on the held-out test levels and the
   out-of-distribution set (r{r}/eval.json and a row in metrics.jsonl; the base model is round -1).

Every stage writes its outputs atomically and is skipped when they exist, so an interrupted run
resumes at the first unfinished stage; rollouts keep each finished batch of games, and consolidation
saves its state every `save_every` steps.

Defaults follow the paper's cheapest setting as its code (microsoft/LMOps, oel/) runs it: Qwen3-1.7B
thinking on FrozenLake 3x3, 2 rounds, knowledge budget 2048 with the knowledge hidden from the extractor,
n = 15, K = 10, lr 5e-6, 20 steps a round, each on the turns of 64 fresh deploy games (here: 1280 deploy
games, 256 prompts a step), one optimizer step per step, responses up to 1024 tokens, 5 turns.

Where we differ from the paper and its code:
- The loss is the exact KL over the whole vocabulary, averaged over all response tokens of a step (the code
  averages over tokens within each packed micro-batch, then weights micro-batches by their sequences); the
  paper's top-256 student-token approximation is available as `topk` > 0 for comparison. A non-finite
  gradient norm stops the run (the code skips that update).
- `context='raw'` gives the teacher raw trajectories (same token budget) instead of extracted knowledge:
  the paper's comparison, here as a run option.
- Extraction: one prompt for every model size, asking for 1-2 lessons on `- EXPERIENCE ITEM:` lines (the
  code's v4 prompt, paraphrased; its 1.7B runs used a free-form analysis prompt whose whole answer is kept);
  at most 2 new items per trajectory, exact repeats dropped; an item line must start with the marker, and a
  response cut off inside its thinking gives none (the code keeps any line containing the marker, and a
  cut-off thinking text); an item longer than the whole budget is dropped, not the whole knowledge. The
  extractor reads deploy trajectories, each accumulation its own random n of them; the code plays separate
  extraction games for it (sampled at 0.7, top-p 0.8, top-k 20), the same levels for every accumulation.
- Consolidation prompts are drawn from one shuffle of all deploy turns per round, not game by game: a step
  has batch_size prompts (the code: every turn of the step's 64 games, 64 to 320), and a turn is used
  steps x batch_size / (deploy turns) times on average (the code: once).
- Out-of-distribution: a set of games (TextWorld by default); the paper reports IF-Eval, which
  lm-evaluation-harness runs on the saved checkpoints.
- Response length counts every generated token, the stop token included (the code re-encodes the decoded text
  without special tokens: about one token less a turn).
- Our own prompt wording (games.py); like the code's, it states no rules and says the knowledge may be
  wrong. The action is the last bracketed valid action, as the code reads it, but case, spaces and quotes
  are forgiven (the code matches the action strings exactly).
- Sokoban levels are drawn so that 2-5 moves solve them (winnable within 5 turns); see games.py. Deploy
  games skip any level that starts like a test level, unless that would leave them fewer than half their
  distinct levels (the paper's FrozenLake 3x3 with 2 holes has 19 boards, all in the test set); see held_out_boards.
- Trainable weights are float32 with bfloat16 autocast on a GPU (the residual stream in bfloat16 too);
  the frozen teacher and the copy the student samples with are bfloat16. So the student trains on the
  numerics it samples with, and with an empty knowledge text its KL to the teacher at the start of a round
  is zero (exactly on a CPU, 4e-16 a token on an H200): no rounding floor unrelated to the knowledge.
"""

import fcntl
import hashlib
import json
import math
import os
import random
import re
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from tqdm import tqdm

import games
import model as modeling
from kernels import fused_linear_kl

MARKER = "- EXPERIENCE ITEM:"  # starts every lesson; a lesson is one line (parsing, resume and the budget work on lines)


@dataclass
class OELConfig:
    model: str = "Qwen/Qwen3-1.7B"  # checkpoint dir, Hub id, or 'tiny'
    out_dir: str = "runs/oel"  # everything of a run lands here
    game: str = "frozenlake"  # a game of games.ENVS
    game_options: str = ""  # JSON settings of the game, e.g. '{"holes": 1}' ('' = the paper's)
    ood_game: str = "textworld"  # the out-of-distribution set
    rounds: int = 2  # R: rounds of deploy, extract, consolidate, evaluate
    seed: int = 0  # seeds every game set, shuffle and sample of the run
    thinking: bool | None = True  # chat mode: true thinking (paper's Qwen3-1.7B/4B/8B), false not, none instruct
    # deploy and evaluation
    n_train: int = 1280  # training games played per round (paper's code: 64 per step, 20 steps)
    n_test: int = 128  # held-out test levels (paper: 128)
    n_ood: int = 64  # out-of-distribution games
    rollout_batch: int = 128  # games played in lockstep at once (bounds the KV cache)
    max_turns: int = 5  # turns per episode
    max_new_tokens: int = 1024  # tokens per turn (deploy, eval and the student's samples)
    # extraction
    extractor: str = ""  # optional separate extractor checkpoint (consistency ablation); '' = the model itself
    context: str = "knowledge"  # the teacher's context: knowledge (extracted) | raw (trajectories: the paper's ablation)
    K: int = 10  # independent accumulations (pool size)
    n: int = 15  # trajectories per accumulation (paper's code: 15 for 1.7B, 25 for 4B, 50 for 8B and 4B-Instruct)
    knowledge_budget: int = 2048  # tokens (paper: 2048 for the 1.7B model, 8192 for 4B/8B)
    show_knowledge: bool = False  # show the knowledge so far in the extraction prompt (paper: hidden for 1.7B only)
    extract_max_new_tokens: int = 2048  # tokens per extraction response (paper's code: the knowledge budget)
    # consolidation
    steps: int = 20  # optimizer steps per round (paper's code: 20 for 1.7B/4B FrozenLake, 100 for 8B and Sokoban)
    batch_size: int = 256  # prompts per step (paper's code: the turns of 64 deploy games)
    micro_batch: int = 4  # prompts per forward/backward
    lr: float = 5e-6  # constant (paper: 5e-6 for 1.7B, 1e-6 for 4B/8B)
    weight_decay: float = 0.01  # AdamW, betas (0.9, 0.999)
    grad_clip: float = 1.0  # max gradient norm
    kl_temperature: float = 0.7  # temperature of both distributions in the loss, and of the student's samples
    topk: int = 0  # 0 = exact KL over the vocabulary; >0 = the paper's top-k student-token approximation
    grad_ckpt: bool = True  # gradient checkpointing (on a GPU)
    offload_optimizer: bool = False  # AdamW's master weights and moments in CPU memory (Qwen3-4B on an 80 GB GPU)
    save_every: int = 10  # consolidation state saved every this many steps


# ----------------------------------------------------------------------------- models and files


def game_settings(text):
    """The game settings of a --game_options JSON string ('' = the defaults) as keyword arguments."""
    settings = json.loads(text or "{}")
    if not isinstance(settings, dict) or "seed" in settings:  # the level seeds are the run's
        raise ValueError("game options are a JSON object of the game's settings, without 'seed'")
    return settings


def read_back(path, read=None, ok=lambda x: True, advice="repair it, or delete it to redo what it holds"):
    """A file a run wrote: JSON, or what read(path) makes of it (e.g. games.load_trajectories), for which ok() holds.
    Atomic writes never leave one damaged, but a copy or a hand edit can: that ends the run with a line naming the
    file, and `advice`."""
    try:
        value = read(path) if read else json.loads(Path(path).read_text(encoding="utf-8"))
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, a malformed trajectory line
        raise SystemExit(f"error: {path} cannot be read back ({e}); {advice}") from None
    if not ok(value):  # e.g. a hand-edited pool.json that is not a list of texts
        raise SystemExit(f"error: {path} does not hold what a run writes there; {advice}")
    return value


def atomic_write(path, text):
    """Write text so that a reader sees either nothing or the whole file."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def infer_dtype(device):
    """Sampling, the teacher and evaluation run in bfloat16 on a GPU; everything is float32 on a CPU."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def frozen_copy(m, dtype):
    """A gradient-free copy of m in `dtype` (no intermediate full-precision copy): teacher and sampler."""
    with torch.device("meta"):
        c = modeling.Transformer(m.config)
    c.load_state_dict({k: v.detach().to(dtype, copy=True) for k, v in m.state_dict().items()}, assign=True)
    return c.eval().requires_grad_(False)


def save_checkpoint(model, tok, path):
    """Hub-layout checkpoint, renamed into place once complete."""
    tmp = f"{path}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    modeling.save(model, tok, tmp)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- extraction


def render_trajectory(traj):
    """Every turn's input (the observation it answered: the first one, then the game's feedback) and full
    output, and the result with the game's last message, as the paper's code shows an episode (without the
    instruction and history that every turn's prompt repeats)."""
    parts = []
    seen = traj.turns[0].state.removeprefix("Observation 1:\n") if traj.turns else ""
    for i, t in enumerate(traj.turns, 1):
        parts.append(f"### Turn {i}\nInput:\n{seen}\n\nOutput:\n{t.response}")
        seen = t.feedback
    result = "won" if traj.won else "lost"
    parts.append(f"### Result\nThe game was {result} after {traj.steps} step(s). The game's last message:\n{seen}")
    return "\n\n".join(parts)


def extraction_prompt(traj, knowledge, show_knowledge):
    """The user message asking for 1-2 new lessons from one trajectory."""
    known, repeat = "", ""
    if show_knowledge and knowledge:
        known = f"## Experience gathered so far\n{knowledge}\n\n"
        repeat = ", and not repeating the experience gathered so far"
    return (
        "Below is one episode of a game that you played: every turn's input and your full output, "
        "the feedback, and the final result.\n\n"
        f"{known}## Episode\n{render_trajectory(traj)}\n\n"
        "## Task\nWrite 1-2 new lessons from this episode that would help play such games better next "
        "time: general and transferable (how the game works, what to do, what to avoid), not tied to "
        f"this particular level{repeat}. Write each lesson on "
        f"its own line starting with '{MARKER}'."
    )


def seed_of(*parts) -> int:
    """A 40-bit seed hashed from its parts, e.g. seed_of(cfg.seed, r, "extract", i): different parts give unrelated
    seeds (seed + r would repeat across runs and rounds), small enough for torch's 64-bit seeds."""
    return int(hashlib.sha1("/".join(map(str, parts)).encode()).hexdigest()[:10], 16)


def parse_items(text):
    """The first 2 distinct experience lines of a response, thinking stripped, marker included."""
    items = []
    for line in modeling.strip_thinking(text).splitlines():
        line = line.strip()
        if line.startswith(MARKER) and line[len(MARKER):].strip():
            items.append(f"{MARKER} {line[len(MARKER):].strip()}")
    return list(dict.fromkeys(items))[:2]  # a repeat within the response is dropped, as one of old items is


def trim_knowledge(items, tok, budget):
    """Drop the oldest items whole until the knowledge text fits in `budget` tokens. An item longer than the whole
    budget goes first (it could never fit; older items are not given up for it)."""
    items = [it for it in items if len(tok.encode(it)) <= budget]
    while items and len(tok.encode("\n".join(items))) > budget:
        items.pop(0)
    return items


def accumulation_orders(cfg, r, n_trajs):
    """For each of the K accumulations, the n trajectory indices it reads, in order (seeded by cfg.seed, r and k)."""
    return [random.Random(seed_of(cfg.seed, r, "accumulation", k)).sample(range(n_trajs), min(cfg.n, n_trajs))
            for k in range(cfg.K)]


def raw_context(trajs, tok, budget):
    """Rendered trajectories, newest first, whole, as many as fit in `budget` tokens together (the raw-trajectory
    baseline: the same budget as the knowledge). One too long to fit is skipped for older, shorter ones."""
    parts = []
    for t in reversed(trajs):
        part = f"## Episode ({t.game})\n{render_trajectory(t)}"
        if len(tok.encode("\n\n".join(parts + [part]))) <= budget:
            parts.append(part)
    return "\n\n".join(parts)


def extract_pool(extractor, tok, trajs, cfg, out_dir, r, budget_tok=None):
    """The pool: K knowledge texts from K accumulations advanced in lockstep (one batched generate per trajectory
    index). Every version is saved as knowledge/r{r}_k{k}_{i}.md; versions on disk are read back, not redone.
    tok: the extractor's tokenizer; budget_tok: the one the knowledge budget counts in, the teacher's (default tok)."""
    kdir = os.path.join(out_dir, "knowledge")
    os.makedirs(kdir, exist_ok=True)
    orders = accumulation_orders(cfg, r, len(trajs))
    n = len(orders[0])
    items = [[] for _ in range(cfg.K)]
    made = cut = reused = 0  # extraction responses generated, those cut off inside their thinking; steps read back
    for i in tqdm(range(1, n + 1), desc=f"round {r} extract", leave=False):
        paths = [os.path.join(kdir, f"r{r}_k{k}_{i}.md") for k in range(cfg.K)]
        if all(os.path.exists(p) for p in paths):  # resumed: this step is on disk
            items = [[line for line in read_back(p, read=lambda f: Path(f).read_text(encoding="utf-8")).splitlines()
                      if line] for p in paths]
            reused += 1
            continue
        prompts = [tok.user_ids(extraction_prompt(trajs[order[i - 1]], "\n".join(known), cfg.show_knowledge),
                                cfg.thinking) for order, known in zip(orders, items)]
        s = games.RolloutConfig()  # sampled as evaluation is: 0.7, top-p 0.8, top-k 20
        outs = modeling.generate(extractor, tok, prompts, max_new_tokens=cfg.extract_max_new_tokens,
                                 temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                                 seed=seed_of(cfg.seed, r, "extract", i))
        made += len(outs)
        cut += sum(not o.stopped and modeling.THINK in o.text and modeling.END_THINK not in o.text for o in outs)
        for k, out in enumerate(outs):
            new = [it for it in parse_items(out.text) if it not in items[k]]
            items[k] = trim_knowledge(items[k] + new, budget_tok or tok, cfg.knowledge_budget)
            atomic_write(paths[k], "\n".join(items[k]) + "\n")
    if cut:
        advice = "raise --extract_max_new_tokens" + (", or use a non-thinking mode" if cfg.thinking else "")
        before = f", not counting the first {reused} of {n} steps, made before a resume" if reused else ""
        print(f"round {r} | warning: {cut} of {made} extraction responses ran out of tokens inside a think block (no "
              f"lessons from them{before}); {advice}")
    return ["\n".join(it) for it in items]


# ----------------------------------------------------------------------------- consolidation


@dataclass
class Sample:
    """One distillation example: a game state, the knowledge the teacher sees, and the student's response to it."""
    game: str
    state: str
    knowledge: str
    prompt: list[int]  # the student's prompt (the state alone)
    response: list[int]


def sample_batch(student, tok, prompts, pool, cfg, step, r) -> list[Sample]:
    """The step's `batch_size` (game, state) prompts, each with a knowledge text drawn from the pool, and the
    student's responses. A round's steps walk through one shuffle of all its prompts, cycling when they run out
    (versus the paper's code: see this file's docstring)."""
    order = random.Random(seed_of(cfg.seed, r, "prompts")).sample(range(len(prompts)), len(prompts))  # round's shuffle
    picks = [prompts[order[(step * cfg.batch_size + i) % len(prompts)]] for i in range(cfg.batch_size)]
    rng = random.Random(seed_of(cfg.seed, r, "step", step))
    know = [pool[rng.randrange(len(pool))] for _ in picks]
    ids = [tok.user_ids(games.user_prompt(g, s), cfg.thinking) for g, s in picks]
    sampler = frozen_copy(student, infer_dtype(student.output_weight.device))  # the current weights, for fast sampling
    seed, outs = rng.randrange(2**31), []
    for i in range(0, len(ids), cfg.rollout_batch):  # at most rollout_batch sequences in the KV cache
        outs += modeling.generate(sampler, tok, ids[i : i + cfg.rollout_batch], max_new_tokens=cfg.max_new_tokens,
                                  temperature=cfg.kl_temperature, top_p=1.0, top_k=0, seed=seed + i)
    return [Sample(g, s, k, p, o.tokens) for (g, s), k, p, o in zip(picks, know, ids, outs)]


def response_hidden(m, prompts, responses):
    """Final hidden states [N,C] at the positions that predict each response token, rows concatenated. Row i is
    prompts[i] + responses[i] (token lists), right-padded: plain causal attention is exact for the real tokens."""
    seqs = [p + r for p, r in zip(prompts, responses)]
    idx = torch.zeros(len(seqs), max(len(s) for s in seqs), dtype=torch.long)  # [B,T], right-padded with 0
    for i, s in enumerate(seqs):
        idx[i, : len(s)] = torch.tensor(s)
    h = m(idx.to(m.output_weight.device), return_hidden=True)  # [B,T,C]
    return torch.cat([h[i, len(p) - 1 : len(p) - 1 + len(r)] for i, (p, r) in enumerate(zip(prompts, responses))])


def distill_loss(student, teacher, tok, batch, cfg):
    """KL(student || teacher) summed over the response tokens of a micro-batch of Samples, and the token count.
    The student sees the state alone, the teacher the state with the knowledge; both score the same tokens."""
    s_prompts = [b.prompt for b in batch]
    t_prompts = [tok.user_ids(games.user_prompt(b.game, b.state, b.knowledge), cfg.thinking) for b in batch]
    resp = [b.response for b in batch]
    n_tok = sum(len(r) for r in resp)
    if n_tok == 0:
        return None, 0
    dev = student.output_weight.device
    # a bfloat16 teacher (on a GPU) means mixed precision: the float32 student runs under autocast
    amp = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=teacher.output_weight.dtype == torch.bfloat16)
    with amp:
        h_s = response_hidden(student, s_prompts, resp)
        with torch.no_grad():
            h_t = response_hidden(teacher, t_prompts, resp)
    dt = h_t.dtype
    w_s, w_t = student.output_weight.to(dt), teacher.output_weight
    if cfg.topk:
        loss = topk_kl(h_s.to(dt) @ w_s.T, h_t @ w_t.T, cfg.kl_temperature, cfg.topk)
    else:
        loss = fused_linear_kl(h_s.to(dt), w_s, h_t, w_t, temperature=cfg.kl_temperature)
    return loss * n_tok, n_tok


def topk_kl(s_logits, t_logits, temperature, k):
    """The paper's approximation: reverse KL summed over the student's top-k tokens only, not renormalised (its code's
    default). [N,V] -> scalar mean. Unlike the exact KL, its gradient is not 0 where student = teacher: it is that of
    the probability in the top k, so a step also moves probability out of the top k into the tail."""
    s = torch.log_softmax(s_logits.float() / temperature, -1)
    t = torch.log_softmax(t_logits.float() / temperature, -1)
    s_top, idx = s.topk(k, dim=-1)  # [N,k]
    return (s_top.exp() * (s_top - t.gather(-1, idx))).sum(-1).mean()


class OffloadedAdamW:
    """AdamW whose float32 master weights and moments live in CPU memory (12 bytes a parameter there, none on the
    GPU): each step brings the gradients to the CPU, steps there and copies the new weights back. The updates of
    torch.optim.AdamW; for a model whose optimizer does not fit beside it on the GPU."""

    def __init__(self, params, **kw):
        self.params = list(params)
        self.master = [p.detach().to("cpu", torch.float32, copy=True) for p in self.params]
        self.opt = torch.optim.AdamW(self.master, **kw)

    def step(self):
        for p, m in zip(self.params, self.master):
            m.grad = None if p.grad is None else p.grad.to("cpu", torch.float32)
        self.opt.step()
        with torch.no_grad():
            for p, m in zip(self.params, self.master):
                p.copy_(m)

    def zero_grad(self):
        for p in self.params:
            p.grad = None

    def state_dict(self):
        return self.opt.state_dict()

    def load_state_dict(self, state):  # called after the model's weights were restored: refresh the master copy
        with torch.no_grad():
            for p, m in zip(self.params, self.master):
                m.copy_(p)
        self.opt.load_state_dict(state)


def consolidate(student, teacher, tok, prompts, pool, cfg, state_path=None, r=0):
    """On-policy context distillation for cfg.steps steps, in place on `student`; returns per-step logs. prompts:
    (game, state) pairs; pool: knowledge texts. Resumes from `state_path` when it exists."""
    teacher.eval().requires_grad_(False)
    if len(prompts) < cfg.batch_size:
        print(f"round {r} | warning: {len(prompts)} deploy turns for a --batch_size of {cfg.batch_size}: every step "
              "uses some of them more than once")
    adamw = dict(lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay)
    if cfg.offload_optimizer:
        opt = OffloadedAdamW(student.parameters(), **adamw)
    else:  # fused: no full-size temporaries on the GPU
        opt = torch.optim.AdamW(student.parameters(), **adamw, fused=student.output_weight.is_cuda)
    start, logs = 0, []
    if state_path and os.path.exists(state_path):
        try:
            state = torch.load(state_path, map_location="cpu")  # copied into place: no second copy on the GPU
            student.load_state_dict(state["model"])
            opt.load_state_dict(state["opt"])
            start, logs = state["step"], state["logs"]
        except torch.cuda.OutOfMemoryError:  # not the file's fault
            raise
        except Exception as e:  # cut short, overwritten, or saved by another version of this code (several kinds)
            raise SystemExit(f"error: {state_path} cannot be read back ({type(e).__name__}); delete it to restart "
                             f"round {r}'s consolidation from its first step") from None
        print(f"round {r} | resuming consolidation at step {start}/{cfg.steps}")
    student.gradient_checkpointing = cfg.grad_ckpt and student.output_weight.is_cuda
    student.train()
    for step in tqdm(range(start, cfg.steps), desc=f"round {r} consolidate", leave=False, initial=start, total=cfg.steps):
        t0 = time.time()
        batch = sample_batch(student, tok, prompts, pool, cfg, step, r)
        n_total = sum(len(b.response) for b in batch)
        loss_sum = 0.0
        for i in range(0, len(batch), cfg.micro_batch):
            loss, n = distill_loss(student, teacher, tok, batch[i : i + cfg.micro_batch], cfg)
            if n:
                (loss / n_total).backward()
                loss_sum += loss.detach()
        norm = float(torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.grad_clip))
        if not math.isfinite(norm):  # one such step would turn every weight to NaN
            raise SystemExit(f"error: round {r} step {step + 1}: the gradient norm is {norm} (the loss diverged, and "
                             "a rerun would again); start a new --out_dir with a lower --lr")
        opt.step()
        opt.zero_grad()
        kl = float(loss_sum / max(n_total, 1))
        logs.append({"step": step + 1, "kl": kl, "grad_norm": norm, "tokens": n_total, "ms": 1000 * (time.time() - t0)})
        shown = max(kl, 0.0)  # rounding can leave -1e-9: no "-0.0000"
        tqdm.write(f"round {r} | step {step + 1:03d}/{cfg.steps} | kl {shown:.4f} | grad {norm:.3f} "
                   f"| tok {n_total / len(batch):.0f}/resp | {logs[-1]['ms']:.0f} ms")
        if state_path and ((step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps):
            # to a Python file, not a path: a full disk's OSError then shows, as is or as the context of torch's
            # RuntimeError (a write after the first failed); a path hides it. On failure the partial file goes (the
            # space it held) and the error names it
            tmp = f"{state_path}.tmp"
            try:
                with open(tmp, "wb") as f:
                    torch.save({"model": student.state_dict(), "opt": opt.state_dict(), "step": step + 1, "logs": logs},
                               f)
            except (OSError, RuntimeError) as e:
                if os.path.exists(tmp):
                    os.remove(tmp)
                if isinstance(err := e if isinstance(e, OSError) else e.__context__, OSError) and not err.filename:
                    err.filename = tmp
                raise
            os.replace(tmp, state_path)
    student.eval()
    return logs


# ----------------------------------------------------------------------------- evaluation and the loop


def rollout_cfg(cfg, deploy=False):
    """Evaluation samples at RolloutConfig's defaults, the paper's (0.7, top-p 0.8, top-k 20); deploy, as the
    paper's code does, at temperature 0.7 from the full distribution."""
    rcfg = games.RolloutConfig(max_turns=cfg.max_turns, max_new_tokens=cfg.max_new_tokens, thinking=cfg.thinking)
    return replace(rcfg, top_p=1.0, top_k=0) if deploy else rcfg


def read_games(path, n):
    """The n trajectories a games file (a set's, or a batch's part) holds; one line naming it if not n."""
    return read_back(path, games.load_trajectories, lambda t: len(t) == n,
                     f"it should hold {n} games; delete it to play them again")


def play(m, tok, game, split, n, seed, rcfg, contexts=(None,), batch=128, options=None, path=None, exclude=()):
    """Roll out n games of a named set (minus levels whose first observation is in `exclude`), `batch` at a time,
    the contexts spread evenly over the games. With `path`, the set is saved there as JSONL (and read back if
    present); each finished batch of games i..j-1 is also saved to path.part{i}-{j} until the set is complete, so an
    interrupted run replays only the unfinished batch, also with another `batch` (the later games are then played,
    and sampled, in batches of the new size)."""
    if path and os.path.exists(path):
        print(f"{path} on disk, reused")
        for p in part_files(path).values():  # left by a run killed between saving the set and removing them
            os.remove(p)
        return read_games(path, n)
    envs = games.make_games(game, split, n, seed=seed, exclude=exclude, **(options or {}))
    saved = {i: (j, p) for (i, j), p in part_files(path).items() if i < j <= n} if path else {}  # others: no batch
    plan, i = [], 0  # (first game, last game + 1, its part file if on disk)
    while i < n:
        j, part = saved.get(i, (min(i + batch, n), None))
        plan.append((i, j, part))
        i = j
    if on_disk := sum(part is not None for _, _, part in plan):
        print(f"{path}: {on_disk} of {len(plan)} batches of games on disk, reused")
    what = f"{os.path.basename(path).split('.')[0] if path else split} {game}"  # e.g. deploy frozenlake
    trajs = []
    for b, (i, j, part) in enumerate(plan):
        if part:
            trajs += read_games(part, j - i)
            continue
        done, desc = [], what + (f" {b + 1}/{len(plan)}" if len(plan) > 1 else "")
        for k, ctx in enumerate(contexts):
            if group := envs[i:j][k :: len(contexts)]:
                done += games.rollout(m, tok, group, rcfg, knowledge=ctx or None, seed=seed_of(split, seed, i, k),
                                      desc=desc)
        if path:
            games.save_trajectories(f"{path}.part{i}-{j}", done)
        trajs += done
    if path:
        games.save_trajectories(path, trajs)
        for p in part_files(path).values():
            os.remove(p)
    return trajs


def part_files(path):
    """The finished batches of a game set on disk: {(first game, last game + 1): file}."""
    folder, name = os.path.split(path)
    found = (re.fullmatch(re.escape(name) + r"\.part(\d+)-(\d+)", f) for f in os.listdir(folder or "."))
    return {(int(m[1]), int(m[2])): os.path.join(folder, m[0]) for m in found if m}


def evaluate(m, tok, cfg, out_dir):
    """Test and out-of-distribution rollouts (trajectories saved, reused when present) -> {split: metrics}."""
    result = {}
    for split, game, n, opts in (("test", cfg.game, cfg.n_test, game_settings(cfg.game_options)),
                                 ("ood", cfg.ood_game, cfg.n_ood, None)):
        if n == 0:
            continue
        path = os.path.join(out_dir, f"eval_{split}.jsonl")
        trajs = play(m, tok, game, split, n, cfg.seed, rollout_cfg(cfg), batch=cfg.rollout_batch, options=opts, path=path)
        result[split] = games.metrics(trajs)
    return result


def held_out_boards(cfg, r):
    """First observations of the test levels, which round r's deploy games avoid; none when that would leave them
    fewer than half the distinct levels they would play otherwise: the level space is then too small to hold any out
    (the paper's FrozenLake 3x3 with 2 holes: 19 boards). A test set without repeats is taken to mean a large space,
    and the deploy levels are not read for the check (a TextWorld level costs a game start). Where the deploy games
    still cannot avoid them (a space the test set covers), train_round plays them anyway."""
    opts = game_settings(cfg.game_options)
    envs = games.make_games(cfg.game, "test", cfg.n_test, cfg.seed, **opts)
    games.pregenerate(envs)
    test = [games.first_observation(e) for e in envs]
    if len(set(test)) == len(test):
        return set(test)
    envs = games.make_games(cfg.game, "train", cfg.n_train, deploy_seed(cfg, r), **opts)
    games.pregenerate(envs)
    train = {games.first_observation(e) for e in envs}
    return set(test) if 2 * len(train - set(test)) >= len(train) else set()


def deploy_seed(cfg, r):
    """The train-split level set of round r's deploy games: runs stay apart for rounds < 1000, and make_games keeps
    them apart from the test split."""
    return cfg.seed * 1000 + r


def train_round(cfg, r, rdir, ckpt, device):
    """Deploy, extract and consolidate round r from checkpoint `ckpt`; the result is saved to rdir/model."""
    frozen, tok = modeling.load(ckpt, device=device, dtype=infer_dtype(device))  # the model at the start of the round
    # 1. deploy
    path = os.path.join(rdir, "deploy.jsonl")
    deploy = lambda exclude: play(frozen, tok, cfg.game, "train", cfg.n_train, deploy_seed(cfg, r),
                                  rollout_cfg(cfg, deploy=True), batch=cfg.rollout_batch,
                                  options=game_settings(cfg.game_options), path=path, exclude=exclude)
    resumed = os.path.exists(path)  # play() reuses what is on disk, made with the exclusion decided then
    exclude = () if resumed else held_out_boards(cfg, r)
    if not resumed and not exclude:
        print(f"round {r} | deploy | the test levels cover most of the level space: the deploy games include them")
    try:
        trajs = deploy(exclude)
    except games.TooFewLevels:  # the test levels cover (nearly) the whole level space
        print(f"round {r} | deploy | warning: fewer than {cfg.n_train} of {games.MAX_GAMES:,} levels start unlike "
              f"the {len(exclude)} test boards: the deploy games include test levels")
        trajs = deploy(())
    stats, levels = games.metrics(trajs), len({t.turns[0].state for t in trajs if t.turns})  # first observations
    print(f"round {r} | deploy | pass {stats['pass_rate']:.3f} | tokens/turn {stats['tokens_per_turn']:.1f} | "
          f"{len(trajs)} games, {levels} distinct levels")
    # 2. extract
    pool_path = os.path.join(rdir, "pool.json")
    if os.path.exists(pool_path):
        print(f"round {r} | extract | {pool_path} on disk, reused")
        pool = read_back(pool_path, ok=lambda p: isinstance(p, list) and p and all(isinstance(x, str) for x in p))
    else:
        if cfg.context == "raw":
            pool = [raw_context([trajs[i] for i in order], tok, cfg.knowledge_budget)
                    for order in accumulation_orders(cfg, r, len(trajs))]
        else:
            extractor, etok = modeling.load(cfg.extractor, device, infer_dtype(device)) if cfg.extractor else (frozen, tok)
            pool = extract_pool(extractor, etok, trajs, cfg, rdir, r, budget_tok=tok)
            del extractor
        atomic_write(pool_path, json.dumps(pool, indent=2))
    if not all(pool):
        print(f"round {r} | warning: {sum(not p for p in pool)} of {len(pool)} teacher contexts are empty "
              f"(no experience item extracted, or no whole trajectory fits the budget)")
    # 3. consolidate: the teacher is the model frozen at the start of the round
    state = os.path.join(rdir, "consolidate.pt")
    prompts = [(t.game, turn.state) for t in trajs for turn in t.turns]
    student = modeling.load(ckpt, device=device, dtype=torch.float32)[0]  # trainable weights in float32
    logs = consolidate(student, frozen, tok, prompts, pool, cfg, state, r)
    atomic_write(os.path.join(rdir, "train_log.json"), json.dumps(logs))
    save_checkpoint(student, tok, os.path.join(rdir, "model"))
    os.remove(state)


def evaluate_round(cfg, r, rdir, ckpt, device):
    """Step 4 of round r (the base model: r = -1): rdir/eval.json, made unless on disk, as a metrics row
    {"round": r, "test_pass_rate": ..., "ood_pass_rate": ...}."""
    path = os.path.join(rdir, "eval.json")
    if os.path.exists(path):
        print(f"{'base' if r < 0 else f'round {r}'} | eval | {path} on disk, reused")
    else:
        m, tok = modeling.load(ckpt, device=device, dtype=infer_dtype(device))
        atomic_write(path, json.dumps(evaluate(m, tok, cfg, rdir), indent=2))
    res = read_back(path, ok=lambda d: isinstance(d, dict) and all(isinstance(x, dict) for x in d.values()))
    return {"round": r, **{f"{s}_{k}": v for s, d in res.items() for k, v in d.items()}}


RESUMABLE = ("out_dir", "rounds", "micro_batch", "rollout_batch", "save_every", "grad_ckpt",  # may change when a
             "offload_optimizer")  # run is resumed: memory and speed, not the method (AdamW's state is the same)


def same_setting(key, a, b, game):
    """Settings compare by meaning: checkpoint paths by the folder they name, game options by the game they make
    (defaults written out or left out)."""
    if key in ("model", "extractor") and a and b and os.path.isdir(a) and os.path.isdir(b):
        return os.path.realpath(a) == os.path.realpath(b)
    if key == "game_options":
        try:
            return games.ENVS[game](**game_settings(a)) == games.ENVS[game](**game_settings(b))
        except (ValueError, TypeError):  # not settings of this game: compare the text's JSON
            return game_settings(a) == game_settings(b)
    return a == b


def check_resume(cfg):
    """Refuse to resume a run folder whose finished stages (files under base/ or r{r}/) were made with other settings,
    or hold no config.json to tell; a folder without them (a failed start, a log redirected into it) takes the new
    settings."""
    path = os.path.join(cfg.out_dir, "config.json")
    why = "it holds the settings the run was made with (without it a rerun would reuse its files whatever the flags)"
    old = read_back(path, ok=lambda d: isinstance(d, dict), advice=f"repair it: {why}, or pass a new --out_dir") \
        if os.path.exists(path) else None
    if old and "model_type" in old:  # a checkpoint's config.json
        raise SystemExit(f"error: {cfg.out_dir} is a model checkpoint, not a train.py run folder; pass another --out_dir")
    stages = [d for d in os.listdir(cfg.out_dir) if d == "base" or re.fullmatch(r"r\d+", d)]  # a run's own folders
    if not any(files for d in stages for _, _, files in os.walk(os.path.join(cfg.out_dir, d))):  # not a log beside
        return
    if old is None:  # a run writes it before anything else
        raise SystemExit(f"error: {cfg.out_dir} holds files but no config.json: {why}; restore it, or pass a new --out_dir")
    old = {k: old.get(k, getattr(OELConfig, k)) for k in asdict(cfg)}  # a setting newer than the run: its default
    diff = [k for k, v in asdict(cfg).items() if k not in RESUMABLE and not same_setting(k, old[k], v, cfg.game)]
    if diff:
        was = "; ".join(f"{k} {old[k]!r} there, {getattr(cfg, k)!r} now" for k in diff)
        raise SystemExit(f"error: {cfg.out_dir} holds a run made with other settings ({', '.join(diff)}) than now "
                         f"({was}); rerun with the same flags to resume it, or pass a new --out_dir")
    done = [r for r in range(old.get("rounds", 0)) if os.path.exists(os.path.join(cfg.out_dir, f"r{r}"))]
    if done and cfg.rounds <= done[-1]:  # metrics.jsonl would drop the later rounds
        raise SystemExit(f"error: {cfg.out_dir} already has round {done[-1]}: --rounds cannot go below {done[-1] + 1}")


def metric_text(key, value):
    """A metric as the logs show it: rates to 3 decimals, token and step counts to 1 (never 1.02e+03)."""
    return f"{value:.3f}" if key.endswith("rate") else f"{value:.1f}"


def run(cfg, device="cpu"):
    """The whole OEL loop; every stage found on disk is skipped. Returns the metrics rows (base model: round -1)."""
    os.makedirs(cfg.out_dir, exist_ok=True)
    check_resume(cfg)  # reads only: before the lock, which writes
    try:
        lock = open(os.path.join(cfg.out_dir, ".lock"), "w")  # held until this process ends
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise SystemExit(f"error: another run is using {cfg.out_dir}") from None
    except OSError as e:
        raise SystemExit(f"error: cannot write in {cfg.out_dir} ({e.strerror})") from None
    atomic_write(os.path.join(cfg.out_dir, "config.json"), json.dumps(asdict(cfg), indent=2))
    rows, ckpt = [], cfg.model  # ckpt: the model at the start of round r
    for r in range(-1, cfg.rounds):
        rdir = os.path.join(cfg.out_dir, "base" if r < 0 else f"r{r}")
        os.makedirs(rdir, exist_ok=True)
        if r >= 0:
            if not os.path.exists(os.path.join(rdir, "model")):
                train_round(cfg, r, rdir, ckpt, device)
            else:
                print(f"round {r} | {rdir}/model on disk, reused")
                try:
                    modeling.check_checkpoint(os.path.join(rdir, "model"))
                except modeling.CHECKPOINT_ERRORS as e:
                    raise SystemExit(f"error: {rdir}/model cannot be read back ({e}); delete the folder to redo "
                                     f"round {r}'s consolidation") from None
                Path(rdir, "consolidate.pt").unlink(missing_ok=True)  # killed between saving the model and this
            ckpt = os.path.join(rdir, "model")
        rows.append(evaluate_round(cfg, r, rdir, ckpt, device))  # 4. evaluate
        atomic_write(os.path.join(cfg.out_dir, "metrics.jsonl"), "".join(json.dumps(x) + "\n" for x in rows))
        keys = ("test_pass_rate", "test_tokens_per_turn", "test_mean_steps", "ood_pass_rate")
        shown = " | ".join(f"{k} {metric_text(k, rows[-1][k])}" for k in keys if k in rows[-1])
        print(f"{'base' if r < 0 else f'round {r}'} | eval | {shown}")
    return rows
