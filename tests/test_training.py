"""Training with the paper's objective: data splitting, process choice, gradients, checkpoints, and a tiny model that
learns to recall through its memory."""

import json
import random
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from memoryllm_hf.evaluation.models import load_model as load_eval_model
from memoryllm_hf.train import main as train_main
from memoryllm_hf.training import (
    KeyValueTask,
    Trainer,
    config_from_dict,
    load_config,
    load_trained_model,
    make_accelerator,
    recall_accuracy,
    split_document,
)
from memoryllm_hf.training.data import Example, read_documents
from memoryllm_hf.training.evaluate import evaluate
from memoryllm_hf.training.model import build_model, mark_trainable
from memoryllm_hf.training.objective import (
    MemoryTrainingModule,
    StepPlan,
    StreamState,
    enable_gradient_checkpointing,
    max_contexts,
    plan_step,
)

CONFIGS = Path(__file__).parent.parent / "configs"
LORA = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_config(tmp_path, **sections) -> dict:
    """A small key/value training config; `sections` replace whole sections or top-level values."""
    values = {
        "output_dir": str(tmp_path / "run"),
        "seed": 0,
        "model": {"base": "tiny", "lora": LORA, "memory": {"num_memory_tokens": 8, "num_update_tokens": 4}},
        "data": {"kind": "key_value", "key_value": {"context_repeats": 2}},
        "objective": {"lm_ratio": 0.2, "forgetting_ratio": 0.4, "full_pool_ratio": 0.5},
        "optim": {"learning_rate": 1e-3, "max_steps": 6},
    }
    return {**values, **sections}


def trainer_for(values: dict) -> Trainer:
    config = config_from_dict(values)
    return Trainer(config, make_accelerator(config, cpu=True))


# ------------------------------------------------------------------ data
def test_split_document_rule():
    for seed in range(200):
        rng = random.Random(seed)
        ids = list(range(rng.randint(32, 900)))
        contexts, segment = split_document(ids, random.Random(seed), 16, 48, 40)
        assert sum(contexts, []) + segment == ids  # nothing lost, order kept, segment ends the document
        assert 16 <= len(segment) <= 40
        assert all(16 <= len(c) <= 48 for c in contexts)
        assert split_document(ids, random.Random(seed), 16, 48, 40) == (contexts, segment)
    assert split_document(list(range(31)), random.Random(0), 16, 48, 40) is None


def test_read_documents_groups_consecutive_rows(tmp_path):
    rows = [{"t": "a", "g": 1}, {"t": "b", "g": 1}, {"t": "c", "g": 2}, {"t": "d", "g": 1}]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "one.txt").write_text("whole file")
    assert read_documents([str(path)], "t", "g") == ["a\n\nb", "c", "d"]
    assert read_documents([str(path), str(tmp_path / "one.txt")], "t") == ["a", "b", "c", "d", "whole file"]
    with pytest.raises(ValueError, match="field 'text'"):
        read_documents([str(path)])


def test_document_examples_are_a_function_of_the_index(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": f"document {i} " * 30}) + "\n" for i in range(5)))
    values = tiny_config(
        tmp_path,
        data={
            "kind": "documents",
            "files": [str(path)],
            "min_chunk_tokens": 8,
            "max_chunk_tokens": 32,
            "max_segment_tokens": 24,
        },
    )
    values["model"]["memory"]["min_inject_tokens"] = 4
    trainer = trainer_for(values)
    first, again = trainer.examples.example(7), trainer.examples.example(7)
    assert [c.tolist() for c in first.contexts] == [c.tolist() for c in again.contexts]
    assert first.segment.tolist() == again.segment.tolist()
    assert all(8 <= len(c) <= 32 for c in first.contexts) and 8 <= len(first.segment) <= 24


def test_warns_when_documents_repeat(tmp_path):
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": f"Document {i} says the sky is blue. " * 8}) + "\n" for i in range(2)))
    data = {"kind": "documents", "files": [str(docs)], "min_chunk_tokens": 4, "max_chunk_tokens": 8}
    values = tiny_config(tmp_path, data={**data, "max_segment_tokens": 8})
    values["model"]["memory"]["min_inject_tokens"] = 4
    with pytest.warns(UserWarning, match="2 documents for 20 examples: every document .* seen ~10 times"):
        trainer_for({**values, "optim": {"max_steps": 20}})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trainer_for({**values, "optim": {"max_steps": 8}})  # 4 passes: no warning


# ------------------------------------------------------------------ config
def test_config_loading_and_errors(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim: {learning_rate: 1e-4}\ndata: {kind: key_value}\n")
    config = load_config(
        path,
        [
            "optim.max_steps=7",
            "optim.mixed_precision=no",
            "objective.contexts_schedule_steps=[10]",
            "objective.contexts_schedule_values=[1, 3]",
        ],
    )
    assert config.optim.learning_rate == 1e-4 and config.optim.max_steps == 7
    assert config.optim.mixed_precision == "no"  # YAML 1.1 would read a bare `no` as False
    assert [max_contexts(config.objective, s) for s in (0, 9, 10, 99)] == [1, 1, 3, 3]
    with pytest.raises(ValueError, match="unknown key"):
        load_config(path, ["optim.learning_rat=1"])
    with pytest.raises(ValueError, match="data.files is empty"):
        config_from_dict({"data": {"kind": "documents"}})
    with pytest.raises(ValueError, match="one more entry"):
        load_config(path, ["objective.contexts_schedule_steps=[5]"])
    with pytest.raises(ValueError, match="min_inject_tokens"):
        values = tiny_config(tmp_path, data={"kind": "documents", "files": [str(path)], "min_chunk_tokens": 8})
        values["model"]["memory"]["min_inject_tokens"] = 16
        trainer_for(values)


def test_shipped_configs_load():
    for path in sorted(CONFIGS.glob("*.yaml")):
        config = load_config(path)
        assert config.model.lora, path


# ------------------------------------------------------------------ processes
def test_plan_step_processes_and_forgetting_cache():
    def example(i):
        return Example([torch.tensor([i] * 4), torch.tensor([i + 1] * 4)], torch.tensor([i, i, i]))

    objective = config_from_dict(
        {
            "data": {"kind": "key_value"},
            "objective": {
                "lm_ratio": 0.1,
                "forgetting_ratio": 0.5,
                "forget_cache_refresh": 1.0,
                "full_pool_ratio": 0.5,
                "contexts_schedule_steps": [],
                "contexts_schedule_values": [2],
            },
        }
    ).objective
    stream = StreamState.seeded(0, 0)
    plans = [plan_step(objective, stream, example(i), i) for i in range(400)]
    counts = {p: sum(plan.process == p for plan in plans) for p in ("new_knowledge", "continuous", "forgetting", "lm")}
    assert all(n > 20 for n in counts.values()), counts
    for i, plan in enumerate(plans):
        if plan.process == "new_knowledge":
            assert [c.tolist() for c in plan.contexts] == [[i + 1] * 4]  # the context next to the segment
        if plan.process == "continuous":
            assert 1 <= len(plan.contexts) <= 2 and plan.contexts[-1].tolist() == [i + 1] * 4
        if plan.process == "forgetting":
            cached = plan.segment[0].item()
            assert cached < i and plans[cached].process in ("new_knowledge", "continuous")
            # unrelated contexts were injected between the cached step and this one
            assert any(p.process in ("new_knowledge", "continuous") for p in plans[cached + 1 : i])
        if plan.process == "lm":
            assert plan.segment.tolist() == [i] * 4 + [i + 1] * 4 + [i] * 3 and not plan.contexts


def grads_by_role(model) -> dict[str, float]:
    totals = {"write": 0.0, "read": 0.0, "memory_embeddings": 0.0}
    for name, param in model.named_parameters():
        if param.grad is None:
            continue
        role = "memory_embeddings" if name.startswith("memory_embeddings") else name.rsplit(".", 1)[-1]
        totals[role] += float(param.grad.abs().sum())
    return totals


def test_processes_train_the_right_adapter_and_commit_memory():
    config = config_from_dict({"data": {"kind": "key_value"}, "model": {"lora": LORA}}).model
    model, _ = build_model(config)
    mark_trainable(model, True)
    model.train()
    module = MemoryTrainingModule(model)
    context, segment = torch.arange(10, 20), torch.arange(30, 40)
    model.inject(torch.arange(3, 13))
    before = model.num_injections

    module(StepPlan("new_knowledge", segment, segment, [context])).backward()
    grads = grads_by_role(model)
    assert grads["write"] > 0 and grads["memory_embeddings"] > 0 and grads["read"] == 0
    assert model.num_injections == before + 1
    model.zero_grad(set_to_none=True)

    module(StepPlan("continuous", segment, segment, [context, context])).backward()
    grads = grads_by_role(model)
    assert grads["read"] > 0 and grads["write"] == 0  # injected contexts carry no gradient
    assert model.num_injections == before + 3
    assert all(name not in dict(model.named_parameters()) for name in ("memory", "memory_filled"))
    assert not model.memory.requires_grad


def loss_and_grads(plan: StepPlan, checkpointing: bool, prefill: bool) -> tuple[float, dict]:
    config = config_from_dict({"data": {"kind": "key_value"}, "model": {"lora": LORA}}).model
    model, _ = build_model(config)
    mark_trainable(model, True)
    if prefill:
        model.inject(torch.arange(3, 13))
    model.train()
    if checkpointing:
        enable_gradient_checkpointing(model)
    loss = MemoryTrainingModule(model)(plan)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_loss_and_grads(plan: StepPlan, prefill: bool) -> None:
    plain_loss, plain = loss_and_grads(plan, False, prefill)
    ckpt_loss, ckpt = loss_and_grads(plan, True, prefill)
    assert ckpt_loss == pytest.approx(plain_loss, abs=1e-6)
    assert plain.keys() == ckpt.keys() and plain
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("process", ["continuous", "lm", "new_knowledge"])
def test_gradient_checkpointing_gives_the_same_loss_and_grads(process):
    context, segment = torch.arange(10, 20), torch.arange(30, 40)
    # "new_knowledge" into an empty pool: the injection window has no memory prefix
    assert_same_loss_and_grads(StepPlan(process, segment, segment, [context]), prefill=process != "new_knowledge")


def test_gradient_checkpointing_new_knowledge_with_a_filled_pool():
    context, segment = torch.arange(10, 20), torch.arange(30, 40)
    assert_same_loss_and_grads(StepPlan("new_knowledge", segment, segment, [context]), prefill=True)


# ------------------------------------------------------------------ checkpoints
def test_resume_is_exact(tmp_path):
    values = tiny_config(tmp_path, checkpoint_every=3)
    values["model"]["lora"] = {**LORA, "lora_dropout": 0.1}  # dropout: the generators must be restored too
    straight = trainer_for(values)
    straight.train()
    values["output_dir"] = str(tmp_path / "resumed")
    values["checkpoint_every"] = 3
    first = trainer_for(values)
    first.train(steps=3)
    resumed = trainer_for(values)
    assert resumed.resume() and resumed.step == 3
    resumed.train()
    assert [r["process"] for r in resumed.history] == [r["process"] for r in straight.history]
    assert {r["process"] for r in straight.history} >= {"continuous", "forgetting"}
    assert [r["loss"] for r in resumed.history] == pytest.approx([r["loss"] for r in straight.history], abs=1e-6)
    for (name, a), b in zip(straight.model.named_parameters(), resumed.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=0, msg=name)
    torch.testing.assert_close(straight.model.memory, resumed.model.memory, atol=1e-7, rtol=0)
    checkpoint = tmp_path / "resumed" / "checkpoints" / "step-000006"
    saved = load_file(checkpoint / "trainables.safetensors")
    trainable = {n for n, p in resumed.model.named_parameters() if p.requires_grad}
    assert set(saved) == trainable and not any(n.endswith("proj.weight") for n in saved)  # only what trains
    assert (checkpoint / "rank-0" / "memory.safetensors").exists()


def test_exported_adapter_rebuilds_the_trained_model(tmp_path):
    trainer = trainer_for(tiny_config(tmp_path))
    trainer.train()
    model, tokenizer = load_trained_model(tmp_path / "run" / "adapter")
    assert tokenizer is not None and not model.training
    trained = dict(trainer.model.named_parameters())
    for name, param in model.named_parameters():
        torch.testing.assert_close(param, trained[name], atol=0, rtol=0, msg=name)
    for name in ("loss_curve.png", "losses.jsonl", "train_config.yaml"):
        assert (tmp_path / "run" / name).stat().st_size > 0
    # the evaluation harness takes the adapter folder as --model, with another pool size
    N = 2 * model.config.num_memory_tokens
    evaluated, _, info = load_eval_model(str(tmp_path / "run" / "adapter"), num_memory_tokens=N)
    assert evaluated.config.num_memory_tokens == N == info["memory"]["num_memory_tokens"]
    for name, param in evaluated.named_parameters():
        torch.testing.assert_close(param, trained[name], atol=0, rtol=0, msg=name)
    with pytest.raises(ValueError, match="trained with the 'output' rule"):
        load_trained_model(tmp_path / "run" / "adapter", memory_update="input")


def test_cli_trains_documents_and_writes_outputs(tmp_path):
    docs = tmp_path / "docs.txt"
    docs.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    out = tmp_path / "cli"
    assert (
        train_main(
            [
                "--config",
                str(CONFIGS / "tiny_kv.yaml"),
                "--output-dir",
                str(out),
                "--cpu",
                "--set",
                "optim.max_steps=4",
                "--set",
                "data.kind=documents",
                "--set",
                f"data.files=[{docs}]",
                "--set",
                "data.min_chunk_tokens=8",
                "--set",
                "data.max_chunk_tokens=16",
                "--set",
                "model.memory.min_inject_tokens=4",
                "--set",
                "objective.lm_ratio=0.5",
            ]
        )
        == 0
    )
    rows = [json.loads(line) for line in (out / "losses.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(r["loss"] > 0 for r in rows)
    assert (out / "adapter" / "trainables.safetensors").exists()


def test_evaluate_compares_trained_and_untrained(tmp_path):
    trainer = trainer_for(tiny_config(tmp_path))
    trainer.train()
    qa, text = tmp_path / "qa.jsonl", tmp_path / "text.jsonl"
    qa.write_text(json.dumps({"context": "Paris is in France.", "question": "Where is Paris?", "answers": ["France"]}))
    text.write_text(json.dumps({"text": "A short held-out paragraph."}))
    results = evaluate(str(tmp_path / "run" / "adapter"), str(qa), str(text), 5, 5, "cpu", "float32")
    assert results["questions"] == 1 and results["paragraphs"] == 1
    for name in ("trained", "untrained"):
        assert set(results[name]) == {"memory", "no_memory", "in_context", "ppl_no_memory", "wall_s"}
        assert results[name]["ppl_no_memory"] > 1


# ------------------------------------------------------------------ it learns
def test_tiny_model_learns_to_recall_through_memory(tmp_path):
    """Inject "k v k v", ask "k": after training the value comes back from memory (>= 90 %), while the untrained
    model and the trained model without its memory stay near chance (1 / 8)."""
    config = load_config(CONFIGS / "tiny_kv.yaml", [f"output_dir={tmp_path / 'kv'}"])
    trainer = Trainer(config, make_accelerator(config, cpu=True))
    task: KeyValueTask = trainer.examples
    held_out = range(10**6, 10**6 + 200)  # training uses indices 0 .. max_steps - 1
    before = recall_accuracy(trainer.model, task, held_out)
    trainer.train()
    after = recall_accuracy(trainer.model, task, held_out)
    without_memory = recall_accuracy(trainer.model, task, held_out, use_memory=False)
    print(f"recall: before {before:.3f}, after {after:.3f}, no memory {without_memory:.3f}, chance {task.chance:.3f}")
    assert before <= 2 * task.chance
    assert without_memory <= 2 * task.chance
    assert after >= 0.9
