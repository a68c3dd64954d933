import errno
import io
import json
import math
import os
import re
import runpy
import fcntl
import shutil
import signal
import subprocess
import sys
import time
import types
from dataclasses import asdict, dataclass, field, replace
from typing import ClassVar

import huggingface_hub
import pytest
import torch

import eval as evaluation
import games
import model as modeling
import oel
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KNOWLEDGE = ("- EXPERIENCE ITEM: Stepping on H ends the game at once, so always walk around the holes.\n"
             "- EXPERIENCE ITEM: The goal G is reached fastest by moving right and down along the edge.")


@pytest.fixture(scope="module")
def tiny():
    return modeling.load("tiny")


def states(game, split, n, seed):
    return [(game, f"Observation 1:\n{env.reset(env.seed)}") for env in games.make_games(game, split, n, seed=seed)]


def mixed_states():
    """Three states whose prompts differ in length: two games, and a second turn."""
    (sokoban, first), frozenlake = states("sokoban", "train", 1, 0)[0], states("frozenlake", "train", 1, 0)[0]
    return [(sokoban, first), frozenlake, (sokoban, first + "\n\nAction 1: [up]\n\nObservation 2:\nYou moved up.")]


def unequal_responses(monkeypatch):
    """Cut the i-th sampled response of every step to 2 + 2i tokens (the tiny model never stops early), so that
    weighting by sequence or micro-batch differs from weighting by token."""
    real = oel.sample_batch
    monkeypatch.setattr(oel, "sample_batch", lambda *a, **k: [replace(b, response=b.response[: 2 + 2 * i])
                                                            for i, b in enumerate(real(*a, **k))])


def fake_trajectory(i):
    turn = games.Turn(state=f"state {i}", prompt=f"prompt {i}", response=f"<think>hm</think>[up] {i}", n_tokens=5,
                      action="up", feedback="You moved up.", reward=0.0)
    return games.Trajectory(game="frozenlake", seed=i, turns=[turn], won=i % 2 == 0, steps=1, response_tokens=5)


def test_parse_items_keeps_marked_lines_after_thinking():
    """Only marker lines outside the think block are kept, at most two, marker normalised."""
    text = ("<think>\n- EXPERIENCE ITEM: thought, not a lesson\n</think>\nSure.\n"
            "  - EXPERIENCE ITEM:   first lesson\nnoise\n- EXPERIENCE ITEM:\n- EXPERIENCE ITEM: second\n- EXPERIENCE ITEM: third")
    assert oel.parse_items(text) == ["- EXPERIENCE ITEM: first lesson", "- EXPERIENCE ITEM: second"]
    assert oel.parse_items("-   EXPERIENCE ITEM: x\nEXPERIENCE ITEM: y") == []  # the marker is a fixed string
    assert oel.parse_items("1. - EXPERIENCE ITEM: x\nNote - EXPERIENCE ITEM: y") == []  # ... that starts the line
    assert oel.parse_items("<think>\n- EXPERIENCE ITEM: unfinished thought") == []
    repeated = "- EXPERIENCE ITEM: same\n- EXPERIENCE ITEM:  same \n- EXPERIENCE ITEM: other"
    assert oel.parse_items(repeated) == ["- EXPERIENCE ITEM: same", "- EXPERIENCE ITEM: other"]  # a repeat is dropped


def test_trim_knowledge_drops_oldest_items_whole(tiny):
    """The budget is met by dropping the oldest items, never by cutting one."""
    _, tok = tiny
    items = [f"- EXPERIENCE ITEM: lesson number {i} about walking around the holes" for i in range(10)]
    last3 = len(tok.encode("\n".join(items[-3:])))
    kept = oel.trim_knowledge(items, tok, last3)
    assert kept == items[-3:]
    assert oel.trim_knowledge(items, tok, last3 - 1) == items[-2:]
    assert oel.trim_knowledge(items, tok, 10**6) == items
    huge = "- EXPERIENCE ITEM: " + "walk around the holes " * 200  # longer than the budget on its own
    assert oel.trim_knowledge(items[-3:] + [huge], tok, last3) == items[-3:]  # dropped itself, not the others


def test_raw_context_fits_whole_trajectories_newest_first(tiny):
    """Raw context: whole rendered trajectories, newest first, the joined text within the budget; one too long
    for the budget is skipped in favour of older ones (it used to leave the context empty)."""
    _, tok = tiny
    trajs = [fake_trajectory(i) for i in range(4)]
    long = fake_trajectory(9)
    long.turns[0].response = "[up] " * 3000
    one = len(tok.encode(oel.raw_context(trajs[-1:], tok, 10**6)))
    for budget in (2 * one, 2 * one + 10, 3 * one + 20):
        text = oel.raw_context(trajs + [long], tok, budget)
        assert 0 < len(tok.encode(text)) <= budget and "state 9" not in text
        assert text == oel.raw_context(trajs, tok, budget)
        kept = [i for i in range(4) if f"state {i}\n" in text]
        assert kept == list(range(4 - len(kept), 4)) and len(kept) >= 1  # a newest-first run of whole episodes


def test_extraction_prompt_shows_or_hides_knowledge():
    """The extraction prompt has every turn's input and output and the result; knowledge only when shown."""
    t = fake_trajectory(0)
    shown = oel.extraction_prompt(t, KNOWLEDGE, show_knowledge=True)
    hidden = oel.extraction_prompt(t, KNOWLEDGE, show_knowledge=False)
    for text in (shown, hidden):
        assert "state 0" in text and "<think>hm</think>[up] 0" in text and "won" in text and oel.MARKER in text
        assert "You moved up." in text and "prompt 0" not in text  # the feedback, not the repeated prompt
    assert KNOWLEDGE in shown and KNOWLEDGE not in hidden


def test_atomic_write_keeps_the_old_file_when_a_write_fails(tmp_path):
    """A write that fails part-way (here: text UTF-8 cannot encode) leaves the old file whole, not emptied (eval.json,
    pool.json, metrics.jsonl and config.json are written this way)."""
    path = tmp_path / "metrics.jsonl"
    oel.atomic_write(path, "old\n")
    with pytest.raises(UnicodeEncodeError):
        oel.atomic_write(path, "new\n" + "\ud800")
    assert path.read_text() == "old\n"


def test_render_trajectory_shows_each_input_the_result_and_the_last_message():
    """A lost two-turn episode renders as written out here: the first observation (its 'Observation 1:' label
    dropped), then the game's answer to the previous action, each with the full output; the result and the last
    answer of the game."""
    first = games.Turn(state="Observation 1:\nboard A", prompt="p1", response="<think>a</think>[up]", n_tokens=3,
                       action="up", feedback="You moved up.\nboard B", reward=0.0)
    second = games.Turn(state="history", prompt="p2", response="[left]", n_tokens=1, action="left",
                        feedback="You fell into a hole!\nboard C", reward=0.0)
    traj = games.Trajectory(game="frozenlake", seed=0, turns=[first, second], won=False, steps=2, response_tokens=4)
    assert oel.render_trajectory(traj) == (
        "### Turn 1\nInput:\nboard A\n\nOutput:\n<think>a</think>[up]\n\n"
        "### Turn 2\nInput:\nYou moved up.\nboard B\n\nOutput:\n[left]\n\n"
        "### Result\nThe game was lost after 2 step(s). The game's last message:\nYou fell into a hole!\nboard C")


def test_eval_mode_prompts_contain_their_context(tiny, tmp_path):
    """none: no context; knowledge: the knowledge text; raw: whole rendered trajectories within the budget."""
    _, tok = tiny
    (tmp_path / "k.md").write_text(KNOWLEDGE)
    trajs = [fake_trajectory(i) for i in range(6)]
    games.save_trajectories(tmp_path / "t.jsonl", trajs)
    state = states("frozenlake", "test", 1, 0)[0][1]
    (none,) = evaluation.contexts("none", None, tok, 100)
    (know,) = evaluation.contexts("knowledge", str(tmp_path / "k.md"), tok, 1000)
    budget = len(tok.encode(oel.raw_context(trajs[-2:], tok, 10**6))) + 2
    (raw,) = evaluation.contexts("raw", str(tmp_path / "t.jsonl"), tok, budget)
    assert none is None and games.user_prompt("frozenlake", state, none) == games.user_prompt("frozenlake", state)
    assert KNOWLEDGE in games.user_prompt("frozenlake", state, know)
    p = games.user_prompt("frozenlake", state, raw)
    assert oel.render_trajectory(trajs[5]) in p and oel.render_trajectory(trajs[4]) in p  # newest first, whole
    assert "state 3" not in p  # the older ones did not fit
    with pytest.raises(SystemExit, match="needs --context"):
        evaluation.contexts("knowledge", str(tmp_path / "missing.md"), tok, 100)


def heldout_kl(student, teacher, tok, prompts, cfg):
    """Mean per-token KL(student || teacher) on fixed prompts, the student sampling with a fixed seed."""
    with torch.no_grad():
        batch = oel.sample_batch(student, tok, prompts, [KNOWLEDGE], cfg, step=10**3, r=7)
        loss, n = oel.distill_loss(student, teacher, tok, batch, cfg)
    return float(loss / n)


def test_consolidation_samples_with_the_students_current_weights(monkeypatch):
    """On-policy: each step's responses are sampled by the student as it is at that step (not the round's start)."""
    student, tok = modeling.load("tiny")
    teacher = oel.frozen_copy(student, torch.float32)
    real, same = modeling.generate, []

    def spy(m, *a, **kw):
        same.append(all(torch.equal(v, student.state_dict()[k]) for k, v in m.state_dict().items()))
        return real(m, *a, **kw)

    monkeypatch.setattr(oel.modeling, "generate", spy)
    cfg = oel.OELConfig(max_new_tokens=6, batch_size=2, micro_batch=2, steps=3, lr=1e-2, grad_ckpt=False)
    oel.consolidate(student, teacher, tok, states("sokoban", "train", 4, 0), [KNOWLEDGE], cfg)
    assert same == [True] * 3
    assert not all(torch.equal(v, teacher.state_dict()[k]) for k, v in student.state_dict().items())


def test_consolidation_halves_heldout_kl_and_only_trains_student():
    """Distillation moves the student towards the knowledge-conditioned teacher on unseen states; the teacher is untouched."""
    torch.manual_seed(0)
    student, tok = modeling.load("tiny")
    with torch.no_grad():  # the 0.02-std preset barely reads its context; larger weights make the knowledge matter
        for p in student.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.1)
    teacher = oel.frozen_copy(student, torch.float32)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    cfg = oel.OELConfig(max_new_tokens=16, batch_size=8, micro_batch=4, steps=30, lr=1e-3, grad_ckpt=False)
    train_p, test_p = states("sokoban", "train", 24, 0), states("sokoban", "test", 8, 0)
    assert not {s for _, s in train_p} & {s for _, s in test_p}  # held-out states (FrozenLake's boards repeat)
    kl0 = heldout_kl(student, teacher, tok, test_p, cfg)
    logs = oel.consolidate(student, teacher, tok, train_p, [KNOWLEDGE], cfg)
    kl1 = heldout_kl(student, teacher, tok, test_p, cfg)
    assert kl0 > 0.05 and kl1 < 0.5 * kl0, (kl0, kl1)
    assert len(logs) == cfg.steps and logs[-1]["kl"] < logs[0]["kl"]
    assert all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items())


def test_response_hidden_predicts_the_sampled_tokens(tiny):
    """The hidden states distillation scores are the ones that sampled each response token: their log-probs at
    the sampling temperature equal generate()'s, for prompts and responses of different lengths in one batch."""
    m, tok = tiny
    prompts = [tok.user_ids(games.user_prompt(g, s), False) for g, s in mixed_states()]
    outs = modeling.generate(m, tok, prompts, max_new_tokens=12, temperature=0.7, seed=3)
    cut = [(o.tokens[: 12 - 4 * i], o.logprobs[: 12 - 4 * i]) for i, o in enumerate(outs)]  # 12, 8, 4 tokens
    assert len({len(p) for p in prompts}) == 3 and [len(t) for t, _ in cut] == [12, 8, 4]
    with torch.no_grad():
        h = oel.response_hidden(m, prompts, [t for t, _ in cut])  # [N,C]
        logp = (h @ m.output_weight.T / 0.7).log_softmax(-1)
    tokens = torch.tensor([x for t, _ in cut for x in t])
    expected = torch.tensor([x for _, lp in cut for x in lp])
    assert torch.allclose(logp[torch.arange(len(tokens)), tokens], expected, atol=1e-5)


def test_distill_loss_matches_float64_reference(tiny):
    """distill_loss = the sum over response tokens of KL(student || teacher) at kl_temperature, each model run on
    its own prompt + response: checked against float64 copies run one sequence at a time."""
    student, tok = modeling.load("tiny")
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))  # the teacher differs from the student beyond its context
    teacher = oel.frozen_copy(modeling.load("tiny")[0], torch.float32)
    cfg = oel.OELConfig(max_new_tokens=10, batch_size=3, micro_batch=3, kl_temperature=0.7)
    batch = oel.sample_batch(student, tok, mixed_states(), [KNOWLEDGE], cfg, 0, 0)
    batch[0] = replace(batch[0], response=batch[0].response[:4])  # responses of different lengths: right padding
    assert len({len(b.prompt) for b in batch}) == 3 and len({len(b.response) for b in batch}) == 2
    with torch.no_grad():
        loss, n = oel.distill_loss(student, teacher, tok, batch, cfg)
    s64, t64 = oel.frozen_copy(student, torch.float64), oel.frozen_copy(teacher, torch.float64)
    ref = torch.zeros((), dtype=torch.float64)
    for b in batch:
        ids, resp, t_ids = b.prompt, b.response, tok.user_ids(games.user_prompt(b.game, b.state, b.knowledge), cfg.thinking)
        zs = s64(torch.tensor([ids + resp]))[0, len(ids) - 1 : -1] / 0.7  # [len(resp),V]: predicts each response token
        zt = t64(torch.tensor([t_ids + resp]))[0, len(t_ids) - 1 : -1] / 0.7
        ps = zs.log_softmax(-1)
        ref += (ps.exp() * (ps - zt.log_softmax(-1))).sum()
    assert n == sum(len(b.response) for b in batch) > 0
    assert torch.allclose(loss.double(), ref, rtol=1e-4), (loss.item(), ref.item())


def test_sample_batch_walks_through_the_prompts(tiny, monkeypatch):
    """A round's steps walk through one shuffle of its prompts (N / B steps use each exactly once, as the paper's
    code uses each deploy turn once); the student samples in chunks of rollout_batch. Deploy samples from the full
    distribution at 0.7, evaluation at the paper's 0.7 / top-p 0.8 / top-k 20."""
    calls = []
    monkeypatch.setattr(oel.modeling, "generate", lambda m, tok, ids, **kw: calls.append(len(ids)) or
                        [modeling.Completion([1], "", [0.0], True) for _ in ids])
    prompts = [("frozenlake", f"state {i}") for i in range(12)]
    cfg = oel.OELConfig(batch_size=4, rollout_batch=3)
    seen = [b.state for step in range(3) for b in oel.sample_batch(tiny[0], tiny[1], prompts, ["k"], cfg, step, 0)]
    assert sorted(seen) == sorted(s for _, s in prompts) and seen != [s for _, s in prompts] and calls == [3, 1] * 3
    deploy, test = oel.rollout_cfg(cfg, deploy=True), oel.rollout_cfg(cfg)
    assert (deploy.temperature, deploy.top_p, deploy.top_k) == (0.7, 1.0, 0) and (test.top_p, test.top_k) == (0.8, 20)


def test_offloaded_optimizer_matches_adamw_and_resumes(tmp_path):
    """Consolidation with AdamW's state in CPU memory gives torch AdamW's weights, also when resumed from a saved
    step (the master copy is refreshed from the restored weights), and when a run saved without it resumes with it
    or the other way round (--offload_optimizer may change on resume)."""
    prompts = states("sokoban", "train", 6, 0)
    cfg = oel.OELConfig(max_new_tokens=6, batch_size=2, micro_batch=2, steps=4, lr=1e-2, grad_ckpt=False, save_every=2)
    runs = []
    for first, offload, path in ((False, False, None), (True, True, None), (True, True, tmp_path / "a.pt"),
                                 (False, True, tmp_path / "b.pt"), (True, False, tmp_path / "c.pt")):
        student, tok = modeling.load("tiny")
        teacher = oel.frozen_copy(student, torch.float32)
        c = replace(cfg, offload_optimizer=offload)
        if path:  # stop after step 2, then resume in a fresh process's worth of objects
            oel.consolidate(student, teacher, tok, prompts, [KNOWLEDGE], replace(c, steps=2, offload_optimizer=first),
                            str(path))
            student = modeling.load("tiny")[0]
        oel.consolidate(student, teacher, tok, prompts, [KNOWLEDGE], c, str(path) if path else None)
        runs.append(student.state_dict())
    for other in runs[1:]:
        for k, v in runs[0].items():
            assert torch.allclose(other[k], v, rtol=0, atol=1e-6), k
    assert not torch.equal(runs[0]["model.norm.weight"], modeling.load("tiny")[0].state_dict()["model.norm.weight"])


def test_distill_loss_gradient_reaches_only_student(tiny):
    """One backward of the distillation loss fills the student's gradients and none of the teacher's."""
    student, tok = modeling.load("tiny")
    teacher = oel.frozen_copy(student, torch.float32)
    cfg = oel.OELConfig(max_new_tokens=8, batch_size=2, micro_batch=2)
    batch = oel.sample_batch(student, tok, states("frozenlake", "train", 2, 0), [KNOWLEDGE], cfg, 0, 0)
    loss, n = oel.distill_loss(student, teacher, tok, batch, cfg)
    (loss / n).backward()
    assert n == sum(len(b.response) for b in batch) > 0
    assert student.output_weight.grad is not None and student.output_weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())


def test_topk_kl_matches_exact_when_k_is_vocab(tiny):
    """The paper's top-k approximation equals the exact loss when k covers the vocabulary."""
    V = tiny[0].config.vocab_size
    s, t = torch.randn(5, V, dtype=torch.float64), torch.randn(5, V, dtype=torch.float64)
    exact = (torch.softmax(s / 0.7, -1) * (torch.log_softmax(s / 0.7, -1) - torch.log_softmax(t / 0.7, -1))).sum(-1).mean()
    assert torch.allclose(oel.topk_kl(s, t, 0.7, V).double(), exact, rtol=1e-5)


TINY_ARGS = ["--model", "tiny", "--rounds", "2", "--n_train", "4", "--n_test", "3", "--n_ood", "2", "--ood_game",
             "sokoban", "--K", "2", "--n", "2", "--steps", "12", "--batch_size", "2", "--micro_batch", "2", "--lr", "1e-3",
             "--max_new_tokens", "12", "--extract_max_new_tokens", "12", "--max_turns", "2", "--save_every", "1"]


def test_two_round_run_writes_everything_and_resumes_after_kill(tmp_path):
    """A run killed mid-consolidation resumes at its saved step, redoes no finished stage, and ends with the
    same weights as an uninterrupted run."""
    out, ref = tmp_path / "run", tmp_path / "ref"
    args = TINY_ARGS + ["--out_dir", str(out)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (out / "r0" / "consolidate.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (out / "r0" / "consolidate.pt").exists() and not (out / "r0" / "model").exists()
    finished = {p: p.stat().st_mtime_ns for p in [out / "r0" / "deploy.jsonl", out / "r0" / "pool.json",
                                                  out / "base" / "eval.json", *(out / "r0" / "knowledge").iterdir()]}
    step = torch.load(out / "r0" / "consolidate.pt")["step"]
    res = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    assert 0 < step < 12 and f"resuming consolidation at step {step}/12" in res.stdout
    assert "deploy.jsonl on disk, reused" in res.stdout and "eval.json on disk, reused" in res.stdout
    assert all(p.stat().st_mtime_ns == t for p, t in finished.items())  # nothing redone
    for r in (0, 1):
        d = out / f"r{r}"
        assert len(games.load_trajectories(d / "deploy.jsonl")) == 4
        assert sorted(os.listdir(d / "knowledge")) == sorted(f"r{r}_k{k}_{i}.md" for k in range(2) for i in (1, 2))
        assert len(json.loads((d / "pool.json").read_text())) == 2
        assert len(json.loads((d / "train_log.json").read_text())) == 12
        assert (d / "model" / "config.json").exists() and (d / "model" / "model.safetensors").exists()
        assert not (d / "consolidate.pt").exists()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [-1, 0, 1] and all(0 <= r["test_pass_rate"] <= 1 for r in rows)
    assert json.loads((out / "config.json").read_text())["rounds"] == 2
    r1, _ = modeling.load(str(out / "r1" / "model"))
    assert not torch.equal(r1.output_weight, modeling.load("tiny")[0].output_weight)  # training changed the weights
    res = subprocess.run([sys.executable, "train.py", *TINY_ARGS, "--out_dir", str(ref)], cwd=ROOT, env=env,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    r1_ref, _ = modeling.load(str(ref / "r1" / "model"))
    for (k, v), v_ref in zip(r1.state_dict().items(), r1_ref.state_dict().values()):
        assert torch.allclose(v, v_ref, rtol=0, atol=1e-6), k
    with pytest.raises(SystemExit, match=r"other settings \(K, lr\) than now \(K 2 there, 3 now; lr 0.001 there, 0.1 now\)"):
        oel.check_resume(train.parse_args(args + ["--K", "3", "--lr", "0.1"]))
    oel.check_resume(train.parse_args(args + ["--rounds", "3"]))  # extending a run is fine
    with pytest.raises(SystemExit, match="--rounds cannot go below 2"):  # metrics.jsonl would lose round 1
        oel.check_resume(train.parse_args(args + ["--rounds", "1"]))
    with open(out / ".lock", "w") as held:  # as if another train.py were running on the folder (a shared lock: a run's
        fcntl.flock(held, fcntl.LOCK_SH)  # own must be exclusive to meet it)
        with pytest.raises(SystemExit, match="another run is using"):
            oel.run(train.parse_args(args))
    assert evaluation.plot(str(out)).endswith("metrics.png") and (out / "metrics.png").exists()


def test_ctrl_c_says_how_to_resume(tmp_path):
    """Ctrl-C ends train.py with one line saying how to resume (exit status 130), not a traceback; what it printed
    before is kept, also in a pipe's buffer."""
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # stdout is a pipe: block-buffered
    proc = subprocess.Popen([sys.executable, "train.py", *TINY_ARGS, "--out_dir", str(out)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "base").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    stdout, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == f"interrupted: rerun the same command to resume {out}"
    assert "oel | model tiny | game frozenlake | 2 rounds" in stdout and f"| out {out}\n" in stdout  # the first lines


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_eval_ctrl_c_is_one_line(tmp_path, sig):
    """Ctrl-C (or a SIGTERM) during eval.py's games ends it with one line (exit status 130, 143), not a traceback."""
    proc = subprocess.Popen([sys.executable, "eval.py", "--model", "tiny", "--n", "64", "--out", str(tmp_path / "x.json")],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen = ""
    while "game/s" not in seen and proc.poll() is None:  # the games have started (their bar counts games/s)
        seen += proc.stderr.read(1)
    proc.send_signal(sig)
    err = seen + proc.communicate(timeout=60)[1]
    assert proc.returncode == 128 + sig and "Traceback" not in err
    assert err.strip().splitlines()[-1] == "interrupted: the evaluation stopped; rerun it to start over"


CTRL_C_IN_TINY_BUILD = r'''
import os, runpy, signal, sys
import model
signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started with Ctrl-C ignored (a background job)
def make_tiny(path):  # the build, interrupted halfway through
    open(os.path.join(path, "tokenizer.json"), "w").close()
    os.kill(os.getpid(), signal.SIGINT)
model.make_tiny = make_tiny
sys.argv = [sys.argv[1], "--model", "tiny", *sys.argv[2:]]
runpy.run_path(sys.argv[0], run_name="__main__")
'''


@pytest.mark.parametrize("script", ["train.py", "eval.py"])
def test_ctrl_c_before_any_work_is_one_line_and_leaves_no_half_built_preset(script, tmp_path):
    """Ctrl-C before the run's own handler is set (here: while the tiny preset is built, on first use) ends train.py
    and eval.py with one line (exit status 130), not a traceback, and leaves no half-built folder in the cache."""
    env = {**os.environ, "OEL_CACHE": str(tmp_path / "cache")}
    args = [script, "--out_dir" if script == "train.py" else "--out", str(tmp_path / "out")]
    res = subprocess.run([sys.executable, "-c", CTRL_C_IN_TINY_BUILD, *args], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 130 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert res.stderr.strip().splitlines()[-1] == "interrupted"
    assert os.listdir(tmp_path / "cache") == []


@pytest.mark.parametrize("script", ["train.py", "eval.py"])
def test_ctrl_c_while_importing_is_one_line(script, tmp_path):
    """Ctrl-C while the imports run (torch takes seconds; here a stand-in torch that is interrupted) ends with one
    line and exit status 130, not an import traceback."""
    (tmp_path / "torch.py").write_text("raise KeyboardInterrupt\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    res = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 130 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert res.stderr.strip() == "interrupted"


def session_processes(sid):
    """Pids of the live processes in session sid (Linux /proc)."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()  # state ppid pgrp session ...
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            pids.append(pid)
    return pids


def test_ctrl_c_while_textworld_generates_leaves_no_workers(tmp_path):
    """Ctrl-C (here to the main process alone, as `kill -INT` sends it) while worker processes generate TextWorld games
    ends everything: status 130, the one-line message, no worker left generating and holding the output pipe."""
    env = {**os.environ, "OEL_CACHE": str(tmp_path / "cache")}
    proc = subprocess.Popen([sys.executable, "eval.py", "--model", "tiny", "--game", "textworld", "--n", "8",
                             "--out", str(tmp_path / "x.json")], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    seen = ""
    while "| 1/" not in seen and proc.poll() is None:  # a first game generated: the workers are at work
        seen += proc.stderr.read(1)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=30)
    made = list((tmp_path / "cache" / "textworld").glob("*.z8"))  # the games when the process ended
    err = seen + proc.communicate(timeout=30)[1]  # (a worker still generating holds stderr: this waits for it)
    assert proc.returncode == 130 and "interrupted: the evaluation stopped; rerun it to start over" in err
    deadline = time.time() + 30
    while session_processes(proc.pid) and time.time() < deadline:
        time.sleep(0.1)
    assert not session_processes(proc.pid)
    assert list((tmp_path / "cache" / "textworld").glob("*.z8")) == made, "workers outlived the interrupted process"


def test_train_rejects_bad_settings(tmp_path, capsys):
    """Impossible settings and missing checkpoints fail early with a message naming the problem."""
    with pytest.raises(SystemExit, match="--steps must be >= 1"):
        train.check(train.parse_args(["--model", "tiny", "--steps", "0"]))
    for flag in ("--game", "--ood_game"):
        with pytest.raises(SystemExit):
            train.parse_args(["--model", "tiny", flag, "chess"])
        err = capsys.readouterr().err  # newer Pythons list the choices without quotes
        assert "invalid choice: 'chess'" in err and all(g in err.split("choose from")[1] for g in games.ENVS)
    with pytest.raises(SystemExit, match="unknown game 'chess'"):  # an OELConfig built in code
        train.check(oel.OELConfig(model="tiny", game="chess"))
    with pytest.raises(SystemExit, match="no config.json"):
        train.check(train.parse_args(["--model", str(tmp_path)]))
    with pytest.raises(SystemExit, match="--extractor 'no/such/thing/here' is not a checkpoint"):
        train.resolve_model("no/such/thing/here", "--extractor")
    with pytest.raises(SystemExit, match="not a checkpoint directory"):
        train.resolve_model("no/such/thing/here")
    out = ["--out_dir", str(tmp_path / "run")]  # the disk check makes the folder
    modeling.save(*modeling.load("tiny"), tmp_path / "ck")
    with pytest.raises(SystemExit, match="more than the model's context"):
        train.check(train.parse_args(["--model", str(tmp_path / "ck"), "--knowledge_budget", "100000", *out]))
    short = ["--max_turns", "1", "--max_new_tokens", "64", "--extract_max_new_tokens", "64", *out]  # ~640 tokens besides
    train.check(train.parse_args(["--model", str(tmp_path / "ck"), "--knowledge_budget", "7000", *short]))
    with pytest.raises(SystemExit, match="more than the model's context"):  # the budget counts
        train.check(train.parse_args(["--model", str(tmp_path / "ck"), "--knowledge_budget", "8000", *short]))
    for flag, value in (("--lr", "0"), ("--kl_temperature", "0"), ("--lr", "nan"), ("--lr", "inf"), ("--grad_clip", "nan")):
        with pytest.raises(SystemExit, match="must be finite and > 0"):
            train.check_settings(train.parse_args(["--model", "tiny", flag, value]))
    with pytest.raises(SystemExit, match="--kl_temperature must be >= 1e-05"):  # generate's lowest: it samples at it
        train.check_settings(train.parse_args(["--model", "tiny", "--kl_temperature", "1e-40"]))
    train.check_settings(train.parse_args(["--model", "tiny", "--kl_temperature", "1e-5"]))
    with pytest.raises(SystemExit, match="--context must be 'knowledge' or 'raw'"):
        train.check_settings(train.parse_args(["--model", "tiny", "--context", "raws"]))
    with pytest.raises(SystemExit, match="unknown game 'chess'"):
        train.check_settings(oel.OELConfig(model="tiny", ood_game="chess"))
    for game, ood in (("textworld", []), ("frozenlake", ["--ood_game", "frozenlake"])):  # the default ood_game; another
        with pytest.raises(SystemExit, match=f"--ood_game {game} is the game trained on, with its default options"):
            train.check_settings(train.parse_args(["--model", "tiny", "--game", game, *ood]))
    train.check_settings(train.parse_args(["--model", "tiny", "--game", "frozenlake", "--ood_game", "frozenlake",
                                           "--n_ood", "0"]))  # no out-of-distribution set
    train.check_settings(train.parse_args(["--model", "tiny", "--game", "frozenlake", "--ood_game", "frozenlake",
                                           "--game_options", '{"size": 4, "holes": 2}', "--max_turns", "6"]))
    with pytest.raises(SystemExit):
        train.parse_args(["--thinking", "maybe"])
    with pytest.raises(SystemExit, match="--game_options"):
        train.check(train.parse_args(["--model", "tiny", "--game_options", '{"size": 1}']))
    for options, match in (("{size", "Expecting property"), ('{"size": 4.5}', "must be int, got 4.5"),
                           ('{"size": "4"}', "must be int, got '4'"), ('{"sise": 4}', "no option 'sise'"),
                           ('{"seed": 4}', "without 'seed'"), ("[4]", "a JSON object"),
                           ('{"size": 6, "holes": 25}', "no solvable 6x6 board")):  # the last only fails in reset()
        with pytest.raises(SystemExit, match=f"--game_options .*{match}"):
            train.check(train.parse_args(["--model", "tiny", "--game_options", options]))
    capsys.readouterr()
    train.check(train.parse_args(["--model", "tiny", "--game_options", '{"size": 4}', "--max_turns", "5"]))
    assert "first test level takes 6 moves, more than --max_turns 5: no game that long can be won" in capsys.readouterr().out
    train.check(train.parse_args(["--model", "tiny", "--game_options", '{"size": 4}', "--max_turns", "6"]))
    assert "warning" not in capsys.readouterr().out
    for flag, value in (("--topk", "-1"), ("--n_ood", "-1"), ("--seed", "-1"), ("--weight_decay", "-1"),
                        ("--weight_decay", "nan"), ("--weight_decay", "inf")):
        with pytest.raises(SystemExit, match=rf"^error: {flag} must be >= 0 \(and finite\), got {value}"):
            train.check_settings(train.parse_args(["--model", "tiny", flag, value]))
    with pytest.raises(SystemExit, match="must be finite and > 0"):  # a negative clip norm would ascend the loss
        train.check_settings(train.parse_args(["--model", "tiny", "--grad_clip", "-1"]))
    with pytest.raises(SystemExit, match="--n_train, --n_test and --n_ood must be <= 10000"):
        train.check_settings(train.parse_args(["--model", "tiny", "--n_train", "10001"]))
    with pytest.raises(SystemExit, match="--n 9 is more than --n_train 8: each accumulation reads n"):
        train.check_settings(train.parse_args(["--model", "tiny", "--n", "9"]))  # the preset's n_train
    for given in (["--n_train", "2"], ["--n", "4", "--n_train", "2"]):  # the hint holds whether --n was typed or not
        with pytest.raises(SystemExit) as e:
            train.check_settings(train.parse_args(["--model", "tiny", *given]))
        assert e.value.code == ("error: --n 4 is more than --n_train 2: each accumulation reads n of the round's deploy "
                                "games (--model tiny sets --n 4 and --n_train 8 where they are not given)")
    train.check_settings(train.parse_args(["--model", "tiny", "--n", "8"]))
    with pytest.raises(SystemExit, match="--extractor is unused with --context raw"):
        train.check_settings(train.parse_args(["--model", "tiny", "--context", "raw", "--extractor", "tiny"]))
    for flag in ("--grad_ckpt", "--show_knowledge"):  # plain true/false flags take no 'none'
        with pytest.raises(SystemExit):
            train.parse_args([flag, "none"])
    with pytest.raises(SystemExit, match="--topk 1024 must be below the vocabulary size 1024"):
        train.check(train.parse_args(["--model", "tiny", "--topk", "1024"]))
    with pytest.raises(SystemExit, match="--extractor .* no config.json"):
        train.check(train.parse_args(["--model", "tiny", "--extractor", str(tmp_path)]))
    tw = lambda *a: train.parse_args(["--model", "tiny", "--game", "textworld", "--ood_game", "frozenlake", *a])
    train.check_settings(tw("--seed", "143", "--rounds", "165"))  # round 164's set: 143164, the largest TextWorld takes
    for args in (("--seed", "143", "--rounds", "166"), ("--seed", "144")):
        rounds = args[3] if len(args) > 2 else oel.OELConfig.rounds
        with pytest.raises(SystemExit, match=f"--seed {args[1]} is too large for TextWorld with --rounds {rounds}: "
                                             ".*32-bit seeds"):
            train.check_settings(tw(*args))
    big = ["--model", "tiny", "--ood_game", "textworld", "--seed", str(games.TW_MAX_SET + 1)]  # the OOD set is --seed's
    with pytest.raises(SystemExit) as e:  # only the OOD set is too large: the message names no --rounds
        train.check_settings(train.parse_args(big))
    assert e.value.code == (f"error: --seed {games.TW_MAX_SET + 1} is too large for the TextWorld --ood_game (at most "
                            f"{games.TW_MAX_SET}): level seeds would pass 2^32, and TextWorld takes 32-bit seeds")
    train.check_settings(train.parse_args([*big[:-1], str(games.TW_MAX_SET)]))
    train.check_settings(train.parse_args([*big, "--n_ood", "0"]))


def test_train_flags_reach_the_config():
    """Every given flag wins over the defaults and the tiny preset, --thinking none (instruct models) included."""
    assert train.parse_args(["--model", "tiny", "--thinking", "none"]).thinking is None
    assert train.parse_args(["--thinking", "false"]).thinking is False and train.parse_args([]).thinking is True
    cfg = train.parse_args(["--model", "tiny", "--steps", "7", "--lr", "0.5", "--game_options", '{"size": 4}'])
    assert (cfg.steps, cfg.lr, cfg.game_options, cfg.K) == (7, 0.5, '{"size": 4}', train.TINY_RUN["K"])
    assert train.parse_args([]) == oel.OELConfig()  # the tiny preset is for the tiny model only
    assert train.parse_args(["--model", "Qwen/Qwen3-4B"]) == oel.OELConfig(model="Qwen/Qwen3-4B")
    assert train.parse_args(["--model", "tiny"]) == oel.OELConfig(**{**train.TINY_RUN, "model": "tiny"})
    assert [train.parse_bool(s) for s in ("1", "0", "TRUE", "False")] == [True, False, True, False]
    assert [train.parse_bool_or_none(s) for s in ("None", "1", "0")] == [None, True, False]


def test_tiny_preset_writes_apart_and_help_shows_each_flag(capsys):
    """--model tiny writes to runs/tiny, not the default run's folder; --help gives each flag its field's comment and
    default, and ends with the tiny preset's defaults."""
    assert train.parse_args(["--model", "tiny"]).out_dir == "runs/tiny" != oel.OELConfig().out_dir
    with pytest.raises(SystemExit) as e:
        train.parse_args(["--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps to the terminal's width
    assert e.value.code == 0 and out.count("(default: ") == len(asdict(oel.OELConfig()))
    assert "The driver: the whole OEL loop on one GPU" in out
    assert ("--steps STEPS optimizer steps per round (paper's code: 20 for 1.7B/4B FrozenLake, 100 for 8B and "
            "Sokoban) (default: 20)") in out
    assert "--model MODEL checkpoint dir, Hub id, or 'tiny' (default: 'Qwen/Qwen3-1.7B')" in out
    assert out.endswith("--model tiny changes these defaults: " + " ".join(json.dumps(train.TINY_RUN).split()))


def test_train_rejects_every_count_below_one_and_sets_beyond_max_games():
    """Each count that a run divides by or loops over is checked (not only --steps); every game set is capped."""
    for name in ("rounds", "K", "n", "n_train", "n_test", "rollout_batch", "steps", "batch_size", "micro_batch",
                 "max_turns", "max_new_tokens", "extract_max_new_tokens", "knowledge_budget", "save_every"):
        with pytest.raises(SystemExit, match=f"error: --{name} must be >= 1, got 0"):
            train.check_settings(train.parse_args(["--model", "tiny", f"--{name}", "0"]))
    for flag in ("--n_train", "--n_test", "--n_ood"):
        with pytest.raises(SystemExit, match="must be <= 10000"):
            train.check_settings(train.parse_args(["--model", "tiny", flag, "10001"]))
        train.check_settings(train.parse_args(["--model", "tiny", flag, "10000"]))  # the limit itself is fine


def test_train_settings_messages_fit_the_run():
    """The --n hint names the tiny preset only for --model tiny; a --seed too large for TextWorld is fine where no
    TextWorld is played."""
    with pytest.raises(SystemExit) as e:
        train.check_settings(train.parse_args(["--n", "20", "--n_train", "10"]))
    assert e.value.code == "error: --n 20 is more than --n_train 10: each accumulation reads n of the round's deploy games"
    train.check_settings(train.parse_args(["--model", "tiny", "--game", "sokoban", "--ood_game", "frozenlake", "--seed",
                                           str(1000 * games.TW_MAX_SET)]))


def test_train_checkpoint_checks_count_memory_disk_and_tokens(tmp_path, monkeypatch):
    """num_params counts a model's parameters (tied or not); the GPU-memory check allows for --offload_optimizer, the
    disk check for every round's checkpoint, the context check for the extraction response; a corrupt weights file
    is a one-line error; a name that is no directory and no owner/name Hub id is never fetched."""
    m, tok = modeling.load("tiny")
    for tie in (True, False):
        mc = replace(m.config, tie_word_embeddings=tie)
        with torch.device("meta"):
            n = sum(p.numel() for p in modeling.Transformer(mc).parameters())
        assert abs(train.num_params(mc) - n) <= 0.01 * n  # only the norms are left out
    modeling.save(m, tok, tmp_path / "ck")
    P = train.num_params(m.config)
    args = ["--model", str(tmp_path / "ck"), "--out_dir", str(tmp_path / "run"), "--knowledge_budget", "7000",
            "--max_turns", "1", "--max_new_tokens", "64"]  # ~7,640 tokens with a 64-token extraction response
    with pytest.raises(SystemExit, match="more than the model's context"):  # 7000 + 576 + 700 > 8192
        train.check(train.parse_args(args + ["--extract_max_new_tokens", "700"]))
    train.check(train.parse_args(args + ["--extract_max_new_tokens", "616"]))  # 7000 + 576 + 616 = 8192: fits exactly
    args += ["--extract_max_new_tokens", "64"]
    with pytest.raises(SystemExit, match="more than the model's context"):  # 7000 + 2 * (512 + 64) + 64 > 8192:
        train.check(train.parse_args(args + ["--max_turns", "2"]))  # each turn's response is in the extraction prompt
    modeling.save(m, tok, tmp_path / "ex")  # an extractor with a shorter context reads the same prompts
    config = json.loads((tmp_path / "ex" / "config.json").read_text())
    (tmp_path / "ex" / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 4096}))
    with pytest.raises(SystemExit, match="more than the extractor's context of 4096"):
        train.check(train.parse_args(args + ["--extractor", str(tmp_path / "ex")]))
    monkeypatch.setattr(train.shutil, "disk_usage", lambda path: types.SimpleNamespace(free=30 * P))
    train.check(train.parse_args(args + ["--rounds", "1"]))  # 4 bytes a parameter per round + 24: 28 < 30
    with pytest.raises(SystemExit, match="GiB free; the run needs"):  # 32 > 30
        train.check(train.parse_args(args + ["--rounds", "2"]))
    monkeypatch.setattr(train.shutil, "disk_usage", lambda path: types.SimpleNamespace(free=2**50))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: types.SimpleNamespace(total_memory=16 * P))
    with pytest.raises(SystemExit, match=re.escape("this GPU has less (--offload_optimizer true needs 12 bytes")):
        train.check(train.parse_args(args))  # 20 bytes a parameter > 16
    train.check(train.parse_args(args + ["--offload_optimizer", "true"]))  # 12 < 16
    monkeypatch.undo()
    shutil.copytree(tmp_path / "ck", tmp_path / "bad")
    (tmp_path / "bad" / "model.safetensors").write_bytes(b"garbage!" * 10)
    with pytest.raises(SystemExit, match=re.escape(f"error: --model {tmp_path / 'bad'}: ")):
        train.checkpoint_or_exit("--model", str(tmp_path / "bad"))
    for name in ("no-such-dir", "./no/such", "./no-such", "/no-such"):  # a typo'd local path is not sent to the Hub
        with pytest.raises(SystemExit, match="is not a checkpoint directory, 'tiny', or a Hub id"):
            train.resolve_model(name)
    def offline(name, **kw):
        raise OSError("no network\nsecond line")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    for flag in ("--model", "--extractor"):  # the advice names the flag whose checkpoint is missing
        with pytest.raises(SystemExit, match=re.escape(f"(OSError: no network); download it elsewhere and pass its "
                                                       f"directory to {flag}") + "$"):
            train.resolve_model("owner/name", flag)
    (tmp_path / "runs").mkdir()  # a typo'd local path that looks like a Hub id: both are said
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="^error: there is no folder runs/typo, and could not fetch 'runs/typo'"):
        train.resolve_model("runs/typo")


def test_train_checks_settings_before_any_download_then_fetches_both_checkpoints(tmp_path, monkeypatch):
    """train.py refuses bad settings before it fetches anything from the Hub, then fetches --model and --extractor and
    runs on the local folders."""
    fetched, runs, local = [], [], str(modeling.tiny_dir())
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda name, **kw: fetched.append(name) or local)
    monkeypatch.setattr(oel, "run", lambda cfg, device: runs.append(cfg) or [])
    args = ["--model", "owner/model", "--extractor", "owner/extractor", "--max_new_tokens", "64",
            "--extract_max_new_tokens", "64", "--out_dir", str(tmp_path / "run")]
    with pytest.raises(SystemExit, match="--steps must be >= 1"):
        train.main(args + ["--steps", "0"])
    assert fetched == []
    train.main(args)
    assert fetched == ["owner/model", "owner/extractor"]
    assert runs[0].model == runs[0].extractor == local


def test_resolve_model_takes_a_local_folder_as_it_is(tmp_path, monkeypatch):
    """A checkpoint folder, also a relative one spelled like a Hub id (runs/ck), is used as it is, not fetched."""
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda name, **kw: pytest.fail(f"fetched {name}"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "ck").mkdir(parents=True)
    assert train.resolve_model("runs/ck") == "runs/ck"
    assert train.resolve_model(str(tmp_path / "runs" / "ck"), "--extractor") == str(tmp_path / "runs" / "ck")


def test_summary_and_ctrl_c_handler():
    """The summary's first row is the base model, round 0 is round 0, a run without an OOD set shows "-"; the Ctrl-C
    handler is only in place inside its block, however it ends (eval.main and train.main can be called from Python)."""
    rows = [{"round": -1, "test_pass_rate": 0.25, "test_tokens_per_turn": 10.0, "test_mean_steps": 3.0},
            {"round": 0, "test_pass_rate": 9 / 128, "test_tokens_per_turn": 1024.25, "test_mean_steps": 2.0}]
    lines = train.summary(rows).splitlines()  # --n_ood 0: no ood_pass_rate
    assert [line.split("|")[0].strip() for line in lines] == ["round", "base", "0"]
    assert [line.split("|")[-1].strip() for line in lines[1:]] == ["-", "-"]
    assert [x.strip() for x in lines[2].split("|")[1:4]] == ["0.070", "1024.2", "2.0"]  # not 0.0703 and 1.02e+03
    before = [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)]
    with train.stop_on_ctrl_c("x"):
        assert signal.getsignal(signal.SIGINT) is signal.getsignal(signal.SIGTERM) not in before
    assert [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)] == before
    with pytest.raises(SystemExit), train.stop_on_ctrl_c("x"):  # also when the block ends with an error
        raise SystemExit("error: the loss diverged")
    assert [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)] == before


def test_summary_shows_zero_rates_and_the_ood_column():
    """A rate or count of 0 prints as a number ("-" means no OOD set), and a run with an OOD set fills its column."""
    rows = [{"round": -1, "test_pass_rate": 0.0, "test_tokens_per_turn": 0.0, "test_mean_steps": 5.0, "ood_pass_rate": 0.0},
            {"round": 1, "test_pass_rate": 0.5, "test_tokens_per_turn": 12.0, "test_mean_steps": 4.0, "ood_pass_rate": 0.25}]
    cells = [[c.strip() for c in line.split("|")] for line in train.summary(rows).splitlines()]
    assert cells == [["round", "test pass", "tok/turn", "steps", "ood pass"], ["base", "0.000", "0.0", "5.0", "0.000"],
                     ["1", "0.500", "12.0", "4.0", "0.250"]]


def test_resume_compares_settings_by_meaning(tmp_path, monkeypatch):
    """The same run folder, checkpoint folder or game options spelled differently (defaults written out) still
    resume; other settings refuse, once something was written (a failed start leaves only config.json); a run's files
    without a config.json refuse any settings, a log beside them does not count."""
    (tmp_path / "run").mkdir()
    (tmp_path / "ck").mkdir()
    cfg = oel.OELConfig(model=str(tmp_path / "ck"), out_dir=str(tmp_path / "run"), game_options='{"size": 4}')
    oel.atomic_write(tmp_path / "run" / "config.json", json.dumps(oel.asdict(cfg)))
    monkeypatch.chdir(tmp_path)
    oel.check_resume(oel.OELConfig(model="ck", out_dir="run", game_options='{"size": 5}'))  # nothing made yet
    (tmp_path / "run" / "base").mkdir()
    (tmp_path / "run" / ".lock").write_text("")  # run() holds it before it checks
    oel.check_resume(oel.OELConfig(model="ck", out_dir="run", game_options='{"size": 5}'))
    (tmp_path / "run" / "base" / "eval_test.jsonl.part0").write_text("")
    oel.check_resume(oel.OELConfig(model="./ck", out_dir="run", game_options='{ "size":4, "holes": 2 }'))
    with pytest.raises(SystemExit, match=r"other settings \(game_options\)"):
        oel.check_resume(oel.OELConfig(model="ck", out_dir="run", game_options='{"size": 5}'))
    old = oel.asdict(cfg)
    del old["topk"]  # a run made before a setting existed ran with its default
    oel.atomic_write(tmp_path / "run" / "config.json", json.dumps(old))
    oel.check_resume(oel.OELConfig(model="ck", out_dir="run", game_options='{"size": 4}'))
    with pytest.raises(SystemExit, match=r"other settings \(topk\)"):
        oel.check_resume(oel.OELConfig(model="ck", out_dir="run", game_options='{"size": 4}', topk=256))
    same = dict(model="ck", out_dir="run", game_options='{"size": 4}')
    oel.check_resume(oel.OELConfig(**same, rounds=5, micro_batch=1, rollout_batch=7, save_every=3, grad_ckpt=False,
                                   offload_optimizer=True))  # may change
    for key, value in (("thinking", None), ("game", "sokoban"), ("seed", 1), ("context", "raw"), ("n_test", 7)):
        with pytest.raises(SystemExit, match=rf"other settings \({key}\)"):
            oel.check_resume(oel.OELConfig(**{**same, key: value}))
    for r in (0, 1):  # the run's two rounds started: metrics.jsonl would lose round 1
        (tmp_path / "run" / f"r{r}").mkdir()
    with pytest.raises(SystemExit, match="--rounds cannot go below 2"):
        oel.check_resume(oel.OELConfig(**same, rounds=1))
    with pytest.raises(SystemExit, match=r"other settings \(seed\)"):  # run() checks before it writes config.json
        oel.run(oel.OELConfig(**same, seed=1))
    assert json.loads((tmp_path / "run" / "config.json").read_text()) == old
    (tmp_path / "run" / "config.json").unlink()  # lost: any flags would reuse the run's files
    with pytest.raises(SystemExit, match="holds files but no config.json"):
        oel.run(oel.OELConfig(**same, seed=1))
    assert not (tmp_path / "run" / "config.json").exists()
    (tmp_path / "fresh").mkdir()  # a log the shell redirects into a new run's folder, a config.json.tmp a failed
    for name in ("train.log", "config.json.tmp"):  # write left: not a run's files
        (tmp_path / "fresh" / name).write_text("x")
    oel.check_resume(oel.OELConfig(**{**same, "out_dir": "fresh"}))
    # options of another game (the game changed too) compare as JSON rather than failing to build the new game
    assert not oel.same_setting("game_options", '{"boxes": 2}', '{"holes": 1}', "frozenlake")
    assert oel.same_setting("game_options", '{"boxes": 2}', '{"boxes":2}', "frozenlake")


@dataclass
class Line:
    """A game a fork might add: walk right along a line to its end. Annotations as strings, as under
    `from __future__ import annotations`."""
    name: ClassVar[str] = "line"
    instruction: ClassVar[str] = "Walk to the end. Wrap your action in square brackets, e.g. [right]."
    length: "int" = 3
    slip: "float | None" = None  # unused: an option typed float
    marks: "list[int]" = field(default_factory=list)  # unused: an option with a default factory
    seed: "int | None" = None

    def reset(self, seed=None):
        if self.length < 2:
            raise RuntimeError("no level: length must be >= 2")
        self.pos, self.done = 0, False
        return self.observation()

    def observation(self):
        return "".join("P" if i == self.pos else "." for i in range(self.length))

    def step(self, action):
        self.pos += action == "right"
        self.done = self.pos == self.length - 1
        return self.observation(), float(self.done), self.done, {"won": self.done}

    def solve(self):
        return ["right"] * (self.length - 1 - self.pos)

    def valid_actions(self):
        return {"right", "wait"}

    def close(self):
        pass


def test_eval_plays_a_new_games_options(tmp_path, monkeypatch):
    """eval.py plays a new game with its options (--game_options, as train.py names it, or --options) and names the
    result by those that differ from the defaults, one with a default factory included."""
    monkeypatch.setitem(games.ENVS, "line", Line)
    monkeypatch.chdir(tmp_path)
    args = ["--model", "tiny", "--game", "line", "--n", "1", "--max_turns", "1", "--max_new_tokens", "1"]
    evaluation.main(args + ["--game_options", '{"length": 4, "marks": [1]}'])
    evaluation.main(args + ["--options", '{"marks": []}'])  # the default
    assert sorted(p.name for p in tmp_path.glob("eval_*.json")) == [
        "eval_tiny_line-length4-marks[1]_test_n1_s0_think_t1_m1_none.json", "eval_tiny_line_test_n1_s0_think_t1_m1_none.json"]


def test_a_new_game_gets_its_instruction_options_and_checks(monkeypatch):
    """A game registered in games.ENVS gets its own instruction, its options typed from its annotations (an int
    JSON value sets a float), and check_game plays its first level with its solver through the action parser."""
    for name, cls in games.ENVS.items():
        assert cls.name == name and "square brackets" in cls.instruction
    monkeypatch.setitem(games.ENVS, "line", Line)
    assert games.user_prompt("line", "P..").startswith(Line.instruction)
    g = games.make_games("line", "test", 2, length=4, slip=0)
    assert [(x.length, x.slip, type(x.slip)) for x in g] == [(4, 0.0, float)] * 2
    with pytest.raises(ValueError, match=re.escape("option 'slip' must be float | None, got '0'")):
        games.make_games("line", "test", 1, slip="0")
    train.check_game("line", '{"length": 5, "slip": 1}', max_turns=4)
    with pytest.raises(ValueError, match=re.escape("""--options '{"length": 1}' for line: no level: length must be""")):
        train.check_game("line", '{"length": 1}', 5, flag="--options")
    bad = {"has no solution": dict(solve=lambda self: None),
           "its solver's plan does not win it": dict(solve=lambda self: ["wait"]),
           "level: its solver's plan does not win it": dict(solve=lambda self: []),  # empty: a plan, not 'no solution'
           "its solver's action 'Right' reads back from a reply as None": dict(
               solve=lambda self: ["Right"] * 2, valid_actions=lambda self: {"Right"}),
           "it needs name = 'line'": dict(name="liner"),  # a variant that kept another's name
           "and an instruction string": dict(instruction=None)}
    closed = []
    for match, attrs in bad.items():
        closing = dict(close=lambda self: closed.append(self.seed), **attrs)
        monkeypatch.setitem(games.ENVS, "line", type("Broken", (Line,), closing))
        with pytest.raises(ValueError, match=match):
            train.check_game("line", "", 5)
    assert closed == [games.level_seed("test", 0, 0)] * 4  # the level checked is closed, also when it fails
    closed.clear()
    monkeypatch.setitem(games.ENVS, "line", type("Closing", (Line,), dict(close=lambda self: closed.append(self.seed))))
    train.check_game("line", "", 5, split="ood")
    assert closed == [games.level_seed("ood", 0, 0)]  # the first level of the split asked for
    closed.clear()  # train.py and eval.py check the first level of the set they play: --seed's
    train.check_settings(train.parse_args(["--model", "tiny", "--game", "line", "--ood_game", "sokoban", "--seed", "7"]))
    with pytest.raises(SystemExit):  # checked, then stopped where the model loads
        evaluation.main(["--model", "not-loaded", "--game", "line", "--split", "ood", "--seed", "9"])
    assert closed == [games.level_seed("test", 7, 0), games.level_seed("ood", 9, 0)]
    train.observation_tokens(types.SimpleNamespace(encode=list), "line", "", "ood", seed=3)  # the context estimate too
    assert closed[-1] == games.level_seed("ood", 3, 0)
    with pytest.raises(ValueError, match="unknown game 'chess'; choose from"):  # not a KeyError
        train.check_game("chess", "", 5)


def test_settings_without_a_later_level_end_with_one_line(tmp_path, monkeypatch):
    """Settings that admit the first level (the checks build it) but not a later one stop train.py and eval.py with
    the game's message as one line, not a traceback."""
    first = games.level_seed("test", 0, 0)

    def reset(self, seed=None):
        if self.seed != first:
            raise games.NoLevel(f"line: no level of length {self.length} for seed {self.seed}")
        return Line.reset(self, seed)

    monkeypatch.setitem(games.ENVS, "line", type("Rare", (Line,), dict(reset=reset)))
    monkeypatch.chdir(tmp_path)
    run = lambda: evaluation.main(["--model", "tiny", "--game", "line", "--n", "2", "--max_new_tokens", "1"])
    with pytest.raises(SystemExit) as e:
        train.cli(run)
    second = games.level_seed("test", 0, 1)
    assert e.value.code == (f"error: line: no level of length 3 for seed {second}; the checks at the start built the "
                            "first level with these settings, but not this one")


def test_eval_checks_the_split_it_plays(tmp_path, monkeypatch, capsys):
    """eval.py builds the first level of the split it plays, not the test split's, before loading a model: settings
    that admit no level of it, and observations of it too long for the model's context, are errors."""
    ood = lambda env: env.seed % 3 == games.SPLITS.index("ood")

    class OodLine(Line):  # no ood level of length 3; ood levels start with 6000 more tokens
        def reset(self, seed=None):
            if ood(self) and self.length == 3:
                raise games.NoLevel("no ood level of length 3")
            return Line.reset(self, seed)

        def observation(self):
            return Line.observation(self) + (" far" * 3000 if ood(self) else "")

    monkeypatch.setitem(games.ENVS, "line", OodLine)
    monkeypatch.setattr(oel, "play", lambda *a, **k: pytest.fail("played"))
    args = ["--model", "tiny", "--game", "line", "--split", "ood", "--n", "1", "--out", str(tmp_path / "x.json")]
    for more, match in (([], "--options '' for line: no ood level of length 3"),
                        (["--options", '{"length": 4}', "--max_turns", "2"], "more than the model's context")):
        with pytest.raises(SystemExit):
            evaluation.main(args + more)
        assert match in capsys.readouterr().err
    monkeypatch.setattr(evaluation, "check_game", lambda *a: None)  # (a TextWorld game takes seconds to generate)
    monkeypatch.setattr(evaluation, "check_writable", lambda *a: sys.exit("past the checks"))
    for seed, ok in ((games.TW_MAX_SET + 1, False), (games.TW_MAX_SET, True)):  # TextWorld takes 32-bit level seeds
        with pytest.raises(SystemExit, match="past the checks" if ok else "2"):
            evaluation.main(["--model", "tiny", "--game", "textworld", "--seed", str(seed), "--n", "1"])
        assert (f"--seed {seed}: TextWorld's level sets go up to {games.TW_MAX_SET}" in capsys.readouterr().err) != ok


def test_extract_pool_accumulates_saves_versions_and_resumes(tiny, tmp_path, monkeypatch):
    """Each accumulation appends the new lessons of every trajectory it reads, under the budget, saving each version;
    a rerun reads the saved versions instead of generating again."""
    _, tok = tiny
    trajs = [fake_trajectory(i) for i in range(5)]
    calls, texts, step_seeds = [], [], []

    def fake_generate(m, tok, prompts, **kw):  # lesson names the trajectory read, so the order is visible
        calls.append(len(prompts))
        texts.append([tok.decode(p) for p in prompts])
        step_seeds.append(kw["seed"])
        seeds = [int(tok.decode(p).split("state ")[1].split()[0]) for p in prompts]
        return [modeling.Completion([], f"<think>x</think>\n{oel.MARKER} from {s}\nnoise\n{oel.MARKER} more {s}", [], True)
                for s in seeds]

    monkeypatch.setattr(oel.modeling, "generate", fake_generate)
    cfg = oel.OELConfig(K=3, n=4, knowledge_budget=len(tok.encode(f"{oel.MARKER} more 1\n" * 5)))
    pool = oel.extract_pool(None, tok, trajs, cfg, str(tmp_path), r=0)
    orders = oel.accumulation_orders(cfg, 0, len(trajs))
    assert calls == [3] * 4 and len(pool) == 3 and len({tuple(o) for o in orders}) > 1
    for k, order in enumerate(orders):
        every = [f"{oel.MARKER} {w} {i}" for i in order for w in ("from", "more")]
        assert pool[k].splitlines() == oel.trim_knowledge(every, tok, cfg.knowledge_budget)
        assert len(pool[k].splitlines()) < len(every)  # the budget dropped the oldest
        assert (tmp_path / "knowledge" / f"r0_k{k}_1.md").read_text().splitlines() == every[:2]
    assert len(set(step_seeds)) == 4 and not any("Experience gathered so far" in x for p in texts for x in p)
    assert step_seeds == [oel.seed_of(cfg.seed, 0, "extract", i) for i in range(1, 5)]  # named: no round collides
    r0_seeds = list(step_seeds)
    oel.extract_pool(None, tok, trajs, cfg, str(tmp_path / "r1"), r=1)
    assert not set(step_seeds[4:]) & set(r0_seeds)  # another round samples its extractions afresh
    calls.clear()
    assert oel.extract_pool(None, tok, trajs, cfg, str(tmp_path), r=0) == pool and calls == []
    os.remove(tmp_path / "knowledge" / "r0_k1_4.md")  # killed while writing the last step's versions: that step is redone
    assert oel.extract_pool(None, tok, trajs, cfg, str(tmp_path), r=0) == pool and calls == [3]
    (tmp_path / "knowledge" / "r0_k1_2.md").write_bytes(b"caf\xe9")  # damaged (a copy, a hand edit): named
    with pytest.raises(SystemExit, match=r"r0_k1_2.md cannot be read back \('utf-8' codec"):
        oel.extract_pool(None, tok, trajs, cfg, str(tmp_path), r=0)
    texts.clear()  # shown: each accumulation sees its own knowledge so far, and only that
    oel.extract_pool(None, tok, trajs, replace(cfg, show_knowledge=True), str(tmp_path / "shown"), r=0)
    for i, step in enumerate(texts[1:], 1):
        for k, text in enumerate(step):
            known = (tmp_path / "shown" / "knowledge" / f"r0_k{k}_{i}.md").read_text().strip()
            assert text.split("## Experience gathered so far\n")[1].split("\n\n## Episode")[0] == known


def test_extraction_warns_when_thinking_is_cut_off(tiny, tmp_path, monkeypatch, capsys):
    """Responses that hit the token limit inside a think block give no lessons, and the run says why, once a round (and
    that it counts only the steps made since a resume)."""
    _, tok = tiny
    cut = modeling.Completion([], f"{modeling.THINK}\nlet me think about", [], False)
    done = modeling.Completion([], f"{modeling.THINK}x{modeling.END_THINK}\n{oel.MARKER} a lesson", [], True)
    long = modeling.Completion([], f"{oel.MARKER} another lesson, cut off after its", [], False)  # no think block
    ended = modeling.Completion([], f"{modeling.THINK}\nno more to say", [], True)  # stopped, not out of tokens
    monkeypatch.setattr(oel.modeling, "generate", lambda m, tok, prompts, **kw: [cut, done, long, ended][:len(prompts)])
    for thinking in (True, False):
        cfg = oel.OELConfig(K=4, n=2, thinking=thinking)
        trajs = [fake_trajectory(0), fake_trajectory(1)]
        pool = oel.extract_pool(None, tok, trajs, cfg, str(tmp_path / str(thinking)), r=0)
        assert pool == ["", f"{oel.MARKER} a lesson", f"{oel.MARKER} another lesson, cut off after its", ""]
        out = capsys.readouterr().out
        assert out.count("warning") == 1 and "2 of 8 extraction responses ran out of tokens inside a think block" in out
        assert ("non-thinking mode" in out) == thinking  # advised only when thinking is on
    (tmp_path / "True" / "knowledge" / "r0_k0_2.md").unlink()  # resumed inside step 2: step 1 is read back
    oel.extract_pool(None, tok, trajs, cfg, str(tmp_path / "True"), r=0)
    assert "1 of 4 extraction responses ran out of tokens inside a think block (no lessons from them, not counting " \
           "the first 1 of 2 steps, made before a resume)" in capsys.readouterr().out


UTF8_SCRIPT = r'''
import codecs, json, locale, shutil, sys
import eval as evaluation, model as modeling, oel
from tests.test_oel import fake_trajectory
assert codecs.lookup(locale.getpreferredencoding(False)).name == "ascii", locale.getpreferredencoding(False)
out, lesson = sys.argv[1], "- EXPERIENCE ITEM: push \u2192 then \u201cleft\u201d, na\u00efvely"
src, ckpt = modeling.tiny_dir(), f"{out}/ckpt"  # a checkpoint whose JSON files hold UTF-8 text
shutil.copytree(src, ckpt)
for name in ("config.json", "tokenizer_config.json"):
    d = json.load(open(f"{ckpt}/{name}", encoding="utf-8"))
    open(f"{ckpt}/{name}", "w", encoding="utf-8").write(json.dumps({**d, "note": "caf\u00e9"}, ensure_ascii=False))
open(f"{ckpt}/chat_template.jinja", "w", encoding="utf-8").write("{# caf\u00e9 #}")
m, tok = modeling.load(ckpt)
modeling.save(m, tok, f"{out}/again")  # the template is kept as UTF-8 too
assert open(f"{out}/again/chat_template.jinja", encoding="utf-8").read() == "{# caf\u00e9 #}"
oel.modeling.generate = lambda m, tok, prompts, **kw: [modeling.Completion([], lesson, [], True) for _ in prompts]
cfg = oel.OELConfig(K=1, n=2)
pool = oel.extract_pool(None, tok, [fake_trajectory(i) for i in range(2)], cfg, out, r=0)  # written
assert pool == [lesson], pool
assert oel.extract_pool(None, tok, [fake_trajectory(i) for i in range(2)], cfg, out, r=0) == pool  # read back
assert evaluation.read_context("knowledge", f"{out}/knowledge/r0_k0_2.md") == [lesson + "\n"]
print("ok")
'''


def test_text_files_are_utf8_under_an_ascii_locale(tmp_path):
    """Knowledge with non-ASCII text is written, resumed from and read by eval.py, and a checkpoint's JSON files and
    chat template with UTF-8 text load and save, under a locale whose default encoding is ASCII (LC_ALL=C, no UTF-8
    mode)."""
    env = {**os.environ, "LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0", "PYTHONPATH": ROOT}
    res = subprocess.run([sys.executable, "-c", UTF8_SCRIPT, str(tmp_path)], cwd=ROOT, env=env, capture_output=True,
                         text=True, encoding="utf-8")
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]


def test_raw_context_pool_replaces_extraction(tmp_path):
    """With context 'raw' the teacher's pool is budget-capped rendered trajectories and nothing is extracted;
    game settings reach every game set."""
    cfg = oel.OELConfig(model="tiny", out_dir=str(tmp_path), rounds=1, context="raw", n_train=3, n_test=1, n_ood=0,
                        game_options='{"size": 4, "holes": 3}',
                        K=2, n=3, knowledge_budget=3000, steps=1, batch_size=2, micro_batch=2, max_new_tokens=8,
                        max_turns=2, save_every=1)
    oel.run(cfg)
    _, tok = modeling.load("tiny")
    pool = json.loads((tmp_path / "r0" / "pool.json").read_text())
    assert len(pool) == 2 and all(p.startswith("## Episode (frozenlake)") and len(tok.encode(p)) <= 3000 for p in pool)
    trajs = games.load_trajectories(tmp_path / "r0" / "deploy.jsonl")  # each context reads its own shuffle
    orders = oel.accumulation_orders(cfg, 0, len(trajs))
    assert pool == [oel.raw_context([trajs[i] for i in o], tok, 3000) for o in orders] and orders[0] != orders[1]
    assert not (tmp_path / "r0" / "knowledge").exists() and (tmp_path / "r0" / "model" / "config.json").exists()
    for path in ("r0/deploy.jsonl", "base/eval_test.jsonl"):  # the game settings reach deploy and evaluation
        board = games.load_trajectories(tmp_path / path)[0].turns[0].state
        assert "+-----+-----+-----+-----+" in board and board.count("  H  ") == 3


def test_eval_cli_writes_result_and_trajectories(tmp_path):
    """eval.py plays a game set with a knowledge file in context and writes metrics JSON and trajectories."""
    (tmp_path / "k.md").write_text(KNOWLEDGE)
    out = tmp_path / "res.json"
    evaluation.main(["--model", "tiny", "--game", "sokoban", "--n", "3", "--mode", "knowledge", "--context",
                     str(tmp_path / "k.md"), "--max_turns", "2", "--max_new_tokens", "6", "--out", str(out)])
    res = json.loads(out.read_text())
    assert res["n"] == 3 and res["mode"] == "knowledge" and 0 <= res["pass_rate"] <= 1
    trajs = games.load_trajectories(tmp_path / "res.jsonl")
    assert len(trajs) == 3 and all(KNOWLEDGE in t.turns[0].prompt for t in trajs)
    assert res["budget"] == oel.OELConfig.knowledge_budget  # no run folder around the context: the default


def test_eval_cli_plays_the_asked_set_with_every_context(tmp_path):
    """--split and --options choose the games played; every text of a pool.json is used, each on its share of the
    games; a context inside a run folder takes that run's knowledge budget."""
    (tmp_path / "r0").mkdir()
    (tmp_path / "config.json").write_text(json.dumps({"knowledge_budget": 300}))
    texts = ["- EXPERIENCE ITEM: first text", "- EXPERIENCE ITEM: second text"]
    (tmp_path / "r0" / "pool.json").write_text(json.dumps(texts))
    out = tmp_path / "res.json"
    evaluation.main(["--model", "tiny", "--game", "sokoban", "--split", "ood", "--n", "4", "--options", '{"size": 7}',
                     "--mode", "knowledge", "--context", str(tmp_path / "r0" / "pool.json"), "--max_turns", "1",
                     "--max_new_tokens", "2", "--out", str(out)])
    res = json.loads(out.read_text())
    assert res["budget"] == 300 and res["split"] == "ood"
    trajs = games.load_trajectories(tmp_path / "res.jsonl")
    envs = {e.seed: e for e in games.make_games("sokoban", "ood", 4, size=7)}
    assert sorted(t.seed for t in trajs) == sorted(envs)
    for t in trajs:
        assert t.turns[0].state == f"Observation 1:\n{games.first_observation(envs[t.seed])}"
    assert [sum(text in t.turns[0].prompt for t in trajs) for text in texts] == [2, 2]


def test_eval_defaults_follow_the_run(tmp_path, capsys):
    """eval.py writes beside a checkpoint folder (r0 and r1 results do not overwrite each other), takes the raw-context
    budget from the run that made the context, and rejects bad flags before loading any model."""
    (tmp_path / "model").mkdir()
    assert evaluation.default_out(str(tmp_path / "model"), "x") == str(tmp_path / "eval_x.json")
    assert evaluation.default_out("Qwen/Qwen3-1.7B", "x") == "eval_Qwen--Qwen3-1.7B_x.json"
    (tmp_path / "r0" / "knowledge").mkdir(parents=True)
    (tmp_path / "config.json").write_text(json.dumps({"knowledge_budget": 300}))
    (tmp_path / "r0" / "config.json").write_text(json.dumps({"model_type": "qwen3"}))  # not a run's config
    assert evaluation.run_setting("knowledge_budget", str(tmp_path / "r0" / "deploy.jsonl")) == 300
    assert evaluation.run_setting("knowledge_budget", str(tmp_path / "r0" / "knowledge" / "r0_k0_4.md")) == 300
    assert evaluation.run_setting("thinking", str(tmp_path / "r0" / "deploy.jsonl")) is oel.OELConfig.thinking
    (tmp_path / "k.md").write_text(KNOWLEDGE)
    k = ["--mode", "knowledge", "--context", str(tmp_path / "k.md")]
    limits = "need 1 <= --n <= 10000, --seed >= 0, and --max_turns, --max_new_tokens and --rollout_batch >= 1"
    for bad, match in ((["--thinking", "maybe"], "expected true, false or none"), (["--mode", "raw"], "needs --context"),
                       (["--mode", "raw", "--context", str(tmp_path / "no.jsonl")], "needs --context"),
                       (["--n", "0"], limits), (["--n", "10001"], limits), (["--seed", "-1"], limits),
                       (["--max_turns", "0"], limits), (["--max_new_tokens", "0"], limits),
                       (["--rollout_batch", "0"], limits), (["--split", "dev"], "invalid choice: 'dev'"), (["--game", "chess"], "invalid choice: 'chess'"),
                       (["--options", "{size"], "--options '{size' for frozenlake"),
                       (["--game", "sokoban", "--options", '{"size": 2}'], "for sokoban: Sokoban: need 5 <= size <= 64"),
                       ([*k, "--budget", "0"], "--budget must be >= 1"),
                       (["--context", str(tmp_path / "k.md")], "--context is only read by --mode knowledge or raw"),
                       (["--budget", "100"], "--budget is only read by --mode knowledge or raw")):
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:  # the flag's own message, not the missing model's
            evaluation.main(["--model", str(tmp_path / "not-loaded"), *bad])
        assert match in f"{e.value.code} {capsys.readouterr().err}", bad
    with pytest.raises(SystemExit):
        evaluation.main([])
    assert "--model is required unless --plot is given" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # an impossible board: found by playing a first level, before loading any model
        evaluation.main(["--model", str(tmp_path / "not-loaded"), "--options", '{"size": 6, "holes": 25}'])
    err = capsys.readouterr().err  # the message names eval.py's flag, --options
    assert "error: --options '{\"size\": 6, \"holes\": 25}' for frozenlake: " in err and "no solvable 6x6 board" in err


def test_eval_plays_the_runs_own_held_out_levels(tmp_path):
    """By default a run's checkpoint plays the run's own test set (its seed and n_test: seed 0 would share levels with
    the deploy games of a run with another seed) and OOD set (n_ood); flags still choose others."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(json.dumps({"seed": 3, "n_test": 2, "n_ood": 3, "game": "sokoban",
                                                              "ood_game": "frozenlake", "max_turns": 1, "thinking": False}))
    modeling.save(*modeling.load("tiny"), tmp_path / "run" / "r0" / "model")
    args = ["--model", str(tmp_path / "run" / "r0" / "model"), "--max_new_tokens", "1"]
    for extra in ([], ["--split", "ood"], ["--seed", "0", "--n", "1"]):
        evaluation.main(args + extra)
    r0 = tmp_path / "run" / "r0"
    assert sorted(p.name for p in r0.glob("eval_*.json")) == ["eval_frozenlake_ood_n3_s3_nothink_t1_m1_none.json",
                                                             "eval_sokoban_test_n1_s0_nothink_t1_m1_none.json",
                                                             "eval_sokoban_test_n2_s3_nothink_t1_m1_none.json"]
    trajs = games.load_trajectories(r0 / "eval_sokoban_test_n2_s3_nothink_t1_m1_none.jsonl")
    assert [t.seed for t in trajs] == [e.seed for e in games.make_games("sokoban", "test", 2, seed=3)]


def test_eval_replays_the_runs_own_evaluation(tmp_path, monkeypatch):
    """eval.py on a run's checkpoint plays exactly the games the run's evaluation played, with a rollout_batch other
    than the default too (each batch samples with its own seed), and names that batch size in its result; another
    --rollout_batch plays the same levels, under its own name."""
    cfg = oel.OELConfig(model="tiny", out_dir=str(tmp_path / "run"), n_test=3, n_ood=0, rollout_batch=2, max_turns=2,
                        max_new_tokens=4, thinking=False)
    m, tok = modeling.load("tiny")
    modeling.save(m, tok, tmp_path / "run" / "r0" / "model")
    (tmp_path / "run" / "config.json").write_text(json.dumps(asdict(cfg)))
    oel.evaluate(m, tok, cfg, str(tmp_path / "run" / "r0"))
    evaluation.main(["--model", str(tmp_path / "run" / "r0" / "model")])
    ours = tmp_path / "run" / "r0" / "eval_frozenlake_test_n3_s0_nothink_t2_m4_b2_none.jsonl"
    assert ours.read_text() == (tmp_path / "run" / "r0" / "eval_test.jsonl").read_text()
    assert json.loads(ours.with_suffix(".json").read_text())["rollout_batch"] == 2
    batches, real = [], games.rollout
    monkeypatch.setattr(games, "rollout", lambda m, tok, envs, *a, **k: batches.append(len(envs)) or
                        real(m, tok, envs, *a, **k))
    evaluation.main(["--model", str(tmp_path / "run" / "r0" / "model"), "--rollout_batch", "3"])  # e.g. less memory
    assert batches == [3]
    other = ours.with_name(ours.name.replace("_b2_", "_b3_"))
    assert json.loads(other.with_suffix(".json").read_text())["rollout_batch"] == 3
    assert [t.seed for t in games.load_trajectories(other)] == [t.seed for t in games.load_trajectories(ours)]


def test_eval_checks_its_result_can_be_written_before_playing(tmp_path, monkeypatch, capsys):
    """A result that would replace a folder, or that cannot be written, is an error before any game is played."""
    monkeypatch.setattr(oel, "play", lambda *a, **k: pytest.fail("played games whose result cannot be written"))
    (tmp_path / "folder").mkdir()
    (tmp_path / "res.jsonl.tmp").mkdir()  # open() fails on it as on a read-only folder
    for out, match in ((tmp_path / "folder", f"the result {tmp_path}/folder would replace a folder"),
                       (tmp_path / "res.json", f"cannot write the result {tmp_path}/res.jsonl (Is a directory)")):
        with pytest.raises(SystemExit):
            evaluation.main(["--model", "tiny", "--n", "1", "--out", str(out)])
        assert match in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "res.jsonl.tmp"]


CONFIG_ADVICE = ("repair it: it holds the settings the run was made with (without it a rerun would reuse its files "
                 "whatever the flags), or pass a new --out_dir")


def test_a_damaged_run_file_ends_a_resumed_run_with_one_line_naming_it(tmp_path):
    """Atomic writes never leave a run file damaged, but a copy or a hand edit can: a resumed run (and eval.py reading
    a run) then ends with one line naming the file, not a traceback, also for valid JSON of the wrong shape (a
    config.json is not to be deleted: it guards the settings); so do a checkpoint passed as the run folder,
    weights holding infinity, and a run folder it cannot write in."""
    cfg = dict(model="tiny", rounds=1, n_train=2, n_test=1, n_ood=0, K=1, n=2, knowledge_budget=64, steps=1,
               batch_size=2, micro_batch=2, max_new_tokens=4, extract_max_new_tokens=4, max_turns=1, save_every=1)
    run = tmp_path / "run"
    oel.run(oel.OELConfig(out_dir=str(run), **cfg))
    for name in ("config.json", "base/eval.json", "r0/model/model.safetensors", "r0/deploy.jsonl", "r0/pool.json",
                 "r0/consolidate.pt", "metrics.jsonl"):
        case = tmp_path / f"case-{name.replace('/', '-')}"
        shutil.copytree(run, case)
        if name.startswith(("r0/deploy", "r0/pool", "r0/consolidate")):  # read only while round 0 is unfinished
            shutil.rmtree(case / "r0" / "model")
        if name.endswith(".pt"):  # removed when the round finished: a state file as torch.save writes one
            torch.save({"step": 1}, case / name)
        (case / name).write_bytes((case / name).read_bytes()[:-25])  # cut short
        named = case / ("r0/model" if "safetensors" in name else name)
        advice = {"r0/model/model.safetensors": "delete the folder to redo round 0's consolidation",
                  "r0/consolidate.pt": "delete it to restart round 0's consolidation from its first step",
                  "r0/deploy.jsonl": "it should hold 2 games; delete it to play them again", "config.json": CONFIG_ADVICE}
        advice = re.escape(advice.get(name, "repair it, or delete it to redo what it holds"))
        with pytest.raises(SystemExit, match=f"^error: {re.escape(str(named))} cannot be read back .*; {advice}$"):
            if name == "metrics.jsonl":
                evaluation.main(["--plot", str(case)])
            else:
                oel.run(oel.OELConfig(out_dir=str(case), **cfg))
        if name == "config.json":
            with pytest.raises(SystemExit, match=f"^error: {re.escape(str(named))} cannot be read back"):
                evaluation.main(["--model", str(case / "r0" / "model")])
    for i, (name, text) in enumerate((("r0/pool.json", "[]"), ("r0/pool.json", "[1, 2]"), ("r0/pool.json", '{"a": 1}'),
                                      ("base/eval.json", '{"test": 5}'), ("base/eval.json", "[]"), ("config.json", "[]"))):
        case = tmp_path / f"shape-{i}"  # valid JSON, but not what the run writes there (a hand edit)
        shutil.copytree(run, case)
        if name.startswith("r0/pool"):
            shutil.rmtree(case / "r0" / "model")
        (case / name).write_text(text)
        advice = re.escape(CONFIG_ADVICE if name == "config.json" else "repair it, or delete it to redo what it holds")
        with pytest.raises(SystemExit, match=f"^error: {re.escape(str(case / name))} does not hold what a run writes "
                           f"there; {advice}$"):
            oel.run(oel.OELConfig(out_dir=str(case), **cfg))
    case = tmp_path / "case-other-version"  # a state file of the code before the stacked projections (the Hub's names)
    shutil.copytree(run, case)
    shutil.rmtree(case / "r0" / "model")
    state = {"model": modeling.hub_state_dict(modeling.load("tiny")[0]), "opt": {}, "step": 1, "logs": []}
    torch.save(state, case / "r0" / "consolidate.pt")
    with pytest.raises(SystemExit, match=rf"^error: {re.escape(str(case))}/r0/consolidate.pt cannot be read back "
                       r"\(RuntimeError\); delete it to restart round 0's consolidation from its first step$"):
        oel.run(oel.OELConfig(out_dir=str(case), **cfg))
    with pytest.raises(SystemExit, match=f"^error: {re.escape(str(run / 'r0' / 'model'))} is a model checkpoint, not"):
        oel.run(oel.OELConfig(out_dir=str(run / "r0" / "model"), **cfg))  # and nothing is written in it
    assert not (run / "r0" / "model" / ".lock").exists()
    bad, tok = modeling.load("tiny")  # weights holding infinity: found when read, after the checks; one line too
    with torch.no_grad():
        bad.output_weight[0, 0] = float("inf")
    modeling.save(bad, tok, tmp_path / "inf")
    with pytest.raises(SystemExit, match=r"^error: .*/inf/model.safetensors: tensor model.embed_tokens.weight holds NaN"):
        train.cli(lambda: evaluation.main(["--model", str(tmp_path / "inf"), "--n", "1", "--out", str(tmp_path / "x.json")]))
    (tmp_path / "ro" / ".lock").mkdir(parents=True)  # open() fails on it as in a read-only folder
    with pytest.raises(SystemExit, match=rf"^error: cannot write in {re.escape(str(tmp_path / 'ro'))} \(Is a directory\)$"):
        oel.run(oel.OELConfig(out_dir=str(tmp_path / "ro"), **cfg))


def test_eval_takes_the_settings_of_the_run(tmp_path, monkeypatch):
    """A run's checkpoint is evaluated in the run's chat mode, game, game options and turn limit unless flags say
    otherwise (its OOD split: the run's ood_game, default options; another game: default options); each setting is in
    the result's name, so results of other settings do not overwrite each other (a default written out is no other)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(json.dumps({"thinking": False, "game": "sokoban", "ood_game": "frozenlake",
                                                              "game_options": '{"size": 7}', "max_turns": 1}))
    modeling.save(*modeling.load("tiny"), tmp_path / "run" / "r0" / "model")
    args = ["--model", str(tmp_path / "run" / "r0" / "model"), "--n", "1", "--max_new_tokens", "2"]
    evaluation.main(args)
    evaluation.main(args + ["--thinking", "none"])
    evaluation.main(args + ["--options", '{"size": 6}'])  # Sokoban's default size
    evaluation.main(args + ["--split", "ood"])
    evaluation.main(args + ["--split", "ood", "--game", "sokoban"])
    evaluation.main(args + ["--game", "frozenlake", "--split", "train"])
    names = sorted(p.name for p in (tmp_path / "run" / "r0").glob("eval_*.json"))
    assert names == ["eval_frozenlake_ood_n1_s0_nothink_t1_m2_none.json",
                     "eval_frozenlake_train_n1_s0_nothink_t1_m2_none.json",
                     "eval_sokoban-size7_ood_n1_s0_nothink_t1_m2_none.json",
                     "eval_sokoban-size7_test_n1_s0_instruct_t1_m2_none.json",
                     "eval_sokoban-size7_test_n1_s0_nothink_t1_m2_none.json",
                     "eval_sokoban_test_n1_s0_nothink_t1_m2_none.json"]
    result = json.loads((tmp_path / "run" / "r0" / names[4]).read_text())
    assert (result["thinking"], result["game"], result["options"], result["max_turns"]) == (False, "sokoban", '{"size": 7}', 1)
    trajs = games.load_trajectories(tmp_path / "run" / "r0" / names[4].replace(".json", ".jsonl"))
    assert trajs[0].game == "sokoban" and trajs[0].steps == 1 and len(trajs[0].turns[0].state.splitlines()[3].split()) == 7
    (tmp_path / "run" / "r0" / "k.md").write_text(KNOWLEDGE)  # a model from elsewhere takes the context's run
    evaluation.main(["--model", "tiny", "--n", "1", "--mode", "knowledge", "--context",
                     str(tmp_path / "run" / "r0" / "k.md")])
    assert len(list(tmp_path.glob("eval_tiny_sokoban-size7_test_n1_s0_nothink_t1_knowledge_r0-k-*.json"))) == 1
    ctx = str(tmp_path / "run" / "r0" / "k.md")
    (tmp_path / "ck").mkdir()  # a checkpoint folder outside any run: the context's run too; a run's own: its run
    assert evaluation.run_setting("game", str(tmp_path / "ck"), ctx) == "sokoban"
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"game": "frozenlake"}))
    assert evaluation.run_setting("game", str(tmp_path / "other" / "r0" / "model"), ctx) == "frozenlake"
    with pytest.raises(SystemExit, match="is a train.py run folder; pass one of its checkpoints"):
        (tmp_path / "run" / "base").mkdir()
        evaluation.main(["--model", str(tmp_path / "run")])
    (tmp_path / "round" / "model").mkdir(parents=True)  # a round's folder: its checkpoint is named
    (tmp_path / "round" / "model" / "config.json").write_text("{}")
    with pytest.raises(SystemExit, match=f"is a round folder of a train.py run; pass its checkpoint, {tmp_path}/round/model$"):
        evaluation.main(["--model", str(tmp_path / "round")])


def test_eval_context_names_and_empty_contexts(tiny, tmp_path, monkeypatch, capsys):
    """Results with different contexts get different default files; a context that the budget empties is an error."""
    monkeypatch.chdir(tmp_path)
    for name in ("a", "b"):
        (tmp_path / f"{name}.md").write_text(KNOWLEDGE)
        evaluation.main(["--model", "tiny", "--n", "1", "--max_turns", "1", "--max_new_tokens", "2",
                         "--mode", "knowledge", "--context", str(tmp_path / f"{name}.md")])
    outs = sorted(p.name for p in tmp_path.glob("eval_*.json"))
    assert [o[:-12] for o in outs] == [f"eval_tiny_frozenlake_test_n1_s0_think_t1_m2_knowledge_{tmp_path.name}-{x}" for x in "ab"]
    assert json.loads((tmp_path / outs[1]).read_text())["context"] == str(tmp_path / "b.md")
    (tmp_path / "pool2.json").write_text(json.dumps([KNOWLEDGE, "- EXPERIENCE ITEM:" + " long" * 200]))
    evaluation.main(["--model", "tiny", "--n", "2", "--max_turns", "1", "--max_new_tokens", "2", "--mode", "knowledge",
                     "--context", str(tmp_path / "pool2.json"), "--budget", "60", "--out", str(tmp_path / "p.json")])
    result = json.loads((tmp_path / "p.json").read_text())  # one of the games was played without knowledge
    assert (result["empty_contexts"], result["n"]) == (1, 2) and "1 of the 2 contexts" in capsys.readouterr().out
    assert json.loads((tmp_path / outs[0]).read_text())["empty_contexts"] == 0
    with pytest.raises(SystemExit, match=r"context is empty \(raise --budget\)"):
        evaluation.contexts("knowledge", str(tmp_path / "a.md"), tiny[1], 5)
    (tmp_path / "pool.json").write_text(json.dumps(["", ""]))
    with pytest.raises(SystemExit, match="holds no knowledge context"):
        evaluation.contexts("knowledge", str(tmp_path / "pool.json"), tiny[1], 100)
    with monkeypatch.context() as mp:  # and before the model loads
        mp.setattr(modeling, "load", lambda *a, **k: pytest.fail("the model loaded before the context was read"))
        with pytest.raises(SystemExit, match="holds no knowledge context"):
            evaluation.main(["--model", "tiny", "--mode", "knowledge", "--context", str(tmp_path / "pool.json")])
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(SystemExit, match="holds no raw context"):
        evaluation.contexts("raw", str(tmp_path / "empty.jsonl"), tiny[1], 100)
    games.save_trajectories(tmp_path / "t.jsonl", [fake_trajectory(0)])
    for mode, path, match in (("raw", "pool.json", "holds knowledge; use --mode knowledge"),
                              ("raw", "bad.jsonl", "not a raw context file"), ("knowledge", "t.jsonl", "use --mode raw"),
                              ("knowledge", "bad.json", None), ("raw", ".", "existing file")):
        (tmp_path / "bad.json").write_text(json.dumps(["x", 3]))
        (tmp_path / "bad.jsonl").write_text(json.dumps(["x", 3]) + "\n")
        args = ["--model", "tiny", "--mode", mode, "--context", str(tmp_path / path)]
        if match is None:  # a .json knowledge file other than a list of texts
            match = "a .json knowledge file is a list of texts"
        with pytest.raises(SystemExit, match=match):
            evaluation.main(args)
    capsys.readouterr()
    with pytest.raises(SystemExit):  # found before playing, not after
        evaluation.main(["--model", "tiny", "--out", str(tmp_path / "no" / "x.json")])
    assert "its folder does not exist" in capsys.readouterr().err
    (tmp_path / "run").mkdir()
    with pytest.raises(SystemExit, match="not a train.py run folder"):
        evaluation.plot(str(tmp_path / "run"))
    (tmp_path / "run" / "config.json").write_text("{}")
    for metrics in (None, ""):  # a run that has not finished its base evaluation: no or an empty metrics.jsonl
        if metrics is not None:
            (tmp_path / "run" / "metrics.jsonl").write_text(metrics)
        with pytest.raises(SystemExit, match="no results yet"):
            evaluation.plot(str(tmp_path / "run"))
    with pytest.raises(SystemExit):  # budget + turns beyond the tiny model's 8192-token context, before loading it
        evaluation.main(["--model", "tiny", "--mode", "raw", "--context", str(tmp_path / "t.jsonl"), "--budget", "100000"])
    assert "more than the model's context of 8192" in capsys.readouterr().err


def test_eval_plays_what_its_result_is_named_after(tmp_path, monkeypatch):
    """The chat mode, token limit, seed and split a result is named after are those its games are played with (default
    limits go unnamed); a context's name tells files and budgets apart: the same file name in two runs, or one file at
    two budgets, do not overwrite each other, while one file spelled two ways is one result."""
    monkeypatch.chdir(tmp_path)
    calls, real_play = [], oel.play
    monkeypatch.setattr(oel, "play", lambda *args, **kw: calls.append(args) or real_play(*args, **kw))
    evaluation.main(["--model", "tiny", "--n", "2", "--seed", "3", "--split", "train", "--thinking", "none",
                     "--max_new_tokens", "3"])
    game, split, n, seed, rcfg, ctxs = calls[0][2:]
    assert (game, split, n, seed, ctxs) == ("frozenlake", "train", 2, 3, [None])
    assert (rcfg.thinking, rcfg.max_new_tokens, rcfg.max_turns) == (None, 3, oel.OELConfig.max_turns)
    assert [p.name for p in tmp_path.glob("eval_*.json")] == ["eval_tiny_frozenlake_train_n2_s3_instruct_m3_none.json"]
    trajs = games.load_trajectories(tmp_path / "eval_tiny_frozenlake_train_n2_s3_instruct_m3_none.jsonl")
    assert sorted(t.seed for t in trajs) == sorted(e.seed for e in games.make_games("frozenlake", "train", 2, seed=3))
    res = json.loads((tmp_path / "eval_tiny_frozenlake_train_n2_s3_instruct_m3_none.json").read_text())
    assert res["budget"] is None and res["empty_contexts"] == 0  # no context: none emptied by a budget
    for run in ("x", "y"):
        (tmp_path / run / "r0").mkdir(parents=True)
        (tmp_path / run / "r0" / "pool.json").write_text(json.dumps([KNOWLEDGE]))
    args = ["--model", "tiny", "--n", "1", "--max_turns", "1", "--max_new_tokens", "1", "--mode", "knowledge"]
    for more in (["--context", "x/r0/pool.json"], ["--context", "y/r0/pool.json"],
                 ["--context", "x/r0/pool.json", "--budget", "100"], ["--context", str(tmp_path / "x/r0/pool.json")]):
        evaluation.main(args + more)
    assert len(list(tmp_path.glob("eval_tiny_frozenlake_test_n1_s0_think_t1_m1_knowledge_r0-pool-*.json"))) == 3


def test_eval_defaults_n_per_split_and_names_options_in_any_order(tmp_path):
    """Without --n, a run's checkpoint plays the run's n_test or n_ood games, and 128 of the train split (no set of the
    run) or of the ood split of a run without an OOD set; a result's name does not depend on the order its JSON
    options are written in."""
    (tmp_path / "run" / "r0" / "model").mkdir(parents=True)
    (tmp_path / "run" / "config.json").write_text(json.dumps({"n_test": 3, "n_ood": 5}))
    for model, sizes in ((str(tmp_path / "run" / "r0" / "model"), [3, 5, 128]),
                         ("tiny", [oel.OELConfig.n_test, oel.OELConfig.n_ood, 128])):
        defaults = [types.SimpleNamespace(model=model, context=None, split=split) for split in ("test", "ood", "train")]
        for a in defaults:
            evaluation.fill_defaults(a)
        assert [a.n for a in defaults] == sizes
    (tmp_path / "run" / "config.json").write_text(json.dumps({"n_test": 3, "n_ood": 0}))  # a run without an OOD set
    a = types.SimpleNamespace(model=str(tmp_path / "run" / "r0" / "model"), context=None, split="ood")
    evaluation.fill_defaults(a)
    assert a.n == 128
    names = set()
    for options in ('{"size": 4, "holes": 3}', '{"holes": 3, "size": 4}'):
        a = types.SimpleNamespace(model="tiny", context=None, split="test", options=options, mode="none")
        evaluation.fill_defaults(a)
        names.add(evaluation.result_name(a, None))
    assert names == {f"frozenlake-holes3-size4_test_n{oel.OELConfig.n_test}_s0_think_none"}


def test_eval_results_of_sibling_checkpoints_do_not_overwrite(tmp_path):
    """Two checkpoint folders side by side get a result each, named after the folder; a run's model folder does not
    name its result (runs/oel/r1/eval_*.json)."""
    m, tok = modeling.load("tiny")
    for d in ("a", "b", "r0/model"):
        modeling.save(m, tok, tmp_path / d)
        evaluation.main(["--model", str(tmp_path / d), "--n", "1", "--max_turns", "1", "--max_new_tokens", "1"])
    what = "frozenlake_test_n1_s0_think_t1_m1_none.json"
    assert {p.name for p in tmp_path.glob("eval_*.json")} == {f"eval_a_{what}", f"eval_b_{what}"}
    assert json.loads((tmp_path / f"eval_b_{what}").read_text())["model"] == str(tmp_path / "b")
    assert [p.name for p in (tmp_path / "r0").glob("eval_*.json")] == [f"eval_{what}"]


def test_eval_takes_the_models_run_and_the_contexts_budget(tmp_path, monkeypatch):
    """A run's checkpoint given another run's context is played in its own run's game, options, limits and chat mode,
    with the context's run's token budget; its OOD split is its run's ood_game with default options (as train.py
    evaluates it), even when that is the run's own game; the innermost run folder holds the setting."""
    monkeypatch.chdir(tmp_path)
    for run, cfg in (("a", dict(game="sokoban", ood_game="sokoban", game_options='{"size": 7}', max_turns=1,
                                max_new_tokens=2, thinking=False, knowledge_budget=300)),
                     ("b", dict(game="frozenlake", max_turns=2, max_new_tokens=3, thinking=True, knowledge_budget=500))):
        (tmp_path / run / "r0").mkdir(parents=True)
        (tmp_path / run / "config.json").write_text(json.dumps(cfg))
    modeling.save(*modeling.load("tiny"), tmp_path / "a" / "r0" / "model")
    (tmp_path / "b" / "r0" / "k.md").write_text(KNOWLEDGE)
    model = ["--model", str(tmp_path / "a" / "r0" / "model"), "--n", "1"]
    evaluation.main(model + ["--mode", "knowledge", "--context", str(tmp_path / "b" / "r0" / "k.md")])
    evaluation.main(model + ["--split", "ood"])
    test, ood = sorted((tmp_path / "a" / "r0").glob("eval_*.json"))
    assert test.name.startswith("eval_sokoban-size7_test_n1_s0_nothink_t1_m2_knowledge_r0-k-")
    assert ood.name == "eval_sokoban_ood_n1_s0_nothink_t1_m2_none.json"
    res = json.loads(test.read_text())
    assert (res["game"], res["options"], res["thinking"], res["max_turns"], res["max_new_tokens"], res["budget"]) == \
        ("sokoban", '{"size": 7}', False, 1, 2, 500)
    res = json.loads(ood.read_text())
    assert (res["game"], res["options"], res["budget"]) == ("sokoban", "", None)
    (board,) = [t.turns[0].state for t in games.load_trajectories(str(ood).replace(".json", ".jsonl"))]
    assert len(board.splitlines()[3].split()) == 6  # Sokoban's default size, not the run's 7
    (tmp_path / "a" / "inner" / "r0").mkdir(parents=True)  # a run folder inside another's
    (tmp_path / "a" / "inner" / "config.json").write_text(json.dumps({"knowledge_budget": 200}))
    assert evaluation.run_setting("knowledge_budget", str(tmp_path / "a" / "inner" / "r0" / "pool.json")) == 200
    (tmp_path / "a" / "inner" / "config.json").write_text('["knowledge_budget"]')  # not a run's: the outer run's
    assert evaluation.run_setting("knowledge_budget", str(tmp_path / "a" / "inner" / "r0" / "pool.json")) == 300


def test_prompt_length_checks_measure_the_games_observations(tiny, tmp_path, capsys):
    """train.py (also for the tiny preset) and eval.py check prompt lengths against the model's context with the
    game's own observation size: a 24x24 board takes thousands of tokens a turn, not the 512 small boards are given."""
    big, out = ["--game_options", '{"size": 24, "holes": 1}'], ["--out_dir", str(tmp_path / "run")]
    with pytest.raises(SystemExit, match=r"\(2 turns of ~\d{4} observation tokens\), more than the model's context of 8192"):
        train.check(train.parse_args(["--model", "tiny", *big, "--max_turns", "2", *out]))
    train.check(train.parse_args(["--model", "tiny", *big, "--max_turns", "1", *out]))  # one turn fits
    with pytest.raises(SystemExit, match="more than the model's context of 8192"):  # the tiny preset's budget counts
        train.check(train.parse_args(["--model", "tiny", "--context", "raw", "--knowledge_budget", "9000", *out]))
    with pytest.raises(SystemExit):
        evaluation.main(["--model", "tiny", "--options", big[1], "--max_turns", "2", "--n", "1", "--out",
                         str(tmp_path / "r.json")])
    assert re.search(r"\(2 observations of ~\d{4}\), more than the model's context of 8192", capsys.readouterr().err)
    assert train.observation_tokens(tiny[1], "sokoban", "") == 512  # small boards: the floor


def test_eval_warns_of_empty_contexts_checks_the_whole_prompt_and_plots_both_sets(tiny, tmp_path, monkeypatch, capsys):
    """A pool text that the budget empties is warned of; the prompt-length check counts every turn's observation;
    a context-free evaluation does not count a budget, and may fill the context exactly; the plot draws the test and
    OOD pass rates per round, and one it cannot write ends with one line."""
    (tmp_path / "pool.json").write_text(json.dumps(["- EXPERIENCE ITEM: short", "- EXPERIENCE ITEM:" + " long" * 200]))
    texts = evaluation.contexts("knowledge", str(tmp_path / "pool.json"), tiny[1], 30)
    assert texts[0] and not texts[1] and "warning: 1 of the 2 contexts" in capsys.readouterr().out
    games.save_trajectories(tmp_path / "t.jsonl", [fake_trajectory(0)])
    with pytest.raises(SystemExit):  # 6000 + 5 turns of ~512 tokens > 8192
        evaluation.main(["--model", "tiny", "--n", "1", "--max_new_tokens", "1", "--mode", "raw", "--context",
                         str(tmp_path / "t.jsonl"), "--budget", "6000", "--max_turns", "5", "--out", str(tmp_path / "r.json")])
    assert "more than the model's context of 8192" in capsys.readouterr().err

    class Played(Exception):
        pass

    def play(*args, **kwargs):  # the checks passed: the games would start
        raise Played

    monkeypatch.setattr(oel, "play", play)
    exact = ["--model", "tiny", "--n", "1", "--max_turns", "15", "--out", str(tmp_path / "r.json")]
    with pytest.raises(Played):  # 15 * 512 + 512 = 8192: fits exactly
        evaluation.main(exact + ["--max_new_tokens", "512"])
    with pytest.raises(SystemExit):
        evaluation.main(exact + ["--max_new_tokens", "513"])
    assert "need ~8193 tokens" in capsys.readouterr().err
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text("{}")
    (tmp_path / "run" / "metrics.jsonl").write_text("".join(json.dumps(
        {"round": r, "test_pass_rate": p, "test_tokens_per_turn": 5.0, "ood_pass_rate": p / 2}) + "\n"
        for r, p in ((-1, 0.2), (0, 0.4))))
    (tmp_path / "run" / "metrics.png").mkdir()  # the plot cannot be written: one line
    with pytest.raises(SystemExit, match=r"^error: cannot write .*metrics.png \(Is a directory\)$"):
        evaluation.plot(str(tmp_path / "run"))
    import matplotlib.figure
    figs = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda self, *a, **kw: figs.append(self))
    evaluation.plot(str(tmp_path / "run"))
    (rate, length) = figs[0].axes
    assert [list(line.get_ydata()) for line in rate.lines] == [[20, 40], [10, 20]]
    assert [list(line.get_xdata()) for line in rate.lines] == [[-1, 0]] * 2
    assert [t.get_text() for t in rate.get_xticklabels()] == ["base", "0"]
    assert [list(line.get_ydata()) for line in length.lines] == [[5.0, 5.0]]


def test_eval_reads_every_kind_of_knowledge_file_and_refuses_what_is_not_one(tmp_path):
    """A .txt or .md knowledge file is one text and a pool.json its list of texts; --mode raw refuses each kind, and
    --mode knowledge a .json other than a list of texts (an object, one string) and bytes that are not UTF-8."""
    for name in ("k.txt", "k.md"):
        (tmp_path / name).write_text(KNOWLEDGE)
        assert evaluation.read_context("knowledge", str(tmp_path / name)) == [KNOWLEDGE]
        with pytest.raises(SystemExit, match="holds knowledge; use --mode knowledge"):
            evaluation.read_context("raw", str(tmp_path / name))
    (tmp_path / "pool.json").write_text(json.dumps(["a", "b"]))
    assert evaluation.read_context("knowledge", str(tmp_path / "pool.json")) == ["a", "b"]
    for text in ('{"a": "b"}', '"ab"'):
        (tmp_path / "bad.json").write_text(text)
        with pytest.raises(SystemExit, match="a .json knowledge file is a list of texts"):
            evaluation.read_context("knowledge", str(tmp_path / "bad.json"))
    (tmp_path / "bin.md").write_bytes(b"\xff\xfe knowledge")
    with pytest.raises(SystemExit, match="bin.md is not a knowledge context file"):
        evaluation.read_context("knowledge", str(tmp_path / "bin.md"))


def test_eval_writes_a_bare_out_name_here_with_its_seed_and_prints_both_files(tmp_path, monkeypatch, capsys):
    """A bare --out file name is written in the working directory with its trajectories beside it (FILE.jsonl, also
    for a name without .json); the result holds the seed its games were played with; the printed lines are its
    metrics and the two files written."""
    monkeypatch.chdir(tmp_path)
    args = ["--model", "tiny", "--n", "1", "--seed", "4", "--max_turns", "1", "--max_new_tokens", "1", "--out"]
    levels = sorted(e.seed for e in games.make_games("frozenlake", "test", 1, seed=4))
    for out in ("res.json", "res"):
        capsys.readouterr()
        evaluation.main(args + [out])
        res, trajs = json.loads((tmp_path / out).read_text()), games.load_trajectories(tmp_path / "res.jsonl")
        assert res["seed"] == 4 and sorted(t.seed for t in trajs) == levels
        *_, metrics, wrote = capsys.readouterr().out.splitlines()  # after a warning: turns too few to win
        assert json.loads(metrics) == games.metrics(trajs) == {k: res[k] for k in games.metrics(trajs)}
        assert wrote == f"wrote {out} and its trajectories, res.jsonl"
        (tmp_path / "res.jsonl").unlink()


def test_eval_takes_n_up_to_max_games(tmp_path, monkeypatch):
    """--n games.MAX_GAMES, the largest set, passes the checks and all of its games are played."""
    monkeypatch.setattr(oel, "play", lambda *a, **k: sys.exit(f"plays {a[4]}"))
    with pytest.raises(SystemExit, match=f"^plays {games.MAX_GAMES}$"):
        evaluation.main(["--model", "tiny", "--n", str(games.MAX_GAMES), "--out", str(tmp_path / "r.json")])


def test_eval_plots_a_run_without_an_ood_set(tmp_path, monkeypatch, capsys):
    """--plot of a run without an OOD set (no ood_pass_rate) draws the test pass rate alone and saves RUN_DIR/metrics.png
    without asking for --model, printing its path."""
    import matplotlib.figure
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"round": r, "test_pass_rate": p,
                                                                "test_tokens_per_turn": 5.0}) + "\n"
                                                    for r, p in ((-1, 0.2), (0, 0.4))))
    saved = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda self, path, **kw: saved.append((self, path)))
    evaluation.main(["--plot", str(tmp_path)])
    (fig, path), = saved
    assert [list(line.get_ydata()) for line in fig.axes[0].lines] == [[20, 40]]
    assert path == str(tmp_path / "metrics.png") and capsys.readouterr().out == f"{path}\n"


def test_eval_takes_no_run_settings_from_the_working_directory(tmp_path, monkeypatch):
    """A Hub id or tiny is no run's checkpoint, even run from inside a run folder: it plays OELConfig's game, unless
    --context lies in a run (its folder included: a knowledge file beside the run's config.json)."""
    (tmp_path / "config.json").write_text(json.dumps({"game": "sokoban", "knowledge_budget": 300}))
    monkeypatch.chdir(tmp_path)
    for model, context, game in (("tiny", None, oel.OELConfig.game), ("Qwen/Qwen3-1.7B", None, oel.OELConfig.game),
                                 ("tiny", "k.md", "sokoban")):
        a = types.SimpleNamespace(model=model, context=context, split="test")
        evaluation.fill_defaults(a)
        assert a.game == game, (model, context)
    assert evaluation.run_setting("knowledge_budget", "k.md") == 300


def test_play_keeps_finished_batches(tiny, tmp_path, monkeypatch, capsys):
    """An interrupted rollout of a game set replays only its unfinished batch (saying so, and which batch it plays; a
    set of one batch is named without a number, after its split when it has no file), and gives the same
    trajectories; with another batch size it keeps the finished batches and plays the rest of the same levels in
    batches of the new size; a damaged batch or set file, or one short of games, ends it with one line naming the
    file."""
    m, tok = tiny
    rcfg = games.RolloutConfig(max_turns=2, max_new_tokens=6)
    path = str(tmp_path / "set.jsonl")
    full = oel.play(m, tok, "sokoban", "test", 5, 0, rcfg, batch=2, path=path)
    assert len(full) == 5 and not any(p.name.startswith("set.jsonl.part") for p in tmp_path.iterdir())
    assert "on disk" not in capsys.readouterr().out  # nothing to reuse yet
    os.remove(path)  # as if killed after the first two batches were saved
    games.save_trajectories(path + ".part0-2", full[:2])
    games.save_trajectories(path + ".part2-4", full[2:4])
    calls = []
    real = games.rollout
    monkeypatch.setattr(games, "rollout", lambda m, tok, envs, *a, **k: calls.append((len(envs), k["desc"])) or
                        real(m, tok, envs, *a, **k))
    again = oel.play(m, tok, "sokoban", "test", 5, 0, rcfg, batch=2, path=path)
    assert calls == [(1, "set sokoban 3/3")] and again == full == games.load_trajectories(path)
    assert f"{path}: 2 of 3 batches of games on disk, reused" in capsys.readouterr().out
    assert oel.play(m, tok, "sokoban", "test", 5, 0, rcfg, batch=2, path=path) == full and len(calls) == 1
    games.save_trajectories(path + ".part2-4", full[2:4])  # as if killed between saving the set and removing its parts
    assert oel.play(m, tok, "sokoban", "test", 5, 0, rcfg, batch=2, path=path) == full and len(calls) == 1
    assert not any(p.name.startswith("set.jsonl.part") for p in tmp_path.iterdir())
    os.remove(path)  # killed after the first batch, resumed with batches of 3 (e.g. after running out of GPU memory)
    games.save_trajectories(path + ".part0-2", full[:2])
    games.save_trajectories(path + ".part0-2x", full[2:4])  # not a batch file of this set
    mixed = oel.play(m, tok, "sokoban", "test", 5, 0, rcfg, batch=3, path=path)
    assert calls[1:] == [(3, "set sokoban 2/2")] and mixed[:2] == full[:2] and len(mixed) == 5
    assert [t.seed for t in mixed] == [t.seed for t in full]  # the same levels
    assert sorted(p.name for p in tmp_path.iterdir() if ".part" in p.name) == ["set.jsonl.part0-2x"]
    os.remove(tmp_path / "set.jsonl.part0-2x")
    os.remove(path)  # batch files that no run of this set writes (no games; beyond the set) are not read
    games.save_trajectories(path + ".part0-2", full[:2])
    games.save_trajectories(path + ".part2-2", [])
    games.save_trajectories(path + ".part4-9", full)
    signal.alarm(60)  # the old loop never ended on part2-2
    calls.clear()
    assert oel.play(m, tok, "sokoban", "test", 5, 0, rcfg, batch=2, path=path) == full
    signal.alarm(0)
    assert calls == [(2, "set sokoban 2/3"), (1, "set sokoban 3/3")]
    assert not any(".part" in p.name for p in tmp_path.iterdir())
    calls.clear()
    even = oel.play(m, tok, "sokoban", "test", 4, 0, rcfg, batch=2, path=str(tmp_path / "even.jsonl"))  # n % batch == 0
    assert len(even) == 4 and not any(".part" in p.name for p in tmp_path.iterdir())
    oel.play(m, tok, "sokoban", "test", 2, 0, rcfg, batch=2)  # one batch, no file
    assert calls[-1] == (2, "test sokoban")
    cut = str(tmp_path / "cut.jsonl")
    games.save_trajectories(cut + ".part0-2", full[:2])
    os.truncate(cut + ".part0-2", 100)  # a copy cut short
    with pytest.raises(SystemExit, match=f"^error: {re.escape(cut)}.part0-2 cannot be read back"):
        oel.play(m, tok, "sokoban", "test", 5, 0, rcfg, batch=2, path=cut)
    games.save_trajectories(cut + ".part0-2", full[:1])  # whole lines, too few of them (a hand edit)
    with pytest.raises(SystemExit, match=f"^error: {re.escape(cut)}.part0-2 does not hold .* should hold 2 games"):
        oel.play(m, tok, "sokoban", "test", 5, 0, rcfg, batch=2, path=cut)
    for kept in (full[:4], []):  # a set's file short of games, or empty
        games.save_trajectories(cut, kept)
        with pytest.raises(SystemExit, match=f"^error: {re.escape(cut)} does not hold .* should hold 5 games"):
            oel.play(m, tok, "sokoban", "test", 5, 0, rcfg, batch=2, path=cut)


def test_deploy_avoids_test_boards_where_the_level_space_allows(monkeypatch):
    """Sokoban and 4x4 FrozenLake hold their test boards out of training; the paper's 3x3 FrozenLake, whose 19
    boards all occur in its test set, cannot, and trains on them too."""
    for game, options, held_out in (("sokoban", "", True), ("frozenlake", '{"size": 4, "holes": 3}', True),
                                    ("frozenlake", "", False)):
        cfg = oel.OELConfig(game=game, game_options=options)
        boards = oel.held_out_boards(cfg, 0)
        assert bool(boards) == held_out
        if held_out:
            envs = games.make_games(game, "train", 256, seed=0, exclude=boards, **oel.game_settings(options))
            assert not {games.first_observation(e) for e in envs} & boards
        else:  # 19 boards in all, each in the test set and in training
            test, train = ({games.first_observation(e) for e in games.make_games(game, split, 128)}
                           for split in ("test", "train"))
            assert len(test) == 19 and test == train
    generated = []  # TextWorld test levels are generated in parallel before their boards are read (one by one)
    monkeypatch.setattr(games, "pregenerate", lambda envs: generated.append([e.seed for e in envs]))
    monkeypatch.setattr(games, "first_observation", lambda env: (env.seed, len(generated)))
    boards = oel.held_out_boards(oel.OELConfig(game="textworld", n_test=3), 0)
    assert boards == {(games.level_seed("test", 0, i), 1) for i in range(3)}  # read after the one pregenerate
    assert generated == [[games.level_seed("test", 0, i) for i in range(3)]]


def test_play_sampling_seeds_differ_between_sets(monkeypatch):
    """Evaluation (test set, seed 0) and round-0 deploy (train set, seed 0) never reuse sampling noise, nor do
    the batches and contexts of one set (they did: coinciding boards gave identical trajectories)."""
    seeds = []
    monkeypatch.setattr(games, "rollout", lambda m, tok, envs, cfg, knowledge=None, seed=0, desc="": seeds.append(seed) or [])
    for split, seed in (("test", 0), ("train", 0), ("train", 10**9)):  # a huge run seed used to overflow
        oel.play(None, None, "sokoban", split, 6, seed, None, contexts=("a", "b"), batch=2)
    assert len(seeds) == len(set(seeds)) == 18 and max(seeds) * 1000 + 1000 < 2**63
    # named seeds: no collision where arithmetic ones collided (step 100 of round 0 = step 0 of round 1, run seed 1 = round 10)
    assert len({oel.seed_of(run, r, "extract", i) for run in (0, 1) for r in (0, 1, 10) for i in (0, 100)}) == 12
    assert oel.seed_of(1, 11, "x") != oel.seed_of(11, 1, "x")


def test_mixed_precision_student_matches_bf16_teacher_exactly(tiny, autocast_policy):
    """The GPU recipe on a CPU: float32 student under bfloat16 autocast, bfloat16 teacher. With no knowledge the
    two compute identically (KL exactly 0, no rounding floor); with knowledge the student gets float32 gradients."""
    student, tok = modeling.load("tiny")
    teacher = oel.frozen_copy(student, torch.bfloat16)
    cfg = oel.OELConfig(max_new_tokens=8, batch_size=2, micro_batch=2)
    prompts = states("sokoban", "train", 2, 0)
    loss, n = oel.distill_loss(student, teacher, tok, oel.sample_batch(student, tok, prompts, [""], cfg, 0, 0), cfg)
    assert n > 0 and loss.item() == 0
    batch = oel.sample_batch(student, tok, prompts, [KNOWLEDGE], cfg, 0, 0)
    loss, n = oel.distill_loss(student, teacher, tok, batch, cfg)
    (loss / n).backward()
    assert torch.isfinite(loss) and loss.item() > 0
    assert student.output_weight.grad.dtype == torch.float32 and student.output_weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_consolidation_steps_on_cuda():
    """The GPU path end to end: CUDA-graph sampling in bf16, autocast student, bf16 teacher, Triton fused KL."""
    student, tok = modeling.load("tiny", device="cuda")
    teacher = oel.frozen_copy(student, torch.bfloat16)
    cfg = oel.OELConfig(max_new_tokens=16, batch_size=4, micro_batch=2, steps=3, lr=1e-3)
    logs = oel.consolidate(student, teacher, tok, states("frozenlake", "train", 4, 0), [KNOWLEDGE], cfg)
    assert len(logs) == 3 and all(math.isfinite(x["kl"]) and x["tokens"] > 0 for x in logs)
    assert all(p.grad is None for p in teacher.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_mixed_precision_kl_is_zero_without_knowledge_on_cuda():
    """Real CUDA autocast (not its CPU emulation): with empty knowledge the float32 student under autocast and the
    bfloat16 teacher agree to a KL under 1e-12 a token (4e-16 on an H200, 2026-11-26; exactly 0 under the CPU
    emulation), where a float32 residual stream left a floor near 1e-6."""
    student, tok = modeling.load("tiny", device="cuda")
    teacher = oel.frozen_copy(student, torch.bfloat16)
    cfg = oel.OELConfig(max_new_tokens=8, batch_size=2, micro_batch=2)
    prompts = states("sokoban", "train", 2, 0)
    loss, n = oel.distill_loss(student, teacher, tok, oel.sample_batch(student, tok, prompts, [""], cfg, 0, 0), cfg)
    assert n > 0 and abs(loss.item()) / n < 1e-12  # distill_loss returns the KL summed over the n tokens


def record_loads(monkeypatch):
    """Wrap modeling.load so a test sees which checkpoints were loaded, in order."""
    loaded, real = [], modeling.load
    monkeypatch.setattr(oel.modeling, "load", lambda path, *a, **kw: loaded.append(str(path)) or real(path, *a, **kw))
    return loaded


def test_rounds_chain_their_checkpoints(tmp_path, monkeypatch, capsys):
    """Round r trains from round r-1's model (round 0 from --model), and each round's evaluation loads that round's
    model, not the base one; a rerun reuses the models and removes a consolidation state left beside one. The base
    model's evaluation logs as base, each round's as round r, made or reused."""
    trained, tiny_model = [], modeling.load("tiny")

    def fake_round(cfg, r, rdir, ckpt, device):
        trained.append((r, ckpt))
        modeling.save(*tiny_model, os.path.join(rdir, "model"))

    monkeypatch.setattr(oel, "train_round", fake_round)
    loaded = record_loads(monkeypatch)
    monkeypatch.setattr(oel, "evaluate", lambda m, tok, cfg, out_dir: {"test": {"pass_rate": 0.0}})
    oel.run(oel.OELConfig(model="tiny", out_dir=str(tmp_path), rounds=2))
    assert trained == [(0, "tiny"), (1, str(tmp_path / "r0" / "model"))]
    assert loaded == ["tiny", str(tmp_path / "r0" / "model"), str(tmp_path / "r1" / "model")]
    evals = lambda: [line for line in capsys.readouterr().out.splitlines() if " | eval | " in line]
    assert evals() == [f"{r} | eval | test_pass_rate 0.000" for r in ("base", "round 0", "round 1")]
    (tmp_path / "r0" / "consolidate.pt").write_bytes(b"")  # killed after saving r0/model, before removing the state
    oel.run(oel.OELConfig(model="tiny", out_dir=str(tmp_path), rounds=2))
    assert len(trained) == 2 and not (tmp_path / "r0" / "consolidate.pt").exists()  # nothing retrained; state removed
    assert evals() == [line for r, d in (("base", "base"), ("round 0", "r0"), ("round 1", "r1"))
                       for line in (f"{r} | eval | {tmp_path / d / 'eval.json'} on disk, reused",
                                    f"{r} | eval | test_pass_rate 0.000")]


def test_train_round_plays_fresh_held_out_games_from_its_checkpoint(tmp_path, monkeypatch, capsys):
    """A round loads every model it uses from its own checkpoint (the extractor from --extractor), deploys on the
    round's own seeds with the test levels held out (logged as evaluation logs its metrics), and consolidates the
    student loaded from that checkpoint. The extractor writes with its own tokenizer."""
    modeling.save(*modeling.load("tiny"), tmp_path / "ck")
    modeling.make_tiny(tmp_path / "ex", seed=1)  # another BPE: the student's tokenizer would encode differently
    text = "Experience 7: avoid the holes."
    assert modeling.Tokenizer(tmp_path / "ex").encode(text) != modeling.Tokenizer(tmp_path / "ck").encode(text)
    plays, real_play, extract_toks, real_extract = [], oel.play, [], oel.extract_pool
    loaded = record_loads(monkeypatch)
    monkeypatch.setattr(oel, "play", lambda *a, **kw: plays.append((a[5], kw["exclude"])) or real_play(*a, **kw))
    monkeypatch.setattr(oel, "extract_pool", lambda m, tok, *a, budget_tok: extract_toks.append(
        (tok.encode(text), budget_tok.encode(text))) or real_extract(m, tok, *a, budget_tok=budget_tok))
    cfg = oel.OELConfig(model="tiny", game="sokoban", n_train=2, n_test=8, K=1, n=1, steps=1, batch_size=1,
                        micro_batch=1, max_new_tokens=3, extract_max_new_tokens=3, max_turns=1, seed=2,
                        extractor=str(tmp_path / "ex"))
    (tmp_path / "r1").mkdir()
    oel.train_round(cfg, 1, str(tmp_path / "r1"), str(tmp_path / "ck"), "cpu")
    assert loaded == [str(tmp_path / "ck"), str(tmp_path / "ex"), str(tmp_path / "ck")]
    # it writes in its own tokens; the knowledge budget counts the teacher's
    assert extract_toks == [(modeling.Tokenizer(tmp_path / "ex").encode(text), modeling.Tokenizer(tmp_path / "ck").encode(text))]
    assert plays == [(2 * 1000 + 1, oel.held_out_boards(cfg, 1))] and len(plays[0][1]) > 4
    # one turn wins no level of 2 or more moves; the tiny model's replies run to max_new_tokens
    assert "round 1 | deploy | pass 0.000 | tokens/turn 3.0 | 2 games, 2 distinct levels" in capsys.readouterr().out
    seeds = {t.seed for t in games.load_trajectories(tmp_path / "r1" / "deploy.jsonl")}
    assert not seeds & {e.seed for e in games.make_games("sokoban", "train", 2, seed=2 * 1000)}  # round 0's


def test_deploy_plays_test_levels_when_no_others_exist(tmp_path, capsys):
    """A level space the test set covers (2x2 FrozenLake: 2 boards) is not held out when the test set repeats a board
    (4 test games); when it does not (2 games, seed 3), the deploy games find no level outside it: the round says so
    and deploys on all levels, instead of failing after the evaluation."""
    cfg = oel.OELConfig(model="tiny", game="frozenlake", game_options='{"size": 2, "holes": 1}', n_train=2, n_test=4,
                        K=1, n=1, steps=1, batch_size=1, micro_batch=1, max_new_tokens=3, extract_max_new_tokens=3,
                        max_turns=1)
    assert oel.held_out_boards(cfg, 0) == set()
    (tmp_path / "r0").mkdir()
    oel.train_round(cfg, 0, str(tmp_path / "r0"), "tiny", "cpu")
    out = capsys.readouterr().out
    assert "round 0 | deploy | the test levels cover most of the level space: the deploy games include them" in out
    assert "| 2 games, 2 distinct levels" in out
    cfg = replace(cfg, n_test=2, seed=3)
    boards = oel.held_out_boards(cfg, 0)
    assert len(boards) == 2
    with pytest.raises(games.TooFewLevels):
        games.make_games("frozenlake", "train", 2, seed=3000, exclude=boards, **oel.game_settings(cfg.game_options))
    (tmp_path / "r1").mkdir()
    oel.train_round(cfg, 0, str(tmp_path / "r1"), "tiny", "cpu")
    assert ("round 0 | deploy | warning: fewer than 2 of 10,000 levels start unlike the 2 test boards: the deploy "
            "games include test levels") in capsys.readouterr().out
    assert len(games.load_trajectories(tmp_path / "r1" / "deploy.jsonl")) == 2


def test_play_spreads_contexts_and_evaluate_samples_as_the_paper(monkeypatch, tmp_path):
    """play() gives each context its share of the n games (not n games each); evaluation (of no OOD set when n_ood
    is 0) samples at 0.7 / top-p 0.8 / top-k 20 while the student's consolidation samples come from the full
    distribution at the loss's temperature."""
    calls = []

    def fake_rollout(m, tok, envs, rcfg, knowledge=None, seed=0, desc=""):
        calls.append((len(envs), knowledge, rcfg))
        return [games.Trajectory(game=e.name, seed=e.seed) for e in envs]

    monkeypatch.setattr(oel.games, "rollout", fake_rollout)
    trajs = oel.play(None, None, "frozenlake", "test", 6, 0, games.RolloutConfig(), contexts=("a", "b"))
    assert len(trajs) == 6 and sorted((n, k) for n, k, _ in calls) == [(3, "a"), (3, "b")]
    calls.clear()
    result = oel.evaluate(None, None, oel.OELConfig(n_test=2, n_ood=0), str(tmp_path))
    assert [(c.temperature, c.top_p, c.top_k) for *_, c in calls] == [(0.7, 0.8, 20)]
    assert list(result) == ["test"]  # no OOD set: no OOD pass rate of 0 in metrics.jsonl
    seen = []
    monkeypatch.setattr(oel.modeling, "generate", lambda m, tok, ids, **kw: seen.append(kw) or
                        [modeling.Completion([1], "", [0.0], True) for _ in ids])
    cfg = oel.OELConfig(batch_size=2, kl_temperature=0.6)
    oel.sample_batch(modeling.load("tiny")[0], modeling.load("tiny")[1], [("frozenlake", "s")], ["k"], cfg, 0, 0)
    assert [(kw["temperature"], kw["top_p"], kw["top_k"]) for kw in seen] == [(0.6, 1.0, 0)]


def test_sample_batch_draws_fresh_knowledge_each_step_and_round(tiny, monkeypatch):
    """Knowledge draws and sampling seeds change from step to step and round to round (a seed that ignored either
    would repeat them); accumulation orders and extraction seeds change from round to round."""
    seeds = []
    monkeypatch.setattr(oel.modeling, "generate", lambda m, tok, ids, **kw: seeds.append(kw["seed"]) or
                        [modeling.Completion([1], "", [0.0], True) for _ in ids])
    prompts, pool = [("frozenlake", f"state {i}") for i in range(16)], [f"knowledge {i}" for i in range(40)]
    cfg = oel.OELConfig(batch_size=16)
    batches = [oel.sample_batch(tiny[0], tiny[1], prompts, pool, cfg, step, r) for step, r in ((0, 0), (1, 0), (0, 1))]
    picks = [[b.knowledge for b in batch] for batch in batches]
    assert picks[0] != picks[1] and picks[0] != picks[2] and len(set(seeds)) == 3
    assert len(set(picks[0])) > 1  # each prompt draws its own knowledge, not one per step
    assert [b.state for b in batches[0]] != [b.state for b in batches[2]]  # each round shuffles its prompts afresh
    assert oel.accumulation_orders(replace(cfg, K=2, n=8), 0, 16) != oel.accumulation_orders(replace(cfg, K=2, n=8), 1, 16)


def test_accumulation_orders_depend_on_the_run_seed():
    """Runs with another --seed (repeats for error bars) give their K accumulations other trajectories to read; a run
    reproduces its own, each accumulation reading n distinct trajectories (all of them when fewer)."""
    cfg = oel.OELConfig(K=3, n=8)
    a, b = oel.accumulation_orders(cfg, 0, 40), oel.accumulation_orders(replace(cfg, seed=1), 0, 40)
    assert a == oel.accumulation_orders(cfg, 0, 40) and all(len(set(o)) == len(o) == 8 for o in a + b)
    assert all(x != y for x, y in zip(a, b))
    assert all(sorted(o) == list(range(5)) for o in oel.accumulation_orders(cfg, 0, 5))


def test_defaults_are_the_papers_cheapest_setting():
    """The defaults are the setting the module docstring names (the paper's Qwen3-1.7B on FrozenLake 3x3): the
    paper's learning rate, loss temperature, gradient clip, budget, pool and episode settings; train.py's flags take
    them from here, so no other test pins them."""
    cfg = oel.OELConfig()
    assert (cfg.model, cfg.game, cfg.game_options, cfg.thinking, cfg.rounds) == \
        ("Qwen/Qwen3-1.7B", "frozenlake", "", True, 2)
    assert (cfg.n_test, cfg.max_turns, cfg.max_new_tokens) == (128, 5, 1024)
    assert (cfg.K, cfg.n, cfg.knowledge_budget, cfg.show_knowledge, cfg.context) == (10, 15, 2048, False, "knowledge")
    assert (cfg.steps, cfg.lr, cfg.weight_decay, cfg.grad_clip, cfg.kl_temperature, cfg.topk) == \
        (20, 5e-6, 0.01, 1.0, 0.7, 0)
    assert (games.FrozenLake().size, games.FrozenLake().holes) == (3, 2)
    assert (games.Sokoban().size, games.Sokoban().boxes, games.Sokoban().max_moves) == (6, 1, 5)


def test_consolidation_weights_tokens_not_micro_batches_and_clips(monkeypatch):
    """The gradient of a step averages over its tokens (responses of 2 to 8 here), so micro_batch (which may change
    on resume) does not change it; a tiny grad_clip shrinks the update (AdamW divides by the gradient's size: only
    clipping far below its epsilon shows in the weights)."""
    unequal_responses(monkeypatch)
    prompts = states("sokoban", "train", 4, 0)
    cfg = oel.OELConfig(max_new_tokens=8, batch_size=4, steps=1, lr=1e-2, grad_ckpt=False)
    base = modeling.load("tiny")[0].state_dict()
    norms, moved = [], []
    for micro, clip in ((4, 1.0), (1, 1.0), (4, 1e-12)):
        student, tok = modeling.load("tiny")
        logs = oel.consolidate(student, oel.frozen_copy(student, torch.float32), tok, prompts, [KNOWLEDGE],
                               replace(cfg, micro_batch=micro, grad_clip=clip))
        norms.append(logs[0]["grad_norm"])
        moved.append(sum((v - base[k]).abs().sum() for k, v in student.state_dict().items()))
    assert norms[0] > 0 and abs(norms[1] / norms[0] - 1) < 1e-4  # the same gradient, micro-batched or not
    assert moved[0] > 0 and moved[2] < 0.1 * moved[0]
    student, tok = modeling.load("tiny")
    with torch.no_grad():
        student.model.norm.weight.fill_(float("nan"))  # a diverged model: the step stops before the update
    before = {k: v.clone() for k, v in student.state_dict().items()}
    with pytest.raises(SystemExit, match="step 1: the gradient norm is nan"):
        oel.consolidate(student, oel.frozen_copy(modeling.load("tiny")[0], torch.float32), tok, prompts, [KNOWLEDGE], cfg)
    assert all(torch.equal(v, before[k]) for k, v in student.state_dict().items() if k != "model.norm.weight")


def test_infinite_gradient_norm_stops_before_the_update(monkeypatch):
    """An infinite gradient norm (not only a NaN one) stops consolidation before the optimizer step."""
    student, tok = modeling.load("tiny")
    before = {k: v.clone() for k, v in student.state_dict().items()}
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda params, clip: torch.tensor(float("inf")))
    cfg = oel.OELConfig(max_new_tokens=4, batch_size=2, micro_batch=2, steps=1, lr=1e-2)
    with pytest.raises(SystemExit, match="step 1: the gradient norm is inf"):
        oel.consolidate(student, oel.frozen_copy(student, torch.float32), tok, states("sokoban", "train", 2, 0),
                        [KNOWLEDGE], cfg)
    assert all(torch.equal(v, before[k]) for k, v in student.state_dict().items())


def test_consolidation_warns_when_a_step_has_more_prompts_than_the_round(capsys):
    """A batch larger than the round's deploy turns is warned of (each step repeats prompts); one that fits is not."""
    student, tok = modeling.load("tiny")
    teacher = oel.frozen_copy(student, torch.float32)
    for batch_size, warned in ((3, True), (2, False)):
        cfg = oel.OELConfig(max_new_tokens=2, batch_size=batch_size, micro_batch=3, steps=1)
        oel.consolidate(student, teacher, tok, states("sokoban", "train", 2, 0), [KNOWLEDGE], cfg, r=1)
        out = capsys.readouterr().out
        assert (f"round 1 | warning: 2 deploy turns for a --batch_size of {batch_size}:" in out) == warned


def test_step_log_is_the_per_token_kl(monkeypatch):
    """A step's logged kl is the KL per response token of its batch (not per sequence: responses of 2 to 8 tokens
    here), over its logged tokens; its grad_norm is the norm of the gradient of that per-token loss before clipping
    (a grad_clip far below it does not change what is logged); steps count from 1."""
    unequal_responses(monkeypatch)
    student, tok = modeling.load("tiny")
    teacher = oel.frozen_copy(student, torch.float32)
    prompts = states("sokoban", "train", 4, 0)
    cfg = oel.OELConfig(max_new_tokens=8, batch_size=4, micro_batch=2, steps=1, grad_clip=1e-4)
    with torch.no_grad():
        batch = oel.sample_batch(student, tok, prompts, [KNOWLEDGE], cfg, 0, 0)  # what step 1 draws
    loss, n = oel.distill_loss(student, teacher, tok, batch, cfg)
    (loss / n).backward()
    norm = torch.cat([p.grad.flatten() for p in student.parameters()]).norm().item()
    student.zero_grad(set_to_none=True)
    (log,) = oel.consolidate(student, teacher, tok, prompts, [KNOWLEDGE], cfg)
    assert log["tokens"] == n > len(batch) and log["kl"] == pytest.approx(float(loss.detach()) / n, rel=1e-4)
    assert log["step"] == 1 and norm > 100 * cfg.grad_clip and log["grad_norm"] == pytest.approx(norm, rel=1e-4)


def test_consolidation_prompts_use_the_runs_chat_mode(tiny, monkeypatch):
    """The student's sampling prompts and the teacher's prompts are chats in the run's mode (--thinking), as the
    rollouts that made the states were."""
    m, tok = tiny
    modes, real = [], tok.user_ids
    monkeypatch.setattr(tok, "user_ids", lambda content, thinking: modes.append(thinking) or real(content, thinking))
    for thinking in (True, None):
        modes.clear()
        cfg = oel.OELConfig(max_new_tokens=4, batch_size=2, micro_batch=2, thinking=thinking)
        batch = oel.sample_batch(m, tok, states("frozenlake", "train", 2, 0), [KNOWLEDGE], cfg, 0, 0)
        oel.distill_loss(m, m, tok, batch, cfg)
        assert modes == [thinking] * 4  # 2 student prompts, 2 teacher prompts


def test_topk_kl_is_the_students_top_k(tiny):
    """With k below the vocabulary, the approximation sums p_s (log p_s - log p_t) over the student's k most likely
    tokens (not the teacher's), both at the given temperature; it is not renormalised."""
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(4, 50, generator=g, dtype=torch.float64) * 3, torch.randn(4, 50, generator=g, dtype=torch.float64) * 3
    logp, logq = torch.log_softmax(s / 0.7, -1), torch.log_softmax(t / 0.7, -1)
    top = logp.topk(5, -1).indices
    ref = (logp.exp() * (logp - logq)).gather(-1, top).sum(-1).mean()
    assert torch.allclose(oel.topk_kl(s, t, 0.7, 5).double(), ref, rtol=1e-5)
    x, y = s.clone().requires_grad_(), s.clone().requires_grad_()  # student = teacher: the loss is 0, and its gradient
    loss = oel.topk_kl(x, s, 0.7, 5)  # is that of the probability in the top k (not 0, unlike the exact KL's)
    mass = torch.softmax(y / 0.7, -1).gather(-1, top).sum(-1).mean()
    (grad,), (expected,) = torch.autograd.grad(loss, x), torch.autograd.grad(mass, y)
    assert loss.item() == 0 and expected.abs().max() > 1e-3 and torch.allclose(grad.double(), expected, atol=1e-6)
    after = torch.softmax((s - 5 * grad) / 0.7, -1).gather(-1, top).sum(-1).mean()  # a step moves mass to the tail
    assert after < mass - 1e-3


def test_extraction_keeps_a_repeated_lesson_once_and_exact_budgets_fit(tiny, tmp_path, monkeypatch):
    """A lesson the extractor repeats is kept once; an item or a trajectory exactly as long as the budget fits."""
    _, tok = tiny
    same = modeling.Completion([], f"{oel.MARKER} walk around the holes", [], True)
    monkeypatch.setattr(oel.modeling, "generate", lambda m, tok, prompts, **kw: [same for _ in prompts])
    pool = oel.extract_pool(None, tok, [fake_trajectory(i) for i in range(3)], oel.OELConfig(K=1, n=3), str(tmp_path), 0)
    assert pool == [f"{oel.MARKER} walk around the holes"]
    item = f"{oel.MARKER} walk around the holes"
    assert oel.trim_knowledge([item], tok, len(tok.encode(item))) == [item]
    one = oel.raw_context([fake_trajectory(0)], tok, 10**6)
    assert oel.raw_context([fake_trajectory(0)], tok, len(tok.encode(one))) == one


@pytest.mark.parametrize("topk", [0, 5])
def test_distill_loss_gradient_matches_float64_reference(tiny, topk):
    """The loss and its gradient reach every student weight as float64 autograd of the reference loss (each model run
    on its own prompt + response) gives them: the output head's own term included (tied to the embeddings, so a head
    cut out of the graph would still leave that weight a gradient from the input side); with --topk, the paper's
    approximation (the sum over the student's top-k tokens) likewise."""
    student, tok = modeling.load("tiny")
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    teacher = oel.frozen_copy(modeling.load("tiny")[0], torch.float32)
    cfg = oel.OELConfig(max_new_tokens=6, batch_size=2, micro_batch=2, kl_temperature=0.7, topk=topk)
    prompts = states("sokoban", "train", 1, 0) + states("frozenlake", "train", 1, 0)
    batch = oel.sample_batch(student, tok, prompts, [KNOWLEDGE], cfg, 0, 0)
    batch[0] = replace(batch[0], response=batch[0].response[:3])  # responses of different lengths: right padding
    assert len({len(b.prompt) for b in batch}) == len({len(b.response) for b in batch}) == 2
    loss, n = oel.distill_loss(student, teacher, tok, batch, cfg)
    (loss / n).backward()
    s64, t64 = oel.frozen_copy(student, torch.float64).requires_grad_(True), oel.frozen_copy(teacher, torch.float64)
    ref = torch.zeros((), dtype=torch.float64)
    for b in batch:
        t_ids = tok.user_ids(games.user_prompt(b.game, b.state, b.knowledge), cfg.thinking)
        ps = (s64(torch.tensor([b.prompt + b.response]))[0, len(b.prompt) - 1 : -1] / 0.7).log_softmax(-1)
        with torch.no_grad():
            pt = (t64(torch.tensor([t_ids + b.response]))[0, len(t_ids) - 1 : -1] / 0.7).log_softmax(-1)
        terms = ps.exp() * (ps - pt)  # [len(response),V]
        ref = ref + (terms if not topk else terms.gather(-1, ps.topk(topk, -1).indices)).sum()
    assert torch.allclose(loss.double(), ref, rtol=1e-5), (loss.item(), ref.item())
    (ref / n).backward()
    grads64 = dict(s64.named_parameters())
    for name, p in student.named_parameters():
        g64 = grads64[name].grad
        assert ((p.grad.double() - g64).norm() / g64.norm()).item() < 1e-5, name


def test_sample_batch_depends_on_the_run_seed_and_draws_the_whole_pool(tiny, monkeypatch):
    """Runs with another --seed (repeats for error bars) shuffle their prompts, draw their knowledge and seed their
    samples differently; each chunk of rollout_batch prompts samples with its own seed; every pool text is drawn,
    about equally often (300 draws from 3 texts: 100 each expected, 3.6 standard deviations allowed)."""
    seeds = []
    monkeypatch.setattr(oel.modeling, "generate", lambda m, tok, ids, **kw: seeds.append(kw["seed"]) or
                        [modeling.Completion([1], "", [0.0], True) for _ in ids])
    prompts, pool = [("frozenlake", f"state {i}") for i in range(300)], ["k0", "k1", "k2"]
    cfg = oel.OELConfig(batch_size=300, rollout_batch=100)
    a = oel.sample_batch(tiny[0], tiny[1], prompts, pool, cfg, 0, 0)
    b = oel.sample_batch(tiny[0], tiny[1], prompts, pool, replace(cfg, seed=1), 0, 0)
    assert len(seeds) == len(set(seeds)) == 6  # 3 chunks a run, none shared within or across the runs
    assert [x.state for x in a] != [x.state for x in b] and [x.knowledge for x in a] != [x.knowledge for x in b]
    for batch in (a, b):
        counts = [sum(x.knowledge == k for x in batch) for k in pool]
        assert all(70 <= c <= 130 for c in counts), counts


def test_deploy_holds_out_the_levels_evaluation_plays(tmp_path, monkeypatch):
    """With a run seed other than 0, the boards the deploy games avoid (held_out_boards) are the first observations of the
    test levels that evaluation plays: the run's seed and n_test, checked against make_games. They are held out
    unless the deploy levels would keep fewer than half their distinct boards; a test set without repeats is."""
    played = []

    def fake_rollout(m, tok, envs, rcfg, knowledge=None, seed=0, desc=""):
        played.extend(games.first_observation(e) for e in envs)
        return [games.Trajectory(game=e.name, seed=e.seed) for e in envs]

    monkeypatch.setattr(oel.games, "rollout", fake_rollout)
    cfg = oel.OELConfig(game="sokoban", seed=3, n_test=6, n_ood=0)
    oel.evaluate(None, None, cfg, str(tmp_path))
    expected = {games.first_observation(e) for e in games.make_games("sokoban", "test", 6, seed=3)}
    assert set(played) == expected == oel.held_out_boards(cfg, 0)
    assert expected != {games.first_observation(e) for e in games.make_games("sokoban", "test", 6, seed=0)}
    # test level i shows board i % d, deploy level i board i % 12: held out while at least 6 of the 12 stay
    for distinct, held_out in ((6, True), (5, True), (4, True), (3, True), (7, False), (8, True)):  # of 8 test levels
        monkeypatch.setattr(oel.games, "first_observation",
                            lambda env, d=distinct: (env.seed // 3) % (d if env.seed % 3 == 1 else 12))
        assert bool(oel.held_out_boards(replace(cfg, n_test=8), 0)) == held_out  # 8 distinct: no repeats, no check


def test_consolidation_prompts_are_every_turn_of_the_deploy_games(tmp_path, monkeypatch):
    """Consolidation's prompts are the states of every turn of every deploy game (the later turns' states too, which
    hold the game so far), not one per game; the student it trains is float32 even where the teacher is bfloat16."""
    trajs = [fake_trajectory(i) for i in range(3)]
    for i, t in enumerate(trajs[:2]):
        t.turns.append(replace(t.turns[0], state=f"state {i}, turn 2"))
        t.steps = 2
    monkeypatch.setattr(oel, "play", lambda *a, **kw: trajs)
    monkeypatch.setattr(oel, "extract_pool", lambda *a, **kw: ["k"])
    seen = []

    def fake_consolidate(student, teacher, tok, prompts, pool, cfg, state_path, r):
        seen.extend(prompts)
        dtypes.append((student.output_weight.dtype, teacher.output_weight.dtype))
        open(state_path, "w").close()  # train_round removes it
        return []

    dtypes = []
    monkeypatch.setattr(oel, "consolidate", fake_consolidate)
    monkeypatch.setattr(oel, "infer_dtype", lambda device: torch.bfloat16)  # as on a GPU
    oel.train_round(oel.OELConfig(model="tiny", n_test=4), 0, str(tmp_path), "tiny", "cpu")
    assert dtypes == [(torch.float32, torch.bfloat16)]  # float32 trainable weights, whatever the teacher's dtype
    assert sorted(seen) == sorted(("frozenlake", s) for s in ["state 0", "state 0, turn 2", "state 1",
                                                             "state 1, turn 2", "state 2"])


def test_extraction_samples_as_evaluation_in_the_runs_chat_mode(tiny, tmp_path, monkeypatch):
    """Extraction responses are sampled as evaluation samples are (0.7, top-p 0.8, top-k 20, as the paper's code),
    up to extract_max_new_tokens (not the games' max_new_tokens), from prompts in the run's chat mode."""
    _, tok = tiny
    calls = []
    monkeypatch.setattr(oel.modeling, "generate", lambda m, tok, prompts, **kw: calls.append((prompts, kw)) or
                        [modeling.Completion([], "", [], True) for _ in prompts])
    for thinking in (True, False):
        cfg = oel.OELConfig(K=1, n=1, thinking=thinking, max_new_tokens=64, extract_max_new_tokens=96)
        oel.extract_pool(None, tok, [fake_trajectory(0)], cfg, str(tmp_path / str(thinking)), 0)
    (p_think, kw), (p_plain, _) = calls
    assert (kw["temperature"], kw["top_p"], kw["top_k"], kw["max_new_tokens"]) == (0.7, 0.8, 20, 96)
    msg = oel.extraction_prompt(fake_trajectory(0), "", False)
    assert p_think == [tok.user_ids(msg, True)] != p_plain == [tok.user_ids(msg, False)]


def test_consolidation_optimizer_takes_the_runs_settings(tmp_path, monkeypatch):
    """Consolidation's AdamW (as its saved state records it) has the run's lr and weight decay (one set away from
    torch's default of 0.01) and the paper's betas (0.9, 0.999); the state is saved after every save_every-th step
    and after the last."""
    saved, real_save = [], torch.save
    monkeypatch.setattr(torch, "save", lambda obj, path: saved.append(obj["step"]) or real_save(obj, path))
    student, tok = modeling.load("tiny")
    cfg = oel.OELConfig(max_new_tokens=2, batch_size=1, micro_batch=1, steps=3, save_every=2, lr=3e-4, weight_decay=0.2)
    oel.consolidate(student, oel.frozen_copy(student, torch.float32), tok, states("sokoban", "train", 1, 0),
                    [KNOWLEDGE], cfg, str(tmp_path / "state.pt"))
    (group,) = torch.load(tmp_path / "state.pt")["opt"]["param_groups"]
    assert (group["lr"], tuple(group["betas"]), group["weight_decay"]) == (3e-4, (0.9, 0.999), 0.2)
    assert saved == [2, 3]


def test_a_closed_output_pipe_stops_with_one_line(tmp_path):
    """`python train.py | head -1`: once the reader has gone, the run stops with one line and status 1, no
    traceback (and no second error from Python's exit flush)."""
    read, write = os.pipe()
    os.close(read)
    try:
        proc = subprocess.run([sys.executable, "train.py", "--model", "tiny", "--out_dir", str(tmp_path / "run")],
                              cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=write,
                              stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write)
    assert proc.returncode == 1 and proc.stderr == "stopped: the program reading the output closed it\n"


def test_a_closed_output_pipe_with_buffered_output_stops_with_one_line(monkeypatch):
    """stdout's reader gone while output is still buffered (no PYTHONUNBUFFERED): one line, and Python's exit flush
    (here: the flush after) raises no second BrokenPipeError."""
    read, write = os.pipe()
    os.close(read)
    out = open(write, "w")
    monkeypatch.setattr(sys, "stdout", out)

    def main():
        print("round 0 | step 001/004")  # buffered: the flush meets the closed pipe
        sys.stdout.flush()

    try:
        with pytest.raises(SystemExit) as e:
            train.cli(main)
        assert e.value.code == "stopped: the program reading the output closed it"
        out.flush()
    finally:
        monkeypatch.undo()
        out.close()


def test_a_full_disk_is_one_line(tmp_path, monkeypatch):
    """A full disk ends a run with one line (naming the file where the error does), whichever writer met it: Python's,
    torch.save's of the consolidation state (through a Python file, which raises OSError where a path raises a
    RuntimeError), or safetensors' and tokenizers' (their text turned into the OSError it reports); other OS errors
    are not called a full disk."""
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "runs/x/deploy.jsonl.tmp")
    with pytest.raises(SystemExit) as e:
        train.cli(lambda: (_ for _ in ()).throw(full))
    assert e.value.code == ("error: the disk is full writing runs/x/deploy.jsonl.tmp (No space left on device): free "
                            "some space and rerun the same command; what was finished is kept")
    with pytest.raises(IsADirectoryError):  # not a full disk: the traceback stays
        train.cli(lambda: open(tmp_path, "w"))
    with pytest.raises(SystemExit, match=f"^error: the disk is full [(]{os.strerror(errno.EDQUOT)}[)]: free"):
        train.cli(lambda: (_ for _ in ()).throw(OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))))  # over a quota

    class FillsUp(io.BytesIO):  # room for the first bytes only: torch.save then raises a RuntimeError from the OSError
        def write(self, b):
            if self.tell() + len(b) > 100:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return super().write(b)

    with pytest.raises(SystemExit, match="^error: the disk is full [(]No space left on device[)]: free"):
        train.cli(lambda: torch.save({"x": torch.zeros(1000)}, FillsUp()))

    class Full(io.FileIO):  # the file is made, its first write fails
        def write(self, b):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    real_open = open
    monkeypatch.setattr(oel, "open", lambda f, mode="r", **kw: Full(f, mode) if mode == "wb" else real_open(f, mode, **kw),
                        raising=False)
    student, tok = modeling.load("tiny")
    cfg = oel.OELConfig(max_new_tokens=2, batch_size=1, micro_batch=1, steps=1, grad_ckpt=False)
    with pytest.raises((OSError, RuntimeError)) as e:
        oel.consolidate(student, oel.frozen_copy(student, torch.float32), tok, states("frozenlake", "train", 1, 0),
                        [KNOWLEDGE], cfg, str(tmp_path / "state.pt"))
    where = re.escape(str(tmp_path / "state.pt.tmp"))
    assert not os.path.exists(tmp_path / "state.pt.tmp")  # removed: the space it held is free again
    with pytest.raises(SystemExit, match=f"^error: the disk is full writing {where} [(]No space left on device[)]: free"):
        train.cli(lambda: (_ for _ in ()).throw(e.value))

    def serializing(*a, **kw):
        raise modeling.SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    modeling.save(student, tok, tmp_path / "ck")
    monkeypatch.setattr(modeling, "save_file", serializing)
    with pytest.raises(OSError) as e:
        modeling.save(student, tok, tmp_path / "ck")
    assert (e.value.errno, e.value.filename) == (errno.ENOSPC, str(tmp_path / "ck" / "model.safetensors"))
    with pytest.raises(FileNotFoundError, match="no config.json"):  # a save cut short leaves no checkpoint behind
        modeling.load(tmp_path / "ck")
    monkeypatch.undo()
    tok.tok = types.SimpleNamespace(save=lambda f: (_ for _ in ()).throw(Exception("No space left on device (os error "
                                                                                  "28)")))  # as tokenizers raises it
    with pytest.raises(OSError) as e:
        modeling.save(student, tok, tmp_path / "ck")
    assert (e.value.errno, e.value.filename) == (errno.ENOSPC, str(tmp_path / "ck" / "tokenizer.json"))


def test_a_file_it_may_not_write_is_one_line(tmp_path, monkeypatch):
    """A read-only cache (say, on a cluster: the tiny model there, the TextWorld games not yet) or a file it may not
    write ends a run with one line naming the file, the cache's saying how to move it; without a file name, or with
    another error, the traceback stays."""
    monkeypatch.setenv("OEL_CACHE", str(tmp_path / "cache"))
    ro = OSError(errno.EROFS, os.strerror(errno.EROFS), str(tmp_path / "cache" / "textworld"))
    with pytest.raises(SystemExit) as e:
        train.cli(lambda: (_ for _ in ()).throw(ro))
    assert e.value.code == f"error: {os.strerror(errno.EROFS)}: {ro.filename}; set OEL_CACHE to a folder you can write"
    denied = PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(tmp_path / "run" / "config.json"))
    with pytest.raises(SystemExit) as e:
        train.cli(lambda: (_ for _ in ()).throw(denied))
    assert e.value.code == f"error: {os.strerror(errno.EACCES)}: {denied.filename}"
    beside = OSError(errno.EROFS, os.strerror(errno.EROFS), str(tmp_path / "cache2" / "x"))  # not in the cache
    with pytest.raises(SystemExit) as e:
        train.cli(lambda: (_ for _ in ()).throw(beside))
    assert e.value.code == f"error: {os.strerror(errno.EROFS)}: {beside.filename}"
    with pytest.raises(PermissionError):
        train.cli(lambda: (_ for _ in ()).throw(PermissionError(errno.EACCES, "denied")))


def test_a_file_it_may_not_write_is_one_line_with_relative_paths(tmp_path, monkeypatch):
    """A relative OEL_CACHE or file name still tells the cache from the run's files, and EPERM is one line like
    EACCES."""
    monkeypatch.chdir(tmp_path)

    def code(err):
        with pytest.raises(SystemExit) as e:
            train.cli(lambda: (_ for _ in ()).throw(err))
        return e.value.code

    hint, ro = "; set OEL_CACHE to a folder you can write", os.strerror(errno.EROFS)
    for cache, name in (("cache", "cache/textworld"), ("cache", str(tmp_path / "cache" / "textworld")),
                        (str(tmp_path / "cache"), "cache/textworld")):
        monkeypatch.setenv("OEL_CACHE", cache)
        assert code(OSError(errno.EROFS, ro, name)) == f"error: {ro}: {name}{hint}"
        assert code(OSError(errno.EROFS, ro, "runs/x/config.json")) == f"error: {ro}: runs/x/config.json"
    perm = os.strerror(errno.EPERM)
    assert code(PermissionError(errno.EPERM, perm, "runs/x/config.json")) == f"error: {perm}: runs/x/config.json"


def test_out_of_gpu_memory_is_one_line_naming_what_to_lower(tmp_path, monkeypatch):
    """Running out of GPU memory ends train.py and eval.py with one line: what to lower (a run then resumes with it
    lowered), and torch's own first line, also where torch raises it as an AcceleratorError; a consolidation state that runs out of memory as it loads is not called
    damaged."""
    def fail(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.\nmore details")

    with pytest.raises(SystemExit) as e:
        train.cli(fail)
    assert e.value.code == ("error: out of GPU memory: lower --rollout_batch (games or samples generated at once) or "
                            "--micro_batch (prompts per forward and backward), or pass --offload_optimizer true, and "
                            "rerun: the run resumes where it stopped (CUDA out of memory. Tried to allocate 2.00 GiB.)")
    if hasattr(torch, "AcceleratorError"):  # torch >= 2.8
        with pytest.raises(SystemExit, match=r"^error: out of GPU memory: lower .* \(CUDA error: out of memory\)$"):
            train.cli(lambda: (_ for _ in ()).throw(torch.AcceleratorError("CUDA error: out of memory\nCUDA kernel")))
        with pytest.raises(torch.AcceleratorError):  # another CUDA error keeps its traceback
            train.cli(lambda: (_ for _ in ()).throw(torch.AcceleratorError("CUDA error: an illegal memory access")))
    with pytest.raises(SystemExit) as e:  # no message from torch: no empty parentheses (nor an IndexError)
        train.cli(lambda: (_ for _ in ()).throw(torch.cuda.OutOfMemoryError()))
    assert e.value.code.endswith("the run resumes where it stopped")
    monkeypatch.delattr(torch, "AcceleratorError", raising=False)  # older torch: a full disk is still one line
    with pytest.raises(SystemExit, match="^error: the disk is full"):
        train.cli(lambda: (_ for _ in ()).throw(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))))
    monkeypatch.setattr(oel, "play", fail)  # eval.py run as a script, out of memory while playing
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["eval.py", "--model", "tiny", "--n", "1", "--max_new_tokens", "1"])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(os.path.join(ROOT, "eval.py"), run_name="__main__")
    assert e.value.code == ("error: out of GPU memory: lower --rollout_batch (games played at once) (CUDA out of "
                            "memory. Tried to allocate 2.00 GiB.)")
    monkeypatch.setattr(torch, "load", fail)  # out of memory while a consolidation resumes: not the state file's fault
    (tmp_path / "state.pt").write_bytes(b"")
    student, tok = modeling.load("tiny")
    with pytest.raises(torch.cuda.OutOfMemoryError):
        oel.consolidate(student, student, tok, [], [""], oel.OELConfig(), str(tmp_path / "state.pt"))


def test_extraction_prompt_shows_no_empty_knowledge_and_asks_not_to_repeat_shown_knowledge():
    """With no knowledge yet, showing it changes nothing (no empty section); shown knowledge comes with the request not
    to repeat it, hidden knowledge without."""
    t = fake_trajectory(0)
    assert oel.extraction_prompt(t, "", True) == oel.extraction_prompt(t, "", False)
    shown, hidden = oel.extraction_prompt(t, KNOWLEDGE, True), oel.extraction_prompt(t, KNOWLEDGE, False)
    assert "not repeating the experience gathered so far" in shown
    assert "not repeating" not in hidden


def test_raw_context_orders_the_kept_episodes_newest_first(tiny):
    """Raw trajectories in context: the newest episode first, episodes a blank line apart."""
    _, tok = tiny
    text = oel.raw_context([fake_trajectory(i) for i in range(3)], tok, 10**6)
    assert text.index("state 2\n") < text.index("state 1\n") < text.index("state 0\n")
    assert text.count("\n\n## Episode (") == 2


def test_student_samples_from_the_full_distribution_at_the_kl_temperature(tiny, monkeypatch):
    """On-policy: the student samples at the KL's temperature with neither top-p nor top-k (the distribution the loss
    compares), up to max_new_tokens."""
    calls = []
    monkeypatch.setattr(oel.modeling, "generate", lambda m, tok, ids, **kw: calls.append(kw) or
                        [modeling.Completion([1], "", [0.0], True) for _ in ids])
    cfg = oel.OELConfig(batch_size=2, kl_temperature=0.5, max_new_tokens=7)
    oel.sample_batch(tiny[0], tiny[1], [("frozenlake", "state 0"), ("frozenlake", "state 1")], ["k"], cfg, 0, 0)
    assert [(kw["temperature"], kw["top_p"], kw["top_k"], kw["max_new_tokens"]) for kw in calls] == [(0.5, 1.0, 0, 7)]


class TripleTok:
    """A teacher tokenizer counting 3 tokens a character: longer counts than the extractor's (tiny)."""

    def encode(self, text):
        return list(text) * 3


def test_extract_pool_counts_the_budget_in_the_teachers_tokenizer(tiny, tmp_path, monkeypatch):
    """With another extractor, the knowledge budget counts the teacher's tokens (budget_tok), whose context it fills."""
    _, tok = tiny
    monkeypatch.setattr(oel.modeling, "generate", lambda m, tok, prompts, **kw: [
        modeling.Completion([], f"{oel.MARKER} lesson from {tok.decode(p).split('state ')[1].split()[0]}", [], True)
        for p in prompts])
    trajs = [fake_trajectory(i) for i in range(3)]
    cfg = oel.OELConfig(K=1, n=3, knowledge_budget=3 * len(f"{oel.MARKER} lesson from 0") + 5)  # one item
    pool = oel.extract_pool(None, tok, trajs, cfg, str(tmp_path), 0, budget_tok=TripleTok())
    assert len(pool[0].splitlines()) == 1 and len(TripleTok().encode(pool[0])) <= cfg.knowledge_budget
    assert len(oel.extract_pool(None, tok, trajs, cfg, str(tmp_path / "same"), 0)[0].splitlines()) == 3


def test_extract_pool_resumed_after_an_empty_step_gives_the_uninterrupted_pool(tiny, tmp_path, monkeypatch):
    """An accumulation step that found no lesson saves an empty version; read back on resume it adds no blank item, so
    the pool equals the uninterrupted run's."""
    _, tok = tiny
    first = oel.seed_of(0, 0, "extract", 1)
    monkeypatch.setattr(oel.modeling, "generate", lambda m, tok, prompts, **kw: [
        modeling.Completion([], "" if kw["seed"] == first else f"{oel.MARKER} a lesson", [], True) for _ in prompts])
    cfg = oel.OELConfig(K=1, n=2)
    trajs = [fake_trajectory(i) for i in range(2)]
    whole = oel.extract_pool(None, tok, trajs, cfg, str(tmp_path), 0)
    last = tmp_path / "knowledge" / "r0_k0_2.md"
    saved = last.read_text()
    last.unlink()  # killed before the last step was saved: step 1 (empty) is read back
    assert oel.extract_pool(None, tok, trajs, cfg, str(tmp_path), 0) == whole == [f"{oel.MARKER} a lesson"]
    assert last.read_text() == saved


def test_offloaded_optimizer_keeps_weights_that_bfloat16_cannot_hold():
    """--offload_optimizer's float32 master copy starts from the weights as they are: a trained float32 checkpoint (not
    exact in bfloat16) takes the same step as with AdamW on the GPU."""
    prompts = states("sokoban", "train", 2, 0)
    cfg = oel.OELConfig(max_new_tokens=4, batch_size=2, micro_batch=2, steps=1, lr=1e-5, grad_ckpt=False)
    runs = []
    for offload in (False, True):
        student, tok = modeling.load("tiny")
        with torch.no_grad():
            for p in student.parameters():
                p.add_(1e-3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        teacher = oel.frozen_copy(student, torch.float32)
        oel.consolidate(student, teacher, tok, prompts, [KNOWLEDGE], replace(cfg, offload_optimizer=offload))
        runs.append(student.state_dict())
    for k, v in runs[0].items():
        assert torch.allclose(runs[1][k], v, rtol=0, atol=1e-6), k


def test_consolidation_freezes_a_loaded_teacher_and_trains_in_train_mode(monkeypatch):
    """A teacher straight from modeling.load (as train_round's) gets no gradient, even through plain autograd (topk);
    the student's loss runs in train mode (gradient checkpointing needs it) and the student is left in eval mode."""
    student, tok = modeling.load("tiny")
    teacher = modeling.load("tiny")[0]
    real, modes = oel.distill_loss, []
    monkeypatch.setattr(oel, "distill_loss", lambda s, *a: modes.append(s.training) or real(s, *a))
    cfg = oel.OELConfig(max_new_tokens=4, batch_size=2, micro_batch=2, steps=1, lr=1e-3, topk=5)
    oel.consolidate(student, teacher, tok, states("sokoban", "train", 2, 0), [KNOWLEDGE], cfg)
    assert all(p.grad is None for p in teacher.parameters())
    assert modes == [True] and not student.training


def test_consolidation_steps_walk_through_the_rounds_own_prompts(monkeypatch):
    """Step s of round r trains on sample_batch(..., s, r): the steps together cover every prompt, and the round's
    own draws (not round 0's, nor step 0's every time)."""
    student, tok = modeling.load("tiny")
    teacher = oel.frozen_copy(student, torch.float32)
    prompts, pool = states("sokoban", "train", 4, 0), ["k0", "k1", "k2"]
    cfg = oel.OELConfig(max_new_tokens=2, batch_size=2, micro_batch=2, steps=2, lr=1e-3)
    real, drawn = oel.sample_batch, []

    def spy(*a):
        batch = real(*a)
        drawn.append([(b.state, b.knowledge) for b in batch])
        return batch

    monkeypatch.setattr(oel, "sample_batch", spy)
    oel.consolidate(student, teacher, tok, prompts, pool, cfg, r=1)
    assert sorted(s for batch in drawn for s, _ in batch) == sorted(s for _, s in prompts)
    assert drawn == [[(b.state, b.knowledge) for b in real(student, tok, prompts, pool, cfg, step, 1)]
                     for step in range(2)]


def test_play_saves_every_finished_batch_the_last_one_included(tiny, tmp_path, monkeypatch):
    """Every finished batch, the last included, is saved under its own range, so a run killed before the set's file
    is written replays no game when resumed."""
    m, tok = tiny
    rcfg = games.RolloutConfig(max_turns=1, max_new_tokens=2)
    path = str(tmp_path / "set.jsonl")
    real_save = games.save_trajectories

    def killed_before_the_set(p, trajs):
        if str(p) == path:
            raise KeyboardInterrupt
        real_save(p, trajs)

    monkeypatch.setattr(games, "save_trajectories", killed_before_the_set)
    with pytest.raises(KeyboardInterrupt):
        oel.play(m, tok, "sokoban", "test", 5, 0, rcfg, batch=2, path=path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set.jsonl.part0-2", "set.jsonl.part2-4", "set.jsonl.part4-5"]
    monkeypatch.setattr(games, "save_trajectories", real_save)
    monkeypatch.setattr(games, "rollout", lambda *a, **k: pytest.fail("replayed a finished batch"))
    assert len(oel.play(m, tok, "sokoban", "test", 5, 0, rcfg, batch=2, path=path)) == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set.jsonl"]


def test_play_ignores_the_temporary_of_a_batch_file_cut_short(tiny, tmp_path):
    """A batch file's temporary, left by a run killed while writing it, is not taken for a finished batch."""
    m, tok = tiny
    path = str(tmp_path / "set.jsonl")
    (tmp_path / "set.jsonl.part0-2.tmp").write_text('{"game": "sok')
    assert oel.part_files(path) == {}
    trajs = oel.play(m, tok, "sokoban", "test", 3, 0, games.RolloutConfig(max_turns=1, max_new_tokens=2), batch=2,
                     path=path)
    assert len(trajs) == 3 and len(games.load_trajectories(path)) == 3


def test_a_games_file_with_more_games_than_the_set_is_refused(tmp_path):
    """A set's file holding more games than the set (a copy, a hand edit) ends the run with one line, as a short one does."""
    path = str(tmp_path / "set.jsonl")
    games.save_trajectories(path, [fake_trajectory(i) for i in range(3)])
    with pytest.raises(SystemExit, match=f"^error: {re.escape(path)} does not hold .* should hold 2 games"):
        oel.play(None, None, "frozenlake", "test", 2, 0, None, path=path)


def test_evaluate_plays_the_ood_set_with_its_own_games_defaults(tmp_path, monkeypatch):
    """The test set is played with the run's game options, the out-of-distribution set with its game's defaults."""
    played = []

    def fake_rollout(m, tok, envs, rcfg, knowledge=None, seed=0, desc=""):
        played.extend(envs)
        return [games.Trajectory(game=e.name, seed=e.seed) for e in envs]

    monkeypatch.setattr(oel.games, "rollout", fake_rollout)
    cfg = oel.OELConfig(game="sokoban", game_options='{"size": 7}', ood_game="frozenlake", n_test=1, n_ood=1)
    assert list(oel.evaluate(None, None, cfg, str(tmp_path))) == ["test", "ood"]
    assert [(e.name, e.size) for e in played] == [("sokoban", 7), ("frozenlake", games.ENVS["frozenlake"]().size)]


def test_frozen_copy_is_a_gradient_free_copy_in_the_asked_dtype():
    """frozen_copy gives the same weights cast to the asked dtype, in eval mode, without gradients; the sampler and
    teacher dtype is bfloat16 on a GPU, float32 on a CPU."""
    m, _ = modeling.load("tiny")
    c = oel.frozen_copy(m, torch.bfloat16)
    assert not c.training and all(p.dtype == torch.bfloat16 and not p.requires_grad for p in c.parameters())
    for (k, v), w in zip(m.state_dict().items(), c.state_dict().values()):
        assert torch.equal(v.to(torch.bfloat16), w), k
    assert oel.infer_dtype("cuda") == oel.infer_dtype(torch.device("cuda", 0)) == torch.bfloat16
    assert oel.infer_dtype("cpu") == torch.float32


def test_train_round_consolidates_under_its_own_round_and_removes_the_state(tmp_path, monkeypatch):
    """A round's consolidation is seeded and logged as that round (not round 0), and its state file is removed once
    the round's model is saved."""
    rounds, real = [], oel.consolidate
    monkeypatch.setattr(oel, "consolidate", lambda *a: rounds.append(a[-1]) or real(*a))
    cfg = oel.OELConfig(model="tiny", game="sokoban", n_train=2, n_test=2, n_ood=0, K=1, n=1, steps=1, batch_size=1,
                        micro_batch=1, max_new_tokens=3, extract_max_new_tokens=3, max_turns=1)
    (tmp_path / "r1").mkdir()
    oel.train_round(cfg, 1, str(tmp_path / "r1"), "tiny", "cpu")
    assert rounds == [1]
    assert (tmp_path / "r1" / "model" / "config.json").exists() and not (tmp_path / "r1" / "consolidate.pt").exists()


def test_resume_compares_extractor_folders_by_meaning(tmp_path, monkeypatch):
    """The extractor checkpoint spelled another way is the same setting on resume; another folder of its name is not."""
    monkeypatch.chdir(tmp_path)
    for d in ("ex", "run/base"):
        (tmp_path / d).mkdir(parents=True)
    (tmp_path / "run" / "base" / "eval.json").write_text("{}")
    cfg = oel.OELConfig(model="tiny", out_dir="run", extractor="ex")
    oel.atomic_write(tmp_path / "run" / "config.json", json.dumps(asdict(cfg)))
    for spelled in ("./ex", str(tmp_path / "ex"), "ex/"):
        oel.check_resume(replace(cfg, extractor=spelled))
    (tmp_path / "other" / "ex").mkdir(parents=True)  # another folder of the same name is another checkpoint
    with pytest.raises(SystemExit, match=r"other settings \(extractor\)"):
        oel.check_resume(replace(cfg, extractor="other/ex"))


def test_train_refuses_an_ood_set_that_is_the_trained_game_with_its_defaults_written_out():
    """--ood_game equal to --game with default options spelled out is the training game, refused as with no options."""
    for options in ('{"size": 3, "holes": 2}', '{"holes": 2}'):
        with pytest.raises(SystemExit, match="--ood_game frozenlake is the game trained on, with its default options"):
            train.check_settings(train.parse_args(["--model", "tiny", "--game", "frozenlake", "--ood_game", "frozenlake",
                                                   "--game_options", options]))


def test_each_rounds_log_line_shows_the_ood_pass_rate(tmp_path, monkeypatch, capsys):
    """The evaluation log line of every round shows the out-of-distribution pass rate beside the test metrics."""
    monkeypatch.setattr(oel, "evaluate", lambda m, tok, cfg, out_dir: {
        "test": {"pass_rate": 0.25, "tokens_per_turn": 3.0, "mean_steps": 2.0}, "ood": {"pass_rate": 0.5}})
    oel.run(oel.OELConfig(model="tiny", out_dir=str(tmp_path), rounds=0))
    assert ("base | eval | test_pass_rate 0.250 | test_tokens_per_turn 3.0 | test_mean_steps 2.0 | ood_pass_rate 0.500"
            in capsys.readouterr().out)
