import copy
import errno
import json
import os
import re
import shutil
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import model as M

transformers = pytest.importorskip("transformers")

SMALL = dict(vocab_size=1024,  # the tiny tokenizer's ids fit
             hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=256)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
HF_CONFIGS = {
    "qwen3-tied": lambda: transformers.Qwen3Config(**SMALL, tie_word_embeddings=True, rope_theta=1e6),
    "qwen3-untied": lambda: transformers.Qwen3Config(**SMALL, tie_word_embeddings=False),
    "llama-tied": lambda: transformers.LlamaConfig(**SMALL, tie_word_embeddings=True),
    "llama3-untied": lambda: transformers.LlamaConfig(**SMALL, tie_word_embeddings=False, rope_scaling=LLAMA3_ROPE),
    "llama-bias": lambda: transformers.LlamaConfig(**SMALL, tie_word_embeddings=False, attention_bias=True),  # o_proj too
    "qwen2-tied": lambda: transformers.Qwen2Config(**{k: v for k, v in SMALL.items() if k != "head_dim"},
                                                   tie_word_embeddings=True),
}


def hf_model(name, seed=0):
    torch.manual_seed(seed)
    m = transformers.AutoModelForCausalLM.from_config(HF_CONFIGS[name](), dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():  # random norms and biases too, so they are tested
            p.normal_(1.0 if "norm" in name else 0.0, 0.1)
    return m


def hf_logits(m, idx):
    with torch.no_grad():
        return m(idx).logits


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and do not stall in OpenMP barriers when the CPU is shared."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny():
    return M.load("tiny")


@pytest.fixture(scope="module")
def lm(tiny):
    """A random untied model over the tiny tokenizer whose greedy outputs are varied (unlike a tied 0.02-init one)."""
    torch.manual_seed(0)
    m = M.Transformer(replace(tiny[0].config, tie_word_embeddings=False)).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.1)
    return m, tiny[1]


# ---------------------------------------------------------------------------------------------------------------
# Parity with transformers


@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_load_matches_transformers(name, tmp_path, tiny):
    """Hub checkpoints saved by transformers load strictly and give the same float32 logits."""
    ref = hf_model(name)
    ref.save_pretrained(tmp_path)
    tiny[1].save(tmp_path)  # load() also wants a tokenizer
    ours, _ = M.load(tmp_path)
    idx = torch.randint(0, 1024, (2, 13))
    with torch.no_grad():
        diff = (ours(idx) - hf_logits(ref, idx)).abs().max().item()
    assert diff < 1e-5, diff


@pytest.mark.parametrize("name", ["qwen3-tied", "llama3-untied", "qwen2-tied", "llama-bias"])
def test_save_loads_in_transformers(name, tmp_path, tiny):
    """save() writes a Hub checkpoint that transformers loads to the same logits (tied: no lm_head.weight), the
    stacked projections and their biases split back to the Hub's tensors."""
    ref = hf_model(name)
    ref.save_pretrained(tmp_path / "hf")
    tiny[1].save(tmp_path / "hf")
    ours, tok = M.load(tmp_path / "hf")
    M.save(ours, tok, tmp_path / "ours")
    names = [load_file(tmp_path / d / "model.safetensors").keys() for d in ("ours", "hf")]
    assert names[0] == names[1] and ("lm_head.weight" in names[0]) == ("untied" in name or "bias" in name)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32).eval()
    idx = torch.randint(0, 1024, (2, 13))
    with torch.no_grad():
        assert (hf_logits(back, idx) - ours(idx)).abs().max().item() < 1e-5


def test_config_follows_its_model_type(tmp_path, tiny):
    """A ModelConfig built in code gets its architecture's q/k norm and biases from model_type alone (a Llama has no
    q/k norm, a Qwen2 always has q/k/v biases), so what save() writes loads in transformers to the same logits; a
    Qwen3 config.json without head_dim means transformers' default of 128, not hidden / heads."""
    for model_type in ("llama", "qwen2"):
        cfg = M.ModelConfig(model_type=model_type, **{k: v for k, v in SMALL.items() if k != "max_position_embeddings"})
        assert not cfg.qk_norm and cfg.attention_bias == (model_type == "qwen2")
        torch.manual_seed(0)
        ours = M.Transformer(cfg).eval()
        M.save(ours, tiny[1], tmp_path / model_type)
        back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / model_type, dtype=torch.float32).eval()
        idx = torch.randint(0, 1024, (1, 7))
        with torch.no_grad():
            assert (hf_logits(back, idx) - ours(idx)).abs().max().item() < 1e-5
    with pytest.raises(ValueError, match="unknown model_type 'gpt2'"):
        M.ModelConfig(model_type="gpt2")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3", **{k: v for k, v in SMALL.items() if k != "head_dim"}}))
    assert M.ModelConfig.from_hf(tmp_path).head_dim == transformers.AutoConfig.from_pretrained(tmp_path).head_dim == 128


def test_sharded_checkpoint(tmp_path, tiny):
    """A sharded checkpoint (model.safetensors.index.json) loads; a model saved into its folder replaces it (also one
    wrapped by torch.compile, whose tensor names carry a prefix)."""
    ref = hf_model("qwen3-untied")
    ref.save_pretrained(tmp_path, max_shard_size="40KB")
    tiny[1].save(tmp_path)
    assert (tmp_path / "model.safetensors.index.json").exists()
    ours, tok = M.load(tmp_path)
    idx = torch.randint(0, 1024, (1, 9))
    with torch.no_grad():
        assert (ours(idx) - hf_logits(ref, idx)).abs().max().item() < 1e-5
        ours.output_weight.add_(1.0)
    M.save(torch.compile(ours), tok, tmp_path)  # over the sharded one (its shards would be read), compiled or not
    assert sorted(f.name for f in tmp_path.glob("model*")) == ["model.safetensors"]
    with torch.no_grad():  # under the Hub's names, not the compile wrapper's _orig_mod. ones
        assert torch.equal(M.load(tmp_path)[0](idx), ours(idx))
    for f in ("a.safetensors", "keep.txt", "model-1.safetensors"):  # an index naming files it must not delete
        (tmp_path / f).write_text("x")
    outside = tmp_path.parent / f"{tmp_path.name}-outside.safetensors"
    outside.write_text("x")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-1.safetensors", "b": f"../{outside.name}", "c": str(tmp_path / "a.safetensors"), "d": "keep.txt"}}))
    M.save(ours, tok, tmp_path)
    assert sorted(f.name for f in tmp_path.glob("*.*")) == sorted([
        "a.safetensors", "keep.txt", "model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
        "tokenizer_config.json"]) and outside.exists()
    (tmp_path / "model.safetensors.index.json").write_text("[]")  # not an index as transformers writes one
    M.save(ours, tok, tmp_path)
    assert not (tmp_path / "model.safetensors.index.json").exists()
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.equal(M.load(tmp_path)[0](idx), ours(idx))
        assert (hf_logits(back, idx) - ours(idx)).abs().max().item() < 1e-5


def test_save_over_an_unusual_index_keeps_its_weights(tmp_path, tiny):
    """An index that names model.safetensors itself (some Hub repos map every tensor to it) or a non-string file is
    removed without removing the weights save just wrote, and the save is a checkpoint."""
    model, tok = tiny
    for files in (["model.safetensors"], [1, None]):
        (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": dict(zip("ab", files))}))
        M.save(model, tok, tmp_path)
        assert not (tmp_path / "model.safetensors.index.json").exists()
        assert torch.equal(M.load(tmp_path)[0].output_weight, model.output_weight)


def test_save_names_the_os_error_a_writer_reports_and_passes_on_others(tmp_path, tiny, monkeypatch):
    """safetensors' text for an OS error becomes that OSError (not always a full disk); any other error of it stays
    what it is, and leaves no config.json behind."""
    def failing(*args, **kwargs):
        raise M.SafetensorError(text)

    monkeypatch.setattr(M, "save_file", failing)
    text = "Error while serializing: I/O error: Permission denied (os error 13)"
    with pytest.raises(PermissionError) as e:
        M.save(*tiny, tmp_path)
    assert (e.value.errno, e.value.filename) == (errno.EACCES, str(tmp_path / "model.safetensors"))
    text = "some other failure"
    with pytest.raises(M.SafetensorError, match="^some other failure$"):
        M.save(*tiny, tmp_path)
    assert not (tmp_path / "config.json").exists()


def test_rope_theta_from_either_key(tmp_path):
    """rope_theta is read from the top-level key (older configs) or from rope_parameters (newer transformers), which
    wins when both are there; rope_scaling wins over rope_parameters: all as transformers reads them. Rope scaling
    other than Llama 3's is refused, also in code."""
    base = {"model_type": "qwen3", **SMALL}
    for extra in ({"rope_theta": 12345.0}, {"rope_parameters": {"rope_type": "default", "rope_theta": 12345.0}},
                  {"rope_theta": 1e4, "rope_parameters": {"rope_type": "default", "rope_theta": 12345.0}}):
        (tmp_path / "config.json").write_text(json.dumps({**base, **extra}))
        assert M.ModelConfig.from_hf(tmp_path).rope_theta == 12345.0
    assert transformers.AutoConfig.from_pretrained(tmp_path).rope_parameters["rope_theta"] == 12345.0
    for extra in ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4}, "rope_scaling": LLAMA3_ROPE,
                   "rope_theta": 5e5},  # both: rope_scaling, and its missing base from the top-level key
                  {"rope_parameters": {**LLAMA3_ROPE, "rope_theta": 1e4}, "rope_theta": 5e5}):
        (tmp_path / "config.json").write_text(json.dumps({**base, "model_type": "llama", **extra}))
        ours, hf = M.ModelConfig.from_hf(tmp_path), transformers.AutoConfig.from_pretrained(tmp_path).rope_parameters
        assert (ours.rope_theta, ours.rope_scaling["factor"]) == (hf["rope_theta"], hf["factor"])
    for scaling in ({"rope_type": "default"}, {"rope_type": "linear", "factor": 2.0}, {"rope_type": "llama3"}):
        with pytest.raises(ValueError, match="rope_scaling must be None or Llama 3's"):
            M.ModelConfig(rope_scaling=scaling)
    (tmp_path / "config.json").write_text(json.dumps({**base, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}))
    with pytest.raises(NotImplementedError, match="yarn"):
        M.ModelConfig.from_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**base, "rope_scaling": {"type": "linear", "factor": 2.0}}))
    with pytest.raises(NotImplementedError, match="linear"):  # older configs name the kind 'type'
        M.ModelConfig.from_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(base))  # neither key: transformers' default base
    hf = transformers.AutoConfig.from_pretrained(tmp_path)  # transformers 5 keeps it in rope_parameters, 4 on top
    theta = (getattr(hf, "rope_parameters", None) or {}).get("rope_theta", getattr(hf, "rope_theta", None))
    assert M.ModelConfig.from_hf(tmp_path).rope_theta == theta == 10000.0


def test_config_errors_name_the_problem(tmp_path):
    """Invalid JSON, missing keys and incomplete llama3 rope scaling are named at load; a config with a sliding window
    is refused exactly when transformers gives one of its layers sliding attention (e.g. a Qwen2 config whose
    window starts after the last layer, or whose window is null, is full attention and loads)."""
    file = tmp_path / "config.json"
    for text, match in (("{oops", "not valid JSON"), (json.dumps({"model_type": "qwen3"}), "lacks vocab_size"),
                        (json.dumps({"model_type": "llama", **SMALL, "rope_scaling": {"rope_type": "llama3",
                                                                                      "factor": 8.0}}), "llama3")):
        file.write_text(text)
        with pytest.raises(ValueError, match=match):
            M.ModelConfig.from_hf(tmp_path)
    full, one_slides = ["full_attention"] * 2, ["full_attention", "sliding_attention"]
    for model_type, extra in [("qwen2", {"use_sliding_window": True, "max_window_layers": 2}),
                              ("qwen2", {"use_sliding_window": True, "max_window_layers": 1}),
                              ("qwen2", {"use_sliding_window": True, "sliding_window": None, "max_window_layers": 0}),
                              ("qwen3", {"use_sliding_window": True, "sliding_window": 8}),  # from layer 28 on
                              ("qwen3", {"use_sliding_window": True, "max_window_layers": 0, "layer_types": full}),
                              ("qwen3", {"use_sliding_window": False, "max_window_layers": 0}),
                              ("qwen3", {"layer_types": one_slides}),
                              ("llama", {"use_sliding_window": True, "max_window_layers": 0})]:  # Llama never slides
        file.write_text(json.dumps({"model_type": model_type, **SMALL, **extra}))
        types = getattr(transformers.AutoConfig.from_pretrained(tmp_path), "layer_types", None) or full
        if "sliding_attention" in types:
            with pytest.raises(NotImplementedError, match="full attention"):
                M.ModelConfig.from_hf(tmp_path)
        else:
            assert M.ModelConfig.from_hf(tmp_path).num_hidden_layers == 2


# ---------------------------------------------------------------------------------------------------------------
# Bad checkpoints give clear errors


@pytest.fixture
def ckpt(tmp_path, tiny):
    M.save(*tiny, tmp_path)
    return tmp_path


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3"])
def test_config_defaults_are_transformers(tmp_path, model_type):
    """Keys a config.json leaves out take transformers' defaults for its model type (a Llama's context is 2048; a
    Qwen's K/V heads are 32 unless given, all heads when given as null)."""
    base = {"model_type": model_type, "vocab_size": 1024, "hidden_size": 512, "intermediate_size": 96,
            "num_hidden_layers": 2, "num_attention_heads": 32}
    for extra in ({}, {"num_key_value_heads": None}):
        (tmp_path / "config.json").write_text(json.dumps({**base, **extra}))
        ours, hf = M.ModelConfig.from_hf(tmp_path), transformers.AutoConfig.from_pretrained(tmp_path)
        for key in ("num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings"):
            assert getattr(ours, key) == getattr(hf, key), key
        assert ours.head_dim == (getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads)  # Qwen2: none
        assert ours.rope_theta == hf.rope_parameters["rope_theta"]


def test_config_keeps_eps_and_unties_by_default(tmp_path):
    """rms_norm_eps comes from config.json; without tie_word_embeddings the embeddings are untied (transformers'
    default for these models)."""
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", **SMALL, "rms_norm_eps": 1e-5}))
    cfg = M.ModelConfig.from_hf(tmp_path)
    assert cfg.rms_norm_eps == 1e-5 and cfg.tie_word_embeddings is False


def test_load_dtype_tied_head_and_custom_eos(ckpt):
    """load(dtype=...) gives that dtype; a tied checkpoint that also stores lm_head.weight loads; an eos_token named
    in tokenizer_config.json (e.g. Llama 3's <|eot_id|>) is a stop token."""
    model, _ = M.load(ckpt, dtype=torch.bfloat16)
    assert model.config.tie_word_embeddings and all(p.dtype == torch.bfloat16 for p in model.parameters())
    sd = load_file(ckpt / "model.safetensors")
    save_file({**sd, "lm_head.weight": sd["model.embed_tokens.weight"].clone()}, ckpt / "model.safetensors")
    M.load(ckpt)
    config = json.loads((ckpt / "tokenizer_config.json").read_text())
    (ckpt / "tokenizer_config.json").write_text(json.dumps({**config, "eos_token": {"content": "<think>"}}))
    _, tok = M.load(ckpt)
    assert tok.tok.token_to_id("<think>") in tok.stop_ids


def test_error_missing_dir(tmp_path):
    """A missing directory or config.json is named."""
    with pytest.raises(FileNotFoundError, match="does not exist"):
        M.load(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        M.load(tmp_path)


def test_error_tokenizer_larger_than_the_vocabulary(tmp_path, tiny):
    """A tokenizer with ids beyond the model's vocab_size is refused by name (they would fail as an index error), even
    one id beyond (the tiny tokenizer's largest id is 1023: a vocabulary of 1023 rows lacks it)."""
    transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**{**SMALL, "vocab_size": 1023})).save_pretrained(tmp_path)
    tiny[1].save(tmp_path)
    with pytest.raises(ValueError, match="has token ids up to 1023, but config.json's vocab_size is 1023"):
        M.load(tmp_path)


def test_error_tokenizer_without_chat_tokens(ckpt):
    """A tokenizer lacking <|im_start|>/<|im_end|> (e.g. Llama 3's) is refused: the chat format written here would be
    plain text to its model."""
    import tokenizers
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.train_from_iterator(["move up", "move down"], tokenizers.trainers.BpeTrainer(special_tokens=["<|endoftext|>"]))
    tok.save(str(ckpt / "tokenizer.json"))
    with pytest.raises(ValueError, match="has no <\\|im_start\\|> or <\\|im_end\\|> token: Tokenizer.chat writes Qwen's"):
        M.load(ckpt)


def test_error_missing_shard(tmp_path, tiny):
    """A shard listed in the index but absent is named."""
    hf_model("qwen3-untied").save_pretrained(tmp_path, max_shard_size="40KB")
    tiny[1].save(tmp_path)
    shard = sorted(tmp_path.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=f"shard {shard.name} .* missing"):
        M.load(tmp_path)


def test_error_malformed_index_or_weights(tmp_path, tiny):
    """An index that is not JSON, not an object, or maps tensors to anything but file names in the checkpoint folder
    (null, ../x) is named, as is a model.safetensors that is not one: errors train.py reports in one line."""
    M.save(*tiny, tmp_path)
    index = tmp_path / "model.safetensors.index.json"
    for text in ("{oops", "[]", json.dumps({"weight_map": {"a": None}}),
                 json.dumps({"weight_map": {"a": "../model.safetensors"}})):
        index.write_text(text)
        with pytest.raises(ValueError, match=re.escape(str(index))) as e:
            M.load(tmp_path)
        assert isinstance(e.value, M.CHECKPOINT_ERRORS)
    index.unlink()
    (tmp_path / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match=f"{re.escape(str(tmp_path / 'model.safetensors'))} is not a safetensors file"):
        M.load(tmp_path)


def test_error_dtype(ckpt):
    """A non-float dtype argument, or an integer or FP8 tensor in the file, is rejected."""
    with pytest.raises(TypeError, match="floating-point"):
        M.load(ckpt, dtype=torch.int64)
    sd = load_file(ckpt / "model.safetensors")
    sd["model.norm.weight"] = sd["model.norm.weight"].long()
    save_file(sd, ckpt / "model.safetensors")
    with pytest.raises(TypeError, match="model.norm.weight .* dtype I64"):
        M.load(ckpt)
    sd["model.norm.weight"] = sd["model.norm.weight"].to(torch.float8_e4m3fn)  # FP8 would need its scales
    save_file(sd, ckpt / "model.safetensors")
    with pytest.raises(TypeError, match="model.norm.weight .* dtype F8_E4M3; expected F16, BF16, F32 or F64"):
        M.check_checkpoint(ckpt)
    sd["model.norm.weight"] = sd["model.norm.weight"].double()  # F64 is a float type load reads
    save_file(sd, ckpt / "model.safetensors")
    M.load(ckpt)


def test_check_checkpoint_reads_headers_only(ckpt):
    """check_checkpoint names a truncated weights file, a missing tokenizer, a stray or missing tensor, a non-integer
    size and a malformed tokenizer_config.json or generation_config.json without loading any weight; a good
    checkpoint passes."""
    assert M.check_checkpoint(ckpt) == (ckpt, M.ModelConfig.from_hf(ckpt))
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[:-100])
    with pytest.raises(Exception, match="(?i)header|metadata|incomplete"):
        M.check_checkpoint(ckpt)
    (ckpt / "model.safetensors").write_bytes(data)
    sd = load_file(ckpt / "model.safetensors")
    save_file({**sd, "model.layers.0.mlp.extra.weight": torch.zeros(2)}, ckpt / "model.safetensors")
    with pytest.raises(ValueError, match="holds model.layers.0.mlp.extra.weight"):
        M.check_checkpoint(ckpt)
    save_file({k: v for k, v in sd.items() if k != "model.layers.1.mlp.up_proj.weight"}, ckpt / "model.safetensors")
    with pytest.raises(ValueError, match="lacks 1 tensor.*model.layers.1.mlp.up_proj.weight"):
        M.check_checkpoint(ckpt)
    (ckpt / "model.safetensors").write_bytes(data)
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, "hidden_size": "64"}))
    with pytest.raises(ValueError, match="hidden_size must be an integer$"):
        M.check_checkpoint(ckpt)
    (ckpt / "config.json").write_text(json.dumps({**cfg, "hidden_size": "64", "vocab_size": 1.5}))
    with pytest.raises(ValueError, match="vocab_size, hidden_size must be integers$"):
        M.check_checkpoint(ckpt)
    (ckpt / "config.json").write_text(json.dumps(cfg))
    for name, text, problem in (("tokenizer_config.json", "{bad", "is not valid JSON"),
                                ("generation_config.json", "[1]", "is not a JSON object"),
                                ("config.json", '{"note": "caf\xe9"}', "is not valid JSON")):  # Latin-1, not UTF-8
        good = (ckpt / name).read_text()
        (ckpt / name).write_bytes(text.encode("latin-1"))
        with pytest.raises(ValueError, match=f"{name} {problem}"):
            M.check_checkpoint(ckpt)
        (ckpt / name).write_text(good)
    (ckpt / "tokenizer.json").write_text("garbage")
    with pytest.raises(ValueError, match="tokenizer.json is not a tokenizer"):
        M.check_checkpoint(ckpt)
    (ckpt / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        M.check_checkpoint(ckpt)


def test_load_refuses_weights_holding_nan(tmp_path, tiny):
    """Weights holding NaN or infinity are refused when load reads them, naming the tensor (check_checkpoint, which
    reads the headers only, passes them)."""
    model, tok = tiny
    bad = copy.deepcopy(model)
    with torch.no_grad():
        bad.model.layers[1].mlp.down_proj.weight[3, 5] = float("nan")
    M.save(bad, tok, tmp_path)
    M.check_checkpoint(tmp_path)
    with pytest.raises(M.NonFinite, match=r"model.safetensors: tensor model.layers.1.mlp.down_proj.weight holds NaN"):
        M.load(tmp_path)


def test_error_model_type_and_shape(ckpt):
    """An unknown model_type, and weights that do not match config.json, are named."""
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    with pytest.raises(ValueError, match="unknown model_type 'gpt2'"):
        M.load(ckpt)
    (ckpt / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 100}))
    with pytest.raises(ValueError, match=r"shape mismatch for model.layers.0.mlp.\w+_proj.weight"):
        M.load(ckpt)
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        M.load(ckpt)


# ---------------------------------------------------------------------------------------------------------------
# Generation


def naive_greedy(model, prompt, n, stops=()):
    """Reference: re-run the whole sequence without a cache for every token."""
    seq, logps = list(prompt), []
    for _ in range(n):
        logits = model(torch.tensor([seq]))[0, -1].float()
        seq.append(logits.argmax().item())
        logps.append(logits.log_softmax(-1)[seq[-1]].item())
        if seq[-1] in stops:
            break
    return seq[len(prompt):], logps


PROMPTS = [[1, 50, 60, 70, 80, 90, 100, 2, 201], [1, 7, 8], [1, *range(300, 311), 11], [1, 400]]


@torch.no_grad()
def test_cached_batched_greedy_equals_naive(lm):
    """Batched cached greedy decoding with mixed prompt lengths equals uncached one-by-one decoding, log-probs too."""
    model, tok = lm
    tok = copy.copy(tok)
    tok.stop_ids = []
    outs = M.generate(model, tok, PROMPTS, max_new_tokens=24, temperature=0)
    for p, out in zip(PROMPTS, outs):
        ref, ref_lp = naive_greedy(model, p, 24)
        assert out.tokens == ref and not out.stopped
        assert torch.allclose(torch.tensor(out.logprobs), torch.tensor(ref_lp), atol=1e-4)
        assert out.text == tok.decode(ref)
    single = M.generate(model, tok, PROMPTS[2:3], max_new_tokens=24, temperature=0)
    assert single[0].tokens == outs[2].tokens


@torch.no_grad()
def test_left_padded_rows_count_positions_from_their_first_token(lm):
    """A left-padded row's cached keys (rotated by position) equal those of its prompt alone, in float64: positions
    count from the row's first token, not from the cache's first column. (Attention scores alone cannot tell: rotary
    embeddings depend only on relative positions, so a shifted row differs only in rounding.)"""
    model = copy.deepcopy(lm[0]).double()
    P = max(len(p) for p in PROMPTS)
    pad = torch.tensor([P - len(p) for p in PROMPTS])
    idx = torch.tensor([[0] * (P - len(p)) + p for p in PROMPTS])
    batch = M.KVCache(model.config, pad, P, torch.float64)
    model(idx, cache=batch, cols=torch.arange(P))
    for b, p in enumerate(PROMPTS):
        alone = M.KVCache(model.config, torch.tensor([0]), len(p), torch.float64)
        model(torch.tensor([p]), cache=alone, cols=torch.arange(len(p)))
        for k, k_alone in zip(batch.k, alone.k):
            assert (k[b, :, P - len(p):] - k_alone[0]).abs().max() < 1e-10


@torch.no_grad()
def test_stop_tokens_and_compaction(lm):
    """Rows end at their first stop token (kept in tokens, dropped from text); finished rows are dropped
    from the batch mid-way without changing the others, and each decode step runs only the batch it was built for
    (on CUDA it replays a graph recorded for that batch, so compaction must build a new one)."""
    model, tok = lm
    prompts = [[1, 10 + i, 20 + 3 * i] for i in range(8)] + [PROMPTS[0]] * 2  # duplicates share one prefill
    refs = [naive_greedy(model, p, 40)[0] for p in prompts]
    tok = copy.copy(tok)
    tok.stop_ids = sorted({r[3] for r in refs[:6]})  # most rows stop early, so the batch gets compacted at step 16
    kept, select = [], M.KVCache.select

    class Step(M.DecodeStep):
        def __init__(self, model, cache):
            super().__init__(model, cache)
            self.rows = len(cache.pad)

        def __call__(self, tok, col):
            assert len(tok) == len(self.cache.pad) == self.rows
            return super().__call__(tok, col)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(M.KVCache, "select", lambda self, rows: kept.append(len(rows)) or select(self, rows))
        mp.setattr(M, "DecodeStep", Step)
        outs = M.generate(model, tok, prompts, max_new_tokens=40, temperature=0)
    assert kept[0] == len(prompts) and len(kept) >= 2 and kept[-1] < len(prompts)  # duplicates copied, then compaction
    for ref, out in zip(refs, outs):
        n = next((i + 1 for i, x in enumerate(ref) if x in tok.stop_ids), len(ref))
        assert out.tokens == ref[:n] and len(out.logprobs) == n
        assert out.stopped == (ref[n - 1] in tok.stop_ids)
        assert out.text == tok.decode(ref[:n - 1] if out.stopped else ref)
    assert sum(o.stopped for o in outs) >= 6 and not all(o.stopped for o in outs)


@torch.no_grad()
def test_duplicates_anywhere_and_log_probs_after_compaction(lm):
    """A prompt repeated at places that are not adjacent gets its own greedy tokens in every row (each row reads its
    own prompt's prefill), and the log-probs of rows still running after finished rows are compacted away stay with
    their rows (they equal the uncached ones)."""
    model, tok = lm
    short = [[1, 10 + i, 20 + 3 * i] for i in range(8)]
    prompts = [PROMPTS[0], *short[:4], PROMPTS[2], *short[4:], PROMPTS[0], PROMPTS[2]]
    refs = [naive_greedy(model, p, 40) for p in prompts]
    tok = copy.copy(tok)
    tok.stop_ids = sorted({refs[i][0][3] for i in (1, 2, 3, 4, 6, 7, 8, 9)})  # the short rows end within 4 tokens
    outs = M.generate(model, tok, prompts, max_new_tokens=40, temperature=0)
    for (ref, ref_lp), out in zip(refs, outs):
        n = next((i + 1 for i, x in enumerate(ref) if x in tok.stop_ids), len(ref))
        assert out.tokens == ref[:n]
        assert torch.allclose(torch.tensor(out.logprobs), torch.tensor(ref_lp[:n]), atol=1e-4)
    lengths = [len(o.tokens) for o in outs]  # most rows done by step 16, others after it: the batch was compacted
    assert sum(n <= M.SYNC_EVERY for n in lengths) >= len(prompts) // 2 and max(lengths) > M.SYNC_EVERY + 1


def test_cache_mask_hides_pads_and_the_future_but_never_a_whole_row(lm):
    """A prefill query sees its row's real keys up to itself, a decode query every written column of its row; a
    left-pad query sees itself alone: a fully masked row gives NaN in some attention kernels, and the pads' values
    would carry it to the real tokens."""
    cache = M.KVCache(lm[0].config, torch.tensor([0, 2]), 8, torch.float32)
    keys, causal, self_ = torch.arange(4), torch.ones(4, 4, dtype=torch.bool).tril(), torch.eye(4, dtype=torch.bool)
    prefill = cache.mask(torch.arange(4))[:, 0]  # [B,T,T]
    assert torch.equal(prefill[0], causal) and torch.equal(prefill[1], causal & (keys >= 2) | self_)
    decode, cols = cache.mask(torch.tensor([5]))[:, 0, 0], torch.arange(8)  # [B,S]
    assert torch.equal(decode, torch.stack([cols <= 5, (cols >= 2) & (cols <= 5)]))


@torch.no_grad()
def test_sampling(lm):
    """Sampling is reproducible per seed, top_k=1 is greedy, log-probs are those of softmax(logits / temperature)."""
    model, tok = lm
    kw = dict(max_new_tokens=20, temperature=0.8, top_p=0.9, top_k=50)
    a, b = M.generate(model, tok, PROMPTS, seed=1, **kw), M.generate(model, tok, PROMPTS, seed=1, **kw)
    c = M.generate(model, tok, PROMPTS, seed=2, **kw)
    assert [x.tokens for x in a] == [x.tokens for x in b] != [x.tokens for x in c]
    for p, out in zip(PROMPTS, a):
        logits = model(torch.tensor([p + out.tokens]))[0, len(p) - 1:-1].float() / 0.8
        ref = logits.log_softmax(-1).gather(-1, torch.tensor(out.tokens)[:, None])[:, 0]
        assert torch.allclose(torch.tensor(out.logprobs), ref, atol=1e-4)
    greedy = M.generate(model, tok, PROMPTS, max_new_tokens=12, temperature=0)
    top1 = M.generate(model, tok, PROMPTS, max_new_tokens=12, temperature=1.0, top_k=1)
    assert [x.tokens for x in greedy] == [x.tokens for x in top1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@torch.no_grad()
def test_cuda_graph_decode_matches_cpu(lm):
    """The CUDA-graph decode path gives the CPU's greedy tokens, with and without mid-way compaction."""
    model, tok = lm
    tok = copy.copy(tok)
    prompts = [[1, 10 + i, 20 + 3 * i] for i in range(8)] + PROMPTS
    tok.stop_ids = sorted({r.tokens[3] for r in M.generate(model, tok, prompts[:6], 8, temperature=0)})
    cpu = M.generate(model, tok, prompts, max_new_tokens=40, temperature=0)
    gpu = M.generate(copy.deepcopy(model).cuda(), tok, prompts, max_new_tokens=40, temperature=0)
    assert [o.tokens for o in cpu] == [o.tokens for o in gpu]


@torch.no_grad()
def test_compiled_decode_step(lm, monkeypatch):
    """The torch.compile'd decode step (what CUDA records as a graph) generates the eager tokens and log-probs, with
    compaction and batch 1, and writes the KV cache in place: it allocates no [B,K,S,D] buffer (a copy of the cache)."""
    from torch._inductor.utils import run_and_get_code
    model, tok = lm
    tok = copy.copy(tok)
    prompts = [[1, 10 + i, 20 + 3 * i] for i in range(8)] + PROMPTS
    tok.stop_ids = sorted({r.tokens[3] for r in M.generate(model, tok, prompts[:6], 8, temperature=0)})
    eager = M.generate(model, tok, prompts, max_new_tokens=40, temperature=0)
    monkeypatch.setattr(M, "decode_logits", M.decode_logits_compiled)  # what DecodeStep runs on CPU
    for ps, ref in ((prompts, eager), (prompts[:1], eager[:1])):
        out = M.generate(model, tok, ps, max_new_tokens=40, temperature=0)
        assert [o.tokens for o in out] == [o.tokens for o in ref]
        assert torch.allclose(torch.tensor(sum((o.logprobs for o in out), [])),
                              torch.tensor(sum((o.logprobs for o in ref), [])), atol=1e-4)

    cache = M.KVCache(model.config, torch.tensor([0, 2, 5]), 64, torch.float32)
    model(torch.randint(3, 1000, (3, 9)), cache=cache, cols=torch.arange(9))
    _, (code,) = run_and_get_code(M.decode_logits_compiled, model, cache, torch.tensor([5, 6, 7]), torch.tensor([9]))
    shapes = [[d.strip() for d in s.split(",") if d.strip()] for s in re.findall(r"empty_strided_\w+\(\(([^)]*)\)", code)]
    assert shapes, "no allocations found: the generated code's format changed"
    D = str(model.config.head_dim)
    cache_like = [s for s in shapes if s[-1] == D and sum(not d.isdigit() for d in s) >= 2]  # dynamic B and S
    assert not cache_like, cache_like


@torch.no_grad()
def test_generate_rejects_bad_requests(lm):
    """No new tokens, an empty prompt or a token id outside the vocabulary is an error (a tensor of prompts is fine);
    running past the trained context is warned about."""
    model, tok = lm
    with pytest.raises(ValueError, match="max_new_tokens >= 1"):
        M.generate(model, tok, PROMPTS, max_new_tokens=0)
    with pytest.raises(ValueError, match="non-empty prompts"):
        M.generate(model, tok, [[1, 2], []], max_new_tokens=2)
    with pytest.raises(ValueError, match=r"prompt token id 1024 is outside the model's vocabulary \(0..1023\)"):
        M.generate(model, tok, [[1, 2], [3, 1024]], max_new_tokens=2)
    with pytest.raises(ValueError, match=r"prompt token id -1 is outside the model's vocabulary"):
        M.generate(model, tok, [[1, -1]], max_new_tokens=2)
    rows = torch.tensor(PROMPTS[:1] * 2)  # tensor rows are prompts too
    assert [c.tokens for c in M.generate(model, tok, rows, max_new_tokens=3, temperature=0)] == \
        [c.tokens for c in M.generate(model, tok, PROMPTS[:1] * 2, max_new_tokens=3, temperature=0)]
    short = copy.deepcopy(model)
    short.config = replace(model.config, max_position_embeddings=16)
    with pytest.warns(UserWarning, match="exceed the model's context of 16"):
        M.generate(short, tok, [list(range(1, 11))], max_new_tokens=8, temperature=0)


def test_top_p_keeps_smallest_head():
    """top_p keeps the smallest set of most likely tokens whose probability reaches top_p."""
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log().expand(2000, 4)
    gen = torch.Generator().manual_seed(0)
    tok, _ = M.sample(logits, 1.0, 0.75, 0, gen)
    assert set(tok.tolist()) == {0, 1}
    tok, _ = M.sample(logits, 1.0, 0.85, 0, gen)
    assert set(tok.tolist()) == {0, 1, 2}
    assert abs((tok == 0).float().mean().item() - 0.5 / 0.95) < 0.05


def filtered_probs(logits, temperature, top_p, top_k):
    """Reference in float64: softmax(logits / T), keep the top_k most likely, then the smallest head of those whose
    renormalised probability reaches top_p; renormalise."""
    p = torch.softmax(logits.double() / temperature, -1)
    keep = p.argsort(descending=True)[:top_k or len(p)]
    q = p[keep] / p[keep].sum()
    keep = keep[:int((q.cumsum(0) - q < top_p).sum())]
    out = torch.zeros_like(p)
    out[keep] = p[keep] / p[keep].sum()
    return out


def test_sampler_draws_from_the_filtered_distribution():
    """Over 20,000 draws from fixed, unsorted logits, the frequencies match the reference distribution for several
    temperatures and top-p / top-k settings (top_k above V included); top_k = 1 is greedy whatever top_p."""
    logits = torch.tensor([0.1, 2.0, -1.0, 1.2, 0.5, -0.3])
    gen = torch.Generator().manual_seed(0)
    for T, top_p, top_k in [(0.5, 1.0, 0), (2.0, 1.0, 0), (1.0, 0.75, 0), (1.0, 0.8, 3), (1.0, 0.95, 2), (0.7, 0.9, 4),
                            (1.0, 1.0, 10)]:  # top_k beyond the vocabulary keeps every token
        tok, _ = M.sample(logits.expand(20000, 6), T, top_p, top_k, gen)
        freq = torch.bincount(tok, minlength=6).double() / 20000
        assert (freq - filtered_probs(logits, T, top_p, top_k)).abs().max() < 0.015, (T, top_p, top_k)
    tok, _ = M.sample(logits.expand(100, 6), 1.0, 0.9, 1, gen)
    assert (tok == 1).all()


@torch.no_grad()
def test_generate_under_autocast_and_in_training_mode(lm, autocast_policy):
    """A float32 model under bfloat16 autocast generates what its bfloat16 copy does; a model in training mode
    with gradient checkpointing generates what it does in eval mode (a cached forward is never checkpointed)."""
    model, tok = lm
    ref = M.generate(model, tok, PROMPTS, max_new_tokens=12, temperature=0)
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        amp = M.generate(model, tok, PROMPTS, max_new_tokens=12, temperature=0)
    assert [o.tokens for o in amp] == [o.tokens for o in M.generate(bf16, tok, PROMPTS, max_new_tokens=12, temperature=0)]
    train = copy.deepcopy(model).train()
    train.gradient_checkpointing = True
    assert [o.tokens for o in M.generate(train, tok, PROMPTS, max_new_tokens=12, temperature=0)] == [o.tokens for o in ref]
    low = M.generate(model, tok, PROMPTS, max_new_tokens=12, temperature=M.MIN_TEMPERATURE)  # the lowest: greedy in effect
    assert [o.tokens for o in low] == [o.tokens for o in ref] and max(abs(x) for o in low for x in o.logprobs) < 1e-3
    for bad in (dict(temperature=-1.0), dict(temperature=1e-40), dict(temperature=float("nan")),
                dict(temperature=float("inf")), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-1)):
        with pytest.raises(ValueError, match=r"temperature 0 \(greedy\) or in \[1e-05, inf\)"):
            M.generate(model, tok, PROMPTS, max_new_tokens=2, **bad)


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_forward_equals_low_precision_copy(lm, dtype):
    """Under CPU autocast a float32 model computes exactly what its copy in the autocast dtype does, in that dtype,
    norms included (their float32 weights are cast too: the tiny preset's norm weights of 1 would not show it)."""
    model = copy.deepcopy(lm[0])
    for name, p in model.named_parameters():
        if "norm" in name:
            p.normal_(1.0, 0.1)
    idx = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    low = copy.deepcopy(model).to(dtype)
    with torch.autocast("cpu", dtype=dtype):
        logits, hidden = model(idx), model(idx, return_hidden=True)
    assert logits.dtype == hidden.dtype == dtype
    assert torch.equal(logits, low(idx)) and torch.equal(hidden, low(idx, return_hidden=True))


def test_max_new_tokens_and_bf16():
    """max_new_tokens bounds the output; the tiny preset generates in bfloat16 too."""
    model, tok = M.load("tiny", dtype=torch.bfloat16)
    outs = M.generate(model, tok, [tok.encode(tok.chat([{"role": "user", "content": "Go left."}]))] * 3,
                      max_new_tokens=7, temperature=1.0)
    assert all(len(o.tokens) <= 7 and (o.stopped or len(o.tokens) == 7) for o in outs)


def test_hidden_output_weight_and_checkpointing(lm):
    """return_hidden @ output_weight.T gives the logits; gradient checkpointing gives the same gradients."""
    model = copy.deepcopy(lm[0]).train()
    idx = torch.randint(0, 1000, (2, 10))
    assert torch.allclose(F.linear(model(idx, return_hidden=True), model.output_weight), model(idx), atol=1e-6)
    grads = []
    for ckpt in (False, True):
        model.zero_grad()
        model.gradient_checkpointing = ckpt
        model(idx).logsumexp(-1).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert all(torch.allclose(g0, g1, atol=1e-6) for g0, g1 in zip(*grads))


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer, chat format, tiny preset

CONVERSATION = [{"role": "system", "content": "You are a player."}, {"role": "user", "content": "State A"},
                {"role": "assistant", "content": "<think>\nplan\n</think>\n\nup"},
                {"role": "user", "content": "State B"}]
HISTORY = ("<|im_start|>system\nYou are a player.<|im_end|>\n<|im_start|>user\nState A<|im_end|>\n"
           "<|im_start|>assistant\nup<|im_end|>\n<|im_start|>user\nState B<|im_end|>\n")


def test_chat_format(tiny):
    """Same strings as Qwen3's chat template (hybrid, enable_thinking False/True) and Instruct-2507's."""
    tok = tiny[1]
    assert tok.chat(CONVERSATION, thinking=False) == HISTORY + "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    assert tok.chat(CONVERSATION, thinking=True) == HISTORY + "<|im_start|>assistant\n"
    instruct = [*CONVERSATION[:2], {"role": "assistant", "content": "up"}, CONVERSATION[3]]
    assert tok.chat(instruct, thinking=None) == HISTORY + "<|im_start|>assistant\n"
    assert tok.chat(CONVERSATION, thinking=True, add_generation_prompt=False) == HISTORY
    for thinking in (True, False, None):  # every prompt the method builds: one user message in the run's chat mode
        chat = tok.chat([{"role": "user", "content": "Q"}], thinking=thinking)
        assert tok.user_ids("Q", thinking) == tok.encode(chat)
    # a final assistant turn (after the last user message) keeps its reasoning, or gets an empty think block
    last = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "<think>\nr\n</think>\n\nA"}]
    assert tok.chat(last, thinking=True, add_generation_prompt=False) == (
        "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n<think>\nr\n</think>\n\nA<|im_end|>\n")
    last[1]["content"] = "A"
    assert tok.chat(last, thinking=False, add_generation_prompt=False) == (
        "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\nA<|im_end|>\n")
    # of two assistant turns after it, only the last gets a think block when the first has no reasoning
    two = [*last, {"role": "assistant", "content": "B"}]
    assert tok.chat(two, thinking=True, add_generation_prompt=False) == (
        "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\nA<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\nB<|im_end|>\n")
    # reasoning given as reasoning_content, not in the content; a content that is not a string renders empty
    given = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A", "reasoning_content": "R"},
             {"role": "user", "content": None}]
    assert tok.chat(given, thinking=True, add_generation_prompt=False) == (
        "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n<think>\nR\n</think>\n\nA<|im_end|>\n"
        "<|im_start|>user\n<|im_end|>\n")
    given = [{"role": "user", "content": [{"type": "text", "text": "Q"}]}, {"role": "user", "content": "Q"},
             {"role": "assistant", "content": None}]
    assert tok.chat(given, thinking=True, add_generation_prompt=False) == (
        "<|im_start|>user\n<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
        "<|im_end|>\n")
    given = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "<think>r</think>A"},
             {"role": "user", "content": "x</tool_response>"}]  # not wrapped in tool tags: a query
    assert tok.chat(given, thinking=True, add_generation_prompt=False).startswith(
        "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\nA<|im_end|>\n")
    given = [{"role": "user", "content": "Q"},  # a reasoning_content leaves the content as it is
             {"role": "assistant", "content": "<think>x</think>A", "reasoning_content": "R"}]
    assert tok.chat(given, thinking=True, add_generation_prompt=False).endswith(
        "<|im_start|>assistant\n<think>\nR\n</think>\n\n<think>x</think>A<|im_end|>\n")
    for last in (None, "<tool_response>x</tool_response>"):  # no query: the reasoning before it is kept
        given = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "<think>r</think>A"},
                 {"role": "user", "content": last}]
        assert tok.chat(given, thinking=True, add_generation_prompt=False).startswith(
            "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n<think>\nr\n</think>\n\nA<|im_end|>\n")
    given = [{"role": "user", "content": "<tool_response>x</tool_response>"},  # no query at all: the template's last
             {"role": "assistant", "content": "<think>r</think>A"}]  # query is then the last message, so no reasoning
    assert tok.chat(given, thinking=True, add_generation_prompt=False) == (
        "<|im_start|>user\n<tool_response>x</tool_response><|im_end|>\n<|im_start|>assistant\nA<|im_end|>\n")
    for role in ("tool", "developer", None):  # the template wraps tool turns and drops others: not rendered as turns
        with pytest.raises(ValueError, match=f"not role {role!r}"):
            tok.chat([{"role": "user", "content": "Q"}, {"role": role, "content": "x"}])


def test_tokenizer_pad_and_stop_ids_from_its_config_files(tmp_path):
    """tokenizer_config.json's pad_token (a string or {"content": ...}) is the pad id before <|endoftext|>; of
    generation_config.json's eos_token_id only integers are stop ids."""
    path = tmp_path / "tok"
    shutil.copytree(M.tiny_dir(), path)
    cfg = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**cfg, "pad_token": {"content": M.IM_END}}))
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, True, 7.0, "8"]}))
    tok = M.Tokenizer(path)
    assert tok.pad_id == tok.tok.token_to_id(M.IM_END) != tok.tok.token_to_id(M.ENDOFTEXT)
    assert tok.stop_ids == [tok.tok.token_to_id(M.IM_END), tok.tok.token_to_id(M.ENDOFTEXT), 7]


def test_strip_thinking():
    """The answer is what follows the think block; an unfinished think block has no answer."""
    assert M.strip_thinking("<think>\nhmm\n</think>\n\nleft") == "left"
    assert M.strip_thinking("hmm</think>right") == "right"
    assert M.strip_thinking("<think>a</think>b</think>c") == "c"  # the answer follows the last </think>
    assert M.strip_thinking("<think>still going") == ""
    assert M.strip_thinking(" up \n") == "up"


def test_tiny_preset(tmp_path, tiny):
    """The tiny preset is deterministic, transformers-loadable, exact in bf16, and its tokenizer round-trips text."""
    for d in ("a", "b"):
        M.make_tiny(tmp_path / d, seed=0)
    for f in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
    model, tok = tiny
    assert model.config.max_position_embeddings >= 8192 and model.config.vocab_size >= tok.tok.get_vocab_size()
    assert all(torch.equal(p, p.bfloat16().float()) for p in model.parameters())  # a bf16 copy is the same model
    for special in (M.ENDOFTEXT, M.IM_START, M.IM_END, M.THINK, M.END_THINK):
        assert len(tok.encode(special)) == 1
    assert tok.stop_ids == [tok.encode(M.IM_END)[0], tok.encode(M.ENDOFTEXT)[0]]
    text = tok.chat([{"role": "user", "content": "Grid:\n#_@$\nMove up, down, left or right? Experience: é✓"}])
    assert tok.decode(tok.encode(text)) == text
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "a")
    assert hf_tok.encode(text, add_special_tokens=False) == tok.encode(text)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "a", dtype=torch.float32)
    idx = torch.tensor([tok.encode(text)])
    with torch.no_grad():
        assert (hf(idx).logits - model(idx)).abs().max().item() < 1e-5


@torch.no_grad()
def test_a_stop_token_as_the_last_allowed_token_counts_as_stopped(lm):
    """A row whose stop token is its max_new_tokens-th token stopped (it did not run out of tokens): the token is kept
    in its tokens, left out of its text, and the row is marked stopped, like a row that stops earlier."""
    model, tok = lm
    prompt, ref = next((p, r) for p in PROMPTS if (r := naive_greedy(model, p, 4)[0])[3] not in r[:3])
    tok = copy.copy(tok)
    tok.stop_ids = [ref[3]]
    for n in (4, 5):
        (out,) = M.generate(model, tok, [prompt], max_new_tokens=n, temperature=0)
        assert out.tokens == ref and out.stopped and out.text == tok.decode(ref[:3]), n


def test_save_writes_bf16_and_the_chat_stop_tokens(tmp_path, tiny):
    """A bfloat16 model saves as a bfloat16 checkpoint (tensors and config dtype, as transformers reads it) that load
    accepts and reads back exactly; transformers reads <|im_end|> as its eos and both stop tokens from
    generation_config.json (what lm-evaluation-harness generates with), and a chat_template.jinja and the sampling
    defaults and eos ids of a generation_config.json are kept. Every file is as readable as the umask lets
    a new file be (safetensors alone would write its weights private)."""
    model, tok = tiny
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    for umask in (0o077, 0o022):  # private, then readable by all: the second checkpoint is checked below
        path, mask = tmp_path / f"umask{umask:03o}", os.umask(umask)
        try:
            M.save(bf16, tok, path)
        finally:
            os.umask(mask)
        assert {f.name: f.stat().st_mode & 0o777 for f in path.iterdir()} == {
            f: 0o666 & ~umask for f in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                                        "tokenizer_config.json")}
    assert {v.dtype for v in load_file(path / "model.safetensors").values()} == {torch.bfloat16}
    back, _ = M.load(path, dtype=torch.bfloat16)
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), bf16.state_dict().values()))
    config = transformers.AutoConfig.from_pretrained(path)
    im_end, endoftext = tok.tok.token_to_id(M.IM_END), tok.tok.token_to_id(M.ENDOFTEXT)
    assert config.dtype == torch.bfloat16 and config.eos_token_id == im_end
    assert transformers.GenerationConfig.from_pretrained(path).eos_token_id == [im_end, endoftext]
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"  # kept where newer transformers keep it
    (path / "chat_template.jinja").write_text(template)
    (path / "generation_config.json").write_text(json.dumps({"do_sample": True, "temperature": 0.6, "top_k": 20,
                                                                "eos_token_id": 7, "pad_token_id": 7}))
    again, tok_again = M.load(path)
    assert tok_again.stop_ids == [im_end, endoftext, 7]  # its eos ids stop generation too (Llama 3 lists three)
    M.save(again, tok_again, tmp_path / "again")
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "again").chat_template == template
    gen = transformers.GenerationConfig.from_pretrained(tmp_path / "again")  # sampling defaults and stops kept
    assert (gen.do_sample, gen.temperature, gen.top_k, gen.eos_token_id) == (True, 0.6, 20, [im_end, endoftext, 7])
    M.save(model, tok, tmp_path / "again")  # a tokenizer without one leaves no stale template behind
    assert not (tmp_path / "again" / "chat_template.jinja").exists()


@torch.no_grad()
def test_uncached_forward_of_one_token(lm):
    """A one-token forward without a cache (mask None) takes the SDPA path and equals the first position of a longer
    forward (the grouped decode branch is only for cached steps)."""
    model = lm[0]
    idx = torch.tensor([[1, 50, 60], [1, 7, 8]])
    assert torch.allclose(model(idx[:, :1]), model(idx)[:, :1], atol=1e-5)


@torch.no_grad()
def test_generate_stops_decoding_once_every_row_has_stopped(lm, monkeypatch):
    """Once every row has hit a stop token, generate returns at the next sync instead of decoding an empty batch up to
    max_new_tokens; and it never runs a decode step whose logits it does not sample from (n tokens: n - 1 steps)."""
    model, tok = lm
    tok = copy.copy(tok)
    refs = [naive_greedy(model, p, 3)[0] for p in PROMPTS]
    tok.stop_ids = sorted({r[1] for r in refs})  # every row stops by its second token
    calls = []

    class Step(M.DecodeStep):
        def __call__(self, t, col):
            calls.append(len(t))
            return super().__call__(t, col)

    monkeypatch.setattr(M, "DecodeStep", Step)
    outs = M.generate(model, tok, PROMPTS, max_new_tokens=200, temperature=0)
    assert all(o.stopped for o in outs)
    assert len(calls) <= M.SYNC_EVERY, len(calls)
    calls.clear()
    tok.stop_ids = []
    outs = M.generate(model, tok, PROMPTS, max_new_tokens=5, temperature=0)
    assert all(len(o.tokens) == 5 for o in outs) and len(calls) == 4


def test_top_p_keeps_the_head_that_reaches_it_exactly():
    """With four equally likely tokens (0.25 each, exact in float32) top_p = 0.5 keeps exactly two: the head's
    probability reaches top_p (>=), no third token is added."""
    tok, _ = M.sample(torch.zeros(4000, 4), 1.0, 0.5, 0, torch.Generator().manual_seed(0))
    assert len(set(tok.tolist())) == 2


def test_sampler_never_draws_a_filtered_token_on_zero_noise(monkeypatch):
    """An Exp(1) draw of exactly 0 (possible in float32) must not select a token that top-p removed: p / 0 = 0 / 0 = NaN
    would win the argmax."""
    real = torch.Tensor.exponential_

    def zero_noise(self, *args, **kwargs):
        real(self, *args, **kwargs)
        return self.zero_()

    monkeypatch.setattr(torch.Tensor, "exponential_", zero_noise)
    logits = torch.tensor([[0.1, 2.0, -1.0, 1.2, 0.5, -0.3]])  # p = 0.507 for token 1: top_p 0.5 keeps it alone
    for top_k in (0, 3):
        tok, _ = M.sample(logits, 1.0, 0.5, top_k, torch.Generator().manual_seed(0))
        assert tok.tolist() == [1], top_k


@torch.no_grad()
def test_generate_applies_top_p(lm):
    """generate passes top_p to the sampler: a tiny top_p keeps only the most likely token, i.e. greedy."""
    model, tok = lm
    greedy = M.generate(model, tok, PROMPTS, max_new_tokens=12, temperature=0)
    nucleus = M.generate(model, tok, PROMPTS, max_new_tokens=12, temperature=1.0, top_p=1e-6, seed=3)
    assert [o.tokens for o in nucleus] == [o.tokens for o in greedy]


def test_chat_reasoning_edge_cases_like_the_template(tiny):
    """As Qwen3's template: a reasoning_content is stripped of newlines and the content after it lstripped; an empty
    reasoning_content is still the reasoning (the content's think block is kept as text); the content after the last
    </think> is the answer."""
    tok = tiny[1]
    head = "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n"
    chat = lambda a: tok.chat([{"role": "user", "content": "Q"}, {"role": "assistant", **a}], thinking=True,
                              add_generation_prompt=False)
    assert chat({"content": "\n\nA", "reasoning_content": "\nR\n"}) == head + "<think>\nR\n</think>\n\nA<|im_end|>\n"
    assert chat({"content": "<think>x</think>A", "reasoning_content": ""}) == (
        head + "<think>\n\n</think>\n\n<think>x</think>A<|im_end|>\n")
    assert chat({"content": "<think>a</think>b</think>c"}) == head + "<think>\na\n</think>\n\nc<|im_end|>\n"
