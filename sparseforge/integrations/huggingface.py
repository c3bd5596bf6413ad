"""Hugging Face ``transformers`` integration: ``attn_implementation="sparseforge"``.

``register()`` adds a "sparseforge" attention function (``AttentionInterface``) and its
mask function (``AttentionMaskInterface``) to transformers, so any model whose attention
goes through ``ALL_ATTENTION_FUNCTIONS`` (Llama, Mistral, Qwen, BERT, ...) runs on
sparseforge with nothing else in the stack changed::

    import sparseforge as sf
    from sparseforge.integrations import huggingface as sf_hf

    sf_hf.register()
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sparseforge")
    with sf_hf.use_pattern(sf.sliding_window(4096) | sf.sinks(4)):
        logits = model(input_ids).logits

Which pattern a layer uses, first match wins:

1. ``use_pattern(p)`` around the call (``p`` a pattern, or ``callable(layer_idx)``);
2. ``config.sparseforge_pattern`` (a pattern, a pattern expression string such as
   ``"sliding_window(512) | sinks(4)"``, or ``callable(layer_idx)``);
3. what the model itself asks for: ``sliding_window(W)`` when transformers passes the
   layer's ``sliding_window``, else ``causal()`` or ``full()`` from ``is_causal``.

The pattern is authoritative: transformers' own mask functions are not consulted.
Padding in the 2-D ``attention_mask`` is honoured (padded keys are masked, as
``documents`` ids). A logit soft-cap the model passes (Gemma 2's ``softcap``) is
applied as ``sf.softcap`` unless the pattern brings its own. Attention dropout and
attention-sink logits (``s_aux``) are refused with a clear error rather than silently
ignored.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Callable, Iterator

import torch

from ..api import attention
from ..ir.nodes import Pattern, causal, documents, full, sliding_window
from ..ir.patterns_parse import parse_pattern
from ..ir.scores import Softcap, score_terms, softcap

NAME = "sparseforge"
PatternChoice = Pattern | str | Callable[[int | None], Pattern]

_override: contextvars.ContextVar[PatternChoice | None] = contextvars.ContextVar(
    "sparseforge_pattern", default=None)


@contextlib.contextmanager
def use_pattern(pattern: PatternChoice) -> Iterator[None]:
    """Use ``pattern`` (or ``pattern(layer_idx)``) for every sparseforge attention call
    made inside the block, whatever the model's config says."""
    if not (isinstance(pattern, (Pattern, str)) or callable(pattern)):
        raise TypeError(f"use_pattern(pattern={type(pattern).__name__}): expected a pattern, an "
                        "expression string or a callable(layer_idx) -> pattern")
    token = _override.set(pattern)
    try:
        yield
    finally:
        _override.reset(token)


def _as_pattern(choice: PatternChoice, layer_idx: int | None) -> Pattern:
    if isinstance(choice, str):
        choice = parse_pattern(choice)
    elif not isinstance(choice, Pattern):
        choice = choice(layer_idx)
    if not isinstance(choice, Pattern):
        raise TypeError(f"sparseforge pattern for layer {layer_idx}: got {type(choice).__name__}")
    return choice


def layer_pattern(module, sliding_window: int | None, is_causal: bool | None) -> Pattern:
    """The pattern one attention layer uses (see the module docstring for the order)."""
    layer_idx = getattr(module, "layer_idx", None)
    choice = _override.get()
    if choice is None:
        choice = getattr(getattr(module, "config", None), "sparseforge_pattern", None)
    if choice is not None:
        return _as_pattern(choice, layer_idx)
    causal_layer = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if sliding_window:
        if not causal_layer:
            raise NotImplementedError("a bidirectional sliding window: pass a pattern "
                                      "(e.g. sf.window(W, W)) with use_pattern")
        return sliding_window_pattern(sliding_window)
    return causal() if causal_layer else full()


def sliding_window_pattern(size: int) -> Pattern:
    """transformers' sliding window: key j visible from query i iff i - size < j <= i."""
    return sliding_window(size)


def sparseforge_attention_forward(module, query: torch.Tensor, key: torch.Tensor,
                                  value: torch.Tensor, attention_mask: torch.Tensor | None,
                                  scaling: float | None = None, dropout: float = 0.0,
                                  sliding_window: int | None = None, is_causal: bool | None = None,
                                  softcap: float | None = None, s_aux=None, **kwargs):
    """transformers attention function: q/k/v [B, H, L, D] in, ([B, L, H, D], None) out."""
    if dropout and getattr(module, "training", False):
        raise NotImplementedError(f"attention dropout ({dropout}) is not supported by sparseforge; "
                                  "set the model's attention_dropout to 0")
    if s_aux is not None:
        raise NotImplementedError("this model passes attention-sink logits (s_aux), which "
                                  "sparseforge does not apply yet")
    pattern = layer_pattern(module, sliding_window, is_causal)
    if softcap is not None and Softcap not in score_terms(pattern):  # Gemma 2 logit capping
        pattern = _capped(pattern, float(softcap))
    if attention_mask is not None:
        pattern = pattern & _key_padding(attention_mask, query.shape[2], key.shape[2])
    out = attention(query, key, value, pattern, scale=scaling,
                    enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2).contiguous(), None


@functools.lru_cache(maxsize=256)
def _capped(pattern: Pattern, cap: float) -> Pattern:
    """``pattern & softcap(cap)``, one object per (pattern, cap), so a warm call reuses
    its canonical form and plan."""
    return pattern & softcap(cap)


def _key_padding(mask: torch.Tensor, q_len: int, kv_len: int) -> Pattern:
    """Padded keys as document ids: queries are document 0, valid keys 0, padding 1."""
    if mask.dim() != 2 or mask.shape[-1] != kv_len:
        raise ValueError(f"attention_mask: expected the [batch, {kv_len}] key-padding mask built "
                         f"by sparseforge's mask function, got shape {tuple(mask.shape)}")
    kv_ids = (~mask.bool()).to(torch.int32)
    q_ids = torch.zeros(mask.shape[0], q_len, dtype=torch.int32, device=mask.device)
    return documents(q_ids, kv_ids)


def sparseforge_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0,
                     kv_offset: int = 0, mask_function=None, attention_mask=None, **kwargs):
    """transformers mask function: the 2-D key-padding mask for this layer's keys, or
    None when nothing is padded (the pattern does the rest)."""
    if attention_mask is None:
        return None
    keys = attention_mask[:, kv_offset:kv_offset + kv_length].bool()
    if keys.shape[-1] < kv_length:  # fewer mask columns than keys: the rest are valid
        pad = torch.ones(keys.shape[0], kv_length - keys.shape[-1], dtype=torch.bool,
                         device=keys.device)
        keys = torch.cat([keys, pad], dim=-1)
    return None if bool(keys.all()) else keys


def register() -> None:
    """Make ``attn_implementation="sparseforge"`` available to transformers models."""
    from transformers import AttentionInterface  # optional dependency: the [hf] extra
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, sparseforge_attention_forward)
    AttentionMaskInterface.register(NAME, sparseforge_mask)
