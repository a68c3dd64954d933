import errno
import hashlib
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import ClassVar, Optional

import pytest

import games
from games import (KNOWLEDGE_HEADING, FrozenLake, RolloutConfig, Sokoban, TextWorldGame, first_observation,
                   load_trajectories, make_games, metrics, parse_action, rollout, save_trajectories, user_prompt)


def play(env, moves):
    return [env.step(m) for m in moves]


@pytest.mark.parametrize("game,options", [("frozenlake", {}), ("sokoban", {}), ("frozenlake", {"size": 4, "holes": 3}),
                                          ("sokoban", {"size": 7, "boxes": 2, "max_moves": None})])
def test_levels_solvable_and_solver_wins(game, options):
    """Every generated level is solvable, and the solver's moves played through step() win on the last move; default
    Sokoban levels take each of 2 to 5 moves."""
    lengths = set()
    for env in make_games(game, "train", 50, seed=1, **options):
        env.reset()
        if game == "frozenlake":  # exactly `holes` holes on the board shown, none on the start or the goal
            n = options.get("size", 3)
            assert env.board().count("H") == options.get("holes", 2) and (env.pos, env.goal) == ((0, 0), (n - 1, n - 1))
        moves = env.solve()
        assert moves and len(moves) == env.optimal
        if game == "sokoban" and "max_moves" not in options:
            assert 2 <= env.optimal <= 5  # never trivial, always winnable within the default 5 turns
            lengths.add(env.optimal)
        results = play(env, moves)
        assert [done for _, _, done, _ in results] == [False] * (len(moves) - 1) + [True]
        assert [r for _, r, _, _ in results] == [0.0] * (len(moves) - 1) + [1.0]
        assert results[-1][3]["won"]
    if game == "sokoban" and "max_moves" not in options:
        assert lengths == {2, 3, 4, 5}  # min_moves and max_moves themselves included


FL_START = """\
Current Board:

+-----+-----+-----+
|  P  |     |  H  |
+-----+-----+-----+
|     |  H  |     |
+-----+-----+-----+
|     |     |  G  |
+-----+-----+-----+

Available Actions: [up], [down], [left], [right]"""


def test_frozenlake_rules():
    """Walking off the board wastes the move, a hole ends the game lost, the goal wins; TextArena's boards."""
    env = FrozenLake()
    assert env.load("P.H\n.H.\n..G") == FL_START
    obs, reward, done, info = env.step("up")
    assert obs == "You tried to move up but hit a wall!\n\n" + FL_START and not done and not info["won"]
    obs, *_ = env.step("jump")
    assert obs.startswith("Invalid action [jump]. Valid actions: [up], [down], [left], [right].\n\n")
    obs, *_ = env.step(None)
    assert obs.startswith("Invalid action: no action in square brackets found.")
    obs, reward, done, info = env.step("right")
    assert obs.startswith("You moved right to position (0, 1).\n\nCurrent Board:\n\n+-----+-----+-----+\n"
                          "|     |  P  |  H  |")
    obs, reward, done, info = env.step("down")
    assert obs.startswith("You moved down to position (1, 1).\nYou fell into a hole! Game over.\n\n")
    assert done and reward == 0.0 and not info["won"]
    with pytest.raises(RuntimeError):
        env.step("left")
    env.load("P.H\n.H.\n..G")
    assert env.solve() == ["down", "down", "right", "right"]
    obs, reward, done, info = play(env, env.solve())[-1]
    assert "Congratulations! You reached the goal!" in obs and "|     |     | P/G |" in obs
    assert done and reward == 1.0 and info["won"]


SOKOBAN = """\
# # # # # #
# X _ _ O #
# P X X _ #
# _ _ _ O #
# _ _ _ O #
# # # # # #"""


def test_sokoban_rules():
    """Walls and blocked pushes (box into a wall or a box) change nothing; pushes move the box; TextArena's boards."""
    env = Sokoban()
    start = f"Current Board:\n\n{SOKOBAN}\n\nAvailable Moves: up, down, left, right"
    assert env.load(SOKOBAN) == start
    for move, msg in [("left", "You cannot move into a wall!"), ("up", "You cannot push a box into a wall!"),
                      ("right", "You cannot push a box into another box!")]:
        obs, reward, done, _ = env.step(move)
        assert obs == f"{msg}\n\n{start}" and reward == 0.0 and not done
    msgs = [obs.split("\n")[0] for obs, *_ in play(env, ["down", "right", "up", "right", "up", "right"])]
    assert msgs == ["You moved down.", "You moved right.", "You moved up and pushed a box.",
                    "You moved right and pushed a box.", "You moved up.", "You moved right."]
    assert env.board() == "# # # # # #\n# X X _ P #\n# _ _ _ X #\n# _ _ _ O #\n# _ _ _ O #\n# # # # # #\n"
    env.step("down")  # onto a target: the box turns into √, the player leaves the target O behind
    assert env.board() == "# # # # # #\n# X X _ O #\n# _ _ _ P #\n# _ _ _ √ #\n# _ _ _ O #\n# # # # # #\n"
    env.load("# # # # # #\n# P X O √ #\n# # # # # #")  # a box already on a target counts as one
    assert env.solve() == ["right"] and not env.done
    obs, reward, done, info = env.step("right")
    assert obs.startswith("You moved right and pushed a box.\nCongratulations! You have solved the Sokoban puzzle!")
    assert "# _ P √ √ #" in obs and done and reward == 1.0 and info["won"]


def test_sokoban_search_stops_at_max_moves():
    """The solver looks no deeper than max_moves (a level needing more is one the game never draws), so settings that
    rarely allow so short a solution fail at once with advice, instead of searching every room they draw for long."""
    level = "# # # # # # # # #\n# P X _ _ _ _ O #\n# # # # # # # # #"  # five pushes right
    for max_moves, plan in ((5, ["right"] * 5), (4, None), (None, ["right"] * 5)):
        env = Sokoban(max_moves=max_moves)
        env.load(level)
        assert env.solve() == plan and env.optimal == (plan and len(plan))
    t = time.time()
    with pytest.raises(games.NoLevel, match=r"12x12 room with 4 boxes .* \(such levels are rare: raise max_moves"):
        Sokoban(size=12, boxes=4, seed=1).reset()
    assert time.time() - t < 60  # it searched each room up to 200,000 states: hours


@pytest.mark.parametrize("states, rooms", [(1365, 10_000), (100_000, 137), (games.BFS_LIMIT, 69)])
def test_sokoban_search_is_bounded(states, rooms, monkeypatch):
    """The level search stops after 10,000 rooms or once the solver has explored as many states as 10,000 rooms may
    take at the default max_moves (1,365 each), whichever comes first: about a minute. Without the state budget,
    20x20 rooms with 6 boxes and max_moves None took about 0.9 s each, 10,000 of them. (Here every room `explores`
    `states` states and none is solvable, at no cost.)"""
    carved, carve = [], games.carve
    monkeypatch.setattr(games, "carve", lambda *a: carved.append(1) or carve(*a))
    monkeypatch.setattr(games, "bfs", lambda *a, **k: (None, states))
    with pytest.raises(games.NoLevel, match=f"found in {rooms:,} rooms .such levels are rare: lower boxes"):
        Sokoban(size=20, boxes=6, max_moves=None, seed=1).reset()
    assert len(carved) == rooms


def test_frozenlake_search_is_bounded():
    """A hole count that leaves hardly any solvable board fails with advice after a bounded number of random boards
    (fewer on a bigger board, each costing more), instead of drawing 100,000 of them: minutes of silence at 64x64."""
    t = time.time()
    with pytest.raises(games.NoLevel, match=r"no solvable 16x16 board with 225 holes in 9,765 random boards; use fewer"):
        FrozenLake(size=16, holes=225, seed=0).reset()
    assert time.time() - t < 60  # about 4 s; 100,000 boards took 40 s


def test_seeds_reproducible_and_disjoint():
    """Same seed, same level; different seeds, different levels; train, test and ood never share a level seed."""
    boards = lambda envs: [(e.reset(), e.board())[1] for e in envs]
    for game in ("frozenlake", "sokoban"):
        assert boards(make_games(game, "test", 20)) == boards(make_games(game, "test", 20))
        assert len(set(boards(make_games(game, "train", 20, seed=3)))) > 8
        assert boards(make_games(game, "train", 5, seed=1)) != boards(make_games(game, "train", 5, seed=2))
    for cls in (FrozenLake, Sokoban):
        assert cls().reset(5) == cls(seed=5).reset() != cls().reset(6)  # reset(seed) plays that level
    test = {e.seed for e in make_games("sokoban", "test", 128)}
    rounds = [{e.seed for e in make_games("sokoban", "train", 256, seed=r)} for r in range(20)]
    assert not any(a & b for i, a in enumerate(rounds) for b in rounds[i + 1:])  # every round plays fresh levels
    train = set().union(*rounds)
    ood = {e.seed for s in range(3) for e in make_games("textworld", "ood", 64, seed=s)}
    assert len(test) == 128 and not test & train and not test & ood and not train & ood


def test_sets_of_up_to_max_games_never_share_a_level_seed():
    """Level seeds stay apart for whole sets of MAX_GAMES games, not only for small ones: the default deploy set (1280
    games a round) of round 0 does not replay round 1's levels, nor the test set the train set's."""
    seeds = {(split, s): {e.seed for e in make_games("frozenlake", split, games.MAX_GAMES, seed=s)}
             for split in ("train", "test") for s in (0, 1)}
    assert all(len(x) == games.MAX_GAMES for x in seeds.values())
    assert not any(a & b for k, a in seeds.items() for j, b in seeds.items() if k < j)


def test_held_out_levels_stay_the_same():
    """The test levels a seed gives are fixed (the paper's 128 fixed levels): a change to level generation (the room
    walk, the hole draw, the search) would silently compare runs on other levels, and a resumed run's rounds with its
    base. The first test level of each game as drawn, and a digest of the 128 test boards."""
    first = lambda game: [first_observation(e) for e in make_games(game, "test", 128)]
    lake, room = first("frozenlake"), first("sokoban")
    assert lake[0].startswith("Current Board:\n\n+-----+-----+-----+\n|  P  |     |  H  |\n+-----+-----+-----+\n"
                              "|     |     |  H  |\n+-----+-----+-----+\n|     |     |  G  |\n")
    assert room[0].startswith("Current Board:\n\n# # # # # #\n# O X _ # #\n# _ _ _ _ #\n# _ P # # #\n# _ # # # #\n"
                              "# # # # # #\n")
    digest = lambda obs: hashlib.sha1("\n\n".join(obs).encode()).hexdigest()
    assert digest(lake) == "a9921e007637122dd85db5c8548d3463af2e2802"
    assert digest(room) == "07da3110d34128bd2df4013a046af7d99df70f3a"


def test_exclude_keeps_test_levels_out():
    """Sokoban levels of different seeds can coincide; make_games(exclude=...) replaces the ones that do by the
    set's next levels, so the deploy games never show a held-out test board."""
    first = lambda envs: [first_observation(e) for e in envs]
    test = set(first(make_games("sokoban", "test", 128)))
    plain = [first(make_games("sokoban", "train", 256, seed=s)) for s in (0, 1)]
    assert any(o in test for obs in plain for o in obs)  # without exclusion the sets overlap (5 boards)
    for s, obs in zip((0, 1), plain):
        kept = first(make_games("sokoban", "train", 256, seed=s, exclude=test))
        assert len(kept) == 256 and not test & set(kept)
        assert [o for o in obs if o not in test] == kept[:len(obs) - sum(o in test for o in obs)]  # order kept
    with pytest.raises(ValueError, match="fewer than 128"):
        make_games("frozenlake", "train", 128, exclude=set(first(make_games("frozenlake", "test", 128))))


def test_exclude_replaces_levels_by_the_sets_next_unused_ones(monkeypatch):
    """An excluded level is replaced by the set's next level seed, itself checked against `exclude`, never by a level
    already drawn; the search gives up after MAX_GAMES levels, before the next set's level seeds."""
    opts = {"size": 4, "holes": 3}
    obs = [first_observation(FrozenLake(**opts, seed=games.level_seed("train", 0, i))) for i in range(8)]
    exclude = {obs[0], obs[3]}  # one of the first 3 levels, and the first level after them
    expected = [i for i in range(8) if obs[i] not in exclude][:3]
    assert expected == [1, 2, 4]
    kept = make_games("frozenlake", "train", 3, exclude=exclude, **opts)
    assert [e.seed for e in kept] == [games.level_seed("train", 0, i) for i in expected]
    monkeypatch.setattr(games, "MAX_GAMES", 6)
    seen, real = [], games.first_observation
    monkeypatch.setattr(games, "first_observation", lambda env: seen.append(env.seed) or real(env))
    with pytest.raises(ValueError, match="fewer than 3"):
        make_games("frozenlake", "train", 3, exclude=set(obs), **opts)
    assert seen == [games.level_seed("train", 0, i) for i in range(6)]  # level 6 would be set 1's level 0


def test_clear_errors(monkeypatch):
    """Unknown names, options of the wrong type and impossible sizes raise ValueError naming the problem."""
    with pytest.raises(ValueError, match="unknown game 'chess'"):
        make_games("chess", "test", 1)
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        make_games("sokoban", "dev", 1)
    for n, seed in ((-1, 0), (games.MAX_GAMES + 1, 0), (1, -1)):  # a negative seed would share level seeds
        with pytest.raises(ValueError, match=f"need 0 <= n <= {games.MAX_GAMES} and seed >= 0"):
            make_games("frozenlake", "test", n, seed=seed)
    with pytest.raises(ValueError, match="unknown game"):
        user_prompt("chess", "")
    assert FrozenLake(size=games.MAX_SIZE).size == Sokoban(size=games.MAX_SIZE).size == 64  # the largest boards
    exact = Sokoban(min_moves=3, max_moves=3)  # levels of exactly 3 moves
    assert [(exact.reset(s), exact.optimal)[1] for s in range(3)] == [3, 3, 3]
    for make in (lambda: FrozenLake(size=3, holes=5), lambda: Sokoban(size=4), lambda: Sokoban(boxes=0),
                 lambda: FrozenLake(size=65), lambda: Sokoban(size=65),  # larger ones would hang level search
                 lambda: Sokoban(min_moves=3, max_moves=2), lambda: Sokoban(max_moves=0), lambda: Sokoban(min_moves=-1),
                 lambda: TextWorldGame(kind="zork"), lambda: TextWorldGame(level=7), lambda: TextWorldGame(level=0),
                 lambda: TextWorldGame().reset(),
                 lambda: make_games("frozenlake", "test", -1)):
        with pytest.raises(ValueError):
            make()
    for options, match in (({"size": 4.5}, "'size' must be int, got 4.5"), ({"holes": True}, "'holes' must be int"),
                           ({"sise": 4}, "no option 'sise'; its options: size, holes$")):  # not 'seed': the set's
        with pytest.raises(ValueError, match=match):
            make_games("frozenlake", "test", 1, **options)
    assert make_games("sokoban", "test", 1, max_moves=None)[0].max_moves is None  # int | None takes None

    @dataclass
    class Slippery(FrozenLake):
        name: ClassVar[str] = "slippery"
        slippery: bool = False
        n: int = 0  # make_games' own parameter names are free for options

    monkeypatch.setitem(games.ENVS, "slippery", Slippery)
    assert make_games("slippery", "test", 1, slippery=True)[0].slippery  # a bool option takes a bool
    assert make_games("slippery", "test", 1, n=2)[0].n == 2


def test_option_types_follow_the_annotations(monkeypatch):
    """A float option takes a JSON int (as a float), also when declared Optional[float] (not when int | float), but
    never a bool (an int subclass); a type isinstance cannot check (list[int]) takes any value."""
    @dataclass
    class Tuned(FrozenLake):
        name: ClassVar[str] = "tuned"
        slip: float = 0.0
        wind: Optional[float] = None
        path: list[int] = field(default_factory=list)
        ratio: int | float = 1

    monkeypatch.setitem(games.ENVS, "tuned", Tuned)
    assert type(make_games("tuned", "test", 1, ratio=2)[0].ratio) is int  # an int stays one where int is declared
    env = make_games("tuned", "test", 1, slip=1, wind=2, path=[1, 2])[0]
    assert (env.slip, type(env.slip), env.wind, type(env.wind), env.path) == (1.0, float, 2.0, float, [1, 2])
    assert make_games("tuned", "test", 1, wind=None)[0].wind is None
    for options, match in (({"slip": True}, "'slip' must be float, got True"),
                           ({"wind": False}, "'wind' must be float | None, got False"),
                           ({"wind": "2"}, "'wind' must be float | None, got '2'")):
        with pytest.raises(ValueError, match=re.escape(match)):
            make_games("tuned", "test", 1, **options)


@pytest.mark.parametrize("response,action", [
    ("[up]", "up"), ("[UP]", "up"), ("Going right looks safe. [ Right ]\n", "right"),
    ("<think>maybe [left]</think>\nSo: [down]", "down"), ("<think>maybe [left]</think> no idea", "left"),
    ("<think>I will go [left]", "left"), ("no brackets at all", None), ("[up] or rather [left]", "left"),
    ("[]", None), ("plan...</think>[Down]", "down"), ("[Go  North]", "go north"), ("[`up`]", "up"),
    ("\\[left\\]", "left"), ("[right] then [ ]", "right"), ('["take key"]', "take key")])
def test_parse_action(response, action):
    """The action is the last non-empty bracketed text anywhere, thinking included, lower-cased and trimmed."""
    assert parse_action(response) == action


def test_parse_action_keeps_only_valid_actions():
    """Given the valid actions, brackets that are not one (board cells, symbols) are passed over."""
    moves = {"up", "down", "left", "right"}
    assert parse_action("<think>P is at [2, 3]; [up] looks safe, the [G] is near", moves) == "up"
    assert parse_action("[north] or [go north]", {"go north"}) == "go north"
    assert parse_action("[P] then [H]", moves) is None


def test_user_prompt_knowledge_and_no_rules():
    """Knowledge appears under its heading only when given; the rules of the games are never stated."""
    for game in ("frozenlake", "sokoban"):
        plain = user_prompt(game, "Observation 1:\nBOARD")
        assert KNOWLEDGE_HEADING not in plain and plain.endswith("BOARD\n\nWhat is your next action?")
        assert "`P`" in plain and "[up], [down], [left], [right]" in plain and "square brackets" in plain
        for word in ("hole", "box", "target", "push", "wall", "ice", "lose", "fall"):
            assert word not in plain.lower()
        with_k = user_prompt(game, "Observation 1:\nBOARD", "- EXPERIENCE ITEM: H is a hole.")
        assert f"{KNOWLEDGE_HEADING}\n- EXPERIENCE ITEM: H is a hole." in with_k
        assert with_k.index(KNOWLEDGE_HEADING) < with_k.index("BOARD")
        assert with_k.startswith(f"{games.ENVS[game].instruction}\n\n{KNOWLEDGE_HEADING}")  # after the instruction
    assert "[go north]" in user_prompt("textworld", "x") and KNOWLEDGE_HEADING not in user_prompt("textworld", "x")
    assert f"{KNOWLEDGE_HEADING}\n- EXPERIENCE ITEM: look first." in user_prompt("textworld", "x", "- EXPERIENCE ITEM: look first.")


def test_user_prompt_trims_the_knowledge_text():
    """A knowledge text with blank lines around it (a hand-written knowledge file) shows as its lines alone, right
    under the heading and one blank line above the game."""
    prompt = user_prompt("frozenlake", "Observation 1:\nBOARD", "\n- EXPERIENCE ITEM: H is a hole.\n\n")
    assert f"{KNOWLEDGE_HEADING}\n- EXPERIENCE ITEM: H is a hole.\n\n## Game so far\n" in prompt


def test_textworld_walkthrough_wins(tmp_path, monkeypatch):
    """A generated TextWorld game: banner-free observations, the valid actions are the commands it lists, the
    walkthrough wins, the cached game is reused."""
    monkeypatch.setenv("OEL_CACHE", str(tmp_path))
    env = TextWorldGame(kind="coin_collector", level=2)
    first = obs = env.reset(5)
    assert "$$" not in obs and "coin" in obs and "Available commands: [" in obs
    listed = set(re.findall(r"\[([^\]]+)\]", obs.split("Available commands: ")[1]))
    assert env.valid_actions() == listed != set(env.solve())  # all the commands listed, not just the walkthrough's
    obs, reward, done, _ = env.step(None)
    assert obs.startswith("Invalid action: no action in square brackets found.") and not done
    obs, reward, done, _ = env.step("restart")  # not an admissible command
    assert obs.startswith("Invalid action [restart]. Valid actions: the commands listed below.") and not done
    results = play(env, env.solve())
    obs, reward, done, info = results[-1]
    assert done and reward == 1.0 and info["won"] and "*** The End ***" not in obs and len(results) == 2
    assert not any(d for _, _, d, _ in results[:-1])
    files = sorted(os.listdir(tmp_path / "textworld"))
    assert files == ["coin_collector-level2-s5.json", "coin_collector-level2-s5.z8"]  # no temporary leftovers
    mtime = os.path.getmtime(tmp_path / "textworld" / files[1])
    assert env.reset(5) == first
    assert os.path.getmtime(tmp_path / "textworld" / files[1]) == mtime
    env.close()


def test_textworld_every_setting_is_won_by_its_walkthrough_in_the_stated_moves():
    """Every kind and level of TW_LEVELS (coin_collector level 2: the test above) generates a game whose walkthrough
    wins it on its last move, in the fewest moves TW_LEVELS' comment states (coin 1/2/4, treasure 1/3/4, cooking
    3/3-4/4-5)."""
    fewest = {"coin_collector": [{1}, {2}, {4}], "treasure_hunter": [{1}, {3}, {4}], "cooking": [{3}, {3, 4}, {4, 5}]}
    envs = [TextWorldGame(kind=kind, level=level, seed=5) for kind in games.TW_LEVELS for level in (1, 2, 3)
            if (kind, level) != ("coin_collector", 2)]
    games.pregenerate(envs)  # in worker processes, in parallel
    for env in envs:
        env.reset()
        plan = env.solve()
        results = play(env, plan)
        assert len(plan) in fewest[env.kind][env.level - 1] and results[-1][3]["won"], (env.kind, env.level, plan)
        assert not any(done for _, _, done, _ in results[:-1])
        env.close()


def test_textworld_games_generate_in_parallel_as_in_process(tmp_path, monkeypatch):
    """pregenerate fills the cache from worker processes with the games in-process generation makes; rollouts and
    level draws around excluded levels call it first."""
    import model

    envs = games.make_games("textworld", "test", 2, level=1)
    monkeypatch.setenv("OEL_CACHE", str(tmp_path / "a"))
    pools, pool = [], games.ProcessPoolExecutor
    monkeypatch.setattr(games, "ProcessPoolExecutor", lambda *a, **kw: pools.append(a) or pool(*a, **kw))
    games.pregenerate(envs)
    assert len(pools) == 1  # generated by worker processes
    assert all(os.path.exists(games.textworld_file(*e.spec())) for e in envs)
    games.pregenerate(envs)
    assert len(pools) == 1  # all cached: no workers started
    kinds = {e.spec()[0] for e in games.make_games("textworld", "test", 30)}
    assert kinds == set(games.TW_LEVELS)  # 'mix': each level draws its kind from its seed
    parallel = [first_observation(e) for e in envs]
    monkeypatch.setenv("OEL_CACHE", str(tmp_path / "b"))
    assert [first_observation(e) for e in envs] == parallel
    calls = []
    monkeypatch.setattr(games, "pregenerate", lambda envs: calls.append([e.seed for e in envs]))
    drawn = games.make_games("frozenlake", "train", 3, exclude={"no such board"})
    monkeypatch.setattr(model, "generate", lambda m, tok, ids, **kw: [SimpleNamespace(text="[up]", tokens=[0])] * len(ids))
    rollout(None, SimpleNamespace(user_ids=lambda content, thinking: [0]), drawn, RolloutConfig(max_turns=1))
    assert calls == [[e.seed for e in drawn]] * 2


def test_textworld_lost_game_ends_cleanly(tmp_path, monkeypatch):
    """Burning the food loses a cooking game: done, no reward, and the last observation is the game's own message
    without the interpreter's banner, score and RESTART/QUIT prompt."""
    monkeypatch.setenv("OEL_CACHE", str(tmp_path))
    env = TextWorldGame(kind="cooking", level=3)
    env.reset(7)
    env.step("take purple potato from counter")
    assert not env.step("cook purple potato with oven")[2]
    obs, reward, done, info = env.step("cook purple potato with oven")
    assert done and reward == 0.0 and not info["won"] and env.state.lost
    assert obs == "You burned the purple potato!"


def test_rollout_lockstep_scripted(monkeypatch, tmp_path, capsys):
    """A scripted policy (the solver) wins every game in optimal steps; finished games leave the batch; the progress
    bars (levels, then games) are named after the set."""
    import model

    envs = make_games("sokoban", "test", 4) + make_games("frozenlake", "test", 4)
    batches = []

    seeds = []

    def fake_generate(m, tok, prompts, **kw):
        live = [e for e in envs if not e.done]
        batches.append(len(prompts))
        seeds.append(kw["seed"])
        assert len(prompts) == len(live)
        return [SimpleNamespace(text=f"<think>[left]?</think> I go [{e.solve()[0].upper()}] toward [G]", tokens=[0] * 7)
                for e in live]  # the last bracket is not a move: the last valid one counts

    monkeypatch.setattr(model, "generate", fake_generate)
    tok = SimpleNamespace(user_ids=lambda content, thinking: [len(content)])
    trajs = rollout(None, tok, envs, RolloutConfig(), seed=3, desc="deploy mixed 2/3")
    err = capsys.readouterr().err
    assert re.search(r"\rdeploy mixed 2/3: levels: +0%", err) and re.search(r"\rdeploy mixed 2/3: +0%.*game/s", err)
    assert all(t.won for t in trajs) and [t.steps for t in trajs] == [e.optimal for e in envs]
    assert batches[0] == 8 and batches == sorted(batches, reverse=True) and len(batches) == max(e.optimal for e in envs)
    assert seeds == [3000 + t for t in range(len(batches))]  # the rollout's seed, a fresh one each turn
    for t in trajs:  # each turn's state is the last one plus the action taken and the game's answer
        for i in range(1, t.steps):
            prev = t.turns[i - 1]
            assert t.turns[i].state == f"{prev.state}\n\nAction {i}: [{prev.action}]\n\nObservation {i + 1}:\n{prev.feedback}"
    m = metrics(trajs)
    assert m["pass_rate"] == 1.0 and m["tokens_per_turn"] == 7 and m["n"] == 8
    assert m["mean_steps"] == sum(e.optimal for e in envs) / 8 and m["tokens_per_episode"] == 7 * m["mean_steps"]
    save_trajectories(tmp_path / "won.jsonl", trajs)
    assert load_trajectories(tmp_path / "won.jsonl") == trajs and metrics(load_trajectories(tmp_path / "won.jsonl")) == m


def test_rollout_feedback_names_an_invalid_action(monkeypatch):
    """A reply whose only bracket is not a valid action wastes the turn, and the feedback names what it said; a reply
    with no bracket wastes it too, and the next turn's history shows its action as (none); a long invalid bracket is
    named cut to MAX_INVALID characters."""
    import model

    env = make_games("frozenlake", "test", 1)[0]
    monkeypatch.setattr(model, "generate", lambda m, tok, prompts, **kw: [SimpleNamespace(text="I [jump]", tokens=[0])])
    modes = []
    tok = SimpleNamespace(user_ids=lambda content, thinking: modes.append(thinking) or [len(content)])
    closed = []
    monkeypatch.setattr(env, "close", lambda: closed.append(True))
    (traj,) = rollout(None, tok, [env], RolloutConfig(max_turns=1, thinking=None), seed=0)
    assert modes == [None]  # the prompt is in the configured chat mode
    assert traj.turns[0].action == "jump" and traj.turns[0].feedback.startswith("Invalid action [jump]")
    assert closed == [True]  # a game out of turns is closed (a TextWorld interpreter would leak)
    monkeypatch.setattr(model, "generate", lambda m, tok, prompts, **kw: [SimpleNamespace(text="I go up.", tokens=[0])])
    (traj,) = rollout(None, tok, make_games("frozenlake", "test", 1), RolloutConfig(max_turns=2), seed=0)
    first, second = traj.turns  # no bracket: the turn is wasted, and the history says no action was read
    assert first.action is None and first.feedback.startswith("Invalid action: no action in square brackets found.")
    assert second.state == f"{first.state}\n\nAction 1: (none)\n\nObservation 2:\n{first.feedback}"
    ramble = "I [think " + "the hole is near so I should not go down " * 150 + "] so: go."
    monkeypatch.setattr(model, "generate", lambda m, tok, prompts, **kw: [SimpleNamespace(text=ramble, tokens=[0])])
    (traj,) = rollout(None, tok, make_games("frozenlake", "test", 1), RolloutConfig(max_turns=2), seed=0)
    first, second = traj.turns  # a long invalid bracket is cut: every later turn's history repeats it twice
    assert first.action == "think the hole is near so i should no..." and len(first.action) == games.MAX_INVALID
    assert first.feedback.startswith(f"Invalid action [{first.action}].") and len(second.state) < 1500  # not 13,000
    assert second.state == f"{first.state}\n\nAction 1: [{first.action}]\n\nObservation 2:\n{first.feedback}"
    for word in ("x" * games.MAX_INVALID, "x" * (games.MAX_INVALID + 1)):  # kept whole up to MAX_INVALID characters
        monkeypatch.setattr(model, "generate", lambda m, tok, prompts, **kw: [SimpleNamespace(text=f"I [{word}]",
                                                                                              tokens=[0])])
        (traj,) = rollout(None, tok, make_games("frozenlake", "test", 1), RolloutConfig(max_turns=1), seed=0)
        assert traj.turns[0].action == (word if len(word) == games.MAX_INVALID else word[:games.MAX_INVALID - 3] + "...")


def test_rollout_tiny_model_jsonl(tmp_path):
    """The tiny model plays several games: well-formed trajectories, the turn cap holds, JSONL round-trips."""
    import model

    m, tok = model.load("tiny")
    envs = make_games("frozenlake", "test", 3) + make_games("sokoban", "test", 3)
    knowledge = "- EXPERIENCE ITEM: think less."
    trajs = rollout(m, tok, envs, RolloutConfig(max_turns=3, max_new_tokens=16), knowledge=knowledge, seed=0)
    assert [t.game for t in trajs] == ["frozenlake"] * 3 + ["sokoban"] * 3
    for t, env in zip(trajs, envs):
        assert t.seed == env.seed and 1 <= t.steps == len(t.turns) <= 3 and (t.steps == 3 or env.done)
        assert t.response_tokens == sum(x.n_tokens for x in t.turns)
        assert t.turns[0].state.startswith("Observation 1:\nCurrent Board:")
        for i, turn in enumerate(t.turns):
            assert turn.prompt == user_prompt(t.game, turn.state, knowledge)
            assert 1 <= turn.n_tokens <= 16 and turn.action == parse_action(turn.response, set(games.MOVES))
            assert turn.feedback and turn.reward == float(t.won and i == t.steps - 1)
            if i:
                assert turn.state.startswith(t.turns[i - 1].state)
    path = tmp_path / "trajs.jsonl"
    save_trajectories(path, trajs)
    assert load_trajectories(path) == trajs
    assert metrics(load_trajectories(path))["n"] == 6


def test_load_trajectories_malformed_line(tmp_path):
    """A malformed line raises ValueError naming the file and the line number."""
    path = tmp_path / "bad.jsonl"
    save_trajectories(path, [games.Trajectory(game="sokoban", seed=1)])
    with open(path, "a") as f:
        f.write('\n{"game": "sokoban", "seed": 2, "turns": [{"state": "x"}]}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: malformed"):
        load_trajectories(path)


def test_metrics_on_won_and_lost_games():
    """Pass rate counts won games over all games, mean steps the turns over the games, tokens per turn the tokens over
    all turns (not over the games): checked on hand-made games, two won and two lost, of 1 to 5 turns."""
    def game(won, tokens):
        turns = [games.Turn("s", "p", "r", n, "up", "f", 0.0) for n in tokens]
        return games.Trajectory(game="frozenlake", seed=0, turns=turns, won=won, steps=len(turns),
                                response_tokens=sum(tokens))
    trajs = [game(True, [10]), game(False, [1, 2, 3, 4, 5]), game(True, [6, 6]), game(False, [7, 7, 7, 7, 7])]
    assert metrics(trajs) == {"pass_rate": 2 / 4, "mean_steps": 13 / 4, "tokens_per_turn": 72 / 13,
                              "tokens_per_episode": 72 / 4, "n": 4}
    assert metrics([]) == {"pass_rate": 0.0, "mean_steps": 0.0, "tokens_per_turn": 0.0, "tokens_per_episode": 0.0,
                           "n": 0}


def test_rollout_records_a_lost_game_as_lost(monkeypatch):
    """A game that ends lost (a walk into a hole: done, no reward) is recorded as lost beside a won one, and the pass
    rate counts only the won game."""
    import model

    envs = make_games("frozenlake", "test", 20)
    for e in envs:
        e.reset()
    loser = next(e for e in envs if e.hole_cells & {(0, 1), (1, 0)})  # a hole next to the start
    winner = next(e for e in envs if e is not loser)
    into = "right" if (0, 1) in loser.hole_cells else "down"

    def fake_generate(m, tok, prompts, **kw):
        live = [e for e in (winner, loser) if not e.done]
        return [SimpleNamespace(text=f"[{into if e is loser else e.solve()[0]}]", tokens=[0]) for e in live]

    monkeypatch.setattr(model, "generate", fake_generate)
    won, lost = rollout(None, SimpleNamespace(user_ids=lambda content, thinking: [0]), [winner, loser], RolloutConfig())
    assert won.won and won.steps == winner.optimal and won.turns[-1].reward == 1.0
    assert not lost.won and lost.steps == 1 and lost.turns[0].reward == 0.0 and "hole" in lost.turns[0].feedback
    assert metrics([won, lost])["pass_rate"] == 0.5


def test_textworld_generation_retries_other_seeds_then_raises_nolevel(tmp_path, monkeypatch):
    """A map that cannot hold the quest is retried from another derived seed; after 10 failed tries make_textworld
    raises NoLevel (train.py and eval.py print its message) and leaves nothing in the cache."""
    import textworld.challenges
    from textworld.generator import QuestGenerationError

    monkeypatch.setenv("OEL_CACHE", str(tmp_path))
    seeds = []

    def cannot(settings, options):
        seeds.append(str(options.seeds))  # the seeds of the map, objects, quest, ... (a dict)
        raise QuestGenerationError("no room for the quest")

    desc, _, parser = textworld.challenges.CHALLENGES["tw-coin_collector"]
    monkeypatch.setitem(textworld.challenges.CHALLENGES, "tw-coin_collector", (desc, cannot, parser))
    with pytest.raises(games.NoLevel, match="no coin_collector level 1 game could be generated from seed 5"):
        games.make_textworld("coin_collector", 1, 5)
    assert len(seeds) == len(set(seeds)) == 10
    assert os.listdir(tmp_path / "textworld") == []  # no temporary folder left


def test_textworld_level_seeds_stay_within_its_32_bit_seeds(tmp_path, monkeypatch):
    """TextWorld refuses seeds of 2^32 and more. Every level seed of the largest set make_games allows is one it takes
    (and its retries' seeds too); the next set is refused (it used to wrap around, onto other sets')."""
    import textworld
    import textworld.challenges
    from textworld.generator import QuestGenerationError

    with pytest.raises(ValueError, match="32 - 1"):
        textworld.GameOptions().seeds = 2**32  # what the bound is for
    top = max(games.level_seed(split, games.TW_MAX_SET, games.MAX_GAMES - 1) for split in games.SPLITS)
    monkeypatch.setenv("OEL_CACHE", str(tmp_path))
    tried = []

    def cannot(settings, options):  # options.seeds was set: TextWorld took the seed
        tried.append(options.seeds)
        raise QuestGenerationError("no room for the quest")

    desc, _, parser = textworld.challenges.CHALLENGES["tw-coin_collector"]
    monkeypatch.setitem(textworld.challenges.CHALLENGES, "tw-coin_collector", (desc, cannot, parser))
    with pytest.raises(games.NoLevel):
        games.make_textworld("coin_collector", 1, top)  # all 10 tries
    assert len(tried) == 10
    assert make_games("textworld", "ood", 1, seed=games.TW_MAX_SET)[0].seed == games.level_seed("ood", games.TW_MAX_SET, 0)
    with pytest.raises(ValueError, match=f"textworld set seeds go up to {games.TW_MAX_SET} .*got {games.TW_MAX_SET + 1}"):
        make_games("textworld", "train", 1, seed=games.TW_MAX_SET + 1)
    make_games("frozenlake", "train", 1, seed=games.TW_MAX_SET + 1)  # other games take any seed


def test_textworld_game_is_marked_complete_only_when_whole(tmp_path, monkeypatch):
    """The .z8 file, whose presence tells the cache a game exists, is moved into place after the .json the interpreter
    also reads: a crash between the two leaves no game that looks complete, so the next call generates it again."""
    import textworld.challenges
    import textworld.generator

    monkeypatch.setenv("OEL_CACHE", str(tmp_path))
    desc, _, parser = textworld.challenges.CHALLENGES["tw-coin_collector"]
    monkeypatch.setitem(textworld.challenges.CHALLENGES, "tw-coin_collector",
                        (desc, lambda settings, options: None, parser))

    def compile_game(game, options):  # stands in for the real (slow) compilation
        for ext in (".z8", ".json"):
            open(options.path.removesuffix(".z8") + ext, "w").close()

    monkeypatch.setattr(textworld.generator, "compile_game", compile_game)
    real = os.replace

    def crash_on_second(src, dst):
        if moved:
            raise OSError("crashed")
        moved.append(dst)
        real(src, dst)

    moved = []
    monkeypatch.setattr(games.os, "replace", crash_on_second)
    with pytest.raises(OSError, match="crashed"):
        games.make_textworld("coin_collector", 1, 5)
    monkeypatch.setattr(games.os, "replace", real)
    assert not os.path.exists(games.textworld_file("coin_collector", 1, 5))
    assert games.make_textworld("coin_collector", 1, 5) == games.textworld_file("coin_collector", 1, 5)
    assert sorted(os.listdir(tmp_path / "textworld")) == [f"coin_collector-level1-s5{ext}" for ext in (".json", ".z8")]


def test_textworld_reset_switches_levels_and_every_interpreter_is_closed(tmp_path, monkeypatch):
    """reset(seed) plays that level, also on a game that played another; an invalid action's feedback lists the
    commands it points to; observations are the game's text without its runs of blank lines, nor the interpreter's
    prompt and status line (room, score); each interpreter started is closed again: by the next reset, when the game
    ends (after which step raises) and by first_observation."""
    import textworld

    monkeypatch.setenv("OEL_CACHE", str(tmp_path))
    for seed in (5, 6):  # generated first: generation starts interpreters of its own
        games.make_textworld("coin_collector", 1, seed)
    started, closed, real = [], [], textworld.start

    def start(*args, **kwargs):
        env = real(*args, **kwargs)
        close = env.close
        env.close = lambda: closed.append(env) or close()
        started.append(env)
        return env

    monkeypatch.setattr(textworld, "start", start)
    env = TextWorldGame(kind="coin_collector", level=1)
    first = env.reset(5)
    other = env.reset(6)
    assert other != first and env.seed == 6 and started[0] in closed and started[1] not in closed
    commands = other[other.index("\n\nAvailable commands: ["):]
    obs, reward, done, _ = env.step("restart")
    assert obs == f"Invalid action [restart]. Valid actions: the commands listed below.{commands}" and not done
    assert "\n\n\n" not in other and env.step("inventory")[0] == f"You are carrying nothing.{commands}"
    results = play(env, env.solve())
    assert results[-1][2] and results[-1][3]["won"] and started[1] in closed
    with pytest.raises(RuntimeError, match="the game is over"):
        env.step("look")
    assert first_observation(TextWorldGame(kind="coin_collector", level=1, seed=5)) == first
    assert all(e in closed for e in started) and len(started) == 3


def fake_game(path, json=True):
    """A file the cache takes for a whole game: a version 8 story header that says 64 bytes, and the .json beside."""
    head = bytearray(64)
    head[0], head[0x1A:0x1C] = 8, (64 // 8).to_bytes(2, "big")
    open(path, "wb").write(bytes(head))
    if json:
        open(path.removesuffix(".z8") + ".json", "w").write("{}")


def test_textworld_damaged_games_are_made_again_and_stale_temporary_folders_go(tmp_path, monkeypatch):
    """A cached game cut short, emptied, with another header, without its .json or with a damaged one is generated
    again (the interpreter would end the process on the first three, naming no file; without the .json a game has no
    commands; a damaged one is a traceback from inside textworld); a temporary folder left by
    a killed generation more than an hour ago is removed, a recent one (a live generation's) is not."""
    monkeypatch.setenv("OEL_CACHE", str(tmp_path))
    path = games.make_textworld("coin_collector", 1, 5)
    whole = open(path, "rb").read()
    stale, live = tmp_path / "textworld" / "tmpstale", tmp_path / "textworld" / "tmplive"
    for folder in (stale, live):
        folder.mkdir()
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    for damage in (lambda: os.truncate(path, 100_000), lambda: os.truncate(path, 0),
                   lambda: open(path, "r+b").write(b"\x05"), lambda: os.remove(path.removesuffix(".z8") + ".json"),
                   lambda: open(path.removesuffix(".z8") + ".json", "w").write("{bad")):
        damage()
        assert not games.cached_textworld(path)
        assert games.make_textworld("coin_collector", 1, 5) == path and open(path, "rb").read() == whole
        assert games.cached_textworld(path)
    assert not stale.exists() and live.exists()
    assert "Available commands: [" in first_observation(TextWorldGame(kind="coin_collector", level=1, seed=5))


def test_textworld_full_disk_is_an_os_error(tmp_path, monkeypatch):
    """The game compiler (which the challenge's make() runs too) failing on a full disk is an OSError (ENOSPC: train.py
    says to free space, in one line); failing otherwise, it is its own error."""
    import textworld.generator

    monkeypatch.setenv("OEL_CACHE", str(tmp_path))

    def compile_game(game, options):
        raise RuntimeError("couldn't write to story file")

    monkeypatch.setattr(textworld.generator, "compile_game", compile_game)
    for free, error in ((2**20, OSError), (2**40, RuntimeError)):
        monkeypatch.setattr(games.shutil, "disk_usage", lambda path, free=free: SimpleNamespace(free=free))
        with pytest.raises(error) as e:
            games.make_textworld("coin_collector", 1, 5)
        assert error is RuntimeError or e.value.errno == errno.ENOSPC
    assert os.listdir(tmp_path / "textworld") == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_pregenerate_workers_end_with_a_killed_parent(tmp_path):
    """Workers still generating when their parent is killed (SIGKILL: the out-of-memory killer's) end too, instead of
    waiting forever for the next game while holding their memory."""
    code = ("import games; games.pregenerate([games.TextWorldGame(kind='cooking', level=3, seed=s) "
            "for s in range(40)])")
    parent = subprocess.Popen([sys.executable, "-c", code], cwd=Path(games.__file__).parent,
                              env={**os.environ, "OEL_CACHE": str(tmp_path)})
    generating = lambda: any(f.startswith("tmp") for f in os.listdir(tmp_path / "textworld"))  # make_textworld's
    deadline = time.time() + 60
    while not (os.path.isdir(tmp_path / "textworld") and generating()) and time.time() < deadline:
        time.sleep(0.2)
    workers = [pid for pid in os.listdir("/proc") if pid.isdigit() and children_of(pid, parent.pid)]
    parent.kill()
    parent.wait()
    deadline = time.time() + 20
    while any(alive(pid) for pid in workers) and time.time() < deadline:
        time.sleep(0.2)
    left = [pid for pid in workers if alive(pid)]
    for pid in left:  # a failed check leaves nothing running
        os.kill(int(pid), signal.SIGKILL)
    assert workers and not left


def children_of(pid, parent):
    try:
        return int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1]) == parent
    except (OSError, IndexError, ValueError):
        return False


def alive(pid):
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_textworld_file_names_each_setting_as_documented(tmp_path, monkeypatch):
    """Each (kind, level, seed) has its own cache file, named after its settings (a flag by its name alone): a renamed
    file would orphan every game already generated."""
    monkeypatch.setenv("OEL_CACHE", str(tmp_path))
    name = "cooking-recipe1-take1-open-cook-s5.z8"
    assert games.textworld_file("cooking", 3, 5) == str(tmp_path / "textworld" / name)
    names = {games.textworld_file(kind, level, seed) for kind in games.TW_LEVELS for level in (1, 2, 3)
             for seed in (5, 6)}
    assert len(names) == 18


def test_pregenerate_gives_the_uncached_games_to_a_worker_per_core(tmp_path, monkeypatch):
    """pregenerate hands the TextWorld games the cache lacks whole (not the cached ones, nor other games; each once) to
    as many worker processes as there are cores, and the workers ignore Ctrl-C: a terminal sends it to the whole process group, and
    the parent alone stops the run (workers interrupted mid-game would print tracebacks)."""
    monkeypatch.setenv("OEL_CACHE", str(tmp_path))
    envs = [TextWorldGame(kind="coin_collector", level=1, seed=s) for s in (0, 1, 2, 2, 3, 4)]  # level 2 twice
    envs += make_games("frozenlake", "test", 2)
    os.makedirs(tmp_path / "textworld")
    fake_game(games.textworld_file("coin_collector", 1, 1))  # cached
    fake_game(games.textworld_file("coin_collector", 1, 3), json=False)  # not whole: generated again
    calls, real = [], games.ProcessPoolExecutor

    class Pool:  # records what a pool would do, generates nothing
        def __init__(self, workers, **kwargs):
            calls.append((workers, kwargs))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            pass

        def map(self, fn, *args):
            calls.append((fn, list(zip(*args))))
            return []

    monkeypatch.setattr(games, "ProcessPoolExecutor", Pool)
    monkeypatch.setattr(games.os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    games.pregenerate(envs)
    (workers, kwargs), (fn, specs) = calls
    assert workers == 3 and fn is games.make_textworld and specs == [("coin_collector", 1, s) for s in (0, 2, 3, 4)]
    assert kwargs["initargs"] == (os.getpid(),)  # the parent, whose death ends the workers (on Linux)
    with real(1, **kwargs) as pool:  # a worker as pregenerate starts it
        assert pool.submit(signal.getsignal, signal.SIGINT).result() == signal.SIG_IGN


def test_bfs_counts_the_states_it_reached_solved_or_not():
    """The solver reports how many states it reached, also when no move sequence wins (the Sokoban level search
    charges them to its state budget: an unsolvable room must not be free)."""
    env = Sokoban(max_moves=None)
    env.load("# # # # # #\n# P X _ O #\n# # # # # #")  # two pushes right; a step back left is the 4th state
    assert env.optimal == 2 and env.explored == 4
    env.load("# # # # # #\n# X _ P O #\n# # # # # #")  # the box is stuck in the corner: 3 player cells, no win
    assert env.optimal is None and env.explored == 3


def test_board_settings_without_a_level_are_refused_when_made():
    """A one-cell FrozenLake (start and goal on one cell), a negative hole count and a negative min_moves are refused
    with the game's ValueError when the game is made, and min_moves 0 is allowed, as the message says."""
    for make in (lambda: FrozenLake(size=1, holes=0), lambda: FrozenLake(holes=-1), lambda: Sokoban(min_moves=-1)):
        with pytest.raises(ValueError, match="FrozenLake: need|Sokoban: need"):
            make()
    env = Sokoban(min_moves=0, seed=1)
    env.reset()
    assert 1 <= env.optimal <= 5


def test_textworld_cache_needs_a_json_object(tmp_path, monkeypatch):
    """A cached game whose .json is valid JSON but not an object (the interpreter's wrapper reads an object) is not
    taken for a whole game."""
    monkeypatch.setenv("OEL_CACHE", str(tmp_path))
    path = games.textworld_file("coin_collector", 1, 5)
    os.makedirs(os.path.dirname(path))
    fake_game(path)
    assert games.cached_textworld(path)
    for text in ("[]", "null", "1"):
        open(path.removesuffix(".z8") + ".json", "w").write(text)
        assert not games.cached_textworld(path)


def test_textworld_retries_use_no_other_levels_seed(tmp_path, monkeypatch):
    """A train level whose quest cannot be generated retries from seeds that are no other level's, and the same in every
    process: a retried game never replays a held-out one. Every int TextWorld takes is some level's seed (or above
    them all), so a retry gives TextWorld its four sub-seeds, which differ from those of the nearby levels."""
    import textworld
    import textworld.challenges
    from textworld.generator import QuestGenerationError

    monkeypatch.setenv("OEL_CACHE", str(tmp_path))
    given, tried = [], []  # what make_textworld sets options.seeds to; the sub-seeds TextWorld makes of it

    GameOptions = textworld.GameOptions

    class Options(GameOptions):
        seeds = property(GameOptions.seeds.fget,
                         lambda self, value: given.append(value) or GameOptions.seeds.fset(self, value))

    def cannot(settings, options):
        tried.append(str(options.seeds))
        raise QuestGenerationError("no room for the quest")

    def derived(seed):
        options = GameOptions()
        options.seeds = seed
        return str(options.seeds)

    desc, _, parser = textworld.challenges.CHALLENGES["tw-coin_collector"]
    monkeypatch.setitem(textworld.challenges.CHALLENGES, "tw-coin_collector", (desc, cannot, parser))
    monkeypatch.setattr(textworld, "GameOptions", Options)
    level = games.level_seed("train", 0, 0)
    with pytest.raises(games.NoLevel):
        games.make_textworld("coin_collector", 1, level)
    assert given[0] == level and all(isinstance(s, dict) and len(s) == 4 for s in given[1:]) and len(given) == 10
    others = {games.level_seed(split, s, i) for split in games.SPLITS for s in (0, 1) for i in range(128)} - {level}
    assert len(set(tried)) == 10 and tried[0] == derived(level) and not set(tried) & {derived(s) for s in others}
    code = f"""if True:
        import games, textworld.challenges as c
        from textworld.generator import QuestGenerationError
        tried = []
        def cannot(settings, options):
            tried.append(str(options.seeds))
            raise QuestGenerationError()
        c.CHALLENGES["tw-coin_collector"] = (None, cannot, None)
        try:
            games.make_textworld("coin_collector", 1, {level})
        except games.NoLevel:
            print(tried)"""
    for hash_seed in ("1", "2"):  # other processes, with other str hashes
        out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONHASHSEED": hash_seed},
                             cwd=Path(games.__file__).parent, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == str(tried)


def test_textworld_no_level_stays_no_level_on_a_full_disk(tmp_path, monkeypatch):
    """A quest that cannot be generated is NoLevel (advice on the settings) even when the disk is nearly full: only the
    compiler's own errors are taken for a full disk."""
    import textworld.challenges
    from textworld.generator import QuestGenerationError

    monkeypatch.setenv("OEL_CACHE", str(tmp_path))
    monkeypatch.setattr(games.shutil, "disk_usage", lambda path: SimpleNamespace(free=2**20))

    def cannot(settings, options):
        raise QuestGenerationError("no room for the quest")

    desc, _, parser = textworld.challenges.CHALLENGES["tw-coin_collector"]
    monkeypatch.setitem(textworld.challenges.CHALLENGES, "tw-coin_collector", (desc, cannot, parser))
    with pytest.raises(games.NoLevel, match="no coin_collector level 1 game could be generated"):
        games.make_textworld("coin_collector", 1, 5)


def test_make_games_without_exclude_plays_no_level(monkeypatch):
    """Without `exclude` (or with an empty one) make_games only makes the games: it resets no level, so a TextWorld
    set is not generated here, one game after the other, before the rollout generates it in parallel."""
    seen = []
    monkeypatch.setattr(games, "first_observation", lambda env: seen.append(env.seed))
    monkeypatch.setattr(games, "pregenerate", lambda envs: seen.append("pregenerate"))
    assert len(make_games("textworld", "test", 3, level=1)) == len(make_games("frozenlake", "test", 3, exclude=set())) == 3
    assert seen == []

@pytest.mark.parametrize("response", ["[[up]]", "I could go [left or [up]", "[[left]] no: [up]"])
def test_parse_action_reads_the_innermost_brackets(response):
    """A bracket inside another ([[up]], or an unclosed [ before the action) leaves the innermost bracketed text as
    the action, not the text from the outer bracket on."""
    assert parse_action(response, set(games.MOVES)) == parse_action(response) == "up"


def test_rollout_keeps_a_long_valid_action_whole(monkeypatch):
    """A valid action longer than MAX_INVALID characters (TextWorld commands can be) is played and recorded whole:
    only an invalid bracket is cut for the feedback."""
    import model

    long = "take the red hot chili pepper from the kitchen counter"
    assert len(long) > games.MAX_INVALID
    env = make_games("frozenlake", "test", 1)[0]
    played, step = [], env.step
    monkeypatch.setattr(env, "valid_actions", lambda: set(games.MOVES) | {long})
    monkeypatch.setattr(env, "step", lambda action: played.append(action) or step("up" if action == long else action))
    monkeypatch.setattr(model, "generate", lambda m, tok, ids, **kw: [SimpleNamespace(text=f"I [{long.title()}]",
                                                                                      tokens=[0])])
    (traj,) = rollout(None, SimpleNamespace(user_ids=lambda content, thinking: [0]), [env], RolloutConfig(max_turns=1))
    assert played == [long] and traj.turns[0].action == long


def test_rollout_samples_with_the_configured_settings(monkeypatch):
    """Every turn's generate call gets the RolloutConfig's token limit, temperature, top-p and top-k (deploy and
    evaluation sample differently), and the rollout's seed for that turn."""
    import model

    seen = []
    monkeypatch.setattr(model, "generate", lambda m, tok, ids, **kw: seen.append(kw) or
                        [SimpleNamespace(text="[right]", tokens=[0])] * len(ids))
    cfg = RolloutConfig(max_turns=2, max_new_tokens=7, temperature=0.3, top_p=0.6, top_k=5)
    rollout(None, SimpleNamespace(user_ids=lambda content, thinking: [0]), make_games("frozenlake", "test", 2), cfg,
            seed=2)
    assert seen == [dict(max_new_tokens=7, temperature=0.3, top_p=0.6, top_k=5, seed=2000 + t) for t in range(2)]



def test_save_trajectories_keeps_the_old_file_when_a_write_fails(tmp_path, monkeypatch):
    """A save that fails halfway (a full disk, an interrupt) leaves the previous file whole and readable: the episodes
    go to a temporary file that replaces it only once complete."""
    path = tmp_path / "t.jsonl"
    old = [games.Trajectory(game="sokoban", seed=1)]
    save_trajectories(path, old)
    real, written = games.json.dumps, []

    def dumps(obj, **kwargs):
        if written:
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(obj)
        return real(obj, **kwargs)

    monkeypatch.setattr(games.json, "dumps", dumps)
    with pytest.raises(OSError):
        save_trajectories(path, [games.Trajectory(game="frozenlake", seed=s) for s in (2, 3)])
    monkeypatch.setattr(games.json, "dumps", real)
    assert written and load_trajectories(path) == old


def test_load_trajectories_line_without_turns(tmp_path):
    """A line without its turns (valid JSON of the wrong shape, e.g. a hand edit) raises ValueError naming the file
    and the line, not a bare KeyError."""
    path = tmp_path / "bad.jsonl"
    path.write_text('{"game": "sokoban", "seed": 2}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: malformed trajectory line \(KeyError"):
        load_trajectories(path)
