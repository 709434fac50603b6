"""The seed recipe as a bare script: tokenizer, AutoModelForCausalLM, a TextDataset-style dataset,
DataCollatorForLanguageModeling and Trainer, nothing else.

`transformers.TextDataset` is gone from transformers 5, so `TextBlocks` does what it did: read
the whole file, tokenize it in one call, cut it into `block_size` blocks (the tail is dropped).
The only additions to the recipe are the timings the benchmark compares, written as JSON:

    python benchmarks/seed_trainer.py --model DIR --data FILE --block-size 128 \
        --batch-size 8 --max-steps 40 --out result.json
"""

import time

STARTED = time.perf_counter()  # before the imports: the process wall includes them

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
from torch.utils.data import Dataset  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    PreTrainedTokenizerBase,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

IMPORTED = time.perf_counter()


class TextBlocks(Dataset):
    """`TextDataset(tokenizer, file_path, block_size)` of transformers 4."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, file_path: str, block_size: int) -> None:
        text = Path(file_path).read_text(encoding="utf-8")
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        self.blocks = [
            torch.tensor(ids[start : start + block_size], dtype=torch.long)
            for start in range(0, len(ids) - block_size + 1, block_size)
        ]

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.blocks[index]


class StepClock(TrainerCallback):
    """When each optimizer step ended (host time; the CPU run has no device queue)."""

    def __init__(self) -> None:
        self.ends: dict[int, float] = {}

    def on_step_end(self, args: Any, state: Any, control: Any, **_: Any) -> None:
        self.ends[state.global_step] = time.perf_counter()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-steps", type=int, default=40)
    parser.add_argument("--learning-rate", type=float, default=5e-4)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    begun = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model)
    loaded = time.perf_counter()
    dataset = TextBlocks(tokenizer, args.data, args.block_size)
    tokenizer.pad_token = tokenizer.eos_token
    collator = DataCollatorForLanguageModeling(tokenizer=tokenizer, mlm=False)
    tokenized = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="seed-trainer-") as output_dir:
        training_args = TrainingArguments(
            output_dir=output_dir,
            max_steps=args.max_steps,
            per_device_train_batch_size=args.batch_size,
            learning_rate=args.learning_rate,
            seed=args.seed,
            save_strategy="no",
            report_to="none",
            use_cpu=not torch.cuda.is_available(),
        )
        clock = StepClock()
        trainer = Trainer(
            model=model,
            args=training_args,
            data_collator=collator,
            train_dataset=dataset,
            callbacks=[clock],
        )
        train_started = time.perf_counter()
        faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        output = trainer.train()
        trained = time.perf_counter()
        train_minor_faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before
        trainer.save_model(str(Path(output_dir) / "model"))
        tokenizer.save_pretrained(str(Path(output_dir) / "model"))
        saved = time.perf_counter()

    tokens_per_step = args.batch_size * args.block_size
    first, last = 1, args.max_steps
    window = clock.ends[last] - clock.ends[first]
    result = {
        "imports_s": IMPORTED - STARTED,
        "load_s": loaded - begun,
        "tokenize_s": tokenized - loaded,
        "trainer_setup_s": train_started - tokenized,
        "train_s": trained - train_started,
        "save_s": saved - trained,
        "script_wall_s": saved - begun,  # after the imports: what the service's worker has done
        "process_wall_s": saved - STARTED,
        "steps": output.global_step,
        "tokens_per_second": tokens_per_step * (last - first) / window,
        "train_minor_faults": train_minor_faults,
        "median_step_s": statistics.median(
            clock.ends[step] - clock.ends[step - 1] for step in range(first + 1, last + 1)
        ),
        "train_runtime_tokens_per_second": tokens_per_step
        * args.max_steps
        / (trained - train_started),
        "blocks": len(dataset),
    }
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
