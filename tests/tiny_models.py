"""Tiny checkpoints built on the spot for end-to-end tests: a base, two "fine-tuned" experts
(base plus low-rank task vectors), a word-level tokenizer and two calibration sets whose
word distributions differ, for a Llama and a BERT architecture."""

import json
import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
import transformers
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

# Decoder architectures besides Llama with the same tiny shape (sequential merging supports them).
DECODERS = {"mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}
# Architectures the layer-streamed statistics pass runs besides (config class, extra settings).
STATISTICS_ONLY = {"phi3": ("Phi3Config", "Phi3ForCausalLM", {"pad_token_id": 0}),
                   "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 8}),
                   "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"head_dim": 8})}

WORDS = [f"w{i}" for i in range(60)]


def make_tokenizer(kind: str) -> PreTrainedTokenizerFast:
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] if kind == "bert" else ["<pad>", "<unk>", "<s>", "</s>"]
    vocab = {tok: i for i, tok in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=specials[1]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if kind == "bert":
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
        )
        return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                       cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<s>", eos_token="</s>")


def make_model(kind: str, vocab_size: int, init_range: float = 0.02, tied: bool = False):
    if kind == "bert":
        config = BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=48, max_position_embeddings=64, initializer_range=init_range)
        return BertModel(config)
    if kind == "gpt2":
        config = transformers.GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                         bos_token_id=2, eos_token_id=3, initializer_range=init_range)
        return transformers.GPT2LMHeadModel(config)
    shape = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tied,
                 initializer_range=init_range)
    if kind in STATISTICS_ONLY:
        config_class, model_class, extra = STATISTICS_ONLY[kind]
        return getattr(transformers, model_class)(getattr(transformers, config_class)(**shape, **extra))
    if kind in DECODERS:
        prefix = DECODERS[kind]
        extra = {"head_dim": 8} if kind == "qwen3" else {}
        config = getattr(transformers, f"{prefix}Config")(**shape, **extra)
        return getattr(transformers, f"{prefix}ForCausalLM")(config)
    return LlamaForCausalLM(LlamaConfig(**shape))


def perturb(model, seed: int, scale: float = 0.05):
    """An "expert": every weight moved by a rank-2 (matrices) or dense (vectors) update."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                a = torch.randn(p.shape[0], 2, generator=g)
                b = torch.randn(2, p.shape[1], generator=g)
                p += scale * p.std() * (a @ b) / 2
            else:
                p += scale * torch.randn(p.shape, generator=g)
    return model


def write_calibration(path: Path, seed: int, lo: int, hi: int, n: int = 24):
    rng = random.Random(seed)
    with open(path, "w") as fp:
        for _ in range(n):
            words = [WORDS[rng.randrange(lo, hi)] for _ in range(rng.randrange(4, 14))]
            fp.write(json.dumps({"text": " ".join(words)}) + "\n")


def build(kind: str, root: Path, init_range: float = 0.02, tied: bool = False) -> dict:
    """base/, expert_a/, expert_b/ (with tokenizer), calib_a.jsonl, calib_b.jsonl under root."""
    root.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer(kind)
    paths = {}
    for name, seed in (("base", None), ("expert_a", 1), ("expert_b", 2)):
        torch.manual_seed(0)
        model = make_model(kind, len(tokenizer), init_range, tied)
        if seed is not None:
            perturb(model, seed)
        out = root / name
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
        paths[name] = out
    write_calibration(root / "calib_a.jsonl", 1, 0, 35)
    write_calibration(root / "calib_b.jsonl", 2, 25, 60)
    paths["calib_a"] = root / "calib_a.jsonl"
    paths["calib_b"] = root / "calib_b.jsonl"
    return paths


def write_config(path: Path, paths: dict, method: str, parameters: dict | None = None,
                 model_parameters: dict | None = None) -> Path:
    import yaml

    models = []
    for expert, calib in (("expert_a", "calib_a"), ("expert_b", "calib_b")):
        p = dict(model_parameters or {})
        if method == "output_qp":
            p.setdefault("calibration", str(paths[calib]))
        elif method in ("ties", "dare_ties"):
            p.setdefault("weight", 1.0)
            p.setdefault("density", 0.5)
        elif method == "task_arithmetic":
            p.setdefault("weight", 0.5)
        models.append({"model": str(paths[expert]), "parameters": p})
    config = {"merge_method": method, "base_model": str(paths["base"]), "models": models, "dtype": "float32"}
    if parameters:
        config["parameters"] = parameters
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path
