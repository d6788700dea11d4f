"""Tiny Llama target, draft and EAGLE models with a word-level tokenizer, built in code and
saved to a directory vLLM can load (no downloads)."""

from __future__ import annotations

import json
from pathlib import Path

VOCAB_SIZE = 512


def build_tokenizer(out: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [f"w{i}" for i in range(VOCAB_SIZE - 4)]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}
    vocab.update({word: i + 4 for i, word in enumerate(words)})
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(out)


def build_llama(out: Path, layers: int = 2, hidden: int = 128, seed: int = 0,
                noise: float = 0.0) -> Path:
    """Random weights from `seed`; `noise` adds Gaussian noise of that scale to every
    weight (the same seed and a little noise: a draft model that mostly agrees)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB_SIZE, hidden_size=hidden, intermediate_size=hidden * 2,
                         num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=4, max_position_embeddings=512,
                         bos_token_id=1, eos_token_id=2, pad_token_id=3,
                         tie_word_embeddings=False, torch_dtype="float32")
    model = LlamaForCausalLM(config).eval()
    if noise:
        generator = torch.Generator().manual_seed(seed + 1000)
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(torch.randn(parameter.shape, generator=generator) * noise)
    model.save_pretrained(out, safe_serialization=True)
    build_tokenizer(out)
    return out


def build_eagle(out: Path, target: Path, seed: int = 1) -> Path:
    """An EAGLE-1 draft head for the target, as vLLM's `EagleLlamaForCausalLM` loads it: one
    decoder layer without input norm, `fc` joining token embedding and target hidden state;
    the target's lm_head is shared."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = json.loads((target / "config.json").read_text())
    config.update(num_hidden_layers=1, architectures=["EagleLlamaForCausalLM"])
    layer = LlamaForCausalLM(LlamaConfig(**{**config, "num_hidden_layers": 1})).state_dict()
    weights = {}
    for name, tensor in layer.items():
        if name.startswith("model.") and ".input_layernorm." not in name \
                and name != "model.norm.weight":
            weights[name[len("model."):]] = tensor.contiguous()
    hidden = config["hidden_size"]
    weights["fc.weight"] = torch.randn(hidden, 2 * hidden) * (1.0 / (2 * hidden) ** 0.5)
    out.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(config))
    build_tokenizer(out)
    return out
