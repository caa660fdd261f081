"""CPU smoke run of benchmarks/serve_load.py: a tiny bounded load on a local cluster, every request answered."""
import json

import pytest

pytest.importorskip("ray", reason="ray[serve] is not installed (pip install -r requirements-dev.txt)")

from benchmarks import serve_load  # noqa: E402


def test_serve_load_smoke(tmp_path, capsys):
    out = tmp_path / "serve_load.json"
    code = serve_load.main(["--model", "lcnet_050", "--device", "cpu", "--replicas", "1", "--max-batch-size", "4",
                            "--batch-wait-ms", "20", "--requests", "40", "--concurrency", "4", "--num-cpus", "2",
                            "--json", str(out)])
    print(capsys.readouterr().out)
    assert code == 0
    [row] = json.loads(out.read_text())["rows"]
    assert row["ok"] == 40 and row["failed"] == 0
    assert row["throughput_rps"] > 0 and row["p99_ms"] >= row["p50_ms"] > 0
    assert row["mean_batch_size"] >= 1
