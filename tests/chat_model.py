"""A tiny GPT-2 whose tokenizer has a chat template, for the chat masking tests.

It is the tiny model of `tests.tiny_model` plus two special tokens, `<|im_start|>` and
`<|im_end|>`, and a ChatML-style template that uses them (the shape of Qwen's and many others').
The embedding matrix grows by two rows, seeded, so every build is the same.
"""

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.tiny_model import build_tiny_model

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"

# trim_blocks is on in transformers' renderer, so newlines are written as expressions.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def build_chat_model(models_dir: Path, name: str = "tiny-chat") -> Path:
    """Save the tiny GPT-2 with a ChatML chat template and its two control tokens."""
    target = build_tiny_model(Path(models_dir), name)
    tokenizer = AutoTokenizer.from_pretrained(target)
    tokenizer.add_special_tokens({"additional_special_tokens": [IM_START, IM_END]})
    tokenizer.chat_template = CHAT_TEMPLATE
    model = AutoModelForCausalLM.from_pretrained(target)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(4321)
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target
