"""
Evaluate any checkpoint on any game set in the paper's comparison modes, or plot a run.

    python eval.py --model runs/oel/r1/model --game frozenlake --mode none
    python eval.py --model Qwen/Qwen3-1.7B --mode knowledge --context runs/oel/r0/pool.json
    python eval.py --model Qwen/Qwen3-1.7B --mode raw --context runs/oel/r0/deploy.jsonl --budget 8192
    python eval.py --plot runs/oel                    # runs/oel/metrics.png: pass rate and length per round

Modes: `none` (no context), `knowledge` (extracted knowledge in the prompt: a .md file, or a
pool.json whose K texts are spread evenly over the games), `raw` (raw trajectories in the prompt,
newest first, capped at the same token budget by dropping whole trajectories).
"""

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

try:  # importing torch takes seconds: a Ctrl-C then ends with one line too
    import torch

    import games
    import model as modeling
    import oel
    from train import (check_game, checkpoint_or_exit, cli, observation_tokens, parse_bool_or_none, resolve_model,
                       stop_on_ctrl_c)
except KeyboardInterrupt:
    print("\ninterrupted", file=sys.stderr)
    sys.exit(130)


def contexts(mode, path, tok, budget, loaded=None):
    """The list of context texts for a mode (one per group of games); [None] for no context. loaded: the file as
    read_context returned it (knowledge texts or trajectories), when already read."""
    if mode == "none":
        return [None]
    loaded = read_context(mode, path) if loaded is None else loaded
    if not loaded or (mode == "knowledge" and not any(t.strip() for t in loaded)):
        raise SystemExit(f"error: {path} holds no {mode} context (every text in it is empty)")
    if mode == "knowledge":
        texts = ["\n".join(oel.trim_knowledge(t.splitlines(), tok, budget)) for t in loaded]
    else:
        texts = [oel.raw_context(loaded, tok, budget)]
    if not any(texts):
        raise SystemExit(f"error: nothing of {path} fits in a budget of {budget} tokens: the {mode} context is empty "
                         "(raise --budget)")
    if not all(texts):
        print(f"warning: {sum(not t for t in texts)} of the {len(texts)} contexts in {path} are empty")
    return texts


def read_context(mode, path):
    """The context file of a mode: knowledge texts (a .md/.txt file, or a pool.json list of them) or trajectories
    (a .jsonl file); a one-line error for anything else."""
    if not (path and os.path.isfile(path)):
        raise SystemExit(f"error: --mode {mode} needs --context pointing to an existing file, got {path!r}")
    if mode == "knowledge" and path.endswith(".jsonl"):
        raise SystemExit(f"error: --context {path} holds trajectories; use --mode raw, or pass knowledge "
                         "(.md, pool.json)")
    if mode == "raw" and path.endswith((".md", ".txt", ".json")):
        raise SystemExit(f"error: --context {path} holds knowledge; use --mode knowledge, or pass trajectories "
                         "(a run's deploy.jsonl)")
    try:
        if mode == "raw":
            return games.load_trajectories(path)
        if not path.endswith(".json"):
            return [open(path, encoding="utf-8").read()]
        texts = json.load(open(path, encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError, a malformed trajectory line, binary data
        raise SystemExit(f"error: --context {path} is not a {mode} context file: {e}") from None
    if not (isinstance(texts, list) and all(isinstance(t, str) for t in texts)):
        raise SystemExit(f"error: --context {path}: a .json knowledge file is a list of texts (like pool.json)")
    return texts


def run_setting(key, *paths):
    """A setting of the train.py run folder holding the first of `paths` that lies in one, at any depth
    (r{r}/model, r{r}/pool.json, r{r}/knowledge/*.md), read from its config.json; OELConfig's default outside a
    run. Gives a run's checkpoints (or a model given a run's context) the run's game and chat mode, and raw
    trajectories and knowledge the run's token budget."""
    for path in paths:
        for folder in Path(path).resolve().parents if path else ():
            file = folder / "config.json"
            if file.exists() and isinstance(cfg := oel.read_back(str(file)), dict) and key in cfg:
                return cfg[key]
    return getattr(oel.OELConfig, key)


def check_args(p, a):
    """Reject settings that cannot work, before a model is loaded; returns the context file as read (or None)."""
    if not (1 <= a.n <= games.MAX_GAMES and a.seed >= 0 and min(a.max_turns, a.max_new_tokens, a.rollout_batch) >= 1):
        p.error(f"need 1 <= --n <= {games.MAX_GAMES}, --seed >= 0, and --max_turns, --max_new_tokens and "
                "--rollout_batch >= 1")
    if a.game == "textworld" and a.seed > games.TW_MAX_SET:
        p.error(f"--seed {a.seed}: TextWorld's level sets go up to {games.TW_MAX_SET} (it takes 32-bit level seeds)")
    if a.budget is not None and a.budget < 1:
        p.error(f"--budget must be >= 1, got {a.budget}")
    for flag in ("context", "budget"):
        if a.mode == "none" and getattr(a, flag) is not None:
            p.error(f"--{flag} is only read by --mode knowledge or raw")
    if a.out and not os.path.isdir(os.path.dirname(os.path.abspath(a.out))):
        p.error(f"--out {a.out}: its folder does not exist")
    try:
        check_game(a.game, a.options, a.max_turns, a.split, "--options", a.seed)
    except ValueError as e:
        p.error(str(e))
    return None if a.mode == "none" else read_context(a.mode, a.context)


def fill_defaults(a):
    """Unset flags take the setting of the run that made --model, else of the run --context comes from, else
    OELConfig's; --split ood without --game plays that run's ood_game with its default options."""
    runs = (a.model if os.path.isdir(a.model) else None, a.context)
    run_ood = a.split == "ood" and "game" not in vars(a)
    a.game = vars(a).get("game", run_setting("ood_game" if run_ood else "game", *runs))
    own = a.game == run_setting("game", *runs) and not run_ood
    a.options = vars(a).get("options", run_setting("game_options", *runs) if own else "")
    for key in ("max_turns", "max_new_tokens", "thinking", "seed", "rollout_batch"):
        setattr(a, key, vars(a).get(key, run_setting(key, *runs)))
    size = {"test": "n_test", "ood": "n_ood"}.get(a.split)  # the run's set; 128 games of another split
    a.n = vars(a).get("n", (size and run_setting(size, *runs)) or 128)


def result_name(a, budget):
    """Every setting that changes a result, e.g. frozenlake-size4_test_n128_s0_think_knowledge_r0-pool-1a2b3c:
    game options and limits only where not the defaults; the context by folder, name and a hash of its path and
    budget."""
    key = f"{Path(a.context).resolve()}:{budget}".encode() if a.context else b""
    tag = f"_{Path(a.context).parent.name}-{Path(a.context).stem}-{hashlib.sha1(key).hexdigest()[:6]}" \
        if a.context else ""
    chat = {True: "think", False: "nothink", None: "instruct"}[a.thinking]
    defaults = games.ENVS[a.game]()
    game = a.game + "".join(f"-{k}{v}" for k, v in sorted(oel.game_settings(a.options).items())
                            if v != getattr(defaults, k))  # frozenlake-size4
    limits = "".join(f"_{c}{getattr(a, k)}" for c, k in (("t", "max_turns"), ("m", "max_new_tokens"),
                     ("b", "rollout_batch")) if getattr(a, k) != getattr(oel.OELConfig, k))
    return f"{game}_{a.split}_n{a.n}_s{a.seed}_{chat}{limits}_{a.mode}{tag}"


def check_writable(p, out):
    """Before any game: the result and its trajectories can be written (a read-only folder, a folder in the way)."""
    for f in (out, out.removesuffix(".json") + ".jsonl"):
        if os.path.isdir(f):
            p.error(f"the result {f} would replace a folder; pass --out FILE.json")
        try:
            open(f"{f}.tmp", "w").close()
            os.remove(f"{f}.tmp")
        except OSError as e:
            p.error(f"cannot write the result {f} ({e.strerror}); pass another --out")


def default_out(model, what):
    """Results of a checkpoint folder go beside it, named after it unless it is a run's `model` folder
    (runs/oel/r1/model -> runs/oel/r1/eval_*.json, ckpts/a -> ckpts/eval_a_*.json: sibling checkpoints do not
    overwrite each other's); a Hub id's or tiny's go here."""
    if os.path.isdir(model) and model != "tiny":
        folder = Path(model).resolve()
        name = "" if folder.name == "model" else f"{folder.name}_"
        return str(folder.parent / f"eval_{name}{what}.json")
    return f"eval_{model.replace('/', '--')}_{what}.json"


def plot(run_dir):
    """PNG of test pass rate and response tokens per turn against the round, from metrics.jsonl."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(os.path.join(run_dir, "config.json")):
        raise SystemExit(f"error: {run_dir} is not a train.py run folder (no config.json)")
    lines = lambda p: [json.loads(line) for line in open(p, encoding="utf-8") if line.strip()]
    rows = oel.read_back(path, lines) if os.path.exists(path) else []
    if not rows:
        raise SystemExit(f"error: {run_dir} has no results yet: not even the base model's evaluation has finished")
    x = [r["round"] for r in rows]  # -1: the base model; r: after round r's consolidation (as in metrics.jsonl)
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    a.plot(x, [100 * r["test_pass_rate"] for r in rows], "o-", label="test")
    if "ood_pass_rate" in rows[0]:
        a.plot(x, [100 * r["ood_pass_rate"] for r in rows], "s--", label="out-of-distribution")
    names = ["base" if r < 0 else str(r) for r in x]
    a.set(xlabel="after round", ylabel="pass rate (%)", xticks=x, xticklabels=names, ylim=(0, 100))
    a.legend()
    b.plot(x, [r["test_tokens_per_turn"] for r in rows], "o-")
    b.set(xlabel="after round", ylabel="response tokens per turn", xticks=x, xticklabels=names)
    fig.tight_layout()
    out = os.path.join(run_dir, "metrics.png")
    try:
        fig.savefig(out, dpi=120)
    except OSError as e:
        raise SystemExit(f"error: cannot write {out} ({e.strerror or e})") from None
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description="Evaluate a checkpoint on a game set, or plot a run folder.")
    p.add_argument("--model", help="checkpoint dir, Hub id, or 'tiny'")
    p.add_argument("--game", default=argparse.SUPPRESS, choices=list(games.ENVS),
                   help="default (as for --options, --max_turns, --max_new_tokens, --thinking and --rollout_batch): the "
                   "setting of the run that made --model, or else of the run --context comes from (with --split ood: "
                   "its ood_game, default options), else OELConfig's")
    p.add_argument("--split", default="test", choices=games.SPLITS, help="level set (default: test)")
    p.add_argument("--n", type=int, default=argparse.SUPPRESS, help="number of games (default: as for --game, the "
                   "run's n_test for --split test and its n_ood for ood, OELConfig's outside a run; 128 for train, "
                   "and for ood after a run without an OOD set)")
    p.add_argument("--options", "--game_options", dest="options", default=argparse.SUPPRESS,
                   help="JSON settings of the game, e.g. '{\"size\": 4, \"holes\": 3}'")
    p.add_argument("--seed", type=int, default=argparse.SUPPRESS, help="seed of the level set and sampling (default: "
                   "as for --game, so a run's checkpoint plays the run's own held-out levels)")
    p.add_argument("--mode", default="none", choices=["none", "knowledge", "raw"],
                   help="what goes into the prompt (default: none)")
    p.add_argument("--context", help="knowledge .md / pool.json (mode knowledge) or trajectories .jsonl (mode raw)")
    p.add_argument("--budget", type=int, help="token budget of the context (default: knowledge_budget of the run "
                   "folder holding --context, else OELConfig's)")
    p.add_argument("--thinking", type=parse_bool_or_none, default=argparse.SUPPRESS,
                   help="true | false | none (instruct models); default: as for --game")
    p.add_argument("--max_turns", type=int, default=argparse.SUPPRESS, help="default: as for --game")
    p.add_argument("--max_new_tokens", type=int, default=argparse.SUPPRESS, help="default: as for --game")
    p.add_argument("--rollout_batch", type=int, default=argparse.SUPPRESS, help="games played at once (each batch "
                   "samples with its own seed: with the run's, a run's checkpoint replays the run's evaluation, unless "
                   "it was resumed with another --rollout_batch); default: as for --game")
    p.add_argument("--out", help="result JSON (default: eval_[<folder>_]<settings>.json beside a checkpoint folder, "
                   "<folder> left out for a run's model folder; eval_<model>_<settings>.json here for a Hub id or "
                   "tiny; <settings>: game[-<option><value>...]_<split>_n<n>_s<seed>_<chat>[_t<max_turns>]"
                   "[_m<max_new_tokens>][_b<rollout_batch>]_<mode>[_<context>], options and limits only "
                   "where not the defaults)")
    p.add_argument("--plot", metavar="RUN_DIR", help="only write RUN_DIR/metrics.png")
    a = p.parse_args(argv)
    if a.plot:
        print(plot(a.plot))
        return
    if not a.model:
        p.error("--model is required unless --plot is given")
    fill_defaults(a)
    loaded = check_args(p, a)  # the context file, read before loading a model
    budget = a.budget if a.budget is not None else run_setting("knowledge_budget", a.context)
    out = a.out or default_out(a.model, result_name(a, budget))
    check_writable(p, out)
    path = resolve_model(a.model)
    directory, mc = checkpoint_or_exit("--model", path)
    tok = modeling.Tokenizer(directory)
    obs = observation_tokens(tok, a.game, a.options, a.split, a.seed)
    need = (budget if a.mode != "none" else 0) + a.max_turns * obs + a.max_new_tokens  # context, observations, reply
    if need > mc.max_position_embeddings:
        p.error(f"context budget + turns need ~{need} tokens ({a.max_turns} observations of ~{obs}), more than the "
                f"model's context of {mc.max_position_embeddings}; lower --budget, --max_turns or --max_new_tokens, "
                "or play smaller levels")
    ctxs = contexts(a.mode, a.context, tok, budget, loaded)  # an empty context stops here, before the model loads
    device = "cuda" if torch.cuda.is_available() else "cpu"
    m, _ = modeling.load(path, device=device, dtype=oel.infer_dtype(device))  # the tokenizer is read above
    rcfg = oel.rollout_cfg(a)  # the flags' turns, tokens and chat mode; the paper's sampling
    with stop_on_ctrl_c("the evaluation stopped; rerun it to start over"):
        trajs = oel.play(m, tok, a.game, a.split, a.n, a.seed, rcfg, ctxs, batch=a.rollout_batch,
                         options=oel.game_settings(a.options))
    metrics = games.metrics(trajs)
    setting = {k: getattr(a, k) for k in ("model", "game", "split", "n", "seed", "options", "mode", "context",
                                          "thinking", "max_turns", "max_new_tokens", "rollout_batch")}
    games.save_trajectories(out.removesuffix(".json") + ".jsonl", trajs)  # first: a result comes with its games
    empty = sum(c == "" for c in ctxs)  # texts the budget emptied: their share of the games had no context (warned)
    oel.atomic_write(out, json.dumps({**setting, "budget": budget if ctxs != [None] else None, "empty_contexts": empty,
                                      **metrics}, indent=2))
    print(json.dumps(metrics))
    print(f"wrote {out} and its trajectories, {out.removesuffix('.json')}.jsonl")


if __name__ == "__main__":
    cli(main, lower="--rollout_batch (games played at once)")
