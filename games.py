"""
Text games and the rollout engine: what the model plays, and how its play is recorded.

A game is a dataclass registered in ENVS, with:
  name, instruction   ClassVars: its ENVS key; the prompt's rules-free instruction, asking for an [action]
  its fields          its settings, typed (--game_options sets them from JSON; __post_init__ raises ValueError
                      on bad ones; none named `exclude`), plus `seed`, the level
  reset(seed=None)    -> the first observation (NoLevel, a RuntimeError, when the settings admit no level). It
                      identifies the level: deploy games leave out levels that start like a test level, so
                      levels that differ should start differently
  step(action)        -> observation, reward, done, info {'won'} (RuntimeError once done)
  solve()             -> winning actions from the current state; None if none (Sokoban: none within max_moves)
  valid_actions()     -> the lower-case action strings;  close()

The games:
- FrozenLake and Sokoban: plain-Python versions of TextArena's FrozenLake-v0 and Sokoban-v0 (same boards
  and rules, checked move by move against TextArena in tests; messages close to its own). Levels come from a
  seed and are resampled until the BFS solver solves them (Sokoban: in 2 to 5 moves, so every level can be
  won within the default 5 turns). Unlike TextArena: no w/a/s/d aliases, reward 1 only on a win (no partial
  credit), an invalid move only wastes the turn, and Sokoban rooms come from a random walk plus the solver
  rather than from reverse play.
- TextWorld: coin collector, treasure hunter and cooking games generated with the `textworld` package (several
  at a time in worker processes: `pregenerate`), cached under $OEL_CACHE/textworld (default ~/.cache/oel), played
  through its interpreter.

Agent protocol (as in the paper): every turn is ONE fresh user message, the short generic instruction of
`user_prompt` plus the observation history so far (never the model's earlier responses). The rules of the
game are not stated. The action is the last [bracketed] valid action anywhere in the response, thinking
included (as the paper's code reads it); none wastes the turn with a feedback message (which names an invalid
bracket, cut to MAX_INVALID characters). At most `max_turns` turns per episode.

Rollouts play many games in lockstep: each turn, the next move of every unfinished game comes from ONE
batched `model.generate` call. Trajectories are saved as JSONL, one episode per line.
"""

import errno
import json
import multiprocessing
import os
import random
import re
import shutil
import signal
import sys
import tempfile
import time
import types
import typing
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from typing import ClassVar

from tqdm import tqdm

SPLITS = ("train", "test", "ood")  # disjoint level seeds: seed % 3 is the split's index
MAX_GAMES = 10_000  # games per (split, seed) set; keeps the level seeds of different sets disjoint
TW_MAX_SET = 2**32 // (3 * MAX_GAMES) - 1  # the largest TextWorld set seed: its level seeds stay below 2^32
# (TextWorld takes 32-bit seeds)
MAX_INVALID = 40  # characters of an invalid bracketed action the feedback and history repeat
MAX_SIZE = 64  # board side: a 64x64 FrozenLake board is ~50k characters already (bigger ones hang level search)
MOVES = {"up": (-1, 0), "down": (1, 0), "left": (0, -1), "right": (0, 1)}
VALID_MOVES = ", ".join(f"[{m}]" for m in MOVES)
KNOWLEDGE_HEADING = ("## Knowledge from earlier games (your guesses at the rules and strategies: maybe incomplete "
                     "or wrong)")


class NoLevel(RuntimeError):
    """A game's settings admit no level for this seed (train.py and eval.py stop with the message, not a traceback)."""


def invalid(action: str | None, valid: str) -> str:
    what = "Invalid action: no action in square brackets found." if action is None else f"Invalid action [{action}]."
    return f"{what} Valid actions: {valid}."


BFS_LIMIT = 200_000  # states the solver explores before it gives up


def bfs(start, nxt, won, depth=None) -> tuple[list[str] | None, int]:
    """Fewest moves from `start` to a state where won(state), and the number of states reached; nxt(state, move) is
    the next state, or None when the move is blocked or loses. None if no solution within BFS_LIMIT states (or
    `depth` moves)."""
    prev, queue = {start: None}, deque([(start, 0)])
    while queue:
        s, d = queue.popleft()
        if won(s):
            path = []
            while prev[s] is not None:
                s, move = prev[s]
                path.append(move)
            return path[::-1], len(prev)
        if d == depth:
            continue
        for move in MOVES:
            t = nxt(s, move)
            if t is not None and t not in prev and len(prev) < BFS_LIMIT:
                prev[t] = (s, move)
                queue.append((t, d + 1))
    return None, len(prev)


# ----------------------------------------------------------------------------- FrozenLake and Sokoban


class Board:
    """What the two board games share: a level from text, its solution length, and the turn logic around move()."""
    instruction: ClassVar[str] = (
        "You are playing a game on a board. You are the player, shown as `P`. Reach the goal in as few steps as "
        f"possible.\nAvailable actions: {VALID_MOVES}.\nWrap your final action in square brackets, e.g. [up]. Only "
        "the last bracketed action in your reply counts.")

    def close(self):  # nothing to release (TextWorld closes its interpreter)
        pass

    def valid_actions(self) -> set[str]:
        return set(MOVES)

    def load(self, board: str) -> str:
        """Set a level from text, one row per line, and return the observation. FrozenLake: 'P' start, 'G' goal,
        'H' hole, '.' ice. Sokoban, as TextArena draws it: '#' wall, '_' floor, 'O' target, 'X' box, '√' box on
        target, 'P' player."""
        rows = [row.split() if " " in row else list(row) for row in board.strip().splitlines()]
        self.shape = (len(rows), len(rows[0]))
        self.done, self.won = False, False
        self.setup({(r, c): x for r, row in enumerate(rows) for c, x in enumerate(row)})
        solution = self.solve()
        self.optimal = None if solution is None else len(solution)  # fewest moves to win; None: see solve()
        return self.observation()

    def step(self, action: str | None):
        if self.done:
            raise RuntimeError("the game is over: call reset()")
        msg = self.move(action) if action in MOVES else invalid(action, VALID_MOVES)
        return f"{msg}\n\n{self.observation()}", float(self.won), self.done, {"won": self.won}


@dataclass
class FrozenLake(Board):
    """TextArena FrozenLake-v0: walk from the top-left corner to the goal G (bottom-right) around the holes H.
    Walking off the board is a wasted move; walking into a hole ends the game, lost."""
    name: ClassVar[str] = "frozenlake"
    size: int = 3  # the board is size x size (paper: 3; TextArena's default: 4)
    holes: int = 2  # exact number of holes (paper: 2)
    seed: int | None = None  # the level; make_games sets it, reset() without a seed uses it

    def __post_init__(self):
        if not 2 <= self.size <= MAX_SIZE or not 0 <= self.holes <= (self.size - 1) ** 2:
            raise ValueError(f"FrozenLake: need 2 <= size <= {MAX_SIZE} and 0 <= holes <= (size-1)^2 so a path can "
                             f"exist, got size={self.size}, holes={self.holes}")

    def reset(self, seed: int | None = None) -> str:
        self.seed = self.seed if seed is None else seed
        rng, n = random.Random(self.seed), self.size
        inner = [(r, c) for r in range(n) for c in range(n) if (r, c) not in ((0, 0), (n - 1, n - 1))]
        tries = min(100_000, 2_500_000 // n**2)  # a try costs ~n^2: a few seconds at most, whatever the size
        for _ in range(tries):
            holes = set(rng.sample(inner, self.holes))
            cell = lambda p: "P" if p == (0, 0) else "G" if p == (n - 1, n - 1) else "H" if p in holes else "."
            obs = self.load("\n".join("".join(cell((r, c)) for c in range(n)) for r in range(n)))
            if self.optimal is not None:
                return obs
        raise NoLevel(f"FrozenLake: no solvable {n}x{n} board with {self.holes} holes in {tries:,} random boards; "
                      "use fewer holes")

    def setup(self, cells: dict):
        self.cells, self.hole_cells = set(cells), {p for p, x in cells.items() if x == "H"}
        self.goal = next(p for p, x in cells.items() if x == "G")
        self.pos = next(p for p, x in cells.items() if x == "P")

    def _next(self, pos, move):
        p = (pos[0] + MOVES[move][0], pos[1] + MOVES[move][1])
        return p if p in self.cells else None

    def solve(self) -> list[str] | None:
        nxt = lambda p, m: (q if (q := self._next(p, m)) not in self.hole_cells else None)
        return bfs(self.pos, nxt, lambda p: p == self.goal)[0]

    def move(self, action: str) -> str:
        if (pos := self._next(self.pos, action)) is None:
            return f"You tried to move {action} but hit a wall!"
        self.pos, msg = pos, f"You moved {action} to position ({pos[0]}, {pos[1]})."
        if pos in self.hole_cells:
            self.done, msg = True, msg + "\nYou fell into a hole! Game over."
        elif pos == self.goal:
            self.done, self.won, msg = True, True, msg + "\nCongratulations! You reached the goal!"
        return msg

    def board(self) -> str:
        line = "+" + "+".join(["-----"] * self.shape[1]) + "+"
        def cell(p):
            if p == self.pos:
                return "P/G" if p == self.goal else "P"
            return "H" if p in self.hole_cells else "G" if p == self.goal else " "
        R, C = self.shape
        rows = ["|" + "|".join(f" {cell((r, c)):^3} " for c in range(C)) + "|" for r in range(R)]
        return "\n".join([line] + [x for row in rows for x in (row, line)])

    def observation(self) -> str:
        return f"Current Board:\n\n{self.board()}\n\nAvailable Actions: {VALID_MOVES}"


@dataclass
class Sokoban(Board):
    """TextArena Sokoban-v0: push every box X onto a target O. Walking into a wall, or pushing a box into a wall or
    another box, is a wasted move. There is no losing state: a stuck box just means the turns run out."""
    name: ClassVar[str] = "sokoban"
    size: int = 6  # the room is size x size, outer ring wall (paper: 6)
    boxes: int = 1  # boxes, and as many targets (paper: 1)
    min_moves: int = 2  # levels solved in fewer moves count as trivial and are resampled
    max_moves: int | None = 5  # levels needing more moves are resampled: winnable within 5 turns (None: any the
    # solver finds within BFS_LIMIT states)
    seed: int | None = None  # the level; make_games sets it, reset() without a seed uses it

    def __post_init__(self):
        if not 5 <= self.size <= MAX_SIZE or self.boxes < 1 or 2 * self.boxes + 1 > (self.size - 2) ** 2 // 2:
            raise ValueError(f"Sokoban: need 5 <= size <= {MAX_SIZE} and boxes >= 1, with boxes, targets and player "
                             f"taking at most half the cells inside the walls; got size={self.size}, boxes={self.boxes}")
        if self.min_moves < 0 or (self.max_moves is not None and self.min_moves > self.max_moves):
            raise ValueError(f"Sokoban: need 0 <= min_moves <= max_moves, got {self.min_moves} and {self.max_moves}")

    def reset(self, seed: int | None = None) -> str:
        self.seed = self.seed if seed is None else seed
        rng, n, k = random.Random(self.seed), self.size, self.boxes
        # at most 10,000 rooms and as many solver states as they may take at the default max_moves = 5 (1,365 each):
        # about a minute, whatever max_moves (None: up to BFS_LIMIT states a room)
        budget, tries = 10_000 * 1365, 0
        while tries < 10_000 and budget > 0:
            tries += 1
            floor = carve(rng, n)
            if len(floor) < 2 * k + 3:
                continue
            player, *rest = rng.sample(sorted(floor), 2 * k + 1)
            items = {player: "P", **{p: "O" for p in rest[:k]}, **{p: "X" for p in rest[k:]}}
            obs = self.load("\n".join(" ".join(items.get((r, c), "_") if (r, c) in floor else "#"
                                                 for c in range(n)) for r in range(n)))
            if self.optimal is not None and self.optimal >= self.min_moves:  # (solve() stops at max_moves)
                return obs
            budget -= self.explored
        raise NoLevel(f"Sokoban: no {n}x{n} room with {k} boxes solvable in {self.min_moves} to {self.max_moves} "
                      f"moves found in {tries:,} rooms (such levels are rare: "
                      f"{'lower boxes' if self.max_moves is None else 'raise max_moves, or lower boxes'})")

    def setup(self, cells: dict):
        self.floor = {p for p, x in cells.items() if x != "#"}
        self.targets = {p for p, x in cells.items() if x in "O√"}
        player = next(p for p, x in cells.items() if x == "P")
        self.state = (player, frozenset(p for p, x in cells.items() if x in "X√"))  # what moves

    def _push(self, state, move):
        """(next state, message) of a move; the state is None when the move is blocked."""
        (r, c), boxes = state
        dr, dc = MOVES[move]
        to, beyond = (r + dr, c + dc), (r + 2 * dr, c + 2 * dc)
        if to not in self.floor:
            return None, "You cannot move into a wall!"
        if to not in boxes:
            return (to, boxes), f"You moved {move}."
        if beyond in boxes:
            return None, "You cannot push a box into another box!"
        if beyond not in self.floor:
            return None, "You cannot push a box into a wall!"
        return (to, boxes - {to} | {beyond}), f"You moved {move} and pushed a box."

    def solve(self) -> list[str] | None:
        """Fewest moves to win; None if it takes more than max_moves (a level this game never draws) or none wins."""
        moves, self.explored = bfs(self.state, lambda s, m: self._push(s, m)[0], lambda s: s[1] == self.targets,
                                   depth=self.max_moves)
        return moves

    def move(self, action: str) -> str:
        state, msg = self._push(self.state, action)
        if state is not None:
            self.state = state
            if state[1] == self.targets:
                self.done, self.won, msg = True, True, msg + "\nCongratulations! You have solved the Sokoban puzzle!"
        return msg

    def board(self) -> str:
        (player, boxes), (R, C) = self.state, self.shape
        def cell(p):
            if p not in self.floor:
                return "#"
            if p == player:
                return "P"  # also on a target, as in Sokoban-v0
            if p in boxes:
                return "√" if p in self.targets else "X"
            return "O" if p in self.targets else "_"
        return "".join(" ".join(cell((r, c)) for c in range(C)) + "\n" for r in range(R))

    def observation(self) -> str:
        return f"Current Board:\n\n{self.board()}\nAvailable Moves: {', '.join(MOVES)}"


def carve(rng: random.Random, n: int) -> set:
    """Floor cells of an n x n room: a random walk inside the walls that turns with probability 0.35 and clears
    one random neighbour of every cell it visits (gym-sokoban's room topology, simplified)."""
    dirs = list(MOVES.values())
    clip = lambda x: min(max(x, 1), n - 2)
    r, c, d = rng.randrange(1, n - 1), rng.randrange(1, n - 1), rng.choice(dirs)
    floor = set()
    for _ in range(int(3.4 * n)):
        if rng.random() < 0.35:
            d = rng.choice(dirs)
        r, c = clip(r + d[0]), clip(c + d[1])
        w = rng.choice(dirs)
        floor |= {(r, c), (clip(r + w[0]), clip(c + w[1]))}
    return floor


# ----------------------------------------------------------------------------- TextWorld

TW_LEVELS = {  # difficulty 1-3 -> challenge settings; fewest moves: coin 1/2/4, treasure 1/3/4, cooking 3/3-4/4-5
    "coin_collector": [{"level": 1}, {"level": 2}, {"level": 4}],
    "treasure_hunter": [{"level": 1}, {"level": 5}, {"level": 7}],
    "cooking": [{"recipe": 1, "take": 1}, {"recipe": 1, "take": 1, "open": True},
                {"recipe": 1, "take": 1, "open": True, "cook": True}],
}
COOKING_DEFAULTS = {"recipe": 1, "take": 0, "go": 1, "open": False, "cook": False, "cut": False, "drop": False,
                    "recipe_seed": 0, "split": None}


def cache_dir() -> str:
    """$OEL_CACHE, default ~/.cache/oel: the TextWorld games and (model.tiny_dir) the tiny preset."""
    return os.environ.get("OEL_CACHE", os.path.expanduser("~/.cache/oel"))


def textworld_file(kind: str, level: int, seed: int) -> str:
    """Where the cache keeps the .z8 game for (kind, level, seed), e.g. .../cooking-recipe1-take1-open-s5.z8."""
    folder = os.path.join(cache_dir(), "textworld")
    tag = "-".join(f"{k}{'' if v is True else v}" for k, v in TW_LEVELS[kind][level - 1].items())
    return os.path.join(folder, f"{kind}-{tag}-s{seed}.z8")


def cached_textworld(path: str) -> bool:
    """Whether the cache holds a whole game at `path`: the .json the interpreter's wrapper reads (a JSON object;
    without it a game has no commands) and the .z8, a version 8 Z-machine story as long as its header says (the
    interpreter ends the whole process on a damaged one, naming no file)."""
    try:
        with open(path, "rb") as f:
            head, size = f.read(64), os.fstat(f.fileno()).st_size
        with open(path.removesuffix(".z8") + ".json", "rb") as f:
            info = json.load(f)
    except (FileNotFoundError, ValueError):  # ValueError: JSONDecodeError, UnicodeDecodeError
        return False
    return isinstance(info, dict) and len(head) == 64 and head[0] == 8 and \
        size >= 8 * int.from_bytes(head[0x1A:0x1C], "big")


def make_textworld(kind: str, level: int, seed: int) -> str:
    """Path of the .z8 game for (kind, level, seed), generated in-process into the cache unless already there whole
    (a damaged one is made again). Files are written to a temporary folder and renamed into place, so a crash never
    leaves half a game; temporary folders older than an hour (of a killed generation) are removed."""
    import textworld  # heavy import, only needed here
    import textworld.challenges
    from textworld.generator import QuestGenerationError

    path = textworld_file(kind, level, seed)
    if cached_textworld(path):
        return path
    folder, stem = os.path.dirname(path), path.removesuffix(".z8")
    os.makedirs(folder, exist_ok=True)
    for entry in os.scandir(folder):  # a live generation's folder is seconds old
        try:
            stale = entry.name.startswith("tmp") and entry.is_dir() and time.time() - entry.stat().st_mtime > 3600
        except FileNotFoundError:  # another worker's, just removed
            continue
        if stale:
            shutil.rmtree(entry.path, ignore_errors=True)
    settings = {**(COOKING_DEFAULTS if kind == "cooking" else {}), **TW_LEVELS[kind][level - 1]}
    make = textworld.challenges.CHALLENGES[f"tw-{kind}"][1]
    tmp = tempfile.mkdtemp(dir=folder)
    try:
        for attempt in range(10):  # some maps cannot hold the quest (rare): retry from seeds no level uses
            # TextWorld turns an int seed into four sub-seeds (map, objects, quest, grammar) below 65635; a retry draws
            # its own four, which equal another level's only by a chance as small as two level seeds' coinciding
            rng, keys = random.Random(f"textworld {seed} retry {attempt}"), ("map", "objects", "quest", "grammar")
            options = textworld.GameOptions()  # (a str seed draws the same in every process)
            options.seeds = seed if attempt == 0 else {k: rng.randrange(65635) for k in keys}
            options.path = os.path.join(tmp, "game.z8")
            try:
                game = make(settings=settings, options=options)
                break
            except QuestGenerationError:
                continue
        else:
            raise NoLevel(f"TextWorld: no {kind} level {level} game could be generated from seed {seed}")
        textworld.generator.compile_game(game, options)
        os.replace(os.path.join(tmp, "game.json"), stem + ".json")  # the interpreter's wrapper reads it
        os.replace(os.path.join(tmp, "game.z8"), path)  # last: its presence marks a complete game
    except Exception as e:  # Inform 7's compiler (make() runs it too) on a full disk: say so (train.py's one line)
        if not isinstance(e, (OSError, NoLevel)) and shutil.disk_usage(folder).free < 2**24:
            raise OSError(errno.ENOSPC, f"no space left for a TextWorld game ({type(e).__name__})", folder) from e
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


@dataclass
class TextWorldGame:
    """A generated TextWorld game: won when the quest is complete (a cooking game can also be lost). Valid actions
    are the game's admissible commands, listed after every observation."""
    name: ClassVar[str] = "textworld"
    instruction: ClassVar[str] = (
        "You are playing a text adventure game. Complete the task given in the observations in as few steps as "
        "possible.\nActions are short text commands such as [go north], [take coin] or [open door]; the available "
        "commands are listed after each observation.\nWrap your final action in square brackets, e.g. [look]. Only "
        "the last bracketed action in your reply counts.")
    kind: str = "mix"  # coin_collector | treasure_hunter | cooking | mix (each level draws its kind from its seed)
    level: int = 2  # difficulty 1-3 (TW_LEVELS)
    seed: int | None = None  # the level; make_games sets it, reset() without a seed uses it

    def __post_init__(self):
        if self.kind != "mix" and self.kind not in TW_LEVELS:
            raise ValueError(f"TextWorld: unknown kind {self.kind!r}; choose from mix, {', '.join(TW_LEVELS)}")
        if not 1 <= self.level <= 3:
            raise ValueError(f"TextWorld: level must be 1, 2 or 3, got {self.level}")
        self.env = None

    def spec(self) -> tuple[str, int, int]:
        """(kind, level, seed) of the game file, for make_textworld."""
        kind = random.Random(self.seed).choice(list(TW_LEVELS)) if self.kind == "mix" else self.kind
        return kind, self.level, self.seed

    def reset(self, seed: int | None = None) -> str:
        import textworld

        self.seed = self.seed if seed is None else seed
        if self.seed is None:
            raise ValueError("TextWorld: reset() needs a seed (the game is generated from it), or make_games' levels")
        path = make_textworld(*self.spec())
        self.close()
        infos = textworld.EnvInfos(admissible_commands=True, policy_commands=True, won=True, lost=True,
                                   objective=True, description=True)
        self.env = textworld.start(path, request_infos=infos)
        self.state, self.done, self.won = self.env.reset(), False, False
        return self.observation(f"{self.state.objective}\n\n{self.state.description}")

    def observation(self, text: str) -> str:
        text = re.split(r"\*\*\* .+? \*\*\*", text)[0]  # drop an end banner (The End, You lost!) and what follows
        text = re.sub(r"^>.*$", "", text, flags=re.M)  # the interpreter's prompt line
        text = re.sub(r"\n\s*\n", "\n\n", text).strip()
        if self.done:
            return text
        return f"{text}\n\nAvailable commands: {', '.join(f'[{c}]' for c in self.state.admissible_commands)}"

    def step(self, action: str | None):
        if self.done:
            raise RuntimeError("the game is over: call reset()")
        if action not in self.state.admissible_commands:  # also keeps out interpreter commands (restart, quit, ...)
            return self.observation(invalid(action, "the commands listed below")), 0.0, False, {"won": False}
        self.state, _, done = self.env.step(action)
        self.won, self.done = bool(self.state.won), bool(done or self.state.won or self.state.lost)
        if self.done:
            self.close()
        return self.observation(self.state.feedback), float(self.won), self.done, {"won": self.won}

    def solve(self) -> list[str]:
        return list(self.state.policy_commands)  # the game's walkthrough from the current state

    def valid_actions(self) -> set[str]:
        return set(self.state.admissible_commands)

    def close(self):
        if self.env is not None:
            self.env.close()
            self.env = None


# ----------------------------------------------------------------------------- named game sets

ENVS = {"frozenlake": FrozenLake, "sokoban": Sokoban, "textworld": TextWorldGame}


def level_seed(split: str, seed: int, i: int) -> int:
    """Seed of game i of the set (split, seed); different sets never share a level seed. Boards can still
    coincide where the level space is small: FrozenLake 3x3 with 2 holes has only 19 solvable layouts, so its
    test boards also occur in training (as in the paper's setting); 6x6 Sokoban levels sometimes repeat, and
    make_games(exclude=...) keeps a set's levels out of another (the deploy games avoid the test levels)."""
    return 3 * (seed * MAX_GAMES + i) + SPLITS.index(split)


def pregenerate(envs: list) -> None:
    """Generate the TextWorld games among envs that the cache lacks, in parallel processes (~1 s each in one)."""
    specs = [e.spec() for e in envs if isinstance(e, TextWorldGame)]
    todo = list(dict.fromkeys(s for s in specs if not cached_textworld(textworld_file(*s))))  # each game once
    if len(todo) < 2:
        return
    spawn = multiprocessing.get_context("spawn")  # not fork: the parent may hold CUDA and threads
    workers = min(len(todo), len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    with ProcessPoolExecutor(workers, mp_context=spawn, initializer=worker_init, initargs=(os.getpid(),)) as pool:
        for _ in tqdm(pool.map(make_textworld, *zip(*todo)), total=len(todo), desc="generate textworld", leave=False):
            pass


def worker_init(parent: int):
    """A pregenerate worker: Ctrl-C is the parent's (a terminal sends it to the whole process group), and on Linux the
    worker ends with its parent, also a killed one (else it waits for work forever, holding its memory)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform == "linux":
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # it died before that
            os._exit(1)


def first_observation(env) -> str:
    """The observation a level starts with (it identifies the level); the game is closed again."""
    obs = env.reset()
    env.close()
    return obs


def option_value(what: str, v, t):
    """Check a JSON value v against option type t and return it (an int given for a float as a float), or raise
    ValueError naming `what`. JSON true is not an int here; a type isinstance cannot check (list[int]) takes any."""
    declared = typing.get_args(t) if typing.get_origin(t) in (typing.Union, types.UnionType) else (t,)
    if type(v) is int and float in declared and int not in declared:
        return float(v)
    try:
        ok = bool in declared if isinstance(v, bool) else isinstance(v, t)
    except TypeError:
        return v
    if not ok:
        names = " | ".join("None" if d is type(None) else getattr(d, "__name__", str(d)) for d in declared)
        raise ValueError(f"{what} must be {names}, got {v!r}")
    return v


class TooFewLevels(ValueError):
    """make_games found fewer than n levels outside `exclude` among a set's MAX_GAMES level seeds."""


def make_games(game: str, split: str, n: int, /, seed: int = 0, exclude=(), **options) -> list:
    """n games of a named, reproducible set. `train`: pass a fresh seed every round (e.g. the round number);
    `test`: the held-out levels (the paper uses 128 fixed levels); `ood`: another disjoint set, meant for a game
    the model was not trained on. options: the game's settings (FrozenLake size/holes, Sokoban size/boxes,
    TextWorld kind/level). Each game's level seed is `game.seed`. exclude: first observations of levels to
    leave out (e.g. the test set's); a level that shows one is replaced by the set's next level seed."""
    if game not in ENVS:
        raise ValueError(f"unknown game {game!r}; choose from {', '.join(ENVS)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
    if not 0 <= n <= MAX_GAMES or seed < 0:
        raise ValueError(f"need 0 <= n <= {MAX_GAMES} and seed >= 0, got n={n}, seed={seed}")
    if game == "textworld" and seed > TW_MAX_SET:
        raise ValueError(f"textworld set seeds go up to {TW_MAX_SET} (TextWorld takes 32-bit level seeds), got {seed}")
    hints = typing.get_type_hints(ENVS[game])  # the fields' types, also where annotations are strings
    names = [f.name for f in fields(ENVS[game]) if f.name != "seed"]
    for k, v in options.items():
        if k not in names:
            raise ValueError(f"{game} has no option {k!r}; its options: {', '.join(names)}")
        options[k] = option_value(f"{game} option {k!r}", v, hints[k])
    levels = [ENVS[game](**options, seed=level_seed(split, seed, i)) for i in range(n)]
    if not exclude:
        return levels
    pregenerate(levels)  # the likely levels
    envs, i = [], 0
    with tqdm(total=n, desc=f"levels {game} {split}", leave=False) as bar:
        while len(envs) < n:
            if i == MAX_GAMES:
                raise TooFewLevels(f"{game} {split} set {seed}: fewer than {n} of its levels are outside `exclude`")
            env = levels[i] if i < n else ENVS[game](**options, seed=level_seed(split, seed, i))
            if first_observation(env) not in exclude:
                envs.append(env)
                bar.update()
            i += 1
    return envs


# ----------------------------------------------------------------------------- agent protocol

def user_prompt(game: str, state: str, knowledge: str | None = None) -> str:
    """The single user message of a turn: instruction, optional knowledge, observation history."""
    if game not in ENVS:
        raise ValueError(f"unknown game {game!r}; choose from {', '.join(ENVS)}")
    parts = [ENVS[game].instruction]
    if knowledge:
        parts.append(f"{KNOWLEDGE_HEADING}\n{knowledge.strip()}")
    parts.append(f"## Game so far\n{state}\n\nWhat is your next action?")
    return "\n\n".join(parts)


def parse_action(response: str, valid=None) -> str | None:
    """The action of a response: as the paper's code reads it, the last [bracketed] text anywhere in it, thinking
    included (a reply cut off mid-thought acts on its latest plan); unlike its exact match, lower-cased and trimmed
    of spaces, quotes, backticks and backslashes (markdown escapes), so [Up] and [ `up` ] count. With `valid`, the
    last that is a valid action. None if none."""
    found = [" ".join(m.split()).strip("`'\"\\ ").lower() for m in re.findall(r"\[([^\[\]]*)\]", response)]
    found = [a for a in found if a and (valid is None or a in valid)]
    return found[-1] if found else None


# ----------------------------------------------------------------------------- rollouts


@dataclass
class RolloutConfig:
    max_turns: int = 5  # turns per episode (paper: 5)
    max_new_tokens: int = 1024  # tokens per turn (paper: 1024)
    temperature: float = 0.7  # sampling: the paper's evaluation settings (Qwen3's recommended non-thinking ones)
    top_p: float = 0.8
    top_k: int = 20  # 0 = off
    thinking: bool | None = False  # chat mode: True thinking, False non-thinking, None instruct (never thinks)


@dataclass
class Turn:
    state: str  # observation history the model saw (user_prompt renders it)
    prompt: str  # the user message
    response: str  # the model's full response text
    n_tokens: int  # response tokens, the stop token included (every token generated: an empty reply counts 1)
    action: str | None  # parsed action, None if none was found
    feedback: str  # what the game answered
    reward: float


@dataclass
class Trajectory:
    game: str
    seed: int  # level seed: make_games(...)[i].seed
    turns: list[Turn] = field(default_factory=list)
    won: bool = False
    steps: int = 0  # turns played
    response_tokens: int = 0  # summed over turns


def rollout(model, tokenizer, envs: list, cfg: RolloutConfig, knowledge: str | None = None,
            seed: int = 0, desc: str = "rollout") -> list[Trajectory]:
    """Play every game to the end or to cfg.max_turns, all unfinished games' turns in one generate call."""
    from model import generate  # torch-heavy; imported only when playing

    pregenerate(envs)
    states = [f"Observation 1:\n{env.reset(env.seed)}" for env in tqdm(envs, desc=f"{desc}: levels", leave=False)]
    trajs = [Trajectory(game=env.name, seed=env.seed) for env in envs]
    active = list(range(len(envs)))
    bar = tqdm(total=len(envs), desc=desc, unit="game", leave=False)
    for t in range(cfg.max_turns):
        if not active:
            break
        prompts = [user_prompt(envs[i].name, states[i], knowledge) for i in active]
        ids = [tokenizer.user_ids(p, cfg.thinking) for p in prompts]
        outs = generate(model, tokenizer, ids, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                        top_p=cfg.top_p, top_k=cfg.top_k, seed=seed * 1000 + t)
        still = []
        for i, prompt, out in zip(active, prompts, outs):
            # a valid action, else the last bracketed text (the feedback names it as invalid, and the history shows
            # it every later turn: cut to MAX_INVALID characters), else None
            valid = envs[i].valid_actions()
            action = parse_action(out.text, valid) or parse_action(out.text)
            if action is not None and action not in valid and len(action) > MAX_INVALID:
                action = action[:MAX_INVALID - 3] + "..."
            feedback, reward, done, info = envs[i].step(action)
            trajs[i].turns.append(Turn(states[i], prompt, out.text, len(out.tokens), action, feedback, reward))
            trajs[i].won = info["won"]
            shown = f"[{action}]" if action is not None else "(none)"
            states[i] += f"\n\nAction {t + 1}: {shown}\n\nObservation {t + 2}:\n{feedback}"
            if done:
                bar.update()
            else:
                still.append(i)
        active = still
        bar.set_postfix(turn=t + 1, won=sum(tr.won for tr in trajs))
    bar.update(len(active))
    bar.close()
    for i in active:  # out of turns
        envs[i].close()
    for tr in trajs:
        tr.steps, tr.response_tokens = len(tr.turns), sum(x.n_tokens for x in tr.turns)
    return trajs


def save_trajectories(path: str, trajs: list[Trajectory]):
    """One episode per line, written to a temporary file and renamed: a reader never sees half a file."""
    with open(f"{path}.tmp", "w", encoding="utf-8") as f:
        for tr in trajs:
            f.write(json.dumps(asdict(tr), ensure_ascii=False) + "\n")
    os.replace(f"{path}.tmp", path)


def load_trajectories(path: str) -> list[Trajectory]:
    trajs = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
                trajs.append(Trajectory(**{**d, "turns": [Turn(**x) for x in d["turns"]]}))
            except (ValueError, TypeError, KeyError) as e:
                raise ValueError(f"{path}:{n}: malformed trajectory line ({type(e).__name__}: {e})") from None
    return trajs


def metrics(trajs: list[Trajectory]) -> dict:
    """Pass rate, mean steps, mean response tokens per turn and per episode, n."""
    n, turns = len(trajs), sum(tr.steps for tr in trajs)
    tokens = sum(tr.response_tokens for tr in trajs)
    return {"pass_rate": sum(tr.won for tr in trajs) / max(n, 1), "mean_steps": turns / max(n, 1),
            "tokens_per_turn": tokens / max(turns, 1), "tokens_per_episode": tokens / max(n, 1), "n": n}
