"""Request and response bodies of the HTTP API (`XCreate` in, `XRead` out)."""

from datetime import UTC, datetime
from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, PlainSerializer, model_validator

Timestamp = Annotated[
    datetime,
    PlainSerializer(
        lambda value: value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"), return_type=str
    ),
]
Item = TypeVar("Item")


class ListRead(BaseModel, Generic[Item]):
    object: Literal["list"] = "list"
    data: list[Item]
    has_more: bool


class DatasetRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    object: Literal["dataset"] = "dataset"
    filename: str
    format: Literal["text", "jsonl", "csv", "parquet"]
    shape: Literal["text", "prompt_completion", "messages"]
    bytes: int
    sha256: str
    examples: int
    created_at: Timestamp


LR_SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
)


class Hyperparameters(BaseModel):
    """Training knobs; every field has a default and a range checked before the job is queued."""

    model_config = ConfigDict(extra="forbid")

    epochs: Annotated[float, Field(gt=0, le=100)] | Literal["auto"] = Field(
        default=3.0, description="Passes over the training set, or `auto`."
    )
    learning_rate: Annotated[float, Field(gt=0, le=1)] | Literal["auto"] = Field(
        default=5e-5, description="Peak learning rate, or `auto`."
    )
    batch_size: Annotated[int, Field(ge=1, le=1024)] | Literal["auto"] = Field(
        default=8, description="Blocks per device step, or `auto`."
    )
    gradient_accumulation_steps: int = Field(
        default=1, ge=1, le=1024, description="Steps summed into one optimizer step."
    )
    block_size: Annotated[int, Field(ge=8, le=32768)] | Literal["auto"] = Field(
        default="auto",
        description="Tokens per training block (packed), or `auto`: 512, or the base model's "
        "positions where it has fewer.",
    )
    warmup_ratio: float = Field(default=0.0, ge=0, lt=1, description="Share of steps that warm up.")
    weight_decay: float = Field(default=0.0, ge=0, le=1, description="AdamW weight decay.")
    lr_scheduler: Literal[LR_SCHEDULERS] = Field(  # type: ignore[valid-type]
        default="linear", description="Learning-rate schedule."
    )
    max_steps: int | None = Field(
        default=None, ge=1, le=10_000_000, description="Stop after this many optimizer steps."
    )
    seed: int = Field(default=42, ge=0, le=2**32 - 1, description="Seed for shuffling and init.")
    compile: bool = Field(
        default=False, description="torch.compile the model (worth it on a GPU for long jobs)."
    )


class LoraConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    r: int = Field(default=8, ge=1, le=1024, description="Rank of the adapter matrices.")
    alpha: float = Field(default=16, gt=0, le=4096, description="Scaling numerator (alpha / r).")
    dropout: float = Field(default=0.05, ge=0, lt=1, description="Dropout on the adapter input.")
    target_modules: list[str] | None = Field(
        default=None, description="Module names to adapt; default depends on the architecture."
    )
    merge: bool = Field(default=False, description="Also ship the merged model in model/.")


BASE_MODEL_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?$"


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=2000)


# A sample prompt: text, or for a `messages` job a conversation, which the job's chat template
# renders up to the assistant's turn (a text prompt there is one user message).
EvalPrompt = (
    Annotated[str, Field(min_length=1, max_length=2000)]
    | Annotated[list[ChatMessage], Field(min_length=1, max_length=8)]
)

# The default learning rate of a LoRA job (a full fine-tune's is `Hyperparameters`' default).
LORA_LEARNING_RATE = 2e-4


class JobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    base_model: str = Field(
        pattern=BASE_MODEL_PATTERN,
        description="A folder name in the models directory, or an allowed Hugging Face Hub id.",
    )
    dataset_id: str = Field(max_length=40, description="Training dataset.")
    validation_dataset_id: str | None = Field(
        default=None, max_length=40, description="Held-out dataset; else a training split."
    )
    validation_split: float = Field(
        default=0.1, ge=0, le=0.5, description="Share of training examples held out for eval."
    )
    method: Literal["full", "lora"] = "full"
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    lora: LoraConfig | None = Field(default=None, description="Only with method `lora`.")
    eval_prompts: list[EvalPrompt] = Field(
        default_factory=list,
        max_length=20,
        description="Prompts sampled before and after training: text, or for a `messages` "
        "dataset a list of {role, content} messages (a text prompt there is one user message), "
        "rendered with the chat template the job trains with.",
    )
    eval_max_new_tokens: int = Field(
        default=64, ge=1, le=1024, description="Tokens generated greedily per eval prompt."
    )
    truncation: Literal["truncate", "drop"] = Field(
        default="truncate",
        description="What to do with a prompt/completion or chat example longer than "
        "block_size: cut it to block_size, or leave it out. Either way it is counted.",
    )
    dry_run: bool = Field(
        default=False,
        description="Only tokenize and plan: report counts, steps and memory, train nothing.",
    )
    suffix: str | None = Field(
        default=None, pattern=r"^[a-z0-9][a-z0-9-]{0,39}$", description="A short model label."
    )
    metadata: dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]] = (
        Field(default_factory=dict, max_length=16, description="Your own key-value pairs.")
    )

    @model_validator(mode="after")
    def _lora_only_with_lora_method(self) -> "JobCreate":
        if self.method == "lora" and self.lora is None:
            self.lora = LoraConfig()
        if self.method == "lora" and "learning_rate" not in self.hyperparameters.model_fields_set:
            # An adapter starts at zero and has few parameters: the full fine-tune's default
            # barely moves it.
            self.hyperparameters.learning_rate = LORA_LEARNING_RATE
        if self.method == "full" and self.lora is not None:
            raise ValueError("`lora` is set but `method` is `full`; use method `lora`")
        return self


class Progress(BaseModel):
    step: int = 0
    total_steps: int | None = None
    epoch: float = 0.0
    fraction: float = 0.0
    tokens_per_second: float | None = None
    eta_seconds: float | None = None


class JobMetrics(BaseModel):
    train_loss: float | None = None
    eval_loss: float | None = None
    eval_perplexity: float | None = None
    baseline_eval_loss: float | None = None
    baseline_eval_perplexity: float | None = None


class Sample(BaseModel):
    prompt: str | list[dict[str, str]]
    base: str
    tuned: str | None = None


Collation = Literal["blocks", "packed", "flatten", "padded"]


class JobPlan(BaseModel):
    """What a job does with its data, settled before training: a dry run's whole answer, and
    the same counts for every training job."""

    examples: int = Field(description="Examples read, training and held out.")
    train_examples: int = Field(description="Examples trained on.")
    eval_examples: int = Field(description="Held-out examples (the validation set).")
    tokens: int = Field(description="Tokens in the packed rows, training and held out.")
    train_tokens: int = Field(description="Tokens in the training rows.")
    trainable_tokens: int = Field(description="Training tokens the loss covers, after masking.")
    blocks: int = Field(description="Training rows of at most `block_size` tokens.")
    eval_blocks: int = Field(description="Held-out rows the evaluations run on.")
    truncated: int = Field(description="Examples longer than `block_size`, cut to it.")
    dropped: int = Field(description="Examples longer than `block_size`, left out.")
    untrained: int = Field(description="Examples with no token to train on, left out.")
    collation: Collation = Field(
        description="How rows are batched: `blocks` (text cut into equal blocks), `packed` or "
        "`flatten` (whole examples per row, kept apart), `padded` (one example per row)."
    )
    total_steps: int = Field(description="Optimizer steps the training will take.")
    hyperparameters: Hyperparameters = Field(description="With every `auto` resolved.")
    peak_memory_bytes: int = Field(
        description="Estimated peak memory of training on the worker's device (not measured)."
    )
    cache_hit: bool = Field(description="The tokenized data came from the cache.")
    device: Literal["cuda", "cpu"] = Field(description="What the worker trains on.")
    name: str | None = Field(None, description="The GPU's name, on CUDA.")
    precision: Literal["bf16", "fp32"] = Field(
        description="`bf16` mixed precision where the device supports it, else `fp32`."
    )
    rendered_examples: list[str] | None = Field(
        None,
        description="Dry runs: the first three examples as text, trained spans marked «…».",
    )


class JobError(BaseModel):
    code: str
    message: str
    user_error: bool


class ArtifactRead(BaseModel):
    url: str
    bytes: int
    sha256: str


class JobRead(BaseModel):
    id: str
    object: Literal["job"] = "job"
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    cancel_requested: bool
    base_model: str
    dataset_id: str
    validation_dataset_id: str | None
    validation_split: float
    method: Literal["full", "lora"]
    hyperparameters: Hyperparameters
    lora: LoraConfig | None
    eval_prompts: list[str | list[dict[str, str]]]
    eval_max_new_tokens: int
    truncation: Literal["truncate", "drop"]
    dry_run: bool
    progress: Progress
    metrics: JobMetrics
    attempt: int
    resumed_from_step: int | None
    error: JobError | None
    artifact: ArtifactRead | None
    plan: JobPlan | None
    samples: list[Sample]
    suffix: str | None
    metadata: dict[str, str]
    created_at: Timestamp
    started_at: Timestamp | None
    finished_at: Timestamp | None

    @classmethod
    def from_row(cls, job: Any) -> "JobRead":
        artifact = None
        if job.status == "succeeded" and job.artifact_sha256:
            artifact = ArtifactRead(
                url=f"/jobs/{job.id}/artifact", bytes=job.artifact_bytes, sha256=job.artifact_sha256
            )
        return cls(
            id=job.id,
            status=job.status,
            cancel_requested=job.cancel_requested,
            base_model=job.base_model,
            dataset_id=job.dataset_id,
            validation_dataset_id=job.validation_dataset_id,
            validation_split=job.validation_split,
            method=job.method,
            hyperparameters=job.hyperparameters,
            lora=job.lora,
            eval_prompts=job.eval_prompts,
            eval_max_new_tokens=job.eval_max_new_tokens,
            truncation=job.truncation,
            dry_run=job.dry_run,
            progress=job.progress,
            metrics=job.metrics,
            attempt=job.attempt,
            resumed_from_step=job.resumed_from_step,
            error=job.error,
            artifact=artifact,
            plan=job.plan,
            samples=job.samples,
            suffix=job.suffix,
            metadata=job.metadata_,
            created_at=job.created_at,
            started_at=job.started_at,
            finished_at=job.finished_at,
        )


class JobEventRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    object: Literal["job.event"] = "job.event"
    created_at: Timestamp
    level: Literal["info", "warning", "error"]
    type: Literal["status", "message", "metrics"]
    message: str
    data: dict[str, Any]


class JobMetricRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    step: int
    epoch: float | None
    train_loss: float | None
    learning_rate: float | None
    grad_norm: float | None
    tokens_per_second: float | None
    eval_loss: float | None
    created_at: Timestamp


class ErrorDetail(BaseModel):
    type: str
    code: str
    message: str
    param: str | None = None
    details: dict[str, Any] = Field(default_factory=dict)


class ErrorRead(BaseModel):
    error: ErrorDetail


class CheckpointRead(BaseModel):
    """A complete checkpoint a job holds now; a re-claimed job resumes from the newest."""

    object: Literal["job.checkpoint"] = "job.checkpoint"
    step: int
    created_at: Timestamp
    metrics: dict[str, float | None] = Field(
        description="At that step: train_loss (mean over the last logging window), "
        "learning_rate and epoch."
    )
