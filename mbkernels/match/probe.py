"""Numeric proof: a swap is made only when the fused computation equals the stock one on a probe.

The stock modules run in float64 and the fused ones in float32 with the reference backend, on one small random
probe with random BatchNorm statistics (fresh statistics make a BatchNorm an identity and would hide a skipped or
misplaced one). The stock side runs once; the fused variants (a longer or shorter run, a block with or without its
residual add) are tried in order and the first that matches is the proven one.
"""
import contextlib
import copy
from dataclasses import dataclass, field
from typing import Callable, Hashable, Iterable, Optional

import torch
import torch.utils._pytree as pytree
from torch import nn

# Largest relative error (to the probe output's largest value) of float32 fused vs float64 stock: float32
# rounding stays near 1e-6; a wrong activation, padding, fold or residual is off by far more.
VERIFY_TOLERANCE = 1e-4


@torch.no_grad()
def randomize_batchnorm(model: nn.Module, generator: Optional[torch.Generator] = None) -> nn.Module:
    """Random running statistics and affine parameters for every BatchNorm in `model`, in place.

    Freshly initialised models in eval mode compute near-zero outputs that hide errors; tests, the probe checks
    and the main command use this instead."""
    def fill(t: torch.Tensor, sample: Callable) -> None:
        t.copy_(sample(torch.empty(t.shape, dtype=torch.float64)))

    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            if m.running_mean is not None:
                fill(m.running_mean, lambda t: t.normal_(0.0, 0.5, generator=generator))
                fill(m.running_var, lambda t: t.uniform_(0.5, 2.0, generator=generator))
            if m.weight is not None:
                fill(m.weight, lambda t: t.uniform_(0.5, 1.5, generator=generator))
            if m.bias is not None:
                fill(m.bias, lambda t: t.normal_(0.0, 0.5, generator=generator))
    return model


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """The model in eval mode for the duration (what inference runs), each module's mode restored after."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, mode in modes:
            module.training = mode


# The image sides `observe` tries: a small one (channels do not depend on the size, and the forward costs a twelfth
# of 224's), then the size most of these models are built for (a fixed final pool, as pytorchcv's AvgPool2d(7),
# needs it).
OBSERVED_SIZES = (64, 224)


@dataclass(frozen=True)
class TensorSpec:
    """What a tensor argument was (its values aside): a probe of it is random data of that shape and kind."""
    shape: tuple
    dtype: torch.dtype
    device: torch.device

    @classmethod
    def of(cls, tensor: torch.Tensor) -> "TensorSpec":
        return cls(tuple(tensor.shape), tensor.dtype, tensor.device)

    def sample(self, generator: torch.Generator) -> torch.Tensor:
        if not self.dtype.is_floating_point:
            return torch.zeros(self.shape, dtype=self.dtype, device=self.device)
        return torch.randn(self.shape, dtype=torch.float64, generator=generator).to(self.dtype).to(self.device)

    def probe(self, generator: torch.Generator) -> torch.Tensor:
        """A float64 CPU probe like the tensor (other kinds as zeros of their dtype)."""
        if not self.dtype.is_floating_point:
            return torch.zeros(self.shape, dtype=self.dtype)
        return torch.randn(self.shape, dtype=torch.float64, generator=generator)


def probe_call(seen: tuple, generator: torch.Generator) -> tuple:
    """(args, kwargs) like an observed call (Observation.inputs), its tensors float64 CPU probes."""
    return pytree.tree_map_only(TensorSpec, lambda spec: spec.probe(generator), seen)


@dataclass
class Observation:
    """One forward of a model on a random image: the channels of the input each module's forward got (for the
    probes of whole modules: a forward that splits or concatenates channels, as ShuffleNet's units, gets other
    channels than its first conv), the model's call and what it returned (the whole-model proof's probe)."""
    channels: dict = field(default_factory=dict)  # module -> channels of its first 4-D tensor argument
    inputs: dict = field(default_factory=dict)  # module -> (args, kwargs) of its first call, tensors as TensorSpecs
    call: Optional[tuple] = None  # (args, kwargs) of the model's forward; None when it ran on no such image
    output: object = None


def observe(model: nn.Module) -> Observation:
    """The model's forward on a random image of OBSERVED_SIZES, the first it runs on (its first conv's channels,
    in that conv's dtype and device); an empty Observation when it runs on none."""
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)  # the stem, a subclass or not
    if first is None or first.weight.device.type == "meta":
        return Observation()
    observation = Observation()

    def record(module, args, kwargs) -> None:
        if args and isinstance(args[0], torch.Tensor) and args[0].dim() == 4:
            observation.channels.setdefault(module, int(args[0].shape[1]))
        if module not in observation.inputs:
            observation.inputs[module] = pytree.tree_map_only(torch.Tensor, TensorSpec.of, (args, kwargs))

    handles = [module.register_forward_pre_hook(record, with_kwargs=True) for module in model.modules()]
    try:
        for size in OBSERVED_SIZES:
            x = torch.randn(1, first.in_channels, size, size, dtype=first.weight.dtype, device=first.weight.device)
            try:
                with eval_mode(model), torch.no_grad():
                    observation.output = model(x)
                observation.call = ((x,), {})
                return observation
            except Exception:  # not this model's input: the next size, or the probes guess the channels
                observation.channels.clear()
                observation.inputs.clear()
        return Observation()
    finally:
        for handle in handles:
            handle.remove()


def probe_copy(module: nn.Module, generator: torch.Generator,
               restore: Callable[[nn.Module], nn.Module] = lambda m: m) -> nn.Module:
    """A float32 CPU eval-mode copy of module with random BatchNorm statistics; `restore` puts the stock modules
    back into the copy where a fused one stands (the planner's unpatch)."""
    clone = restore(copy.deepcopy(module)).to(device="cpu", dtype=torch.float32).eval()
    return randomize_batchnorm(clone, generator)


def probe_input(channels: int, height: int, width: int, generator: torch.Generator, batch: int = 1) -> torch.Tensor:
    """A float64 random probe; keep it small and odd-shaped: float64 convolutions are slow on CPUs."""
    return torch.randn(batch, channels, height, width, dtype=torch.float64, generator=generator)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want| in float64 (NaN when got holds a NaN)."""
    want = want.double()
    return ((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


@dataclass
class Proof:
    """What a probe showed: the first variant that matched the stock modules (None: none did), why each variant
    tried before it failed, and whether the stock modules wrote into their input."""
    proven: Optional[Hashable] = None
    failures: dict = field(default_factory=dict)
    stock_writes_input: bool = False

    @property
    def failure(self) -> Optional[str]:
        """The first variant's failure when none matched, else None."""
        return None if self.proven is not None else next(iter(self.failures.values()), "no variant to prove")


def describe_failure(error: BaseException) -> str:
    return f"could not be checked on a probe: {type(error).__name__}: {error}"


def _floating(value, dtype: torch.dtype):
    """value (a call's arguments) with its floating-point tensors copied in dtype."""
    return pytree.tree_map_only(torch.Tensor, lambda t: t.to(dtype, copy=True) if t.is_floating_point() else t,
                                value)


@torch.no_grad()
def prove(stock: nn.Module, variants: Iterable[tuple[Hashable, Callable[[], nn.Module]]], probe,
          tolerance: float = VERIFY_TOLERANCE, kwargs: Optional[dict] = None) -> Proof:
    """Run `stock` once in float64 on probe (a tensor, or a tuple of the call's positional arguments) and kwargs,
    the call's other arguments, then each variant (built by its callable, on its own copy of the stock modules) in
    float32 until one matches within tolerance. Anything a variant raises means "not proven equal"; what the stock
    modules raise propagates (the probe is not their input)."""
    proof = Proof()
    call = (probe if isinstance(probe, tuple) else (probe,), kwargs or {})
    stock_call = _floating(call, torch.float64)
    want = stock.double().eval()(*stock_call[0], **stock_call[1])
    proof.stock_writes_input = not all(torch.equal(a, b) for a, b in zip(
        pytree.tree_leaves(stock_call), pytree.tree_leaves(_floating(call, torch.float64)))
        if isinstance(a, torch.Tensor))
    for key, build in variants:
        try:
            fused = build().float().eval()
            fused_call = _floating(call, torch.float32)
            got = fused(*fused_call[0], **fused_call[1])
        except Exception as error:  # whatever stops the variant: it is not proven
            proof.failures[key] = describe_failure(error)
            continue
        failure = _difference(got, want, tolerance)
        if failure is not None:
            proof.failures[key] = failure
            continue
        proof.proven = key
        return proof
    return proof


def _difference(got, want, tolerance: float) -> Optional[str]:
    """None when got matches want (a tensor, or a list / tuple / dict of them: a backbone's features, a
    detector's outputs) within tolerance, tensor by tensor; else what differs."""
    got_leaves, got_structure = pytree.tree_flatten(got)
    want_leaves, want_structure = pytree.tree_flatten(want)
    if got_structure != want_structure:
        return f"fused output {_shapes(got)} differs from stock {_shapes(want)} on a probe"
    for got_leaf, want_leaf in zip(got_leaves, want_leaves):
        if not isinstance(want_leaf, torch.Tensor):
            if got_leaf != want_leaf:
                return f"fused output {got_leaf!r} differs from stock {want_leaf!r} on a probe"
            continue
        if not isinstance(got_leaf, torch.Tensor) or got_leaf.shape != want_leaf.shape:
            return f"fused output {_shapes(got)} differs from stock {_shapes(want)} on a probe"
        error = relative_error(got_leaf, want_leaf)
        if not error <= tolerance:  # also catches NaN
            return f"fused output differs from stock on a probe (max relative error {error:.2e})"
    return None


def _shapes(output) -> str:
    """An output's structure with its tensors' shapes, for a message: [(2, 8, 5, 5), (2, 16, 3, 3)]."""
    return str(pytree.tree_map(lambda v: tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__, output))
