"""A module whose forward code does the work, rewritten: its captured graph (mbkernels.match.dataflow) with fused
modules in place of the matched nodes.

The rewrite leaves the module tree as it is: the stock modules stay in their slots (the state_dict does not change,
unpatch has nothing to put back) and the stock forward runs in training mode, when autograd needs a graph, and for
calls whose non-tensor arguments differ from those the graph was captured with. In inference the module's forward
is the instance attribute `forward` (a CapturedForward), which runs the rewritten graph; the fused modules live in
the module's `_mbkernels_fused` list, borrowing the stock modules they fold from (they hold them without
registering them, so they add no state_dict entries and .to() / .half() move the stock modules once).
"""
import inspect
from typing import Optional

import torch
import torch.fx as fx
from torch import nn

from ..match.dataflow import VALUE, Capture, CaptureError, capture, find

CONTAINER = "_mbkernels_fused"  # the rewritten module's list of fused modules
_MAX_SHAPES = 16  # graphs kept per forward that computes with its input's shape; other shapes run the stock forward


class GraphCode:
    """The Python code of an fx graph, run with `owner` as self (call_module targets are paths in owner). Copies and
    pickles carry the graph and make the code again."""

    def __init__(self, owner: nn.Module, graph: fx.Graph):
        self.owner = owner
        self.graph = graph
        self._compile()

    def _compile(self) -> None:
        code = self.graph.python_code(root_module="self")
        namespace = dict(code.globals)
        exec(compile(code.src, f"<mbkernels rewrite of {type(self.owner).__name__}>", "exec"), namespace)
        self.function = namespace["forward"]

    def __call__(self, *values):
        return self.function(self.owner, *values)

    def __getstate__(self):
        return {"owner": self.owner, "graph": self.graph}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._compile()


def _same(a, b) -> bool:
    return a is b or (type(a) is type(b) and a == b)


class CapturedForward:
    """The `forward` instance attribute of a rewritten module: its rewritten graph in inference, its stock forward
    otherwise (training, autograd, or non-tensor arguments other than those the graph was captured with).

    A forward that computes with its input's shape (TensorFlow 'SAME' padding from x.shape) was captured at one
    shape (Capture.shapes): its graph runs for inputs of that shape only, as torch.compile's guards would have it.
    An input of another shape is captured anew on its first call, the same matches fused (what the proven graph
    fused, found again at that shape with that shape's padding), and kept for that shape."""

    def __init__(self, owner: nn.Module, code: GraphCode, capture: Capture, call_kwargs: dict, matched: tuple):
        self.owner = owner
        self.code = code
        self.shapes = None if capture.shapes is None else tuple(capture.shapes[name] for name in capture.tensors)
        self.codes = {self.shapes: code}  # input shapes -> the graph for them (a shape-specialised capture)
        # Per fused match, (its fusion kind, the module targets it takes): to match them again at a new shape.
        self.matched = matched
        self.tensors = list(capture.tensors)
        self.concrete = dict(capture.concrete)
        # The call the parent makes (x positionally, the specialised values by keyword) is checked by one dict
        # comparison; any other call is bound to the signature and checked value by value.
        self.fast_kwargs = dict(call_kwargs)
        self.fast = (capture.parameters[:len(self.tensors)] == self.tensors
                     and all(_same(call_kwargs.get(name, value), value) for name, value in self.concrete.items())
                     and set(call_kwargs) <= set(self.concrete))

    def stock(self, *args, **kwargs):
        return type(self.owner).forward(self.owner, *args, **kwargs)

    def values(self, args: tuple, kwargs: dict) -> Optional[list]:
        """The graph's inputs for a call, or None when the call's specialised values differ from the graph's."""
        if self.fast and len(args) == len(self.tensors) and kwargs == self.fast_kwargs:
            return list(args)
        try:
            bound = inspect.signature(type(self.owner).forward).bind(self.owner, *args, **kwargs)
        except TypeError:
            return None
        bound.apply_defaults()
        if not all(_same(bound.arguments[name], value) for name, value in self.concrete.items()):
            return None
        return [bound.arguments[name] for name in self.tensors]

    def __call__(self, *args, **kwargs):
        owner = self.owner
        if owner.training or (torch.is_grad_enabled() and _needs_grad(owner, args, kwargs)):
            return self.stock(*args, **kwargs)
        values = self.values(args, kwargs)
        if values is None:
            return self.stock(*args, **kwargs)
        if self.shapes is None:
            return self.code(*values)
        shapes = tuple(tuple(v.shape) for v in values)
        code = self.codes.get(shapes)
        if code is None:
            code = self.specialise(values)
            if code is None:
                return self.stock(*args, **kwargs)
        return code(*values)

    def specialise(self, values: list) -> Optional[GraphCode]:
        """The graph for inputs of these values' shapes: captured at them, the matches found again fused with fused
        modules appended to the owner's list (None where that fails: the stock forward runs)."""
        if len(self.codes) >= _MAX_SHAPES:
            return None
        container = getattr(self.owner, CONTAINER)
        spec = ((), {**{name: VALUE for name in self.tensors}, **self.concrete})
        try:
            captured = capture(self.owner, spec, dict(zip(self.tensors, values)))
        except CaptureError:
            return None
        found = find(captured)
        kinds = sorted({kind for kind, _ in self.matched}, key=lambda kind: kind.graph_priority)
        chosen, used = [], set()
        for kind, match in ((kind, match) for kind in kinds for match in kind.graph_matches(found)):
            if (kind, _targets(match)) in self.matched and not used & set(match.nodes):
                chosen.append((kind, match))
                used.update(match.nodes)
        if len(chosen) != len(self.matched):
            return None
        planned = list(container)[:len(self.matched)]
        code, ordered = rewritten_code(self.owner, captured, chosen, planned[0].backend, container)
        for (kind, match), fused in zip(ordered, list(container)[-len(chosen):]):
            twin = planned[self.matched.index((kind, _targets(match)))]
            fused.training, fused.dataflow_path = twin.training, getattr(twin, "dataflow_path", "")
            object.__setattr__(fused, "specialises", twin)  # the report lists the planned one only
        self.codes[tuple(tuple(v.shape) for v in values)] = code
        return code


def _targets(match) -> frozenset:
    """The module targets a match takes: what identifies it in captures of one forward at other shapes."""
    return frozenset(node.target for node in match.nodes if node.op == "call_module")


def _needs_grad(owner: nn.Module, args: tuple, kwargs: dict) -> bool:
    tensors = [v for v in list(args) + list(kwargs.values()) if isinstance(v, torch.Tensor)]
    return any(t.requires_grad for t in tensors) or any(p.requires_grad for p in owner.parameters())


def borrow(fused: nn.Module) -> nn.Module:
    """Hold fused's child modules as plain attributes: they stay in their own slots in the model, and fused adds no
    state_dict entries and no second registration of them."""
    for name in list(fused._modules):
        object.__setattr__(fused, name, fused._modules.pop(name))
    return fused


def _copy_graph(graph: fx.Graph) -> tuple:
    """A copy of graph and the map from its nodes to the copy's."""
    copied, nodes = fx.Graph(), {}
    output = copied.graph_copy(graph, nodes)
    copied.output(output)
    return copied, nodes


def _stock_subgraph(graph: fx.Graph, match) -> fx.Graph:
    """The match's own nodes as a graph of its input (and of what they read besides: shapes of the input)."""
    sub = fx.Graph()
    env = {match.input: sub.placeholder("x")}

    def copy_node(node: fx.Node) -> fx.Node:
        if node not in env:
            if node.op == "placeholder":
                raise ValueError(f"{node.name} is an input of the forward the match does not take")
            for source in node.all_input_nodes:
                copy_node(source)
            env[node] = sub.node_copy(node, env.__getitem__)
        return env[node]

    copy_node(match.output)
    sub.output(env[match.output])
    return sub


def rewrite(root: nn.Module, capture: Capture, chosen: list, backend: Optional[str], call_kwargs: dict) -> tuple:
    """(CapturedForward, fused module list) of root with each chosen match ((fusion kind, match): the kind, a
    planner.kinds.FusionKind class, builds its fused module) replaced by a call of its fused module; install both on
    root (`install`) to use them. Each fused module's stock_forward is the match's own stock nodes."""
    container = nn.ModuleList()
    code, ordered = rewritten_code(root, capture, chosen, backend, container)
    matched = tuple((kind, _targets(match)) for kind, match in ordered)
    return CapturedForward(root, code, capture, call_kwargs, matched), container


def in_graph_order(capture: Capture, chosen: list) -> list:
    """(kind, match) pairs sorted by where each match's output is in the captured graph."""
    order = {node: i for i, node in enumerate(capture.graph.nodes)}
    return sorted(chosen, key=lambda pair: order[pair[1].output])


def rewritten_code(root: nn.Module, capture: Capture, chosen: list, backend: Optional[str],
                   container: nn.ModuleList) -> tuple:
    """(GraphCode of capture's graph with each chosen (kind, match) replaced by a call of its fused module,
    appended to container; the chosen pairs in graph order)."""
    graph, nodes = _copy_graph(capture.graph)
    ordered = in_graph_order(capture, chosen)
    for kind, match in ordered:
        fused = borrow(kind.from_match(root, match, backend))
        fused.stock_forward = GraphCode(root, _stock_subgraph(capture.graph, match))
        container.append(fused)
        output = nodes[match.output]
        with graph.inserting_after(output):
            call = graph.call_module(f"{CONTAINER}.{len(container) - 1}", (nodes[match.input],))
        output.replace_all_uses_with(call)
        inputs = {source for node in match.nodes for source in nodes[node].all_input_nodes}
        erased = {nodes[node] for node in match.nodes}
        for node in reversed(match.nodes):
            graph.erase_node(nodes[node])
        nodes[match.output] = call  # a later match may start where this one ends
        _erase_unused(graph, inputs - erased)
    graph.lint()
    return GraphCode(root, graph), ordered


def _erase_unused(graph: fx.Graph, candidates: set) -> None:
    """Erase what only the erased nodes used (the shapes an SE's views read), transitively; calls of modules stay."""
    frontier = list(candidates)
    while frontier:
        node = frontier.pop()
        if node.graph is graph and not node.users and node.op in ("call_function", "call_method") \
                and not node.is_impure():
            sources = node.all_input_nodes
            graph.erase_node(node)
            frontier += sources


def install(root: nn.Module, forward: CapturedForward, container: nn.ModuleList) -> None:
    """Make root run the rewrite (the fused list registered last: .to() moves the stock modules before the fused
    modules refold from them). forward goes in as a bound method, as a module's forward is (torch.export reads
    its code object)."""
    setattr(root, CONTAINER, container)
    root.forward = forward.__call__


def captured_forward(module: nn.Module) -> Optional[CapturedForward]:
    """The CapturedForward a rewritten module runs, else None."""
    forward = getattr(module.__dict__.get("forward"), "__self__", None)
    return forward if isinstance(forward, CapturedForward) else None


def rewritten(module: nn.Module) -> bool:
    return captured_forward(module) is not None
