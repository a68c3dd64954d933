"""
The driver: the whole OEL loop on one GPU (or, with --model tiny, on a CPU in under a minute).

    python train.py                                   # Qwen3-1.7B (thinking) on FrozenLake, 2 rounds: the paper's cheapest setting
    python train.py --model tiny                      # offline tiny model, small sizes, CPU
    # Sokoban with Qwen3-4B-Instruct-2507, as the paper's code runs it:
    python train.py --model Qwen/Qwen3-4B-Instruct-2507 --game sokoban --thinking none --lr 1e-6 \
        --knowledge_budget 8192 --extract_max_new_tokens 8192 --show_knowledge true --n 50 --steps 100 \
        --n_train 6400 --rounds 3

Every flag is a field of oel.OELConfig (its comment is the help text). Rerunning the same command
resumes an interrupted run at its first unfinished stage.
"""

import argparse
import contextlib
import dataclasses
import errno
import inspect
import json
import math
import multiprocessing
import os
import re
import shutil
import signal
import sys
from pathlib import Path

try:  # importing torch takes seconds: a Ctrl-C then ends with one line too
    import torch

    import games
    import model as modeling
    import oel
except KeyboardInterrupt:
    print("\ninterrupted", file=sys.stderr)
    sys.exit(130)

# --model tiny: sizes that run the whole loop on a CPU in under a minute (flags given explicitly still win)
TINY_RUN = dict(out_dir="runs/tiny", n_train=8, n_test=8, n_ood=2, K=2, n=4, knowledge_budget=256, steps=4,
                batch_size=4, micro_batch=4, max_new_tokens=32, extract_max_new_tokens=32, max_turns=4, save_every=2)


def field_help():
    """The comment after each OELConfig field, used as its --help text."""
    src = inspect.getsource(oel.OELConfig)
    return {m[1]: m[2] for m in re.finditer(r"^\s+(\w+): .*?#\s*(.*)$", src, re.M)}


def parse_bool(s):
    if s.lower() not in ("true", "false", "1", "0"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")
    return s.lower() in ("true", "1")


def parse_bool_or_none(s):
    if s.lower() not in ("true", "false", "none", "1", "0"):
        raise argparse.ArgumentTypeError(f"expected true, false or none, got {s!r}")
    return None if s.lower() == "none" else parse_bool(s)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0],
                                epilog=f"--model tiny changes these defaults: {json.dumps(TINY_RUN)}")
    helps = field_help()
    for f in dataclasses.fields(oel.OELConfig):
        kind = {bool: parse_bool, bool | None: parse_bool_or_none}.get(f.type, type(f.default))
        p.add_argument(f"--{f.name}", type=kind, default=argparse.SUPPRESS,
                       choices=list(games.ENVS) if f.name in ("game", "ood_game") else None,
                       help=f"{helps.get(f.name, '')} (default: {f.default!r})")
    given = vars(p.parse_args(argv))  # only the flags given (--thinking none included)
    preset = TINY_RUN if given.get("model") == "tiny" else {}
    return oel.OELConfig(**{**preset, **given})


def first_line(e):
    """An exception's message cut to its first line ('' where it has none): errors from the Hub and torch run long."""
    return (str(e).strip().splitlines() or [""])[0]


def resolve_model(name, flag="--model"):
    """'tiny', a local checkpoint directory, or a Hub id fetched with huggingface_hub."""
    if name == "tiny" or os.path.isdir(name):
        return name
    if name.count("/") != 1 or os.path.sep + os.path.sep in name or name.startswith((".", "/")):
        raise SystemExit(f"error: {flag} {name!r} is not a checkpoint directory, 'tiny', or a Hub id (owner/name)")
    try:
        from huggingface_hub import snapshot_download
        return snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "tokenizer*"])
    except Exception as e:
        local = f"there is no folder {name}, and " if os.path.isdir(name.split("/")[0]) else ""  # runs/typo
        raise SystemExit(f"error: {local}could not fetch {name!r} from the Hub ({type(e).__name__}: {first_line(e)}); "
                         f"download it elsewhere and pass its directory to {flag}") from e


def check_settings(cfg):
    """Fail early, before any download, on settings that cannot work."""
    for name in ("rounds", "K", "n", "n_train", "n_test", "rollout_batch", "steps", "batch_size", "micro_batch",
                 "max_turns", "max_new_tokens", "extract_max_new_tokens", "knowledge_budget", "save_every"):
        if getattr(cfg, name) < 1:
            raise SystemExit(f"error: --{name} must be >= 1, got {getattr(cfg, name)}")
    for name in ("n_ood", "topk", "seed", "weight_decay"):
        if not 0 <= getattr(cfg, name) < math.inf:  # NaN fails too
            raise SystemExit(f"error: --{name} must be >= 0 (and finite), got {getattr(cfg, name)}")
    if max(cfg.n_train, cfg.n_test, cfg.n_ood) > games.MAX_GAMES:
        raise SystemExit(f"error: --n_train, --n_test and --n_ood must be <= {games.MAX_GAMES}")
    if cfg.n > cfg.n_train:
        preset = (f" (--model tiny sets --n {TINY_RUN['n']} and --n_train {TINY_RUN['n_train']} where they are not "
                  "given)" if cfg.model == "tiny" else "")
        raise SystemExit(f"error: --n {cfg.n} is more than --n_train {cfg.n_train}: each accumulation reads n of the "
                         f"round's deploy games{preset}")
    if not all(0 < x < math.inf for x in (cfg.lr, cfg.kl_temperature, cfg.grad_clip)):  # NaN fails too
        raise SystemExit("error: --lr, --kl_temperature and --grad_clip must be finite and > 0")
    if cfg.kl_temperature < modeling.MIN_TEMPERATURE:  # the student samples at it too
        raise SystemExit(f"error: --kl_temperature must be >= {modeling.MIN_TEMPERATURE}, the lowest sampling temperature")
    if cfg.context not in ("knowledge", "raw"):
        raise SystemExit(f"error: --context must be 'knowledge' or 'raw', got {cfg.context!r}")
    if cfg.context == "raw" and cfg.extractor:
        raise SystemExit("error: --extractor is unused with --context raw (nothing is extracted)")
    for g in (cfg.game, cfg.ood_game):
        if g not in games.ENVS:
            raise SystemExit(f"error: unknown game {g!r}; choose from {', '.join(games.ENVS)}")
    too_large = "level seeds would pass 2^32, and TextWorld takes 32-bit seeds"
    if cfg.game == "textworld" and oel.deploy_seed(cfg, cfg.rounds - 1) > games.TW_MAX_SET:
        raise SystemExit(f"error: --seed {cfg.seed} is too large for TextWorld with --rounds {cfg.rounds}: {too_large}")
    if cfg.ood_game == "textworld" and cfg.n_ood and cfg.seed > games.TW_MAX_SET:  # the OOD set is --seed's
        raise SystemExit(f"error: --seed {cfg.seed} is too large for the TextWorld --ood_game (at most "
                         f"{games.TW_MAX_SET}): {too_large}")
    try:
        check_game(cfg.game, cfg.game_options, cfg.max_turns, seed=cfg.seed)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    if cfg.n_ood and cfg.ood_game == cfg.game and oel.same_setting("game_options", cfg.game_options, "", cfg.game):
        raise SystemExit(f"error: --ood_game {cfg.ood_game} is the game trained on, with its default options (as the "
                         "out-of-distribution set plays it): pass another --ood_game, or --n_ood 0")


def check_game(game, options, max_turns, split="test", flag="--game_options", seed=0):
    """Before any work, build the first level of set `seed` of `split` (the run's own, so TextWorld generates no extra
    game) with these options and win it with the game's own solver, through the action parser. A game registered
    wrongly, bad JSON, unknown or mistyped options, settings that admit no level (the message names `flag`), and a
    solver or actions the rollouts could not play raise ValueError now rather than mid-run; a level longer than
    max_turns is warned of (it cannot be won)."""
    cls = games.ENVS.get(game)  # (an unknown game: make_games says so)
    if cls and (getattr(cls, "name", None) != game or not isinstance(getattr(cls, "instruction", None), str)):
        raise ValueError(f"games.ENVS[{game!r}] is {cls.__name__}: it needs name = {game!r} (trajectories carry it, "
                         "and consolidation rebuilds prompts from it) and an instruction string (see games.py)")
    try:
        env = games.make_games(game, split, 1, seed, **oel.game_settings(options))[0]  # ValueError: JSON, names, types...
        env.reset()  # RuntimeError: no level with these settings (any other error is the game's bug: a traceback)
    except (ValueError, RuntimeError) as e:
        raise ValueError(f"{flag} {options!r} for {game}: {e}") from None
    where = f"{game} with {flag} {options!r}: the first {split} level"
    try:
        plan, info = env.solve(), {"won": False}
        if plan is None:
            raise ValueError(f"{where} has no solution")
        if len(plan) > max_turns:  # levels differ in length, so only a warning
            print(f"warning: {where} takes {len(plan)} moves, more than --max_turns {max_turns}: no game that long can "
                  "be won")
        for a in plan:
            action = games.parse_action(f"[{a}]", env.valid_actions())
            if action != a:
                raise ValueError(f"{where}: its solver's action {a!r} reads back from a reply as {action!r} "
                                 "(actions are lower-case strings of valid_actions())")
            info = env.step(action)[3]
        if not info["won"]:
            raise ValueError(f"{where}: its solver's plan does not win it")
    finally:
        env.close()


def check_checkpoints(cfg):
    """Fail early on settings that cannot work with the (resolved) checkpoints."""
    path, mc = checkpoint_or_exit("--model", cfg.model)
    readers = [("model", path, mc)] + ([("extractor", *checkpoint_or_exit("--extractor", cfg.extractor))]
                                      if cfg.extractor else [])
    if cfg.topk >= mc.vocab_size:
        raise SystemExit(f"error: --topk {cfg.topk} must be below the vocabulary size {mc.vocab_size} (0: the exact KL)")
    # the extraction prompt holds the knowledge, a whole trajectory (observations and responses) and the response
    for who, where, c in readers:
        obs = observation_tokens(modeling.Tokenizer(where), cfg.game, cfg.game_options, seed=cfg.seed)
        need = cfg.knowledge_budget + cfg.max_turns * (obs + cfg.max_new_tokens) + cfg.extract_max_new_tokens
        if need > c.max_position_embeddings:
            raise SystemExit(f"error: knowledge budget + trajectory + response need ~{need} tokens ({cfg.max_turns} "
                             f"turns of ~{obs} observation tokens), more than the {who}'s context of "
                             f"{c.max_position_embeddings}; lower --knowledge_budget, --max_new_tokens, "
                             "--extract_max_new_tokens or --max_turns, or play smaller levels")
    if cfg.model != "tiny":
        P = num_params(mc)
        disk = (4 * cfg.rounds + 2 * 12) * P  # float32 round checkpoints; consolidation state (weights + Adam) twice while replaced
        make_out_dir(cfg.out_dir)
        free = shutil.disk_usage(cfg.out_dir).free
        if free < disk:
            raise SystemExit(f"error: {cfg.out_dir} has {free / 2**30:.0f} GiB free; "
                             f"the run needs ~{disk / 2**30:.0f} GiB (checkpoints and consolidation state)")
        # float32 weights and gradients (and Adam's moments, unless offloaded); the bfloat16 teacher and sampling copy
        gpu = (12 if cfg.offload_optimizer else 20) * P
        if torch.cuda.is_available() and torch.cuda.get_device_properties(0).total_memory < gpu:
            raise SystemExit(f"error: training a {P / 1e9:.1f}B model needs ~{gpu / 2**30:.0f} GiB of GPU memory "
                             "before activations; this GPU has less" +
                             ("" if cfg.offload_optimizer else " (--offload_optimizer true needs 12 bytes a parameter)"))


def make_out_dir(path):
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise SystemExit(f"error: --out_dir {path}: {e}") from None


def observation_tokens(tok, game, options, split="test", seed=0):
    """Rough token count of one observation in a prompt, from the first level of set `seed` of `split`: its first
    observation, plus the action and feedback around later ones; at least 512."""
    env = games.make_games(game, split, 1, seed, **oel.game_settings(options))[0]
    return max(512, len(tok.encode(games.first_observation(env))) + 64)


def checkpoint_or_exit(flag, path) -> tuple[Path, modeling.ModelConfig]:
    """model.check_checkpoint (config, tokenizer, weight headers; no weights read) with a one-line error: (directory,
    config)."""
    has_config = os.path.isfile(os.path.join(path, "config.json"))
    if not has_config and os.path.isfile(os.path.join(path, "model", "config.json")):
        raise SystemExit(f"error: {flag} {path} is a round folder of a train.py run; pass its checkpoint, "
                         f"{os.path.join(path, 'model')}")
    if has_config and os.path.isdir(os.path.join(path, "base")):
        raise SystemExit(f"error: {flag} {path} is a train.py run folder; pass one of its checkpoints, e.g. "
                         f"{os.path.join(path, 'r0', 'model')}")
    try:
        return modeling.check_checkpoint(path)
    except modeling.CHECKPOINT_ERRORS as e:
        raise SystemExit(f"error: {flag} {path}: {e}") from None


def num_params(mc):
    """Parameter count implied by a ModelConfig."""
    attn = mc.hidden_size * mc.head_dim * (2 * mc.num_attention_heads + 2 * mc.num_key_value_heads)
    layer = attn + 3 * mc.hidden_size * mc.intermediate_size
    return mc.vocab_size * mc.hidden_size * (1 if mc.tie_word_embeddings else 2) + mc.num_hidden_layers * layer


def check(cfg):
    """Both checks, for a config whose checkpoints are already local (tests; main resolves Hub ids between them)."""
    check_settings(cfg)
    check_checkpoints(cfg)


def cli(main, lower="--rollout_batch (games or samples generated at once) or --micro_batch (prompts per forward and "
        "backward), or pass --offload_optimizer true, and rerun: the run resumes where it stopped"):
    """Run main(), turning seven more ends into one line each: a Ctrl-C outside stop_on_ctrl_c (the checks, a
    download, the tiny preset's build, the last writes; after the KeyboardInterrupt has cleaned up), NoLevel from a
    level after the first (the checks build only the first), weights found to hold NaN when they are read, the GPU
    out of memory (saying to lower the settings `lower` names), a full disk, a file it may not read or write (a
    read-only cache), and stdout's reader gone (`| head`; files are written whole or not at all, so a run resumes)."""
    try:
        main()
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's exit flush would fail again
        sys.exit("stopped: the program reading the output closed it")
    except games.NoLevel as e:
        sys.exit(f"error: {e}; the checks at the start built the first level with these settings, but not this one")
    except modeling.NonFinite as e:  # found when a checkpoint's weights are read, after the checks
        sys.exit(f"error: {e}")
    except (OSError, RuntimeError) as e:
        # torch >= 2.8 raises an AcceleratorError for an OOM while a CUDA graph is recorded (pytorch#159594)
        accelerator = getattr(torch, "AcceleratorError", ())
        if isinstance(e, torch.cuda.OutOfMemoryError) or isinstance(e, accelerator) and "out of memory" in str(e):
            why = first_line(e)
            sys.exit(f"error: out of GPU memory: lower {lower}" + (f" ({why})" if why else ""))
        if isinstance(e, OSError) and e.errno in (errno.EACCES, errno.EPERM, errno.EROFS) and e.filename:
            cache = os.path.abspath(games.cache_dir())
            in_cache = os.path.commonpath([os.path.abspath(e.filename), cache]) == cache
            hint = "; set OEL_CACHE to a folder you can write" if in_cache else ""
            sys.exit(f"error: {e.strerror}: {e.filename}{hint}")  # e.g. a read-only cache that lacks the games
        full = e if isinstance(e, OSError) else e.__context__  # torch.save to a Python file: RuntimeError after OSError
        if not isinstance(full, OSError) or full.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        where = f" writing {full.filename}" if full.filename else ""
        sys.exit(f"error: the disk is full{where} ({full.strerror}): free some space and rerun the same command; what "
                 "was finished is kept")


@contextlib.contextmanager
def stop_on_ctrl_c(advice):
    """Ctrl-C, or a SIGTERM (`kill`, a scheduler's time limit), stops the process and its workers at once, as a kill
    would (files are written whole or not at all), with one line; exit status 128 + the signal's number."""
    def on_ctrl_c(signum, frame):
        try:
            sys.stdout.flush()
        except (RuntimeError, ValueError):  # interrupted inside a write to stdout
            pass
        for p in multiprocessing.active_children():  # e.g. games.pregenerate's workers: they share our stderr
            p.kill()
        os.write(2, f"\ninterrupted: {advice}\n".encode())
        os._exit(128 + signum)  # no KeyboardInterrupt: raised inside native code it can surface as another error

    previous = {s: signal.signal(s, on_ctrl_c) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def summary(rows):
    cols = [("round", "round"), ("test_pass_rate", "test pass"), ("test_tokens_per_turn", "tok/turn"),
            ("test_mean_steps", "steps"), ("ood_pass_rate", "ood pass")]
    lines = [" | ".join(f"{h:>10}" for _, h in cols)]
    for r in rows:
        cells = ["base" if r["round"] < 0 else r["round"]] + [oel.metric_text(k, r[k]) if k in r else "-"
                                                              for k, _ in cols[1:]]  # "-": no OOD set
        lines.append(" | ".join(f"{c:>10}" for c in cells))
    return "\n".join(lines)


def main(argv=None):
    cfg = parse_args(argv)
    check_settings(cfg)
    cfg.model = resolve_model(cfg.model)
    if cfg.extractor:
        cfg.extractor = resolve_model(cfg.extractor, "--extractor")
    check_checkpoints(cfg)
    make_out_dir(cfg.out_dir)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"oel | model {cfg.model} | game {cfg.game} | {cfg.rounds} rounds | device {device} | out {cfg.out_dir}")
    print(json.dumps(dataclasses.asdict(cfg)))

    with stop_on_ctrl_c(f"rerun the same command to resume {cfg.out_dir}"):
        rows = oel.run(cfg, device=device)
    print(summary(rows))


if __name__ == "__main__":
    cli(main)
