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
