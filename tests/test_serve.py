"""mbkernels.serve: the model path without Ray, then the application on a local Ray cluster on loopback (CPU).

Every HTTP call has a timeout, every request loop a bound; nothing leaves 127.0.0.1.
"""
import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

ray = pytest.importorskip("ray", reason="ray[serve] is not installed (pip install -r requirements-dev.txt)")
import psutil  # noqa: E402  (ray ships it, importable once ray is)
import timm  # noqa: E402
from PIL import Image  # noqa: E402
from ray import serve  # noqa: E402

from mbkernels import serve as mbserve  # noqa: E402

MODEL = "lcnet_050"
MAX_PIXELS = 1024 * 1024
REPO = Path(mbserve.__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def encode(image: Image.Image, image_format: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, image_format)
    return buffer.getvalue()


def noise_image(width: int, height: int, seed: int) -> Image.Image:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (height, width, 3), dtype=torch.uint8, generator=generator)
    return Image.fromarray(pixels.numpy())


# Different sizes and aspect ratios, so resize and center crop are exercised; one grayscale, converted to RGB.
IMAGES = {
    "png": (encode(noise_image(320, 240, 1), "PNG"), "image/png"),
    "jpeg": (encode(noise_image(200, 300, 2), "JPEG"), "image/jpeg"),
    "gray-png": (encode(noise_image(256, 256, 3).convert("L"), "PNG"), "application/octet-stream"),
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    torch.manual_seed(7)
    model = timm.create_model(MODEL, pretrained=False)
    for module in model.modules():  # non-trivial BN statistics, so folding BN into the fused kernels matters
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    path = tmp_path_factory.mktemp("checkpoint") / f"{MODEL}.pt"
    torch.save(model.state_dict(), path)
    return str(path)


@pytest.fixture(scope="module")
def expected(checkpoint) -> dict:
    """Top-5 of each image from the stock (unpatched) model, preprocessed with timm's eval transform."""
    model = timm.create_model(MODEL, pretrained=False)
    model.load_state_dict(torch.load(checkpoint, weights_only=True))
    model.eval()
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
    answers = {}
    with torch.inference_mode():
        for name, (body, _) in IMAGES.items():
            image = Image.open(io.BytesIO(body)).convert("RGB")
            probabilities = model(transform(image)[None]).softmax(-1)[0]
            values, indices = probabilities.topk(5)
            answers[name] = list(zip(indices.tolist(), values.tolist()))
    return answers


def assert_matches(payload: dict, want: list) -> None:
    assert [entry["index"] for entry in payload["top5"]] == [index for index, _ in want]
    for entry, (_, probability) in zip(payload["top5"], want):
        assert abs(entry["probability"] - probability) <= 1e-4


# ----------------------------------------------------------------------------------------- without Ray
def test_build_model_matches_stock(checkpoint, expected):
    model, transform, backend = mbserve.build_model(MODEL, checkpoint)
    assert backend == "reference"
    assert any(isinstance(m, mbserve.DWConvBNAct) for m in model.modules()), "nothing was fused"
    run_batch = mbserve.BatchClassifier(model, mbserve.data_config(model)["input_size"], max_batch_size=4)
    images = torch.stack([transform(mbserve.decode_image(body, MAX_PIXELS)) for body, _ in IMAGES.values()])
    for name, probabilities in zip(IMAGES, run_batch(images)):
        assert_matches({"top5": mbserve.top_classes(probabilities)}, expected[name])


def test_build_model_tuned_at_the_buckets_matches_stock(checkpoint, expected, tmp_path, monkeypatch):
    monkeypatch.setenv("MBKERNELS_TUNING_CACHE", str(tmp_path / "tuning.json"))
    model, transform, backend = mbserve.build_model(MODEL, checkpoint, tune_batches=[1, 2])
    assert backend.startswith("tuned: ")
    fused = [m for m in model.modules() if isinstance(m, mbserve.FusedModule)]
    assert fused and all(sorted(key[0][0] for key in m.tuned) == [1, 2] for m in fused)
    assert (tmp_path / "tuning.json").exists()
    run_batch = mbserve.BatchClassifier(model, mbserve.data_config(model)["input_size"], max_batch_size=4)
    images = torch.stack([transform(mbserve.decode_image(body, MAX_PIXELS)) for body, _ in IMAGES.values()])
    for name, probabilities in zip(IMAGES, run_batch(images)):
        assert_matches({"top5": mbserve.top_classes(probabilities)}, expected[name])


def test_the_tuning_table_is_the_one_named_for_every_replica(tmp_path, monkeypatch):
    monkeypatch.setenv("MBKERNELS_TUNING_CACHE", str(tmp_path / "shipped.json"))
    options = mbserve.resolve_options(mbserve.parse_args(["--model", MODEL]), cluster_gpus=0)
    assert options.tuning_table == str(tmp_path / "shipped.json") and options.tune
    named = mbserve.resolve_options(mbserve.parse_args(["--model", MODEL, "--tuning-table", "t.json", "--no-tune"]),
                                    cluster_gpus=0)
    assert named.tuning_table == os.path.abspath("t.json") and not named.tune
    actor = mbserve.replica_actor_options(named)
    assert actor["runtime_env"] == {"env_vars": {"MBKERNELS_TUNING_CACHE": os.path.abspath("t.json")}}
    monkeypatch.delenv("MBKERNELS_TUNING_CACHE")
    unnamed = mbserve.resolve_options(mbserve.parse_args(["--model", MODEL]), cluster_gpus=0)
    assert unnamed.tuning_table is None and "runtime_env" not in mbserve.replica_actor_options(unnamed)


def test_bucket_sizes():
    assert mbserve.bucket_sizes(1) == [1]
    assert mbserve.bucket_sizes(8) == [1, 2, 4, 8]
    assert mbserve.bucket_sizes(12) == [1, 2, 4, 8, 12]


def test_checkpoint_that_does_not_fit_is_refused(tmp_path):
    other = tmp_path / "other.pt"
    torch.save(timm.create_model("mobilenetv3_small_050", pretrained=False).state_dict(), other)
    with pytest.raises(ValueError, match=f"does not fit {MODEL}: .*missing keys"):
        mbserve.create_model(MODEL, str(other))



def test_checkpoint_that_is_no_state_dict_is_refused_in_our_words(tmp_path):
    garbage, pickled_model, missing = tmp_path / "garbage.pt", tmp_path / "model.pt", tmp_path / "missing.pt"
    garbage.write_bytes(b"not a checkpoint")
    torch.save(torch.nn.Linear(2, 2), pickled_model)  # a whole pickled module, not its state_dict
    training = tmp_path / "training.pt"
    torch.save({"model": torch.nn.Linear(2, 2).state_dict(), "epoch": 3}, training)  # a state_dict inside
    for path in (garbage, pickled_model, training):
        with pytest.raises(ValueError) as refused:
            mbserve.create_model(MODEL, str(path))
        assert str(refused.value) == (f"--checkpoint {path}: not a checkpoint this server reads: it reads a "
                                      "state_dict of tensors saved with torch.save(model.state_dict(), PATH)")
    with pytest.raises(ValueError, match=r"missing.pt: cannot be read \(No such file or directory\)$"):
        mbserve.create_model(MODEL, str(missing))


@pytest.mark.parametrize("name", ["tv:no_such_model", "timm:no_such_model", "hub:no_such_model"])
def test_a_model_no_library_has_is_refused(name):
    with pytest.raises(ValueError, match=f"model '{name}': .*(no_such_model|prefix)"):
        mbserve.create_model(name)


@pytest.mark.parametrize("problem", ["checkpoint", "model"])
def test_command_refuses_a_bad_checkpoint_or_model_before_serving(tmp_path, problem):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    args, message = {"checkpoint": (["--model", MODEL, "--checkpoint", str(garbage)],
                                    "not a checkpoint this server reads"),
                     "model": (["--model", "tv:no_such_model"], "has a model 'no_such_model'")}[problem]
    done = run_command(args, capture_output=True, timeout=120)
    assert done.returncode == 2
    assert message in done.stderr and "Ray" not in done.stderr  # refused before any cluster started
    assert len(done.stderr.splitlines()) == 1 and "weights_only" not in done.stderr  # in one line, ours


CLI_BAD_VALUES = {
    "replicas": (["--replicas", "0"], "--replicas must be at least 1"),
    "max-batch-size": (["--max-batch-size", "-1"], "--max-batch-size must be at least 1"),
    "batch-wait-ms": (["--batch-wait-ms", "-5"], "--batch-wait-ms must be at least 0"),
    "port": (["--port", "70000"], "--port must be from 1 to 65535, got 70000"),
    "port-not-int": (["--port", "http"], "argument --port: invalid int value: 'http'"),
    "dtype": (["--dtype", "float64"], "argument --dtype: invalid choice: 'float64'"),
    "num-cpus-with-address": (["--address", "h:6379", "--num-cpus", "2"], "--num-cpus sizes a local cluster"),
}


@pytest.mark.parametrize("argv, message", list(CLI_BAD_VALUES.values()), ids=list(CLI_BAD_VALUES))
def test_cli_bad_option_value_is_one_line_and_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exited:
        mbserve.parse_args(["--model", MODEL, *argv])
    err = capsys.readouterr().err.splitlines()
    assert exited.value.code == 2
    assert len(err) == 1 and err[0].startswith("python -m mbkernels.serve: error: ") and message in err[0]


def test_cli_every_option_has_help():
    assert all(action.help for action in mbserve.make_parser()._actions)


# ----------------------------------------------------------------------------------------- the command
def run_command(args, **kwargs):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    command = [sys.executable, "-m", "mbkernels.serve", *args]
    if "timeout" in kwargs:
        return subprocess.run(command, env=env, text=True, **kwargs)
    return subprocess.Popen(command, env=env, text=True, **kwargs)


def wait_for_line(stream, marker: str, timeout: float) -> str:
    """The first line of stream containing marker, read on a thread so that the wait is bounded."""
    found = []

    def read():
        for line in stream:
            if marker in line:
                found.append(line)
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout)
    assert found, f"no line with {marker!r} within {timeout} s"
    return found[0]


def test_command_serves_then_sigint_stops_everything(tmp_path, checkpoint, expected):
    """Runs first, before the module's cluster starts: two clusters at once crowd two cores."""
    port = free_port()
    log = (tmp_path / "serve.log").open("w")
    process = run_command(["--model", MODEL, "--checkpoint", checkpoint, "--port", str(port), "--num-cpus", "1",
                           "--max-batch-size", "4"], stdout=subprocess.PIPE, stderr=log)
    try:
        line = wait_for_line(process.stdout, "listening on", timeout=180)
        assert f"http://127.0.0.1:{port}" in line
        body, content_type = IMAGES["jpeg"]
        status, payload, _ = mbserve.classify(f"http://127.0.0.1:{port}", body, content_type)
        assert status == 200, payload
        assert_matches(payload, expected["jpeg"])
        # Everything the command started (GCS, raylet, workers, replicas) descends from it.
        started = psutil.Process(process.pid).children(recursive=True)
        assert any("raylet" in " ".join(p.cmdline()) for p in started)
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=90) == 0
        _, alive = psutil.wait_procs(started, timeout=30)
        assert not alive, f"left behind: {[' '.join(p.cmdline())[:80] for p in alive]}"
    finally:
        if process.poll() is None:
            process.kill()
        log.close()


# ----------------------------------------------------------------------------------------- on a Ray cluster
@pytest.fixture(scope="module")
def server(checkpoint):
    """The application on a local two-CPU cluster: two replicas, batches of up to 8 gathered for 50 ms."""
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    options = mbserve.ServeOptions(MODEL, checkpoint, replicas=2, max_batch_size=8, batch_wait_ms=50,
                                   max_pixels=MAX_PIXELS, port=free_port())
    try:
        mbserve.run_application(options)
        yield options.url
    finally:
        serve.shutdown()
        ray.shutdown()


def replica_actors() -> list:
    return sorted((actor["name"], actor["namespace"]) for actor in ray.util.list_named_actors(all_namespaces=True)
                  if actor["name"].startswith("SERVE_REPLICA::") and mbserve.DEPLOYMENT_NAME in actor["name"])


def wait_healthy(url: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        status, payload = mbserve.http_request(f"{url}/healthz", timeout=30)
        if status == 200 or time.monotonic() > deadline:
            return status, payload
        time.sleep(1)


def test_healthz_once_every_replica_runs(server):
    status, payload = wait_healthy(server)
    assert status == 200 and payload["ready"] and payload["replicas_running"] == 2, payload


@pytest.mark.parametrize("name", IMAGES)
def test_answers_equal_stock(server, expected, name):
    body, content_type = IMAGES[name]
    status, payload, _ = mbserve.classify(server, body, content_type)
    assert status == 200, payload
    assert payload["model"] == MODEL and payload["backend"] == "reference"
    assert_matches(payload, expected[name])


def test_concurrent_requests_are_batched(server, expected):
    body, content_type = IMAGES["png"]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: mbserve.classify(server, body, content_type), range(24)))
    for status, payload, _ in answers:
        assert status == 200, payload
        assert_matches(payload, expected["png"])
    replicas = {}
    for _ in range(20):  # each GET /stats reaches one replica: ask until both have answered
        status, stats = mbserve.http_request(f"{server}/stats", timeout=30)
        assert status == 200
        replicas[stats["replica"]] = stats
        if len(replicas) == 2:
            break
    largest = max(int(size) for stats in replicas.values() for size in stats["batch_sizes"])
    assert largest > 1, replicas
    assert all(stats["latency_ms"]["p99"] >= stats["latency_ms"]["p50"] > 0 for stats in replicas.values())


def truncated(name: str) -> bytes:
    body = IMAGES[name][0]
    return body[: len(body) // 2]


BAD_INPUTS = {
    "not an image": (b"hello, this is text", "image/png", "not a PNG or JPEG image"),
    "truncated png": (truncated("png"), "image/png", "truncated"),
    "truncated jpeg": (truncated("jpeg"), "image/jpeg", "truncated"),
    "empty body": (b"", "image/png", "empty body"),
    "over the pixel limit": (encode(Image.new("RGB", (1500, 1000)), "PNG"), "image/png", "over the limit"),
    "gif": (encode(Image.new("RGB", (64, 64)), "GIF"), "image/gif", "unsupported Content-Type"),
    "gif as octet-stream": (encode(Image.new("RGB", (64, 64)), "GIF"), "application/octet-stream",
                            "not a PNG or JPEG"),
    "text/plain": (IMAGES["png"][0], "text/plain", "unsupported Content-Type"),
    "multipart": (IMAGES["png"][0], "multipart/form-data; boundary=x", "unsupported Content-Type"),
}


@pytest.mark.parametrize("name", BAD_INPUTS)
def test_bad_input_gets_400_and_serving_goes_on(server, expected, name):
    body, content_type, reason = BAD_INPUTS[name]
    status, payload = mbserve.http_request(f"{server}/classify", "POST", body, content_type)
    assert status == 400, payload
    assert reason in payload["error"] and "\n" not in payload["error"]
    status, payload, _ = mbserve.classify(server, *IMAGES["png"])
    assert status == 200
    assert_matches(payload, expected["png"])


def test_wrong_path_and_method(server):
    assert mbserve.http_request(f"{server}/nowhere")[0] == 404
    assert mbserve.http_request(f"{server}/classify")[0] == 405
    assert mbserve.http_request(f"{server}/healthz", "POST", b"", "image/png")[0] == 405


def test_replica_killed_under_load_is_replaced_and_no_request_lost(server, expected):
    """Four clients send requests until a replacement replica runs (or a bound is hit); each retries what the
    server refused or failed, and every request must end answered, and answered right."""
    before = replica_actors()
    assert len(before) == 2
    victim = before[0]
    body, content_type = IMAGES["jpeg"]
    replaced, answers, lock = threading.Event(), [], threading.Lock()
    deadline = time.monotonic() + 150

    def client():
        for _ in range(1000):  # bounded in count and time; the time bound is the one meant to end it
            if replaced.is_set() or time.monotonic() > deadline:
                return
            answer = mbserve.classify(server, body, content_type, attempts=40)
            with lock:
                answers.append(answer)

    clients = [threading.Thread(target=client) for _ in range(4)]
    for thread in clients:
        thread.start()
    try:
        while not answers and time.monotonic() < deadline:
            time.sleep(0.1)
        ray.kill(ray.get_actor(victim[0], namespace=victim[1]), no_restart=True)
        while time.monotonic() < deadline:
            current = replica_actors()
            if len(current) == 2 and victim not in current and wait_healthy(server, timeout=0)[0] == 200:
                break
            time.sleep(0.5)
        answered_before = len(answers)
        time.sleep(2)  # load on the replaced set too
    finally:
        replaced.set()
        for thread in clients:
            thread.join(timeout=240)
    after = replica_actors()
    assert len(after) == 2 and victim not in after, after
    assert len(answers) > answered_before, "no request answered after the replacement"
    for status, payload, _ in answers:
        assert status == 200, payload
        assert_matches(payload, expected["jpeg"])
    retried = sum(attempts > 1 for _, _, attempts in answers)
    print(f"\nreplica {victim[0]} killed under load: {len(answers)} of {len(answers)} answered, {retried} after retries")
