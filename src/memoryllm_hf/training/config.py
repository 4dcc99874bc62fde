"""Training configuration: nested dataclasses read from YAML or JSON, with `section.key=value` overrides.

Defaults follow the official MemoryLLM recipes (spec §5; "v1" = the paper's 7B recipe, "v2" = MemoryLLM-8B stage 1)
where a value carries over to a small model; each field says which.
"""

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

OFFICIAL_LORA = {
    "r": 8,
    "lora_alpha": 32,
    "lora_dropout": 0.1,
    "target_modules": ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj", "gate_proj"],
}


@dataclass
class ModelConfig:
    """Which model trains. `base` is "tiny" (a random `memoryllm_hf.tiny` model), "smollm2" (the offline
    SmolLM2-135M-Instruct), or a path to a Llama or MemoryLlama folder."""

    base: str = "tiny"
    memory_update: str = "output"
    # MemoryLlamaConfig fields (N, K, pool rules, ...); for base "tiny" also any tiny architecture override.
    memory: dict = field(default_factory=dict)
    lora: dict = field(default_factory=lambda: dict(OFFICIAL_LORA))  # official v1: r 8, alpha 32, dropout 0.1
    add_decoder_lora: bool = True  # official v2: a separate read adapter
    train_memory_embeddings: bool = True  # `bos_embedding` and `new_memory_positional_emb`
    gradient_checkpointing: bool = False
    seed: int = 0  # seed of the random "tiny" model
    # "tiny" only: multiply its (frozen, random) token embeddings, so that a tied output layer can give confident
    # predictions and a token stays recognisable after the random layers (a pretrained base has both for free).
    tiny_embedding_scale: float = 1.0


@dataclass
class DataConfig:
    """Where examples come from. kind "documents": local .txt/.jsonl files split into (contexts, segment) as in
    `data.split_document`; kind "key_value": the synthetic recall task of `synthetic.KeyValueTask`."""

    kind: str = "documents"
    files: list[str] = field(default_factory=list)
    text_field: str = "text"  # jsonl: the field holding the text
    group_field: str | None = None  # jsonl: rows sharing this field (in file order) form one document
    min_chunk_tokens: int = 16  # official v2: 16
    max_chunk_tokens: int = 512  # official v1/v2: 512
    max_segment_tokens: int = 512  # official v2: segments of short documents are one chunk (<= 512)
    key_value: dict = field(default_factory=dict)  # KeyValueTask fields for kind "key_value"


@dataclass
class ObjectiveConfig:
    """How each step picks one of the paper's processes (see `objective.choose_process`)."""

    lm_ratio: float = 0.1  # plain LM on contexts + segment, full pool (v2 `full_context_and_sentence_training_ratio`)
    forgetting_ratio: float = 0.2  # re-score the cached segment (v2: 1 - pass_ratio = 0.2; v1: 0.5)
    forget_cache_refresh: float = 1.0  # probability a forgetting step empties the cache (v2 `empty_prob`)
    full_pool_ratio: float = 0.8  # continuous-context reads of the full pool (v2 0.8; v1 0.5); else new knowledge
    # Most contexts a continuous step injects, growing with the step: values[i] from steps[i - 1] on (values[0] first).
    # v1: steps [10000, 15000, 20000, 30000, 50000, 60000], values [1, 2, 3, 4, 5, 10, 20];
    # v2: steps [100000, 200000], values [50, 100, 200].
    contexts_schedule_steps: list[int] = field(default_factory=list)
    contexts_schedule_values: list[int] = field(default_factory=lambda: [1])
    random_num_contexts: bool = True  # draw 1..max contexts (v1) instead of always the maximum (v2)
    max_lm_tokens: int = 2048  # LM steps read at most this many tokens (v2 `max_seq_length`)


@dataclass
class OptimConfig:
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    scheduler: str = "linear"  # any `transformers.get_scheduler` name
    warmup_steps: int = 0
    max_steps: int = 1000
    max_minutes: float | None = None  # also stop (all ranks together) once training took this long
    gradient_accumulation_steps: int = 1  # official v1: 4
    max_grad_norm: float | None = 1.0
    mixed_precision: str = "no"  # accelerate: "no", "fp16", "bf16"


@dataclass
class TrainConfig:
    output_dir: str = "outputs/train"
    seed: int = 42  # official: seed_everything(42)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    log_every: int = 10
    checkpoint_every: int = 0  # updates between checkpoints (0: none)
    keep_checkpoints: int = 2  # newest checkpoints kept
    export_dtype: str = "float32"  # dtype of the exported trainables (bfloat16 halves the adapter file)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _build(cls, values: dict, where: str):
    """Dataclass `cls` from a dict, recursing into nested dataclass fields; unknown keys are an error."""
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in {where or 'config'}; known: {sorted(known)}")
    kwargs = {}
    for name, value in values.items():
        nested = known[name].default_factory if dataclasses.is_dataclass(known[name].default_factory) else None
        if nested:
            value = _build(nested, value or {}, f"{where}{name}.")
        elif known[name].type in (float, float | None) and isinstance(value, (str, int)):
            value = float(value)  # YAML reads 1e-4 (no dot) as a string
        elif known[name].type is str and isinstance(value, bool):
            value = "yes" if value else "no"  # YAML 1.1 reads no/yes/off/on as booleans
        kwargs[name] = value
    return cls(**kwargs)


def config_from_dict(values: dict) -> TrainConfig:
    config = _build(TrainConfig, values, "")
    validate(config)
    return config


def apply_overrides(values: dict, overrides: list[str]) -> dict:
    """Apply `section.key=value` strings (value parsed as YAML, e.g. `optim.max_steps=5`) to a config dict."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} must look like section.key=value")
        *parents, leaf = key.split(".")
        target = values
        for parent in parents:
            target = target.setdefault(parent, {})
        target[leaf] = yaml.safe_load(raw)
    return values


def load_config(path: str | Path, overrides: list[str] = ()) -> TrainConfig:
    """Read a YAML (.yaml/.yml) or JSON config file and apply overrides."""
    text = Path(path).read_text()
    values = json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)
    return config_from_dict(apply_overrides(values or {}, list(overrides)))


def validate(config: TrainConfig) -> None:
    data, objective = config.data, config.objective
    if data.kind not in ("documents", "key_value"):
        raise ValueError(f"data.kind must be 'documents' or 'key_value', got {data.kind!r}")
    if data.kind == "documents" and not data.files:
        raise ValueError("data.files is empty: list the .txt/.jsonl files to train on")
    if data.max_chunk_tokens < 2 * data.min_chunk_tokens:
        raise ValueError("data.max_chunk_tokens must be at least 2 * data.min_chunk_tokens")
    if data.max_segment_tokens < data.min_chunk_tokens:
        raise ValueError("data.max_segment_tokens must be at least data.min_chunk_tokens")
    ratios = {
        k: getattr(objective, k) for k in ("lm_ratio", "forgetting_ratio", "forget_cache_refresh", "full_pool_ratio")
    }
    for name, value in ratios.items():
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"objective.{name} must be in [0, 1], got {value}")
    steps, values = objective.contexts_schedule_steps, objective.contexts_schedule_values
    if len(values) != len(steps) + 1 or min(values) < 1 or steps != sorted(steps):
        raise ValueError("objective.contexts_schedule_values needs one more entry (>= 1) than the sorted _steps")
