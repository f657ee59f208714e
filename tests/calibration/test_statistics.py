"""The hooks gather exactly the statistics of docs/method.md from a real transformers model."""


import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mergekit_qp.calibration.collector import StatisticsCollector
from mergekit_qp.calibration.store import ModelStatistics, StatisticsError, save_statistics, statistics_metadata
from mergekit_qp.core.statistics import EmbeddingStats, LinearStats, NormStats


def assert_gram_close(got, expected, rtol=1e-5):
    """Entry-wise error relative to the Gram's scale, √(G_ii G_jj) (an absolute tolerance would
    be a third of a typical down_proj entry)."""
    scale = torch.sqrt(torch.outer(expected.diagonal(), expected.diagonal())).clamp(min=1e-30)
    worst = float(((got - expected).abs() / scale).max())
    assert worst < rtol, f"Gram differs by {worst:.2e} of its scale"


def save(path, collector, **description):
    meta = statistics_metadata(aliases=collector.aliases, transposed=collector.transposed,
                               tokens=collector.token_count(), base_model_prefix=description.pop("prefix", ""),
                               description=description)
    save_statistics(str(path), ModelStatistics(collector.tensors(), meta))


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


def sequences():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 97, (n,), generator=g) for n in (7, 12, 3, 12)]


def padded(seqs, pad=0):
    t = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), t), pad)
    mask = torch.zeros((len(seqs), t), dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
        mask[i, : len(s)] = True
    return ids, mask


def capture_inputs(model, seqs):
    """Reference: every linear module's inputs, one unpadded sequence at a time."""
    rows = {}
    handles = [
        m.register_forward_pre_hook(lambda mod, args, name=name: rows.setdefault(name, []).append(args[0][0]))
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear)
    ]
    with torch.no_grad():
        for s in seqs:
            model(input_ids=s[None])
    for h in handles:
        h.remove()
    return {k: torch.cat(v).double() for k, v in rows.items()}


def collect(model, batches):
    collector = StatisticsCollector(model)
    for ids, mask in batches:
        collector.observe(ids, mask)
    collector.close()
    return collector


def test_linear_grams_match_unpadded_reference_and_padding_never_enters():
    model = tiny_llama()
    seqs = sequences()
    # Padding with a token that would change the statistics if it leaked in.
    collector = collect(model, [padded(seqs[:2], pad=5), padded(seqs[2:], pad=96)])
    tensors = collector.tensors()
    reference = capture_inputs(model, seqs)
    n = sum(len(s) for s in seqs)
    assert collector.token_count() == n
    for name, x in reference.items():
        key = collector.aliases.get(name, name)
        gram = tensors[f"linear/{key}/gram"].double()
        assert_gram_close(gram, x.T @ x / n)
        torch.testing.assert_close(tensors[f"linear/{key}/mean"].double(), x.mean(0), rtol=1e-4, atol=1e-5)


def test_shared_inputs_are_stored_once():
    collector = collect(tiny_llama(), [padded(sequences())])
    tensors = collector.tensors()
    for layer in range(2):
        p = f"model.layers.{layer}"
        assert collector.aliases[f"{p}.self_attn.k_proj"] == f"{p}.self_attn.q_proj"
        assert collector.aliases[f"{p}.self_attn.v_proj"] == f"{p}.self_attn.q_proj"
        assert collector.aliases[f"{p}.mlp.up_proj"] == f"{p}.mlp.gate_proj"
        assert f"linear/{p}.self_attn.k_proj/gram" not in tensors
        assert f"linear/{p}.self_attn.o_proj/gram" in tensors
        assert f"linear/{p}.mlp.down_proj/gram" in tensors


def test_norm_moments_and_token_frequencies():
    model = tiny_llama()
    seqs = sequences()
    norm_inputs = {}
    norm = model.model.layers[1].post_attention_layernorm
    h = norm.register_forward_pre_hook(lambda m, a: norm_inputs.setdefault("x", []).append(a[0][0]))
    with torch.no_grad():
        for s in seqs:
            model(input_ids=s[None])
    h.remove()
    x = torch.cat(norm_inputs["x"]).double()
    x_tilde = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)

    tensors = collect(model, [padded(seqs, pad=3)]).tensors()
    name = "norm/model.layers.1.post_attention_layernorm"
    torch.testing.assert_close(tensors[f"{name}/m2"].double(), x_tilde.pow(2).mean(0), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(tensors[f"{name}/m1"].double(), x_tilde.mean(0), rtol=1e-4, atol=1e-6)

    counts = torch.bincount(torch.cat(seqs), minlength=97).double()
    torch.testing.assert_close(tensors["embedding/model.embed_tokens/freq"].double(), counts / counts.sum())


def test_store_round_trip_lookup_by_checkpoint_name(tmp_path):
    collector = collect(tiny_llama(), [padded(sequences())])
    path = str(tmp_path / "stats.safetensors")
    save(path, collector, prefix="model", model="tiny")
    stats = ModelStatistics.open(path)
    assert stats.tokens == 34
    k = stats.lookup("model.layers.0.self_attn.k_proj")
    q = stats.lookup("model.layers.0.self_attn.q_proj")
    assert isinstance(k, LinearStats) and torch.equal(k.gram, q.gram)
    # q/k/v read one Gram: one identity for their shared factorisation; o_proj reads its own.
    v = stats.lookup("model.layers.0.self_attn.v_proj")
    assert k.shared_input is not None and k.shared_input == q.shared_input == v.shared_input
    assert stats.lookup("model.layers.0.self_attn.o_proj").shared_input is None
    assert stats.lookup("model.layers.0.mlp.gate_proj").shared_input == \
        stats.lookup("model.layers.0.mlp.up_proj").shared_input != k.shared_input
    # Prefix-insensitive: a checkpoint saved without the model prefix finds the same entry.
    assert torch.equal(stats.lookup("layers.0.self_attn.q_proj").gram, q.gram)
    assert isinstance(stats.lookup("model.norm"), NormStats)
    assert isinstance(stats.lookup("model.embed_tokens"), EmbeddingStats)
    assert stats.lookup("model.rotary_emb") is None
    assert not list(tmp_path.glob(".tmp-*"))


def test_foreign_and_truncated_files_are_rejected(tmp_path):
    foreign = tmp_path / "foreign.safetensors"
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(foreign), metadata={"format": "pt"})
    with pytest.raises(StatisticsError, match="not a mergekit-qp statistics file"):
        ModelStatistics.open(str(foreign))
    collector = collect(tiny_llama(), [padded(sequences())])
    good = tmp_path / "good.safetensors"
    save(good, collector)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(StatisticsError, match="truncated.safetensors"):
        ModelStatistics.open(str(truncated))


def test_non_finite_activations_are_an_error():
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = float("inf")
    collector = collect(model, [padded(sequences())])
    with pytest.raises(StatisticsError, match="non-finite"):
        collector.tensors()


def test_bert_statistics_match_unpadded_reference():
    """Bidirectional attention: padding only stays out of real tokens' activations through the
    attention mask; LayerNorm (with bias) moments and position / token-type frequencies too."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=48, max_position_embeddings=64)).eval()
    seqs = sequences()
    collector = collect(model, [padded(seqs, pad=7)])
    tensors = collector.tensors()
    assert "pooler.dense" in collector.skipped  # one vector per sequence: no token mask fits it

    reference = capture_inputs(model, seqs)
    n = sum(len(s) for s in seqs)
    for name, x in reference.items():
        if name == "pooler.dense":
            continue
        key = collector.aliases.get(name, name)
        assert_gram_close(tensors[f"linear/{key}/gram"].double(), x.T @ x / n)

    ln = model.encoder.layer[1].output.LayerNorm
    inputs = []
    h = ln.register_forward_pre_hook(lambda m, a: inputs.append(a[0][0]))
    with torch.no_grad():
        for s in seqs:
            model(input_ids=s[None])
    h.remove()
    x_tilde = torch.nn.functional.layer_norm(torch.cat(inputs).double(), (32,), eps=ln.eps)
    prefix = "norm/encoder.layer.1.output.LayerNorm"
    torch.testing.assert_close(tensors[f"{prefix}/m2"].double(), x_tilde.pow(2).mean(0), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(tensors[f"{prefix}/m1"].double(), x_tilde.mean(0), rtol=1e-4, atol=1e-5)

    positions = torch.cat([torch.arange(len(s)) for s in seqs])
    expected = torch.bincount(positions, minlength=64).double() / n
    torch.testing.assert_close(tensors["embedding/embeddings.position_embeddings/freq"].double(), expected)
    token_types = tensors["embedding/embeddings.token_type_embeddings/freq"]
    assert token_types[0] == 1 and token_types[1:].sum() == 0
