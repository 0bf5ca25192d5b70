"""Models for the save/load tests, importable by the fresh processes those tests start (not a
test module). Each builder gives the dense base model, deterministically."""

from __future__ import annotations

import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, 2 * width)
        self.fc2 = nn.Linear(2 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.relu(self.fc1(x)))


class Net(nn.Module):
    """An MLP with awkward widths (97 is prime: structures zero-pad it) and no bias on one layer."""

    def __init__(self, d_in: int = 97, width: int = 24, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Linear(d_in, width, bias=False)
        self.blocks = nn.ModuleList(Block(width) for _ in range(2))
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        for block in self.blocks:
            h = block(h)
        return self.head(h)


def net(seed: int = 0, **kwargs: int) -> Net:
    torch.manual_seed(seed)
    return Net(**kwargs)


def tiny_hf_models() -> dict:
    """Tiny GPT-2 (Conv1D, tied head), Llama, BERT and ViT from local configs, dense."""
    import transformers as tf

    torch.manual_seed(0)
    small = {"hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64}
    return {
        "gpt2": tf.GPT2LMHeadModel(
            tf.GPT2Config(
                vocab_size=97,
                n_positions=32,
                n_embd=32,
                n_layer=2,
                n_head=2,
                bos_token_id=0,
                eos_token_id=0,
            )
        ),
        "llama": tf.LlamaForCausalLM(
            tf.LlamaConfig(
                vocab_size=97,
                num_hidden_layers=2,
                num_key_value_heads=1,
                **small,
                max_position_embeddings=32,
            )
        ),
        "bert": tf.BertModel(
            tf.BertConfig(vocab_size=97, num_hidden_layers=2, max_position_embeddings=32, **small)
        ),
        "vit": tf.ViTForImageClassification(
            tf.ViTConfig(image_size=16, patch_size=4, num_hidden_layers=2, num_labels=5, **small)
        ),
    }


def hf_inputs(name: str) -> dict:
    """Fixed inputs for ``tiny_hf_models()[name]``."""
    g = torch.Generator().manual_seed(1)
    if name == "vit":
        return {"pixel_values": torch.randn(2, 3, 16, 16, generator=g)}
    return {"input_ids": torch.randint(0, 97, (2, 9), generator=g)}


def hf_output(model, name: str) -> torch.Tensor:
    with torch.no_grad():
        out = model(**hf_inputs(name))
    return out.logits if hasattr(out, "logits") else out.last_hidden_state
