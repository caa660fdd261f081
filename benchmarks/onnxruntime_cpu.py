"""On the CPU, a CPU inference engine against mbkernels: ONNX Runtime running the stock model exported to ONNX, the
model patched with mbkernels under torch.compile, and stock PyTorch eager for scale; float32, NCHW, random weights
with random BatchNorm statistics (mbkernels.models.build_model), every output checked against the float64 stock
model first.

    pip install onnxruntime onnx onnxscript   # not dependencies of mbkernels: this comparison only
    python -m benchmarks.onnxruntime_cpu [--model mobilenetv3_large_100] [--batches 1 8] [--threads 2] [--rounds 7]

The variants take turns within each round (benchmarks/test_cpu_speed.py's interleaved_medians), so the machine's
other load falls on all of them alike; each cell is the median ms per call. PyTorch and ONNX Runtime each get
--threads intra-op threads, and ONNX Runtime's idle threads do not spin (they would take the cores from the
variant that runs next).
"""
import argparse
import copy
import datetime
import os
import platform
import tempfile

import torch

import mbkernels
from mbkernels.models import build_model

from .test_cpu_speed import check, interleaved_medians

VARIANTS = ("stock eager", "patched + torch.compile", "onnxruntime")


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def onnxruntime_session(model: torch.nn.Module, x: torch.Tensor, path: str, threads: int):
    """model exported to ONNX at path (torch's exporter, through torch.export) and an ONNX Runtime CPU session of it,
    every graph optimisation on: a function of a float32 tensor returning the logits as a tensor."""
    import onnxruntime

    torch.onnx.export(model, (x,), path, input_names=["x"], output_names=["logits"], dynamo=True,
                      external_data=False, verbose=False)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    return lambda x: torch.from_numpy(session.run(None, {"x": x.numpy()})[0])


def main() -> None:
    import onnxruntime

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mobilenetv3_large_100")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--size", type=int, default=224)
    options = parser.parse_args()
    torch.set_num_threads(options.threads)
    print(f"{datetime.date.today()}, {cpu_name()} ({os.cpu_count()} cores, {platform.machine()}), "
          f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, {options.threads} threads, "
          f"{options.model} {options.size}x{options.size} float32, {options.rounds} interleaved rounds, median ms")
    print(f"{'batch':>5}  {VARIANTS[0]:>11}  {VARIANTS[1]:>23}  {VARIANTS[2]:>11}  {'patched / onnxruntime':>21}")
    stock = build_model(options.model)
    reference = copy.deepcopy(stock).double()
    with tempfile.TemporaryDirectory() as folder:
        for batch in options.batches:
            x = torch.randn(batch, 3, options.size, options.size, generator=torch.Generator().manual_seed(1))
            torch._dynamo.reset()
            models = dict(zip(VARIANTS, (
                stock,
                torch.compile(mbkernels.patch(copy.deepcopy(stock))),
                onnxruntime_session(stock, x, os.path.join(folder, "model.onnx"), options.threads))))
            iterations = 8 if batch == 1 else 2
            with torch.no_grad():
                check(models, reference, x)
                ms = interleaved_medians(models, x, options.rounds, iterations)
            print(f"{batch:5d}  {ms[VARIANTS[0]]:11.2f}  {ms[VARIANTS[1]]:23.2f}  {ms[VARIANTS[2]]:11.2f}  "
                  f"{ms[VARIANTS[1]] / ms[VARIANTS[2]]:20.2f}x", flush=True)


if __name__ == "__main__":
    main()
