"""backend_status(): a dict of (available, reason) pairs, printed as a table, emulated backends marked."""
import dataclasses

import pytest
import torch

import mbkernels
from mbkernels import backends, dispatch
from mbkernels.backends import ANY_DEVICE, Backend


def declared(name, devices, opt_in=(), reason=None):
    return Backend(name, priority=0, devices=devices, opt_in_devices=opt_in, unavailable_reason=lambda: reason,
                   describe=lambda: f"{name} kernels", ops={})


def test_a_backend_that_serves_no_device_here_for_real_is_emulated(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(backends, "declared", lambda: (
        declared("gpu_only", ("cuda",), opt_in=("cpu",)),       # a host emulation on a machine without a GPU
        declared("interpreted", (), opt_in=("cpu",)),           # an interpreter
        declared("off", ("cuda",), reason="its library is missing"),
        declared("everywhere", (ANY_DEVICE,)),
        declared("on_the_cpu", ("cpu",), opt_in=("cuda",)),
        declared("gpu_or_nothing", ("cuda",)),  # runs nothing here, emulates nothing
    ))
    status = dispatch.backend_status()
    assert {name: s.state for name, s in status.items()} == {
        "gpu_only": "emulated", "interpreted": "emulated", "off": "unavailable", "everywhere": "available",
        "on_the_cpu": "available", "gpu_or_nothing": "available"}
    assert status["gpu_only"] == (True, "gpu_only kernels") and status["gpu_only"].available  # still a pair
    available, reason = status["off"]
    assert (available, reason) == (False, "its library is missing")
    assert str(status).splitlines() == [
        "backend         state        details",
        "gpu_only        emulated     gpu_only kernels",
        "interpreted     emulated     interpreted kernels",
        "off             unavailable  its library is missing",
        "everywhere      available    everywhere kernels",
        "on_the_cpu      available    on_the_cpu kernels",
        "gpu_or_nothing  available    gpu_or_nothing kernels",
    ]
    assert repr(status) == str(status)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert dispatch.backend_status()["gpu_only"].state == "available"


def test_the_real_table_has_a_row_per_backend():
    lines = str(mbkernels.backend_status()).splitlines()
    assert lines[0].split() == ["backend", "state", "details"]
    assert [line.split()[0] for line in lines[1:]] == ["cuda", "triton", "reference"]
    assert lines[-1].split()[:2] == ["reference", "available"]


def test_the_automatic_default_on_a_device_is_the_first_backend_the_device_rule_lets_run(monkeypatch):
    """The server's default backend: never a host emulation or an interpreter on the CPU; the first in priority
    order that serves the device and runs here."""
    assert dispatch.first_available(torch.device("cpu")) == "reference"
    triton, reference = backends.get("triton"), backends.get("reference")
    serving_cpu = dataclasses.replace(triton, devices=("cpu",), unavailable_reason=lambda: None)
    monkeypatch.setattr(backends, "declared", lambda: (serving_cpu, reference))
    assert dispatch.first_available(torch.device("cpu")) == "triton"
    off = dataclasses.replace(serving_cpu, unavailable_reason=lambda: "not here")
    monkeypatch.setattr(backends, "declared", lambda: (off, reference))
    assert dispatch.first_available(torch.device("cpu")) == "reference"


def test_a_backend_the_caller_names_wins_over_the_environment_variable(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    assert dispatch.requested_backend(None) == "triton"  # the variable is the default
    assert dispatch.requested_backend("reference") == "reference"
    monkeypatch.setenv(dispatch.ENV_VAR, "bogus")  # a bad variable is not read when the caller names one
    assert dispatch.requested_backend("reference") == "reference"
    with pytest.raises(ValueError, match="^unknown backend 'cudnn'"):  # named by where it came from
        dispatch.requested_backend("cudnn")
