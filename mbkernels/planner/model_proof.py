"""The whole patched model proven against stock, with rollback.

Each swap is proven on its own probe first (the precise reasons); what no such probe sees is the model's own
forward around them: code that reads the attributes of what it calls, that checks a module's type, that calls a
module twice or with other arguments. So once patch has placed (and tuned) its changes, the model runs on its
probe calls (the example inputs when given, else the image the planner observed the model on) and every output
is compared with what the model computed before patch changed it. A forward that raises or differs never reaches
the user: group testing over the placed changes (each removed and placed again through its Change) finds those
responsible, puts their stock modules back, proves the rest again, and reports each with its reason.

Tolerance: within the dtype's rounding of stock (TOLERANCE); beyond it, the outputs are compared with the stock
model run in float64, and the patched model passes when it is as close to those as stock is (within
AMPLIFICATION times stock's own error: deep networks amplify rounding, and the fused ops round at other points).
Where the outputs are discrete (a detector's boxes and labels after non-maximum suppression: integer tensors, or
a structure or count that differs) or stock's own outputs change with rounding alone, the outputs cannot judge a
swap: only that the patched forward runs is proven (the per-swap probes judged the values).
"""
import contextlib
import traceback
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.utils._pytree as pytree
from torch import nn

from ..match.probe import eval_mode
from ..match.layers import is_depthwise
from ..match.se import se_channels
from ..nn import rewrite
from ..nn.fused import EagerWindow, FusedModule

# Largest max-abs difference of a patched output from stock, relative to stock's largest value, that passes
# without the float64 check: a few roundings of the dtype (the fused op keeps float32 inside, stock rounds after
# each layer).
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 6e-2}
AMPLIFICATION = 4.0  # how much further from float64 than stock a patched output may be


@dataclass
class Verdict:
    """One check of the model as it is now: None failure when it computes what stock computed."""
    failure: Optional[str] = None
    raised: bool = False


def _run(model: nn.Module, call: tuple):
    args, kwargs = call
    with torch.no_grad(), eval_mode(model):
        return model(*args, **kwargs)


def _post_processed(output) -> bool:
    """Whether an output holds integer or boolean tensors (labels, indices, masks): post-processing such as
    non-maximum suppression made it, and rounding alone can change which boxes it keeps."""
    return any(isinstance(leaf, torch.Tensor) and not leaf.is_floating_point() and not leaf.is_complex()
               for leaf in pytree.tree_leaves(output))


def _float_leaves(output) -> list:
    return [leaf for leaf in pytree.tree_leaves(output) if isinstance(leaf, torch.Tensor)]


def _error(got, want) -> Optional[float]:
    """max |got - want| / max |want| over every tensor of two outputs (the same NaN and infinity positions
    required); None when their structures, shapes or non-tensor values differ."""
    got_leaves, got_spec = pytree.tree_flatten(got)
    want_leaves, want_spec = pytree.tree_flatten(want)
    if got_spec != want_spec:
        return None
    worst = 0.0
    for g, w in zip(got_leaves, want_leaves):
        if not isinstance(w, torch.Tensor):
            if g != w:
                return None
            continue
        if not isinstance(g, torch.Tensor) or g.shape != w.shape:
            return None
        g, w = g.detach().double().cpu(), w.detach().double().cpu()
        finite = torch.isfinite(w)
        if not torch.equal(finite, torch.isfinite(g)) or not torch.equal(g[~finite].nan_to_num(), w[~finite].nan_to_num()):
            return float("inf")
        if finite.any():
            scale = w[finite].abs().max().clamp_min(1e-30)
            worst = max(worst, ((g[finite] - w[finite]).abs().max() / scale).item())
    return worst


def describe_raise(error: BaseException, model: nn.Module) -> str:
    """What a forward raised, and in which module's forward (the innermost model module whose own code it was in,
    mbkernels' code aside)."""
    paths = {module: path for path, module in model.named_modules()}
    where = None
    for frame, _ in traceback.walk_tb(error.__traceback__):
        owner = frame.f_locals.get("self")
        in_mbkernels = frame.f_code.co_filename.startswith(_PACKAGE_ROOT)
        if isinstance(owner, nn.Module) and owner in paths and not in_mbkernels \
                and frame.f_code.co_filename != nn.Module.__call__.__code__.co_filename:
            where = paths[owner]
    text = f"{type(error).__name__}: {error}".splitlines()[0]
    return f"the forward of {where or 'the model'} raised {text}" if where is not None else f"the model's forward raised {text}"


_PACKAGE_ROOT = __file__.rsplit("/planner/", 1)[0]


@dataclass
class ModelProof:
    """The model's outputs on its probe calls before patch changed it, and the check of the model as it is now."""
    model: nn.Module
    calls: list  # [(args, kwargs)]
    stock_copy: Callable[[], nn.Module]  # the model with every change removed, copied (for the float64 reference)
    stock: list = field(default_factory=list)
    reference: Optional[list] = None  # the stock model's outputs in float64, made when first needed
    runs: int = 0  # how many checks ran (each a forward per call)
    rolled_back: int = 0  # how many changes the proofs of this patch removed
    ran: dict = field(default_factory=dict)  # in the last check, the watched modules whose own forward ran

    def watching(self, modules: dict):
        """Record in `ran` which of modules ({module: what to record}) run their own forward in each check."""
        return recording_runs(modules, self.ran)

    def check(self) -> Verdict:
        self.runs += 1
        self.ran.clear()
        for index, (call, want) in enumerate(zip(self.calls, self.stock)):
            try:
                got = _run(self.model, call)
            except Exception as error:  # whatever the patched forward raises is the change's fault: roll it back
                return Verdict(describe_raise(error, self.model), raised=True)
            failure = self.compare(index, got, want)
            if failure is not None:
                return Verdict(failure)
        return Verdict()

    def compare(self, index: int, got, want) -> Optional[str]:
        if _post_processed(want):
            return None  # discrete outputs (NMS boxes and labels, a count): rounding alone moves them
        error = _error(got, want)  # None: another structure or shape, judged against float64 stock as any error
        leaves = _float_leaves(want)
        dtype = leaves[0].dtype if leaves else torch.float32
        if error is not None and error <= TOLERANCE.get(dtype, TOLERANCE[torch.float32]):
            return None
        reference = self.float64_reference()
        if reference is None:
            return _mismatch(error)
        stock_error = _error(want, reference[index])
        if stock_error is None or stock_error == float("inf"):
            return None  # stock's own outputs change with rounding: they cannot judge a swap
        patched_error = _error(got, reference[index])
        if patched_error is not None and patched_error <= max(TOLERANCE[torch.float32],
                                                              AMPLIFICATION * stock_error):
            return None
        return _mismatch(error) + (f"; float64 stock: patched {_describe(patched_error)}, stock {stock_error:.1e}")

    def float64_reference(self) -> Optional[list]:
        if self.reference is None:
            try:
                stock = self.stock_copy().double()
                self.reference = [_run(stock, _double(call)) for call in self.calls]
            except Exception:  # a model that does not run in float64: the dtype's tolerance decides
                self.reference = []
        return self.reference or None


def _double(call: tuple) -> tuple:
    as_double = lambda v: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v  # noqa: E731
    return pytree.tree_map(as_double, call[0]), pytree.tree_map(as_double, call[1])


def _describe(error: Optional[float]) -> str:
    return "differs in structure" if error is None else f"{error:.1e}"


def _mismatch(error: Optional[float]) -> str:
    if error is None:
        return "the patched model's outputs differ from stock's on its probe in structure or shape"
    return f"the patched model's outputs differ from stock's on its probe (max relative error {error:.1e})"


def culprits(changes: list, passes: Callable[[list], bool]) -> list:
    """The changes to remove so that the rest passes, found by adaptive group testing: `passes(placed)` places
    exactly `placed` (the others removed) and says whether the model then matches stock. Assumes the empty set
    passes and the whole set does not; about 2 d log2(n) checks for d culprits among n changes."""
    def search(base: list, group: list) -> list:  # base passes, base + group does not
        if len(group) == 1:
            return group
        half = len(group) // 2
        first, second = group[:half], group[half:]
        if passes(base + first):
            return search(base + first, second)
        found = search(base, first)
        clean = [change for change in first if change not in found]
        if passes(base + clean + second):
            return found
        return found + search(base + clean, second)

    return search([], list(changes))


def prove_and_roll_back(proof: ModelProof, changes: list, model: nn.Module) -> list:
    """[(change, reason)] of the changes the whole-model proof removed (every other change placed), [] when the
    patched model passes as it is. The last check run is of the model as it is left."""
    verdict = proof.check()
    if verdict.failure is None:
        return []

    def with_only(placed: list) -> Verdict:
        for change in changes:
            (change.place if change in placed else change.remove)()
        return proof.check()

    def passes(placed: list) -> bool:
        return with_only(placed).failure is None

    # Stock failing against itself (outputs that move between runs): nothing can be proven, stock stays whole.
    found = culprits(changes, passes) if passes([]) else list(changes)
    kept = [change for change in changes if change not in found]
    removed = [(change, with_only(kept + [change]).failure or verdict.failure) for change in found]
    if not passes(kept):
        removed += [(change, f"the patched model could not be proven ({verdict.failure})") for change in kept]
        with_only([])
    EagerWindow.attach(model)
    return removed



_MAX_SE_MODULES = 8  # an SE-like module holds a few layers (asking more of larger modules costs a probe each)


def stock_kinds(model: nn.Module) -> dict:
    """{module: (path, the report's kind)} of every BatchNorm, depthwise conv and squeeze-excite-like module of
    model outside the fused modules' own code (the BatchNorms are the conv folds')."""
    kinds = {}
    for path, module in model.named_modules():
        if isinstance(module, FusedModule) or rewrite.rewritten(module):  # a rewritten forward runs its graph
            continue
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            kinds[module] = (path, "conv_bn_act")
        elif is_depthwise(module):
            kinds[module] = (path, "dwconv_bn_act")
        elif sum(1 for _ in module.modules()) <= _MAX_SE_MODULES and se_channels(module) is not None:
            kinds[module] = (path, "squeeze_excite")
    return kinds


@contextlib.contextmanager
def recording_runs(modules: dict, ran: dict):
    """For the duration, ran[module] = modules[module] for each of modules whose own forward runs."""
    def record(module, args) -> None:  # a pre-hook that returned a value would replace the arguments
        ran.setdefault(module, modules[module])

    handles = [module.register_forward_pre_hook(record) for module in modules]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def stock_runs(model: nn.Module, call: tuple) -> list:
    """(path, kind) of each module of stock_kinds that runs its own forward when model runs call."""
    ran = {}
    with recording_runs(stock_kinds(model), ran):
        try:
            _run(model, call)
        except Exception:  # a forward that fails says nothing of what runs stock
            pass
    return list(ran.values())
