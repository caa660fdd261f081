"""The planner's dataflow pass: a module whose forward code does what the structural kinds cannot see (a
BatchNorm and an activation applied in forward, one activation module serving several calls, an inline
squeeze-excite) is captured as a graph, its patterns matched (mbkernels.match.dataflow), and its forward rewritten
with fused modules (mbkernels.nn.rewrite), proven on a probe like every swap.

The pass runs where the structural kinds left something behind among a module's own children (a depthwise conv or
another conv left alone or half-fused, or two or more 1x1 layers no kind took: an SE written in forward); its
matches then replace the structural swaps of the children they cover. Modules the structural kinds cover fully
(timm's and torchvision's) are never captured.
"""
import copy
import dataclasses
import functools
import inspect
from typing import Optional

from torch import nn

from ..backends import proof_backend
from ..match import probe_copy, probe_input, prove
from ..match.dataflow import VALUE, CaptureError, ConvRun, capture, find
from ..match.probe import TensorSpec, describe_failure
from ..match.layers import is_plain_sequential
from ..match.padding import overrides_forward
from ..nn import rewrite
from ..nn.rewrite import CapturedForward
from . import cost
from .kinds import ABSENT, BlockAlternative, BlockKind


def forward_of(path: str) -> str:
    """The report's words for the forward of the module at path (given with its trailing dot)."""
    return f"forward of {path[:-1] or 'the model'}"


# The STOCK_SLOTS of a rewrite's fused list: both slots it fills were empty (unpatch deletes them).
REWRITE_SLOTS = ((rewrite.CONTAINER, ABSENT), ("forward", ABSENT))


class DataflowPass:
    def __init__(self, planner):
        self.planner = planner
        self.captures = {}  # module path -> Capture, or the CaptureError of that module

    def call_of(self, path: str, outer: tuple) -> Optional[tuple]:
        """How the nearest module around it whose forward calls the module at path calls it (a call spec), when
        that forward can be captured and calls it one way; None otherwise (its defaults then specialise it)."""
        for outer_path, module in reversed(outer):
            captured = self.capture(outer_path, module, None)
            if isinstance(captured, CaptureError):
                continue
            calls = [call for call in captured.calls.get(path[len(outer_path):-1], [])]
            if calls:
                return calls[0] if None not in calls and all(call == calls[0] for call in calls) else None
        return None

    def called_children(self, path: str) -> Optional[set]:
        """The children the captured forward of the module at path calls (None: not captured)."""
        captured = self.captures.get(path)
        if captured is None or isinstance(captured, CaptureError):
            return None
        return {target.partition(".")[0] for target in captured.calls}

    def capture(self, path: str, module: nn.Module, call: Optional[tuple]):
        if path not in self.captures:
            try:
                self.captures[path] = capture(module, call, self.example_of(module))
            except CaptureError as error:
                self.captures[path] = error
        return self.captures[path]

    def example_of(self, module: nn.Module) -> Optional[dict]:
        """Tensor parameter name -> a random tensor like the one module's forward got in the model's forward (for
        a forward that computes with its input's shape), or None when it was not seen."""
        seen = self.planner.observation.inputs.get(module)
        if seen is None:
            return None
        try:
            arguments = inspect.signature(type(module).forward).bind(None, *seen[0], **seen[1]).arguments
        except TypeError:
            return None
        return {name: value.sample(self.planner.generator) for name, value in arguments.items()
                if isinstance(value, TensorSpec)}

    def plan(self, parent: nn.Module, path: str, call: Optional[tuple], structural: dict):
        """A Rewrite of parent's forward, proven, or the reason there is none (a str), or None where it would fuse
        nothing more than the structural swaps of its children do (structural: conv slot -> (BatchNorm folded,
        activation fused))."""
        captured = self.capture(path, parent, call)
        if isinstance(captured, CaptureError):
            return str(captured)
        matches, timed_blocks = self.select(parent, path, captured, find(captured))
        if not timed_blocks and not gains_over(matches, structural):
            return None
        called_kwargs = {k: v for k, v in call[1].items() if v is not VALUE} if call else {}
        probe_kwargs = _bound_constants(parent, call)
        failure = self.prove(parent, captured, matches, called_kwargs, probe_kwargs)
        if failure is not None:
            return f"its rewritten forward {failure.removeprefix('fused output ')}"
        forward, container, entries = self.rewritten(parent, path, captured, matches, called_kwargs)
        covered = {node.target for _, match in matches for node in match.nodes if node.op == "call_module"}
        alternatives = []
        for block in timed_blocks:
            failure = self.prove(parent, captured, [block], called_kwargs, probe_kwargs)
            if failure is not None:
                estimate = cost.decide(BlockKind.from_match(parent, block[1], proof_backend()),
                                       f"{path}{block[1].dw.conv}", None, every_block=False)
                self.planner.report.blocks.append(dataclasses.replace(
                    estimate, plan="layers", reason=f"the forward rewritten with the block fused "
                                                    f"{failure.removeprefix('fused output ')}"))
                continue
            block_forward, block_container, block_entries = self.rewritten(parent, path, captured, [block],
                                                                           called_kwargs)
            block_container.covered = sorted({node.target.partition(".")[0] for node in block[1].nodes
                                              if node.op == "call_module"})
            alternatives.append(BlockRewrite(parent, block_forward, block_container, block_entries,
                                             via=forward_of(path)))
        return Rewrite(forward, container, covered, entries, alternatives)

    def rewritten(self, parent: nn.Module, path: str, captured, chosen: list, called_kwargs: dict) -> tuple:
        """(CapturedForward, fused module list, (path, kind, shape, activation) per fused module) of parent's
        forward with the chosen (kind, match) pairs fused."""
        forward, container = rewrite.rewrite(parent, captured, chosen, self.planner.backend, called_kwargs)
        entries = []
        for (kind, match), fused in zip(rewrite.in_graph_order(captured, chosen), container):
            fused.dataflow_path = f"{path}{kind.anchor(match)}"
            entries.append((fused.dataflow_path, kind.kind, *self.kinds[kind].describe(fused)))
        return forward, container, entries

    def leftovers(self, parent: nn.Module, children: list, taken: set, entries: list) -> bool:
        """Whether the structural kinds left something a rewrite of parent's forward could take (each graph kind
        says, FusionKind.left_in_forward; `entries`: (child name, report entry) of this parent's children); never in
        a plain Sequential or a module that keeps nn.Module's forward."""
        if is_plain_sequential(parent) or not overrides_forward(parent, nn.Module):
            return False
        return any(kind.left_in_forward(children, taken, entries) for kind in self.kinds.values())

    @functools.cached_property
    def kinds(self) -> dict:
        """The planner's kinds (those patch's flags leave on) that have a graph pattern, by class, in the order
        their matches take nodes."""
        graph_kinds = [kind for kind in self.planner.kinds if kind.graph_priority is not None]
        return {type(kind): kind for kind in sorted(graph_kinds, key=lambda kind: kind.graph_priority)}

    def select(self, parent: nn.Module, path: str, captured, found) -> tuple:
        """(the (kind, match) pairs to fuse, none overlapping, each kind's in turn (a block before the SE and the
        convs in it) as its kind admits them; the (kind, block) pairs a tuned patch times against those layers)."""
        chosen, used, timed = [], set(), []
        for kind_type, kind in self.kinds.items():
            for match in kind_type.graph_matches(found):
                verdict = kind.admit(parent, path, captured, match)
                if verdict == "time":
                    timed.append((kind_type, match))  # layer fusion now, the block timed against it (tuning)
                elif verdict == "fuse" and not used & set(match.nodes):
                    chosen.append((kind_type, match))
                    used.update(match.nodes)
        return chosen, timed

    def prove(self, parent: nn.Module, captured, matches: list, call_kwargs: dict, probe_kwargs: dict
              ) -> Optional[str]:
        """None when parent's rewritten forward (reference backend) equals its stock forward on a probe."""
        observed = self.planner.observed_call(parent)
        if len(captured.tensors) != 1 and observed is None:
            return f"takes {len(captured.tensors)} tensor inputs, and no forward of the model gave it any to probe"
        generator = self.planner.generator
        try:
            stock = probe_copy(parent, generator, self.planner.restore)

            def variant():
                copied = copy.deepcopy(stock)
                local = _relocate(captured, copied)
                rewrite.install(copied, *rewrite.rewrite(copied, local, matches, proof_backend(), call_kwargs))
                return copied

            if observed is not None:
                proof = prove(stock, [(0, variant)], observed[0], kwargs=observed[1])
            else:
                channels, size = _probe_plane(parent, captured, self.planner.observed.get(parent))
                proof = prove(stock, [(0, variant)], probe_input(channels, size, size + 1, generator),
                              kwargs=probe_kwargs)
        except Exception as error:  # the stock forward cannot run on a probe: not proven
            return describe_failure(error)
        return proof.failure


def gains_over(chosen: list, structural: dict) -> bool:
    """Whether the chosen (kind, match) pairs fuse more than the structural swaps of the same children do
    (structural: conv slot -> (BatchNorm folded, activation fused)): an SE or a block, a conv they leave, or a
    BatchNorm or an activation they leave beside a conv."""
    for _, match in chosen:
        if not isinstance(match, ConvRun) or any(match.pad_before or ()):
            return True  # an SE or a block, or a pad merged into the conv
        norm, act = structural.get(match.conv, (None, None))
        if norm is None or (match.norm and not norm) or (match.activation != "identity" and not act):
            return True
    return False


class Rewrite:
    """A planned rewrite of one module's forward: what to install, the child slots its matches cover, one
    (path, kind, shape, activation) per fused module, and the BlockRewrites a tuned patch times against it."""

    def __init__(self, forward, container, covered: set, entries: list, alternatives: list):
        self.forward, self.container, self.covered, self.entries = forward, container, covered, entries
        self.alternatives = alternatives


class BlockRewrite(BlockAlternative):
    """A block that is a module's whole forward (efficientnet_pytorch's MBConvBlock), for a tuned patch: its layer
    fusion is the module's rewritten forward (installed), its block fusion another rewrite of that forward (forward,
    container; entries: (path, kind, shape, activation) of its fused module), which calls the block's fused module
    (built and proven when planned). parent and block are the module."""

    def __init__(self, module: nn.Module, forward: CapturedForward, container: nn.ModuleList, entries: list,
                 via: str):
        super().__init__(entries[0][0], module, rewrite.CONTAINER, module, container[0])
        self.forward, self.container, self.entries, self.via = forward, container, entries, via

    def layers(self):
        # Called as the graph is (the specialised arguments are in it): the module's call would bind them again.
        return rewrite.captured_forward(self.block).code

    def swap(self) -> tuple:
        entries = [dict(zip(("path", "kind", "shape", "activation"), entry), via=self.via) for entry in self.entries]
        return (self.block, [(rewrite.CONTAINER, self.container), ("forward", self.forward.__call__)],
                REWRITE_SLOTS, list(self.container), entries)


def _relocate(captured, module: nn.Module):
    """The capture with its module replaced by a copy (the graph addresses submodules by path)."""
    return dataclasses.replace(captured, module=module)


def _bound_constants(parent: nn.Module, call: Optional[tuple]) -> dict:
    """The specialised arguments of the call the parent gets, by name (what the probe passes besides x)."""
    if call is None:
        return {}
    arguments = inspect.signature(type(parent).forward).bind(None, *call[0], **call[1]).arguments
    return {name: value for name, value in list(arguments.items())[1:] if value is not VALUE}


def _probe_plane(module: nn.Module, captured, observed: Optional[int]) -> tuple:
    """(channels, height) of a probe for module's one tensor input: the channels observed in the model's forward,
    else those of the first conv or linear that reads it (else of the first module stating in_channels), a plane
    large enough for every stride inside."""
    placeholder = next(node for node in captured.graph.nodes if node.op == "placeholder")
    channels = observed
    for user in placeholder.users if channels is None else ():
        if user.op == "call_module":
            layer = module.get_submodule(user.target)
            channels = getattr(layer, "in_channels", getattr(layer, "in_features", None))
            if channels is not None:
                break
    if channels is None:
        channels = next(m.in_channels for m in module.modules() if isinstance(getattr(m, "in_channels", None), int))
    convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
    downsampling = min(functools.reduce(lambda a, c: a * max(c.stride), convs, 1), 64)
    reach = max([d * (k - 1) for c in convs for k, d in zip(c.kernel_size, c.dilation)] or [0])
    return channels, downsampling + reach + 3
