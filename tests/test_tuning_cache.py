"""mbkernels.planner.cache: hits and misses per environment and signature, files that are not ours or cannot be
written (one warning, never a crash, never overwritten), processes tuning at once, the environment variables."""
import json
import multiprocessing
import os
import stat
import warnings

import pytest
import torch

import mbkernels
from mbkernels.planner import cache
from mbkernels.planner.cache import TuningCache, TuningCacheWarning

ENV = {"device_type": "cuda", "device": "NVIDIA H200", "capability": "9.0", "cuda": "13.0", "torch": "2.14.1",
       "triton": "3.8.0", "mbkernels": "0.1.0", "triton_interpret": False}
SIGNATURE = {"op": "dwconv_bn_act", "shape": [8, 72, 28, 28], "strides": [56448, 1, 2016, 72], "dtype": "float16",
             "activation": "hardswish", "kernel": [5, 5], "stride": 2}
RECORD = {"choice": "triton", "ms": {"stock": 0.031, "triton": 0.019, "cuda": 0.022}}


def new_process(monkeypatch):
    """From here on, as a new process: no file read yet (the in-process memo empty)."""
    monkeypatch.setattr(cache, "_FILES", {})


@pytest.fixture(autouse=True)
def fresh_process(monkeypatch):
    new_process(monkeypatch)


def load(path, env=ENV):
    return TuningCache.load(None, path, env=env)


def saved(path, signature=SIGNATURE, record=RECORD, env=ENV):
    table = load(path, env)
    table.put(signature, record)
    assert table.save()
    return table


def test_a_saved_record_is_a_hit_here_and_in_the_next_process(tmp_path, monkeypatch):
    path = tmp_path / "tuning.json"
    table = load(path)
    assert table.get(SIGNATURE) is None
    table.put(SIGNATURE, RECORD)
    assert table.get(SIGNATURE) == RECORD
    assert table.save() and not table.save()  # nothing new the second time
    new_process(monkeypatch)
    assert load(path).get(SIGNATURE) == RECORD
    assert load(path).get(dict(reversed(list(SIGNATURE.items())))) == RECORD  # key order is no part of it
    content = json.loads(path.read_text())
    assert (content["format"], content["version"]) == (cache.FORMAT, cache.VERSION)


def test_the_file_is_read_once_per_process(tmp_path, monkeypatch):
    path = tmp_path / "tuning.json"
    saved(path)
    new_process(monkeypatch)
    reads = []
    parse = cache._parse
    monkeypatch.setattr(cache, "_parse", lambda data: reads.append(1) or parse(data))
    assert load(path).get(SIGNATURE) == RECORD
    assert load(str(path)).get(SIGNATURE) == RECORD
    assert len(reads) == 1


def test_the_record_is_a_copy_and_must_be_json(tmp_path):
    table = load(tmp_path / "tuning.json")
    record = {"choice": "triton", "ms": {"triton": 0.5}}
    table.put(SIGNATURE, record)
    record["ms"]["triton"] = 9.0
    assert table.get(SIGNATURE)["ms"]["triton"] == 0.5
    with pytest.raises(ValueError):
        table.put(SIGNATURE, {"ms": float("nan")})  # not strict JSON
    with pytest.raises(TypeError):
        table.put({"shape": torch.Size([1]), "x": object()}, RECORD)


@pytest.mark.parametrize("field", sorted(ENV))
def test_a_change_in_any_environment_field_is_a_miss(tmp_path, monkeypatch, field):
    path = tmp_path / "tuning.json"
    saved(path)
    other = dict(ENV, **{field: "other" if isinstance(ENV[field], str) else not ENV[field]})
    saved(path, record={"choice": "stock"}, env=other)  # both environments' tables in one file
    new_process(monkeypatch)
    assert load(path).get(SIGNATURE) == RECORD
    assert load(path, other).get(SIGNATURE) == {"choice": "stock"}
    assert load(path, dict(ENV, threads=4)).get(SIGNATURE) is None  # an added field: another environment
    assert len(json.loads(path.read_text())["tables"]) == 2


@pytest.mark.parametrize("field", sorted(SIGNATURE))
def test_a_change_in_any_signature_field_is_a_miss(tmp_path, field):
    table = saved(tmp_path / "tuning.json")
    value = SIGNATURE[field]
    changed = [v + 1 for v in value] if isinstance(value, list) else value + 1 if isinstance(value, int) else "x"
    assert table.get(dict(SIGNATURE, **{field: changed})) is None
    assert table.get({k: v for k, v in SIGNATURE.items() if k != field}) is None
    assert table.get(SIGNATURE) == RECORD
    table.put("a plain string signature", RECORD)
    assert table.get("a plain string signature") == RECORD


def cuda_device(monkeypatch, name="NVIDIA H200", capability=(9, 0)):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)


# Each source of an environment field, changed: the environment (the table's key) changes with it. The versions
# set are ones no installed stack has (a real one could be the stack this runs on).
SOURCES = {
    "device name": lambda mp: cuda_device(mp, name="NVIDIA A100-SXM4-80GB"),
    "capability": lambda mp: cuda_device(mp, capability=(8, 0)),
    "cuda": lambda mp: mp.setattr(torch.version, "cuda", "0.1"),
    "torch": lambda mp: mp.setattr(torch, "__version__", "0.0.1"),
    "triton": lambda mp: mp.setattr(__import__("triton"), "__version__", "0.0.1"),
    "mbkernels": lambda mp: mp.setattr(cache, "installed_version", lambda: "0.0.1"),
    "triton interpreter": lambda mp: mp.setenv("TRITON_INTERPRET", "1"),
}


@pytest.mark.parametrize("source", sorted(SOURCES))
def test_the_cuda_environment_follows_each_source(monkeypatch, source):
    pytest.importorskip("triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cuda_device(monkeypatch)
    before = cache.environment("cuda")
    assert before["device"] == "NVIDIA H200" and before["capability"] == "9.0"
    assert (before["torch"], before["mbkernels"]) == (torch.__version__, mbkernels.__version__)
    SOURCES[source](monkeypatch)
    assert cache.environment(torch.device("cuda", 0)) != before


def test_the_cpu_environment_names_the_cpu_and_the_threads(monkeypatch):
    threads = torch.get_num_threads()
    env = cache.environment("cpu")
    assert env["device_type"] == "cpu" and env["device"] and env["threads"] == threads
    try:
        torch.set_num_threads(threads + 1)
        assert cache.environment("cpu")["threads"] == threads + 1
    finally:
        torch.set_num_threads(threads)


def valid_file_bytes(tmp_path) -> bytes:
    source = tmp_path / "valid.json"
    saved(source)
    return source.read_bytes()


# name -> (the file's bytes given a valid file's bytes, words the warning must contain)
UNUSABLE = {
    "corrupt": (lambda valid: b"{\"format\": \"mbkernels-tuning\", \"version\": 1, tables", "not valid JSON"),
    "truncated": (lambda valid: valid[:len(valid) // 2], "not valid JSON"),
    "binary": (lambda valid: b"\xff\xfe\x00\x01garbage", "not valid JSON"),
    "foreign-list": (lambda valid: b"[1, 2, 3]", "not an mbkernels tuning file"),
    "foreign-dict": (lambda valid: b"{\"entries\": {}}", "not an mbkernels tuning file"),
    "other-version": (lambda valid: valid.replace(b"\"version\": 1", b"\"version\": 2"), "format version 2"),
    "bad-tables": (lambda valid: json.dumps({"format": cache.FORMAT, "version": cache.VERSION,
                                             "tables": {"x": 1}}).encode(), "\"tables\""),
}


@pytest.mark.parametrize("kind", sorted(UNUSABLE))
def test_an_unusable_file_warns_once_is_ignored_and_left_alone(tmp_path, monkeypatch, kind):
    make, words = UNUSABLE[kind]
    content = make(valid_file_bytes(tmp_path))
    path = tmp_path / "tuning.json"
    path.write_bytes(content)
    new_process(monkeypatch)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        table = load(path)
        assert table.get(SIGNATURE) is None  # the truncated file held this entry: never a guess from its rest
        table.put(SIGNATURE, {"choice": "stock"})
        assert table.get(SIGNATURE) == {"choice": "stock"}  # kept in memory for the process
        assert not table.save()
        assert not load(path).save()
    assert [w.category for w in caught] == [TuningCacheWarning]
    message = str(caught[0].message)
    assert str(path) in message and words in message and "left as it is" in message and "not saved" in message
    assert path.read_bytes() == content


def test_an_empty_file_is_an_empty_table(tmp_path):
    path = tmp_path / "tuning.json"
    path.write_bytes(b"")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        saved(path)
    assert load(path).get(SIGNATURE) == RECORD


def test_a_file_replaced_by_a_foreign_one_after_loading_is_not_overwritten(tmp_path):
    path = tmp_path / "tuning.json"
    table = load(path)
    path.write_bytes(b"[\"someone else's\"]")
    table.put(SIGNATURE, RECORD)
    with pytest.warns(TuningCacheWarning, match="left as it is"):
        assert not table.save()
    assert path.read_bytes() == b"[\"someone else's\"]"


def test_save_merges_what_another_process_wrote_since_loading(tmp_path, monkeypatch):
    path = tmp_path / "tuning.json"
    saved(path, signature="first")
    mine = load(path)
    new_process(monkeypatch)
    saved(path, signature="theirs", record={"choice": "cuda"})  # another process, after this one read the file
    mine.put("mine", RECORD)
    assert mine.save()
    assert mine.get("theirs") == {"choice": "cuda"}
    new_process(monkeypatch)
    after = load(path)
    assert [after.get(s) for s in ("first", "theirs", "mine")] == [RECORD, {"choice": "cuda"}, RECORD]


def _tune_concurrently(path, worker, rounds, barrier):
    """One process: each round, one new entry put and saved (the file merged under the lock each time)."""
    barrier.wait()
    for r in range(rounds):
        table = TuningCache.load(None, path, env=ENV)
        table.put({"worker": worker, "round": r}, {"choice": f"w{worker}r{r}"})
        table.save()


def test_processes_tuning_at_once_lose_no_entry(tmp_path):
    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("needs fork (a spawned process would import torch again: seconds each)")
    context = multiprocessing.get_context("fork")
    path, workers, rounds = str(tmp_path / "tuning.json"), 4, 12
    barrier = context.Barrier(workers)
    processes = [context.Process(target=_tune_concurrently, args=(path, w, rounds, barrier)) for w in range(workers)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
        assert process.exitcode == 0
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".tuning.json.")]  # no temporary left
    table = load(path)
    lost = [(w, r) for w in range(workers) for r in range(rounds)
            if table.get({"worker": w, "round": r}) != {"choice": f"w{w}r{r}"}]
    assert lost == []


def test_a_read_only_file_is_read_but_never_written(tmp_path, monkeypatch):
    path = tmp_path / "tuning.json"
    saved(path)
    content = path.read_bytes()
    path.chmod(0o444)
    new_process(monkeypatch)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        table = load(path)
        assert table.get(SIGNATURE) == RECORD
        table.put("new", {"choice": "cuda"})
        assert not table.save() and not table.save()
        assert table.get("new") == {"choice": "cuda"}  # kept in memory for the process
    assert len(caught) == 1 and "read-only" in str(caught[0].message) and str(path) in str(caught[0].message)
    assert path.read_bytes() == content


def test_a_path_that_cannot_be_a_file_keeps_results_in_memory(tmp_path):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the cache directory would be")
    path = blocker / "mbkernels" / "tuning.json"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        table = load(path)
        table.put(SIGNATURE, RECORD)
        assert not table.save() and not table.save()
    assert len(caught) == 1 and str(path) in str(caught[0].message)
    assert "cannot be read" in str(caught[0].message) and "kept in memory" in str(caught[0].message)
    assert table.get(SIGNATURE) == RECORD


def test_a_write_the_system_refuses_keeps_results_in_memory(tmp_path, monkeypatch):
    """A directory the user may not write (simulated: as root, permissions refuse nothing)."""
    path = tmp_path / "tuning.json"
    saved(path, signature="first")
    content = path.read_bytes()
    new_process(monkeypatch)
    table = load(path)
    table.put(SIGNATURE, RECORD)

    def refuse(*args):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(os, "replace", refuse)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert not table.save() and not table.save()
    assert len(caught) == 1 and "cannot be written" in str(caught[0].message)
    assert "Permission denied" in str(caught[0].message)
    assert table.get(SIGNATURE) == RECORD and table.get("first") == RECORD
    assert path.read_bytes() == content
    assert sorted(os.listdir(tmp_path)) == ["tuning.json", "tuning.json.lock"]  # the temporary file removed


def test_saving_keeps_the_file_permissions(tmp_path):
    path = tmp_path / "tuning.json"
    saved(path, signature="first")
    path.chmod(0o640)
    saved(path, signature="second")
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


def test_the_cache_path_follows_the_environment_variables(tmp_path, monkeypatch):
    monkeypatch.setenv("MBKERNELS_TUNING_CACHE", str(tmp_path / "mine.json"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.cache_path() == tmp_path / "mine.json"
    table = TuningCache.load("cpu")
    assert table.path == tmp_path / "mine.json"
    assert table.environment == cache.environment("cpu")
    table.put(SIGNATURE, RECORD)
    table.save()
    assert (tmp_path / "mine.json").exists()
    monkeypatch.delenv("MBKERNELS_TUNING_CACHE")
    assert cache.cache_path() == tmp_path / "xdg" / "mbkernels" / "tuning.json"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache.cache_path() == tmp_path / "home" / ".cache" / "mbkernels" / "tuning.json"


@pytest.mark.parametrize("value, enabled", [(None, True), ("1", True), ("0", False), ("off", False),
                                            (" False ", False), ("no", False)])
def test_mbkernels_tune_turns_tuning_off(monkeypatch, value, enabled):
    if value is None:
        monkeypatch.delenv("MBKERNELS_TUNE", raising=False)
    else:
        monkeypatch.setenv("MBKERNELS_TUNE", value)
    assert cache.tuning_enabled() is enabled
