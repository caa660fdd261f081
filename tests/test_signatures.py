"""Each op's arguments are listed once, as the fields of its bundle in mbkernels/_contract.py (with their types);
the schemas of the registered ops must be that list: the public ops (defined by csrc/public_ops.cpp where
mbkernels._C is loaded, by mbkernels.ops otherwise) take the fields then the backend's name, the CUDA kernels' ops
(csrc/registration.cpp) the fields alone, since the cuda backend passes them the bundle as it is. A field added,
renamed, moved or retyped on one side only fails here: names, types, optionality, order and defaults are compared.
"""
import re

import pytest
import torch

from mbkernels import _contract, _native
from mbkernels.backends import cuda


def spelled(kind) -> str:
    """A schema type as the schema spells it (SymInt kept apart from int, which the types' own names merge)."""
    if isinstance(kind, torch.OptionalType):
        return spelled(kind.getElementType()) + "?"
    if isinstance(kind, torch.ListType):
        return spelled(kind.getElementType()) + "[]"
    if isinstance(kind, torch.SymIntType):
        return "SymInt"
    return kind.annotation_str


def arguments(schema) -> list:
    return [(a.name, spelled(a.real_type), a.N, a.default_value, a.kwarg_only) for a in schema.arguments]


def assert_schema(name: str, expected: str) -> None:
    actual = getattr(torch.ops.mbkernels, name).default._schema
    expected = torch._C.parse_schema(f"mbkernels::{name}{expected}")
    assert arguments(actual) == arguments(expected), f"mbkernels::{name}: the schema and the bundle disagree"
    assert str(actual) == str(expected)  # anything else a schema states: returns, alias annotations


@pytest.mark.parametrize("op", _contract.CONTRACTS)
def test_the_public_op_takes_its_bundle_then_the_backend(op):
    assert_schema(op, _contract.op_schema(op))


@pytest.mark.skipif(_native.C is None, reason=f"mbkernels._C is not loaded: {_native.unavailable_reason}")
@pytest.mark.parametrize("op", cuda.BACKEND.ops)
def test_the_cuda_kernels_op_takes_its_bundle(op):
    fields = _contract.CONTRACTS[op].fields
    assert_schema(f"{op}_cuda", f"({', '.join(_contract.schema_arguments(fields))}) -> Tensor")


@pytest.mark.skipif(_native.C is None, reason=f"mbkernels._C is not loaded: {_native.unavailable_reason}")
@pytest.mark.parametrize("op, source", [("dwconv_bn_act", "public_ops.cpp"), ("squeeze_excite", "public_ops.cpp"),
                                        ("dwconv_bn_act_cuda", "registration.cpp"),
                                        ("squeeze_excite_cuda", "registration.cpp")])
def test_the_schemas_compared_are_the_native_librarys(op, source):
    """Where mbkernels._C is loaded, it defines these ops (C++ programs run them): the schemas above are C++'s."""
    defined = re.search(r"^debug: registered at (.*)$", torch._C._dispatch_dump(f"mbkernels::{op}"), re.MULTILINE)
    assert defined is not None and defined[1].rsplit(":", 1)[0].endswith(f"csrc/{source}"), defined
