"""A tiny GPT-2 and its tokenizer, built on the fly so tests need no download.

The tokenizer is a byte-level BPE trained on a few sentences (any text still encodes, byte by
byte), and the model is randomly initialised from a fixed seed, so every build is the same.
"""

import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

EOS = "<|endoftext|>"
VOCAB_SIZE = 512
SEED = 1234

# Enough varied English for the BPE merges to be useful on the test datasets.
_CORPUS = [
    "Apple Inc. released its new iPhone model yesterday, featuring a longer battery life.",
    "Google announced a new feature in its search engine that aims to combat misinformation.",
    "Tesla's latest electric vehicle model has been receiving rave reviews for its performance.",
    "Amazon's quarterly profits exceeded expectations, boosted by the surge in online shopping.",
    "Microsoft's new operating system update includes several features aimed at privacy.",
    "The quick brown fox jumps over the lazy dog. 0123456789",
    "the cat sat on the mat. the dog sat on the log. a bird sang in the tree.",
    '{"prompt": "Question:", "completion": " Answer.", "text": "user assistant system"}',
]


def _train_tokenizer() -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[EOS],
        # The whole byte alphabet, so no input is ever out of vocabulary.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=EOS,
        eos_token=EOS,
        unk_token=EOS,
        model_max_length=1024,
    )


def build_tiny_model(
    models_dir: Path,
    name: str = "tiny-gpt2",
    *,
    layers: int = 2,
    width: int = 64,
    heads: int = 2,
    positions: int = 1024,
    seed: int = SEED,
) -> Path:
    """Save a GPT-2 (safetensors, 2 layers of width 64 unless asked otherwise) and the tiny
    byte-level BPE tokenizer to `models_dir/name`."""
    target = Path(models_dir) / name
    target.mkdir(parents=True, exist_ok=True)
    tokenizer = _train_tokenizer()
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=positions,
        n_embd=width,
        n_layer=layers,
        n_head=heads,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    # Seed a private generator state so building the model does not disturb the caller's RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


def with_pickle_weights(model: Path, target: Path) -> Path:
    """A copy of `model` whose weights are a pickle (`pytorch_model.bin`), as older repositories
    ship them, instead of safetensors."""
    shutil.copytree(model, target, ignore=shutil.ignore_patterns("*.safetensors"))
    torch.save(load_file(model / "model.safetensors"), target / "pytorch_model.bin")
    return target
