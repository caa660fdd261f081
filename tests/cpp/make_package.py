"""Writes an AOTInductor package of the patched hand-written MobileNetV3-Small (random BatchNorm statistics) and
the tensors tests/cpp/run_package checks it with: torch.save([input, stock float64 output]).

    python tests/cpp/make_package.py OUT_FOLDER       -> OUT_FOLDER/patched.pt2, OUT_FOLDER/tensors.pt
"""
import copy
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))  # tests.models

import mbkernels  # noqa: E402
from mbkernels.patch import randomize_batchnorm  # noqa: E402
from tests.models.mobilenetv3 import mobilenetv3_small  # noqa: E402


def main(folder: str) -> None:
    torch.manual_seed(0)
    stock = randomize_batchnorm(mobilenetv3_small().eval(), torch.Generator().manual_seed(0))
    patched = mbkernels.patch(copy.deepcopy(stock))
    example, x = torch.randn(2, 3, 48, 51), torch.randn(2, 3, 48, 51)
    with torch.no_grad():
        exported = torch.export.export(patched, (example,))
        expected = copy.deepcopy(stock).double()(x.double())
    ops = {str(node.target) for node in exported.graph.nodes if "mbkernels" in str(node.target)}
    assert ops == {"mbkernels.dwconv_bn_act.default", "mbkernels.squeeze_excite.default"}, ops
    os.makedirs(folder, exist_ok=True)
    package = torch._inductor.aoti_compile_and_package(exported, package_path=os.path.join(folder, "patched.pt2"))
    torch.save([x, expected], os.path.join(folder, "tensors.pt"))
    print(f"package {package} (ops {sorted(ops)}), tensors {os.path.join(folder, 'tensors.pt')}")


if __name__ == "__main__":
    main(sys.argv[1])
