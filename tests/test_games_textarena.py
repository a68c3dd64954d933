"""Our FrozenLake and Sokoban against TextArena's own environments (test-only reference), move by move."""
import random

import numpy as np
import pytest

import games

ta = pytest.importorskip("textarena")
from textarena.envs.FrozenLake.env import FrozenLakeEnv  # noqa: E402  (the bare envs: no wrappers around them)
from textarena.envs.Sokoban.env import SokobanEnv  # noqa: E402


def textarena_frozenlake(env):
    """TextArena's FrozenLake-v0 set to our level."""
    R, C = env.shape
    t = FrozenLakeEnv(size=R, num_holes=len(env.hole_cells))
    t.reset(num_players=1, seed=0)
    grid = [["H" if (r, c) in env.hole_cells else "G" if (r, c) == env.goal else " " for c in range(C)] for r in range(R)]
    t.state.game_state.update(grid=grid, player_pos=env.pos, goal_pos=env.goal)
    return t


def textarena_sokoban(env):
    """TextArena's Sokoban-v0 set to our level (codes: 0 wall, 1 floor, 2 target, 3 box on target, 4 box, 5 player)."""
    (player, boxes), (R, C) = env.state, env.shape
    t = SokobanEnv(dim_room=(R, C), num_boxes=len(boxes))
    t.reset(num_players=1, seed=0)
    fixed = np.array([[0 if (r, c) not in env.floor else 2 if (r, c) in env.targets else 1 for c in range(C)]
                      for r in range(R)])
    state = fixed.copy()
    for b in boxes:
        state[b] = 3 if b in env.targets else 4
    state[player] = 5
    t.room_fixed, t.room_state, t.player_position = fixed, state, np.array(player)
    return t


@pytest.mark.parametrize("options", [{}, {"size": 4, "holes": 3}])
def test_frozenlake_moves_match_textarena(options):
    """Random walks and solver moves on our levels give TextArena's boards, game ends and wins at every step."""
    rng = random.Random(0)
    for env in games.make_games("frozenlake", "test", 30, **options):
        env.reset()
        for moves in ([rng.choice(list(games.MOVES)) for _ in range(8)], env.solve()):
            env.reset()
            t = textarena_frozenlake(env)
            assert t._render_board() == env.board()
            for move in moves:
                r, c = env.pos[0] + games.MOVES[move][0], env.pos[1] + games.MOVES[move][1]
                if not (0 <= r < env.shape[0] and 0 <= c < env.shape[1]):
                    continue  # off the board: TextArena counts an invalid move, we waste the turn (test_games.py)
                _, _, done, info = env.step(move)
                t_done, _ = t.step(f"[{move}]")
                assert t._render_board() == env.board() and t_done == done
                if done:
                    assert (t.state.rewards[0] == 1) == info["won"]
                    break
        assert env.won  # the solver's moves won in both


@pytest.mark.parametrize("options", [{}, {"size": 7, "boxes": 2, "max_moves": None}])
def test_sokoban_moves_match_textarena(options):
    """Random walks and solver moves on our levels give TextArena's boards and wins at every step."""
    rng = random.Random(0)
    for env in games.make_games("sokoban", "test", 30, **options):
        env.reset()
        solution = env.solve()
        for moves in ([rng.choice(list(games.MOVES)) for _ in range(12)], solution):
            env.reset()
            t = textarena_sokoban(env)
            assert t.create_board_str(t.room_state) == env.board()
            for move in moves:
                blocked = env._push(env.state, move)[0] is None
                _, _, done, info = env.step(move)
                if blocked:  # TextArena records an invalid move; the board stays the same in both
                    assert t.create_board_str(t.room_state) == env.board()
                    continue
                t_done, _ = t.step(f"[{move}]")
                assert t.create_board_str(t.room_state) == env.board() and t_done == done
                if done:
                    assert info["won"]
                    break
            if moves is solution:
                assert env.won
