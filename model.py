"""
Decoder-only transformer for the Qwen3 family (also Llama and Qwen2 through config flags), Hub checkpoint I/O,
the tokenizer with the Qwen3 chat format, and fast batched generation with a static KV cache.

Shapes: B batch rows, T tokens in this forward (the whole sequence without a cache), S cache columns, N keys a
query sees (T in a prefill, S in a decode step), U distinct prompts, P longest prompt, C hidden, H query heads,
K key/value heads, G = H // K, D head dim, V vocabulary, L layers.
"""
import contextlib
import json
import math
import os
import random
import re
import shutil
import tempfile
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import tokenizers
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch.utils._triton import has_triton
from torch.utils.checkpoint import checkpoint

ARCHITECTURES = {"qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
ENDOFTEXT, IM_START, IM_END, THINK, END_THINK = "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"
SYNC_EVERY = 16  # generate() looks at the host-side "all finished?" flag only every this many steps
MIN_TEMPERATURE = 1e-5  # sampling below it is greedy in effect, and logits / temperature can overflow: use 0


def read_json(file: Path) -> dict:
    """A JSON object file of a checkpoint (config.json, tokenizer_config.json, ...); {} if there is none."""
    if not file.is_file():
        return {}
    try:
        d = json.loads(file.read_text(encoding="utf-8"))
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"{file} is not valid JSON: {e}") from None
    if not isinstance(d, dict):
        raise ValueError(f"{file} is not a JSON object")
    return d


LLAMA3_ROPE = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


@dataclass
class ModelConfig:
    model_type: str = "qwen3"  # 'qwen3' (q/k norm) | 'llama' (plain) | 'qwen2' (q/k/v bias); defaults: Qwen3-1.7B
    vocab_size: int = 151936  # V, rows of the embedding (may exceed the tokenizer's size)
    hidden_size: int = 2048  # C
    intermediate_size: int = 6144  # SwiGLU width
    num_hidden_layers: int = 28  # L
    num_attention_heads: int = 16  # H
    num_key_value_heads: int = 8  # K, grouped-query attention when K < H
    head_dim: int = 128  # D
    rms_norm_eps: float = 1e-6  # epsilon of every RMSNorm
    rope_theta: float = 1e6  # rotary base
    rope_scaling: dict | None = None  # None, or Llama 3.x {'rope_type': 'llama3', 'factor', 'low_freq_factor', ...}
    max_position_embeddings: int = 40960  # longest sequence the model was trained for
    tie_word_embeddings: bool = True  # lm_head reuses the embedding matrix
    attention_bias: bool = False  # bias on q/k/v projections and o_proj (Qwen2: on q/k/v alone, always)

    def __post_init__(self):
        if self.model_type not in ARCHITECTURES:
            raise ValueError(f"unknown model_type {self.model_type!r}; supported: {', '.join(ARCHITECTURES)}")
        self.attention_bias = self.attention_bias or self.model_type == "qwen2"
        r = self.rope_scaling
        if r is not None and (r.get("rope_type", r.get("type")) != "llama3" or any(k not in r for k in LLAMA3_ROPE)):
            raise ValueError(f"rope_scaling must be None or Llama 3's: rope_type 'llama3' and "
                             f"{', '.join(LLAMA3_ROPE)}; got {r}")

    @property
    def qk_norm(self) -> bool:  # per-head RMSNorm on queries and keys: Qwen3's alone
        return self.model_type == "qwen3"

    @classmethod
    def from_hf(cls, path) -> "ModelConfig":
        """Read a Hub config.json (Qwen3ForCausalLM, LlamaForCausalLM or Qwen2ForCausalLM)."""
        file = Path(path) / "config.json"
        if not file.is_file():
            raise FileNotFoundError(f"no config.json in checkpoint directory {path}")
        d = read_json(file)
        sizes = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim")  # the first five are required
        mt = d.get("model_type")
        if mt not in ARCHITECTURES:
            raise ValueError(f"unknown model_type {mt!r} in {file}; supported: {', '.join(ARCHITECTURES)}")
        if missing := [k for k in sizes[:5] if k not in d]:
            raise ValueError(f"{file} lacks {', '.join(missing)}")
        if wrong := [k for k in sizes if d.get(k) is not None and type(d[k]) is not int]:
            raise ValueError(f"{file}: {', '.join(wrong)} must be {'an integer' if len(wrong) == 1 else 'integers'}")
        # Qwen2/3 as transformers reads them: layer_types if given, else layers from max_window_layers on slide
        window = d.get("sliding_window", 4096) if d.get("use_sliding_window") else None
        sliding = mt != "llama" and ("sliding_attention" in d["layer_types"] if d.get("layer_types") else
                                     window is not None and d.get("max_window_layers", 28) < d["num_hidden_layers"])
        if d.get("hidden_act", "silu") != "silu" or d.get("mlp_bias") or sliding:
            raise NotImplementedError(f"{file}: only SiLU MLPs without bias and full attention are implemented")
        rope = dict(d.get("rope_scaling") or d.get("rope_parameters") or {})  # transformers' order (5.x)
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "llama3"):
            raise NotImplementedError(f"{file}: rope_type {rope_type!r} is not implemented (default, llama3 are)")
        H = d["num_attention_heads"]
        kv = d.get("num_key_value_heads", H if mt == "llama" else 32)  # transformers' class defaults; null: H
        try:
            return cls(
                model_type=mt, vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
                intermediate_size=d["intermediate_size"], num_hidden_layers=d["num_hidden_layers"],
                num_attention_heads=H, num_key_value_heads=kv or H,
                head_dim=d.get("head_dim") or (128 if mt == "qwen3" else d["hidden_size"] // H),  # transformers'
                rms_norm_eps=d.get("rms_norm_eps", 1e-6),
                rope_theta=float(rope.get("rope_theta", d.get("rope_theta", 10000.0))),  # the rope dict's first
                rope_scaling={k: v for k, v in rope.items() if k != "rope_theta"} if rope_type == "llama3" else None,
                max_position_embeddings=d.get("max_position_embeddings", 2048 if mt == "llama" else 32768),
                tie_word_embeddings=d.get("tie_word_embeddings", False),
                attention_bias=d.get("attention_bias", False))
        except ValueError as e:  # __post_init__'s checks (e.g. incomplete llama3 rope scaling)
            raise ValueError(f"{file}: {e}") from None

    def to_hf(self) -> dict:
        """The Hub config.json dict that transformers loads."""
        d = asdict(self)
        if self.model_type == "qwen2":
            del d["attention_bias"]  # always on for Qwen2
        return {"architectures": [ARCHITECTURES[self.model_type]], **d, "hidden_act": "silu"}


# ----------------------------------------------------------------------------------------------------------------
# Model


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x):
        y = F.rms_norm(x, x.shape[-1:], self.weight.to(x.dtype), self.eps)  # same dtypes: the fused kernel
        return y.to(x.dtype)  # CUDA autocast (torch >= 2.12) returns float32 norms: keep the stream's dtype


def rope_inv_freq(cfg: ModelConfig, device) -> torch.Tensor:
    """Rotary frequencies [D/2] (float32), with Llama 3 long-context scaling when configured."""
    D = cfg.head_dim
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, D, 2, dtype=torch.int64, device=device).float() / D)
    if cfg.rope_scaling:  # llama3: divide low frequencies by `factor`, interpolate the middle band
        s = cfg.rope_scaling
        factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        n0 = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > n0 / lo, inv_freq / factor, inv_freq)
        smooth = (n0 / wavelen - lo) / (hi - lo)
        middle = (wavelen >= n0 / hi) & (wavelen <= n0 / lo)
        inv_freq = torch.where(middle, (1 - smooth) * scaled / factor + smooth * scaled, scaled)
    return inv_freq


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class KVCache:
    """Static K/V buffers, one [B,K,S,D] pair per layer (separate tensors, not views of one: torch.compile then
    updates them in place instead of copying a whole cache every step). Prompts are left-padded so every row
    writes the same column; row b's tokens start at column pad[b], and its position is column - pad[b]."""

    def __init__(self, cfg: ModelConfig, pad: torch.Tensor, S: int, dtype):
        shape = (len(pad), cfg.num_key_value_heads, S, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=pad.device) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros_like(k) for k in self.k]
        self.pad, self.S = pad, S  # [B] long, cache length

    def mask(self, cols):  # cols [T] -> [B,1,T,N], True where a query may attend (N = T for a prefill, else S)
        keys = torch.arange(len(cols) if len(cols) > 1 else self.S, device=cols.device)
        m = (keys >= self.pad[:, None, None]) & (keys <= cols[:, None])  # [B,T,N]
        return (m | (keys == cols[:, None]))[:, None]  # attending to itself keeps left-pad queries finite

    def select(self, rows):  # keep (or repeat) batch rows
        n = len(rows)
        for kv in (self.k, self.v):
            for i, x in enumerate(kv):
                if n <= x.size(0):  # compaction: reuse the buffers instead of holding a second full cache
                    x[:n] = x[rows]
                    kv[i] = x[:n]
                else:
                    kv[i] = x[rows]
        self.pad = self.pad[rows]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer, self.H, self.K, self.D = layer, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        C, HD, KD = cfg.hidden_size, self.H * self.D, self.K * self.D
        self.qkv_proj = nn.Linear(C, HD + 2 * KD, bias=cfg.attention_bias)  # the Hub's q/k/v_proj stacked: one matmul
        self.o_proj = nn.Linear(HD, C, bias=cfg.attention_bias and cfg.model_type != "qwen2")
        if cfg.qk_norm:
            self.q_norm, self.k_norm = RMSNorm(self.D, cfg.rms_norm_eps), RMSNorm(self.D, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, cache=None, cols=None, mask=None):
        B, T, _ = x.shape
        q, k, v = self.qkv_proj(x).split([self.H * self.D, self.K * self.D, self.K * self.D], -1)
        q = q.view(B, T, self.H, self.D)  # [B,T,H,D]
        k, v = k.view(B, T, self.K, self.D), v.view(B, T, self.K, self.D)  # [B,T,K,D]
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B,H,T,D], [B,K,T,D]
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        if cache is not None:  # write the new columns; a prefill attends within its own, a decode step over all
            k = cache.k[self.layer].index_copy_(2, cols, k)  # [B,K,S,D]
            v = cache.v[self.layer].index_copy_(2, cols, v)
            if T > 1:
                k, v = k[:, :, :T], v[:, :, :T]  # [B,K,T,D]
        if T == 1 and mask is not None:  # decode: grouped matmuls read each K/V head once (no repeat for GQA)
            qg = q.view(B, self.K, self.H // self.K, self.D)  # [B,K,G,D]
            att = (qg @ k.transpose(2, 3)) * self.D**-0.5  # [B,K,G,S]
            att = att.masked_fill(~mask, float("-inf")).softmax(-1, dtype=torch.float32).to(q.dtype)
            y = (att @ v).view(B, self.H, 1, self.D)  # [B,H,1,D]
        else:  # with a mask, repeat K/V heads: the GQA-aware flash kernel takes no mask, the mem-efficient one no GQA
            if mask is not None:
                k, v = k.repeat_interleave(self.H // self.K, 1), v.repeat_interleave(self.H // self.K, 1)  # [B,H,T,D]
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.H * self.D))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)  # gate_proj, up_proj
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, -1)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, cache=None, cols=None, mask=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, cols, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    """Parameter names are the Hub's *ForCausalLM's, but for the stacked projections (hub_parts)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(cfg.vocab_size, cfg.hidden_size),
            layers=nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers)),
            norm=RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)))
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.gradient_checkpointing = False  # when training, recompute each layer in the backward pass

    @property
    def output_weight(self) -> torch.Tensor:  # [V,C]
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def forward(self, idx, return_hidden=False, cache: KVCache | None = None, cols=None):
        """idx [B,T] -> logits [B,T,V] in the model's dtype (callers upcast; a float32 copy of a 150k vocabulary
        would be huge), or the final-normed hidden states [B,T,C] if return_hidden. Without a cache: causal attention
        from position 0 (right padding is harmless). With a cache: idx fills columns cols [T] of it (a prefill: all
        of 0..T-1; a decode step: one column) and only the last position is returned ([B,1,V])."""
        B, T = idx.shape
        if cache is None:
            pos, mask = torch.arange(T, device=idx.device)[None], None  # [1,T]
        else:
            pos, mask = cols[None] - cache.pad[:, None], cache.mask(cols)  # [B,T], [B,1,T,N]
        x = self.model.embed_tokens(idx)  # [B,T,C]
        if torch.is_autocast_enabled(x.device.type):  # mixed precision: the residual stream too is in the autocast
            x = x.to(torch.get_autocast_dtype(x.device.type))  # dtype, as in a low-precision copy of these weights
        freqs = pos[..., None].float() * rope_inv_freq(self.config, idx.device)  # [B,T,D/2]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # [B,1,T,D], broadcast over heads
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        for layer in self.model.layers:
            if self.gradient_checkpointing and self.training and cache is None:  # a cached forward never trains
                x = checkpoint(layer, x, cos, sin, use_reentrant=False)
            else:
                x = layer(x, cos, sin, cache, cols, mask)
        if cache is not None:
            x = x[:, -1:]
        x = self.model.norm(x)
        return x if return_hidden else F.linear(x, self.output_weight)


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints (Hub layout)


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint: model.safetensors, or the shards its index lists."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        named = lambda f: isinstance(f, str) and Path(f).name == f and f not in ("", ".", "..")  # a file in path
        if not isinstance(weight_map, dict) or not all(named(f) for f in weight_map.values()):
            raise ValueError(f"{index} has no weight_map of tensor names to file names in {path}")
        files = sorted(set(weight_map.values()))
    elif (path / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {path}")
    for f in files:
        if not (path / f).is_file():
            raise FileNotFoundError(f"checkpoint shard {f} listed in {index} is missing")
    return [path / f for f in files]


def hub_parts(key: str, cfg: ModelConfig) -> list[tuple[str, int]]:
    """The Hub tensors that our tensor `key` stacks along its rows, with their row counts (q/k/v_proj in qkv_proj,
    gate/up_proj in gate_up_proj: one matmul instead of three and two); [(key, 0)] for any other tensor."""
    HD, KD, I = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim, cfg.intermediate_size
    for parent, ours, parts in (("self_attn", "qkv_proj", (("q_proj", HD), ("k_proj", KD), ("v_proj", KD))),
                                ("mlp", "gate_up_proj", (("gate_proj", I), ("up_proj", I)))):
        if f".{parent}.{ours}." in key:
            head, tail = key.split(f".{parent}.{ours}.")
            return [(f"{head}.{parent}.{name}.{tail}", rows) for name, rows in parts]
    return [(key, 0)]


def hub_shapes(cfg: ModelConfig) -> dict[str, tuple]:
    """Name and shape of every tensor a Hub checkpoint of this config holds (but the unused ones)."""
    with torch.device("meta"):
        ours = Transformer(cfg).state_dict()
    return {name: (rows or v.shape[0], *v.shape[1:]) for k, v in ours.items() for name, rows in hub_parts(k, cfg)}


def hub_state_dict(model: "Transformer") -> dict[str, torch.Tensor]:
    """The model's tensors under the Hub's names (the stacked projections split back): what save() writes."""
    out = {}
    for k, v in model.state_dict().items():
        parts = hub_parts(k, model.config)
        for (name, _), part in zip(parts, v.split([rows or len(v) for _, rows in parts])):
            out[name] = part
    return out


def unused(key: str, cfg: ModelConfig) -> bool:
    """Tensors some checkpoints carry that we do not load: rotary tables (recomputed), a tied lm_head."""
    return key.endswith("rotary_emb.inv_freq") or (key == "lm_head.weight" and cfg.tie_word_embeddings)


class NonFinite(ValueError):
    """A checkpoint's weights hold NaN or infinity (found by load, which reads them; check_checkpoint does not)."""


CHECKPOINT_ERRORS = (OSError, ValueError, TypeError, NotImplementedError, SafetensorError)  # what check_checkpoint and load raise for a bad one


def check_checkpoint(path_or_name) -> tuple[Path, ModelConfig]:
    """Check a checkpoint without reading its weights: config.json, tokenizer.json, and the name, dtype and shape of
    every tensor in the safetensors headers. Raises an error naming the first problem; returns (directory, config)."""
    path = tiny_dir() if str(path_or_name) == "tiny" else Path(path_or_name)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    cfg = ModelConfig.from_hf(path)
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(f"no tokenizer.json in {path}")
    try:
        tok = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
    except Exception as e:  # the tokenizers library raises a bare Exception
        raise ValueError(f"{path / 'tokenizer.json'} is not a tokenizer: {e}") from None
    for name in ("tokenizer_config.json", "generation_config.json"):  # optional, but valid where present
        read_json(path / name)
    if (n := max(tok.get_vocab().values(), default=-1) + 1) > cfg.vocab_size:
        raise ValueError(f"{path / 'tokenizer.json'} has token ids up to {n - 1}, but config.json's vocab_size is "
                         f"{cfg.vocab_size}: the model has no embedding for the ids beyond")
    if missing := [t for t in (IM_START, IM_END) if tok.token_to_id(t) is None]:
        raise ValueError(f"{path / 'tokenizer.json'} has no {' or '.join(missing)} token: Tokenizer.chat writes Qwen's "
                         "chat format (ChatML, as Qwen2/2.5/3 and SmolLM2 use), which this model was not trained on")
    expected = hub_shapes(cfg)
    found = set()
    for f in weight_files(path):
        try:
            sf = safe_open(f, "pt")  # reads the header only (and checks the file is as long as it says)
        except SafetensorError as e:
            raise ValueError(f"{f} is not a safetensors file: {e}") from None
        with sf:
            for k in sf.keys():
                x = sf.get_slice(k)
                if unused(k, cfg):
                    continue
                if k not in expected:
                    raise ValueError(f"{f.name} holds {k}, which a {cfg.model_type} model with this config.json lacks")
                if x.get_dtype() not in ("F16", "BF16", "F32", "F64"):  # FP8 needs its scales: not supported
                    raise TypeError(f"tensor {k} in {path} has unsupported dtype {x.get_dtype()}; "
                                    "expected F16, BF16, F32 or F64")
                if tuple(x.get_shape()) != expected[k]:
                    raise ValueError(f"shape mismatch for {k}: checkpoint has {tuple(x.get_shape())}, "
                                     f"config.json implies {expected[k]}")
                found.add(k)
    if missing := [k for k in expected if k not in found]:
        raise ValueError(f"{path} lacks {len(missing)} tensor(s) that config.json implies, e.g. {missing[0]}")
    return path, cfg


def load(path_or_name, device="cpu", dtype=torch.float32):
    """Load a Hub-layout checkpoint directory (or 'tiny', the offline preset) -> (Transformer, Tokenizer)."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    path, cfg = check_checkpoint(path_or_name)
    with torch.device("meta"):
        model = Transformer(cfg)
    sd = {}
    for f in weight_files(path):
        weights = load_file(f, device=str(device))
        for k in list(weights):
            v = weights.pop(k)  # convert one tensor at a time: a shard is never held twice
            if not unused(k, cfg):
                if not torch.isfinite(v).all():  # e.g. a diverged fine-tune: say so, not "the loss diverged" later
                    raise NonFinite(f"{f}: tensor {k} holds NaN or infinite values")
                sd[k] = v.to(dtype)
    def stacked(k):  # our tensor k from the Hub's
        parts = hub_parts(k, cfg)
        return sd.pop(k) if len(parts) == 1 else torch.cat([sd.pop(name) for name, _ in parts])

    model.load_state_dict({k: stacked(k) for k in model.state_dict()}, strict=True, assign=True)
    return model.eval(), Tokenizer(path)


@contextlib.contextmanager
def as_os_error(file):
    """Raise an I/O error that safetensors or tokenizers (Rust) report as text ("... (os error 28)": a full disk) as
    the OSError it is."""
    try:
        yield
    except Exception as e:  # SafetensorError; tokenizers raises a bare Exception
        if not (code := re.search(r"os error (\d+)", str(e))):
            raise
        raise OSError(int(code[1]), os.strerror(int(code[1])), str(file)) from None


def save(model: Transformer, tokenizer: "Tokenizer", path):
    """Write the tokenizer files, model.safetensors (tied: no lm_head.weight), generation_config.json and, last,
    config.json: a save cut short leaves a folder without one, which no loader takes for a checkpoint."""
    model = getattr(model, "_orig_mod", model)  # a torch.compile wrapper prefixes every name with _orig_mod.
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").unlink(missing_ok=True)  # over a checkpoint: not one until this save is whole
    tokenizer.save(path)
    sd = {k: v.detach().to("cpu", copy=True) for k, v in hub_state_dict(model).items()}  # no shared storage
    with as_os_error(path / "model.safetensors"):
        save_file(sd, path / "model.safetensors", metadata={"format": "pt"})
    os.chmod(path / "model.safetensors", (path / "tokenizer.json").stat().st_mode)  # safetensors writes it private
    if (index := path / "model.safetensors.index.json").is_file():  # a sharded checkpoint there: read before ours
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (ValueError, KeyError, TypeError, AttributeError):  # not an index as transformers writes one
            shards = set()
        index.unlink()
        for f in shards:  # its shards: only plain .safetensors names in this folder
            if isinstance(f, str) and f == Path(f).name and f.endswith(".safetensors") and (path / f).is_file() \
                    and f != "model.safetensors":
                (path / f).unlink()
    gen = {**tokenizer.generation, "eos_token_id": tokenizer.stop_ids, "pad_token_id": tokenizer.pad_id}
    (path / "generation_config.json").write_text(json.dumps(gen, indent=2))
    dtype = str(model.output_weight.dtype).removeprefix("torch.")
    cfg = {**model.config.to_hf(), "torch_dtype": dtype, "dtype": dtype, "eos_token_id": tokenizer.stop_ids[0]}
    (path / "config.json").write_text(json.dumps(cfg, indent=2))


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer and chat format


class Tokenizer:
    """tokenizer.json through the `tokenizers` library, plus the Qwen3 chat format written in code."""

    def __init__(self, path):
        path = Path(path)
        if not (path / "tokenizer.json").is_file():
            raise FileNotFoundError(f"no tokenizer.json in {path}")
        self.tok = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
        self.config = read_json(path / "tokenizer_config.json")  # kept as is for save()
        file = path / "chat_template.jinja"  # where newer transformers keep the template: kept for save() too
        self.template = file.read_text(encoding="utf-8") if file.is_file() else None
        self.generation = read_json(path / "generation_config.json")  # sampling defaults: save() keeps them too

        def named(key):  # tokenizer_config.json stores a token as a string or as {"content": ...}
            t = self.config.get(key)
            return t["content"] if isinstance(t, dict) else t

        ids = [self.tok.token_to_id(t) for t in (IM_END, ENDOFTEXT, named("eos_token")) if t]
        eos = self.generation.get("eos_token_id")  # an id or a list of them
        ids += [i for i in (eos if isinstance(eos, list) else [eos]) if type(i) is int]
        self.stop_ids = list(dict.fromkeys(i for i in ids if i is not None))  # generation stops on any of these
        pads = [self.tok.token_to_id(t) for t in (named("pad_token"), ENDOFTEXT) if t]
        self.pad_id = next((i for i in pads if i is not None), self.stop_ids[0] if self.stop_ids else 0)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids  # special tokens in the text map to their ids

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)

    def save(self, path):
        path = Path(path)
        with as_os_error(path / "tokenizer.json"):
            self.tok.save(str(path / "tokenizer.json"))
        (path / "tokenizer_config.json").write_text(json.dumps(self.config, indent=2))
        if self.template is not None:
            (path / "chat_template.jinja").write_text(self.template, encoding="utf-8")
        else:  # another tokenizer's template there would be read instead of tokenizer_config.json's
            (path / "chat_template.jinja").unlink(missing_ok=True)

    def chat(self, messages: list[dict], thinking: bool | None = False, add_generation_prompt=True) -> str:
        """Render like Qwen3's chat template. thinking True/False: hybrid Qwen3 with enable_thinking True/False
        (False appends an empty think block to the generation prompt); None: Instruct-2507, which never thinks.
        Hybrid mode drops the reasoning of assistant turns before the last user message (with text content, not a
        tool response), as the template does; an assistant turn's reasoning is its `reasoning_content` if given, else
        the think block in its content. A content that is not a string (None, a list of parts) renders empty."""
        if bad := [m.get("role") for m in messages if m.get("role") not in ("system", "user", "assistant")]:
            raise ValueError(f"chat renders system, user and assistant turns, not role {bad[0]!r} (no tool calls)")
        tool = lambda c: c.startswith("<tool_response>") and c.endswith("</tool_response>")
        last_user = max((i for i, m in enumerate(messages) if m["role"] == "user" and isinstance(m.get("content"), str)
                         and not tool(m["content"])), default=len(messages) - 1)  # the template's last query
        s = ""
        for i, m in enumerate(messages):
            content = m["content"] if isinstance(m.get("content"), str) else ""
            if m["role"] == "assistant" and thinking is not None:
                reasoning = m.get("reasoning_content")
                if not isinstance(reasoning, str):
                    reasoning = ""
                    if END_THINK in content:
                        reasoning = content.split(END_THINK)[0].rstrip("\n").split(THINK)[-1].lstrip("\n")
                        content = content.split(END_THINK)[-1].lstrip("\n")
                if i > last_user and (i == len(messages) - 1 or reasoning):
                    reasoning, content = reasoning.strip("\n"), content.lstrip("\n")
                    content = f"{THINK}\n{reasoning}\n{END_THINK}\n\n{content}"
            s += f"{IM_START}{m['role']}\n{content}{IM_END}\n"
        if add_generation_prompt:
            s += f"{IM_START}assistant\n" + (f"{THINK}\n\n{END_THINK}\n\n" if thinking is False else "")
        return s

    def user_ids(self, content: str, thinking: bool | None) -> list[int]:
        """Token ids of a one-user-message chat, ready for the assistant's reply (every prompt the method builds)."""
        return self.encode(self.chat([{"role": "user", "content": content}], thinking=thinking))


def strip_thinking(text: str) -> str:
    """The answer after a <think>...</think> block (or after a dangling </think>); '' if thinking never ended."""
    if END_THINK in text:
        return text.split(END_THINK)[-1].strip()
    return "" if THINK in text else text.strip()


# ----------------------------------------------------------------------------------------------------------------
# Generation


@dataclass
class Completion:
    tokens: list[int]  # new tokens, the stop token included if one was hit
    text: str  # decoded tokens without the stop token
    logprobs: list[float]  # log-prob of each token under softmax(logits / temperature) (softmax(logits) if greedy)
    stopped: bool  # a stop token ended it (else max_new_tokens did)


def sample(logits, temperature, top_p, top_k, generator):
    """logits [B,V] float32 -> (tokens [B], their log-probs under softmax(logits / temperature) [B]); no host sync."""
    if temperature == 0:
        tok = logits.argmax(-1)
        return tok, logits.log_softmax(-1).gather(-1, tok[:, None])[:, 0]
    logits = logits / temperature
    vals, idx = logits, None  # candidate logits [B,N] and their token ids (None: all V tokens)
    if top_k > 0:
        vals, idx = logits.topk(min(top_k, logits.size(-1)), dim=-1)  # sorted, descending
    elif top_p < 1:
        vals, idx = logits.sort(dim=-1, descending=True)
    if top_p < 1:  # keep the smallest head of the sorted list whose probability reaches top_p
        probs = vals.softmax(-1)
        vals = vals.masked_fill(probs.cumsum(-1) - probs >= top_p, float("-inf"))
    probs = vals.softmax(-1)
    noise = torch.empty_like(probs).exponential_(generator=generator).clamp_min_(1e-20)  # argmax(p / Exp(1)) ~ p
    choice = (probs / noise).argmax(-1)
    tok = choice if idx is None else idx.gather(-1, choice[:, None])[:, 0]
    return tok, logits.log_softmax(-1).gather(-1, tok[:, None])[:, 0]


def decode_logits(model: Transformer, cache: KVCache, tok, col):
    """One decode step: tokens [B] written at cache column col [1] -> next-token logits [B,V] float32."""
    return model(tok[:, None], cache=cache, cols=col)[:, -1].float()


# Compiled lazily, once for any batch size and cache length (dynamic shapes; batch 1 specialises once). Fusing
# each layer's ~25 small elementwise kernels (norms, rotary, masking, residuals) into a few matters at small
# batches, where the weights are read fast and launches dominate.
decode_logits_compiled = torch.compile(decode_logits, fullgraph=True, dynamic=True)
# At batch 1 a step is matrix-vector products: inductor's coordinate descent tuning turns them into tuned Triton
# reductions, 518 against 478 decode tok/s on an H200 (bench/RESULTS.md, 2026-11-27). Larger batches: not timed.
decode_logits_compiled_b1 = torch.compile(decode_logits, fullgraph=True, dynamic=True,
                                          options={"coordinate_descent_tuning": True})


class DecodeStep:
    """decode_logits for one cache. On CUDA it is compiled (when Triton is there), then recorded as a CUDA graph on
    first use and replayed (one launch per step); on CPU it runs eagerly."""

    def __init__(self, model: Transformer, cache: KVCache):
        self.model, self.cache, self.graph = model, cache, None

    def __call__(self, tok, col):
        if not tok.is_cuda:
            return decode_logits(self.model, self.cache, tok, col)
        if self.graph is None:  # warm-up (compilation) and recording run on static inputs that write the spare column
            fn = decode_logits
            if has_triton():
                fn = decode_logits_compiled_b1 if tok.shape[0] == 1 else decode_logits_compiled
            self.tok, self.col = tok.clone(), torch.full_like(col, self.cache.S - 1)  # generate()'s spare one
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                fn(self.model, self.cache, self.tok, self.col)
            torch.cuda.current_stream().wait_stream(stream)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.logits = fn(self.model, self.cache, self.tok, self.col)
        self.tok.copy_(tok)
        self.col.copy_(col)
        self.graph.replay()
        return self.logits


@torch.no_grad()
def generate(model: Transformer, tokenizer: Tokenizer, prompts: list[list[int]], max_new_tokens=1024,
             temperature=0.7, top_p=1.0, top_k=0, seed=0) -> list[Completion]:
    """Sample a completion for each prompt (temperature 0: greedy) until a stop token or max_new_tokens.
    Mixed prompt lengths give the same greedy results as one-by-one (left padding, per-row positions, masked
    pads); sampled ones depend on the batch too, as the noise is drawn for the whole batch at each step."""
    prompts = [p.tolist() if isinstance(p, torch.Tensor) else [int(t) for t in p] for p in prompts]  # lists of ids
    if not prompts:
        return []
    V = model.config.vocab_size
    if bad := [t for p in prompts for t in p if not 0 <= t < V][:1]:
        raise ValueError(f"prompt token id {bad[0]} is outside the model's vocabulary (0..{V - 1})")
    if max_new_tokens < 1 or not all(prompts):
        raise ValueError(f"generate needs max_new_tokens >= 1 (got {max_new_tokens}) and non-empty prompts")
    if not (temperature == 0 or MIN_TEMPERATURE <= temperature < math.inf) or not 0 < top_p <= 1 or top_k < 0:
        raise ValueError(f"generate needs temperature 0 (greedy) or in [{MIN_TEMPERATURE}, inf), 0 < top_p <= 1 and "
                         f"top_k >= 0; got {temperature}, {top_p}, {top_k}")
    device, dtype = model.output_weight.device, model.output_weight.dtype
    if torch.is_autocast_enabled(device.type):  # the cached K/V come out in the autocast dtype
        dtype = torch.get_autocast_dtype(device.type)
    uniq = list(dict.fromkeys(tuple(p) for p in prompts))  # prefill each distinct prompt once
    where = {p: i for i, p in enumerate(uniq)}
    P = max(len(p) for p in uniq)
    if P + max_new_tokens > model.config.max_position_embeddings:
        warnings.warn(f"prompt ({P}) + max_new_tokens ({max_new_tokens}) exceed the model's context of "
                      f"{model.config.max_position_embeddings} tokens: positions beyond it were never trained")
    idx = torch.full((len(uniq), P), tokenizer.pad_id, dtype=torch.long)  # [U,P], left-padded
    for i, p in enumerate(uniq):
        idx[i, P - len(p):] = torch.tensor(p)
    pad = torch.tensor([P - len(p) for p in uniq], device=device)
    cache = KVCache(model.config, pad, P + max_new_tokens, dtype)  # one spare column at the end
    logits = model(idx.to(device), cache=cache, cols=torch.arange(P, device=device))[:, -1].float()  # [U,V]
    if len(uniq) < len(prompts):  # copy each prompt's K/V to the rows that sample from it
        rows = torch.tensor([where[tuple(p)] for p in prompts], device=device)
        cache.select(rows)
        logits = logits[rows]  # [B,V]

    B = len(prompts)
    generator = torch.Generator(device).manual_seed(seed)
    stop = torch.tensor(tokenizer.stop_ids, dtype=torch.long, device=device)
    out = torch.full((B, max_new_tokens), tokenizer.pad_id, device=device)
    logps = torch.zeros(B, max_new_tokens, device=device)
    rows = torch.arange(B, device=device)  # original index of each row still in the batch
    done = torch.zeros(B, dtype=torch.bool, device=device)
    col = torch.tensor([P], device=device)  # cache column of the next token
    step = DecodeStep(model, cache)
    for t in range(max_new_tokens):
        tok, lp = sample(logits, temperature, top_p, top_k, generator)  # [b], [b]
        out[rows, t], logps[rows, t] = tok, lp
        done |= torch.isin(tok, stop)
        if t == max_new_tokens - 1:
            break
        if (t + 1) % SYNC_EVERY == 0:
            live = (~done).nonzero()[:, 0]  # the only host sync
            if len(live) == 0:
                break
            if len(live) <= len(rows) // 2:  # drop finished rows once they are half the batch
                rows, done, tok = rows[live], done[live], tok[live]
                cache.select(live)
                step = DecodeStep(model, cache)
        logits = step(tok, col)
        col += 1

    stops, completions = set(tokenizer.stop_ids), []
    for toks, lps in zip(out.tolist(), logps.tolist()):
        n = next((i + 1 for i, x in enumerate(toks) if x in stops), max_new_tokens)  # cut after the first stop
        stopped = toks[n - 1] in stops
        text = tokenizer.decode(toks[:n - 1] if stopped else toks[:n])
        completions.append(Completion(toks[:n], text, lps[:n], stopped))
    return completions


# ----------------------------------------------------------------------------------------------------------------
# The 'tiny' preset: a random Qwen3-shaped model with a locally trained byte-level BPE tokenizer


TINY = ModelConfig(vocab_size=1024, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=8192)
TINY_VERSION = 1  # bump when make_tiny changes so cached copies are rebuilt


def _tiny_corpus(rng: random.Random) -> list[str]:
    words = ("up down left right move push box goal target hole ice frozen lake wall floor player agent grid cell "
             "row column step steps turn action actions reward win won lose lost game episode state observation "
             "experience knowledge lesson learned strategy avoid reach go north south east west take open door key "
             "room inventory look examine the a an you are is at on in to of and or not it this that your valid "
             "invalid answer think current position next best should must never always first then because").split()
    lines = []
    for _ in range(3000):
        kind = rng.random()
        if kind < 0.5:
            lines.append(" ".join(rng.choice(words) for _ in range(rng.randint(4, 14))).capitalize() + ".")
        elif kind < 0.7:
            lines.append("\n".join("".join(rng.choice("#_.@$*+OXPFHGS ") for _ in range(6)) for _ in range(4)))
        elif kind < 0.85:
            a = rng.choice(["up", "down", "left", "right", "Up", "Down", "Left", "Right"])
            lines.append(rng.choice([f"Action: {a}", f"<answer>{a}</answer>", f"[{a}]", f"({rng.randint(0, 9)}, "
                                     f"{rng.randint(0, 9)})", f"I will move {a}.", f"{{\"action\": \"{a}\"}}"]))
        else:
            lines.append(f"Experience {rng.randint(1, 99)}: " + " ".join(rng.choice(words) for _ in range(8)) + ".")
    return lines


def make_tiny(path, seed=0):
    """Write the tiny preset (random float32 weights that are exact in bf16, BPE tokenizer) to path, Hub layout."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=TINY.vocab_size - 2, special_tokens=[ENDOFTEXT, IM_START, IM_END], show_progress=False,
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_tiny_corpus(random.Random(seed)), trainer)
    tok.add_tokens([tokenizers.AddedToken(t, special=False, normalized=False) for t in (THINK, END_THINK)])
    tok.save(str(path / "tokenizer.json"))
    tok_cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None, "eos_token": IM_END,
               "pad_token": ENDOFTEXT, "model_max_length": TINY.max_position_embeddings}
    (path / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2))

    cfg = replace(TINY, vocab_size=-(-tok.get_vocab_size() // 64) * 64)  # padded to a multiple of 64, like Qwen
    model, gen = Transformer(cfg), torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:  # norms stay at 1
                p.normal_(0, 0.02, generator=gen)
                p.copy_(p.bfloat16().float())
    save(model, Tokenizer(path), path)


def tiny_dir() -> Path:
    """The tiny preset's directory in the cache ($OEL_CACHE, default ~/.cache/oel), built on first use."""
    cache = Path(os.environ.get("OEL_CACHE", Path.home() / ".cache" / "oel"))
    path = cache / f"tiny-v{TINY_VERSION}"
    if not (path / "config.json").is_file():
        cache.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=cache))
        tmp.chmod(0o755)
        try:
            make_tiny(tmp)
        except BaseException:  # Ctrl-C included: no half-built folder left in the cache
            shutil.rmtree(tmp)
            raise
        try:
            tmp.rename(path)  # atomic: concurrent builders race harmlessly
        except OSError:
            shutil.rmtree(tmp)
    return path
