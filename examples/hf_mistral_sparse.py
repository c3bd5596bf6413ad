"""Swap a Hugging Face model's attention for a sparseforge pattern.

    python examples/hf_mistral_sparse.py

Builds a small Mistral-style model (random weights, sliding_window=16), checks that
attn_implementation="sparseforge" reproduces its own eager attention exactly, then runs
the same model with a different pattern (window + attention sinks, StreamingLLM style)
and takes one training step through sparseforge's backward.
"""

import copy

import torch
from transformers import MistralConfig, MistralForCausalLM

import sparseforge as sf
from sparseforge.integrations import huggingface as sf_hf


def main():
    sf_hf.register()
    torch.manual_seed(0)
    config = MistralConfig(vocab_size=1000, hidden_size=128, intermediate_size=256,
                           num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                           head_dim=16, sliding_window=16, max_position_embeddings=512)
    eager = MistralForCausalLM._from_config(copy.deepcopy(config), attn_implementation="eager")
    ours = MistralForCausalLM._from_config(copy.deepcopy(config), attn_implementation="sparseforge")
    ours.load_state_dict(eager.state_dict())
    ids = torch.randint(0, 1000, (2, 100))

    with torch.no_grad():
        ref = eager(ids).logits
        same = ours(ids).logits  # pattern derived from config.sliding_window
        print(f"sliding_window(16) via sparseforge vs eager: max |diff| = {(same - ref).abs().max():.2e}")
        with sf_hf.use_pattern(sf.sliding_window(16) | sf.sinks(4)):
            sinks = ours(ids).logits
        print(f"with 4 attention sinks added: logits move by {(sinks - ref).abs().max():.3f}")

    with sf_hf.use_pattern(sf.sliding_window(16) | sf.sinks(4)):
        loss = ours(ids, labels=ids).loss
        loss.backward()
    grad = ours.model.layers[0].self_attn.q_proj.weight.grad
    print(f"training step: loss {loss.item():.3f}, |grad q_proj| = {grad.norm():.3e}")


if __name__ == "__main__":
    main()
