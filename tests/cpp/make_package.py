"""Writes an AOTInductor package of the patched hand-written MobileNetV3-Small (random BatchNorm statistics) and
the tensors tests/cpp/run_package checks it with: the input and the stock model's float64 output, each as
int64 rank, int64 sizes, float64 values (native byte order).

    python tests/cpp/make_package.py OUT_FOLDER       -> OUT_FOLDER/patched.pt2, OUT_FOLDER/tensors.bin
"""
import copy
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))  # tests.models

import mbkernels  # noqa: E402
from mbkernels.match import randomize_batchnorm  # noqa: E402
from tests.models.mobilenetv3 import mobilenetv3_small  # noqa: E402


def write_tensors(path: str, tensors) -> None:
    with open(path, "wb") as file:
        for t in tensors:
            file.write(torch.tensor([t.dim(), *t.shape], dtype=torch.int64).numpy().tobytes())
            file.write(t.detach().to(torch.float64).contiguous().numpy().tobytes())


def main(folder: str) -> None:
    torch.manual_seed(0)
    stock = randomize_batchnorm(mobilenetv3_small().eval(), torch.Generator().manual_seed(0))
    patched = mbkernels.patch(copy.deepcopy(stock), blocks=False)  # the layer ops have C++ kernels; blocks do not
    example, x = torch.randn(2, 3, 48, 51), torch.randn(2, 3, 48, 51)
    with torch.no_grad():
        exported = torch.export.export(patched, (example,))
        expected = copy.deepcopy(stock).double()(x.double())
    ops = {str(node.target) for node in exported.graph.nodes if "mbkernels" in str(node.target)}
    assert ops == {"mbkernels.dwconv_bn_act.default", "mbkernels.squeeze_excite.default"}, ops
    os.makedirs(folder, exist_ok=True)
    package = torch._inductor.aoti_compile_and_package(exported, package_path=os.path.join(folder, "patched.pt2"))
    write_tensors(os.path.join(folder, "tensors.bin"), [x, expected])
    print(f"package {package} (ops {sorted(ops)}), tensors {os.path.join(folder, 'tensors.bin')}")


if __name__ == "__main__":
    main(sys.argv[1])
