"""Several read modes in one run (`--read-modes`): the memory is written once, every mode asks in turn, and each
mode's records and metrics equal those of a run of that mode alone; resumed and sharded runs of several modes equal
an unbroken run."""

import json

import pytest
import torch

from memoryllm_hf.evaluation.cli import main
from memoryllm_hf.modeling import MemoryLlamaConfig

from test_eval_stream import STREAM_ARGS, _data
from test_evaluation import _drop_times, data_dir  # noqa: F401 (a fixture)

MODES = ("pool", "retrieve")
STORE = ("--set", "long_term_memory_tokens=256")
TASK_ARGS = {
    "editing": ["editing", "--sequential", "--prompt-style", "plain", "--limit", "3"],
    "longcontext": ["longcontext", "--max-new-tokens", "12", "--prompt-style", "chat", "--limit", "3"],
    "integrity": ["integrity", "--updates", "7", "--record-every", "2", "--probe-every", "1", "--max-new-tokens", "3",
                  "--limit", "3"],
}  # fmt: skip

pytestmark = pytest.mark.skipif(
    "read_mode" not in MemoryLlamaConfig().to_dict(), reason="the model has no read modes"
)


def _run(argv, out) -> dict:
    assert main(["eval", *argv, "--model", "tiny", *STORE, "--output", str(out)]) == 0
    return json.loads(out.read_text())


def _mode_records(value):
    """Records without wall times and without the read mode a record of several modes carries."""
    value = _drop_times(value)
    if isinstance(value, list):
        return [_mode_records(v) for v in value]
    if isinstance(value, dict):
        return {k: _mode_records(v) for k, v in value.items() if k not in ("read_mode", "batch_rows")}
    return value


MODE_FIELDS = ("metrics", "records", "sequential", "rows")


def _assert_modes_equal_single_runs(multi: dict, singles: dict) -> None:
    assert multi["read_modes"] == list(MODES) and "records" not in multi
    for mode, single in singles.items():
        part = multi["by_read_mode"][mode]
        assert set(part) == {field for field in MODE_FIELDS if field in single}
        for field in part:
            assert _mode_records(part[field]) == _mode_records(single[field]), (mode, field)
        for record in part.get("records", part.get("rows", [])):
            if record.get("kind") != "once":
                assert record["read_mode"] == mode


def _memory_answers(part: dict) -> list:
    records = part.get("records") or part["rows"]
    return [record.get("memory", record.get("hits")) for record in records]


@pytest.fixture
def stream_folder(tmp_path):
    data = _data(4, related={30: "R2"})
    folder = tmp_path / "stream-data"
    folder.mkdir()
    for name, rows in (("squad_qa.jsonl", data.examples), ("squad_paragraphs.jsonl", data.unrelated)):
        (folder / name).write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder


def _task_argv(task, data_dir, stream_folder):
    if task == "retention":
        return [*STREAM_ARGS[:1], *STREAM_ARGS[3:], "--data", str(stream_folder)]
    return [*TASK_ARGS[task], "--data", str(data_dir)]


@pytest.mark.parametrize("task", ["retention", "editing", "longcontext", "integrity"])
def test_a_run_of_several_read_modes_equals_the_runs_of_each(
    data_dir, stream_folder, tmp_path, monkeypatch, task  # noqa: F811
):
    if task == "integrity":  # the tiny model hits nothing: let the retrieve read hit at every third injection
        from memoryllm_hf.evaluation import integrity

        probe = integrity.probe

        def distinct(model, *args):
            hit = probe(model, *args)
            return hit or (model.config.read_mode == "retrieve" and model.num_injections % 3 == 0)

        monkeypatch.setattr(integrity, "probe", distinct)
    argv = _task_argv(task, data_dir, stream_folder)
    singles = {mode: _run([*argv, "--read-mode", mode], tmp_path / f"{mode}.json") for mode in MODES}
    multi = _run([*argv, "--read-modes", *MODES], tmp_path / "multi.json")
    _assert_modes_equal_single_runs(multi, singles)
    # the modes answer differently here, so a run that read with one mode for both would fail the test
    assert _memory_answers(multi["by_read_mode"]["pool"]) != _memory_answers(multi["by_read_mode"]["retrieve"])
    assert multi["config"]["read_modes"] == list(MODES) and multi["model"]["read"]["read_modes"] == list(MODES)
    from memoryllm_hf.evaluation.report import report

    text = report(tmp_path / "multi.json")
    assert "*pool read*" in text and "*retrieve read*" in text and "--read-modes pool retrieve" in text


@pytest.mark.parametrize("stop", [3, 4])
@pytest.mark.parametrize("task", ["retention", "editing", "longcontext", "integrity"])
def test_a_run_of_several_modes_stopped_anywhere_resumes_to_the_unbroken_run(
    data_dir, stream_folder, tmp_path, monkeypatch, task, stop  # noqa: F811
):
    """Stopped at the `stop`-th record (between two modes' records of one item, or between items), resumed: every
    mode's records and metrics equal an unbroken run's."""
    from memoryllm_hf.evaluation import records as records_module

    argv = [*_task_argv(task, data_dir, stream_folder), "--read-modes", *MODES]
    whole = _run(argv, tmp_path / "whole.json")
    add, calls = records_module.RecordLog.add, []

    def interrupted(log, key, index, record):
        calls.append(key)
        if len(calls) == stop:
            raise KeyboardInterrupt
        add(log, key, index, record)

    monkeypatch.setattr(records_module.RecordLog, "add", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _run(argv, tmp_path / "cut.json")
    monkeypatch.setattr(records_module.RecordLog, "add", add)
    assert {key.split("/")[0] for key in calls[:stop] if "/" in key} <= set(MODES)
    resumed = _run([*argv, "--resume"], tmp_path / "cut.json")
    assert _mode_records(resumed["by_read_mode"]) == _mode_records(whole["by_read_mode"])


@pytest.mark.parametrize("task", ["retention", "editing"])
def test_shards_of_a_run_of_several_modes_merge_to_the_whole_run(
    data_dir, stream_folder, tmp_path, task  # noqa: F811
):
    from memoryllm_hf.evaluation.report import main as report_main

    argv = [*_task_argv(task, data_dir, stream_folder), "--read-modes", *MODES]
    whole = _run(argv, tmp_path / "whole.json")
    for shard in range(2):
        _run([*argv, "--shard", f"{shard}/2"], tmp_path / f"s{shard}.json")
    shards = [str(tmp_path / f"s{shard}.json") for shard in (1, 0)]
    assert report_main(["--merge", str(tmp_path / "merged.json"), *shards]) == 0
    merged = json.loads((tmp_path / "merged.json").read_text())
    assert [s["shard"] for s in merged.pop("shards")] == [[0, 2], [1, 2]]
    assert _mode_records(merged) == _mode_records(whole)  # (a shard's batches hold other rows: batch_rows differ)
    assert [r["read_mode"] for r in merged["by_read_mode"]["retrieve"]["records"] if "memory" in r][:1] == ["retrieve"]
    for mode in MODES:
        assert (tmp_path / f"merged-{mode}.png").exists() == (task == "retention" or task == "editing")


def test_a_log_written_before_read_modes_resumes_and_reports(data_dir, tmp_path):  # noqa: F811
    """A single-mode log whose header has no `read_modes` entry (as every log before this option) resumes with
    the same records, and its results file reports as before."""
    from memoryllm_hf.evaluation.records import CHECKSUM, checksum
    from memoryllm_hf.evaluation.report import report

    argv = [*TASK_ARGS["editing"], "--data", str(data_dir), "--read-mode", "pool"]
    whole = _run(argv, tmp_path / "whole.json")
    log = tmp_path / "old.records.jsonl"
    lines = (tmp_path / "whole.records.jsonl").read_text().splitlines()
    header = json.loads(lines[0])
    assert header["header"]["config"].pop("read_modes") is None
    header[CHECKSUM] = checksum(header)
    log.write_text("\n".join([json.dumps(header), *lines[1:3]]) + "\n")  # the header and two records
    resumed = _run([*argv, "--resume"], tmp_path / "old.json")
    assert "by_read_mode" not in resumed
    assert _drop_times(resumed["records"]) == _drop_times(whole["records"])
    assert _drop_times(resumed["metrics"]) == _drop_times(whole["metrics"])
    assert "read)" in report(tmp_path / "old.json") and "*pool read*" not in report(tmp_path / "old.json")


def test_switching_the_read_mode_between_reads_leaks_no_cache():
    """One model, one memory: reads alternating between pool and retrieve give each mode's logits of a model that
    only ever read with that mode (the read objects' caches do not leak into the other mode)."""
    from memoryllm_hf.evaluation.modes import ReadModes
    from memoryllm_hf.tiny import tiny_model

    def model(read_mode):
        found = tiny_model(seed=3, long_term_memory_tokens=256, read_mode=read_mode)
        for text in range(6):
            found.inject(torch.randint(4, 90, (40,), generator=torch.Generator().manual_seed(text)), progress=False)
        return found

    prompt = torch.randint(4, 90, (2, 12), generator=torch.Generator().manual_seed(9))

    def logits(found):
        with torch.no_grad():
            return found(input_ids=prompt, attention_mask=torch.ones_like(prompt)).logits

    alone = {mode: logits(model(mode)) for mode in MODES}
    assert not torch.equal(alone["pool"], alone["retrieve"])
    shared = model("pool")
    modes = ReadModes(shared, MODES)
    for mode in [*MODES, *MODES[::-1], *MODES]:
        with modes.reading(mode):
            assert shared.config.read_mode == mode
            torch.testing.assert_close(logits(shared), alone[mode], rtol=0, atol=1e-6)
    assert shared.config.read_mode == "pool"
    with pytest.raises(ValueError, match="read mode 'banana' cannot be served"):
        ReadModes(shared, ["pool", "banana"])


def test_a_retrieve_read_of_nothing_is_not_the_no_memory_answer():
    """Why no shortcut is taken for prompts that read nothing (every injection below the retrieval threshold):
    such a row still reads the memory's `[bos]` prefix, so its answer is not the base model's (no-memory) answer;
    every mode's memory answers are computed."""
    from memoryllm_hf.tiny import tiny_model

    model = tiny_model(seed=3, long_term_memory_tokens=256, read_mode="retrieve", retrieval_threshold=1e9)
    for text in range(3):
        model.inject(torch.randint(4, 90, (40,), generator=torch.Generator().manual_seed(text)), progress=False)
    prompt = torch.randint(4, 90, (1, 12), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        read = model(input_ids=prompt, attention_mask=torch.ones_like(prompt)).logits
        assert model.last_retrieval == [[]] and model.config.add_bos_embedding
        plain = model(input_ids=prompt, attention_mask=torch.ones_like(prompt), use_memory=False).logits
    assert not torch.allclose(read, plain, atol=1e-3)


def test_the_pool_read_does_not_depend_on_a_long_term_store_beside_it(data_dir, tmp_path):  # noqa: F811
    """A run of several modes builds a model with a long-term store (for retrieve); its pool answers equal those of
    a pool-only model without a store (the store is written beside the pool, not instead of it)."""
    argv = [*TASK_ARGS["editing"], "--data", str(data_dir)]
    alone = ["eval", *argv, "--model", "tiny", "--read-mode", "pool", "--output", str(tmp_path / "pool.json")]
    assert main(alone) == 0
    pool = json.loads((tmp_path / "pool.json").read_text())
    assert pool["model"]["read"]["long_term_memory_tokens"] == 0
    multi = _run([*argv, "--read-modes", *MODES], tmp_path / "multi.json")
    for field in ("metrics", "records", "sequential"):
        assert _mode_records(multi["by_read_mode"]["pool"][field]) == _mode_records(pool[field]), field


def test_read_mode_options_are_checked(data_dir, tmp_path):  # noqa: F811
    out = str(tmp_path / "x.json")
    base = ["eval", "retention", "--model", "tiny", "--data", str(data_dir), "--output", out]
    with pytest.raises(ValueError, match="not both"):
        main([*base, "--read-mode", "pool", "--read-modes", "pool", "retrieve"])
    with pytest.raises(ValueError, match="per-question protocol once per --read-mode"):
        main([*base, "--protocol", "per-question", "--read-modes", "pool", "retrieve"])
    with pytest.raises(ValueError, match="read mode 'retrieve' cannot be served.*long_term_memory_tokens"):
        main(["eval", *TASK_ARGS["longcontext"], "--data", str(data_dir), "--model", "tiny", "--output", out,
              "--read-modes", "pool", "retrieve"])
    assert not (tmp_path / "x.records.jsonl").exists()
