"""Dataflow matching: what a module's own forward computes, captured as a graph, and the fusable patterns in it.

For modules whose forward code, not their module tree, says what runs (efficientnet_pytorch's MBConvBlock applies
its BatchNorms and one shared swish in forward and computes its squeeze-excite inline; other packages keep
activations as plain functions). The capture is torch.fx symbolic tracing of the module's own forward with every
submodule a leaf (a call of that module), see `capture`; why fx and not a capture that runs the real forward is
argued in docs/dataflow.md. The patterns (`find`):

  conv run   [pad ->] conv -> [BatchNorm] -> [activation]: the conv a Conv2d (any subclass whose forward computes a
             zero-padded conv, see padding.static_padding), the pad a ZeroPad2d / ConstantPad2d(0) module or an
             F.pad with zeros, the activation a module, a function or an expression (F.silu(x), x * torch.sigmoid(x),
             F.relu6(x + 3) / 6 * x);
  SE         a mean over H and W (adaptive_avg_pool2d, AdaptiveAvgPool2d, mean) -> Linear or 1x1 conv -> [BatchNorm]
             -> activation -> Linear or 1x1 conv -> gate, multiplied by the very x that was pooled (and the one-layer
             effective SE: pool -> layer -> gate -> multiply);
  block      [expand conv run ->] depthwise conv run -> [SE -> [activation]] -> project conv run [+ the block input].

Activations and gates are recognised by what they compute on a probe (mbkernels.activations), never by names. A
match is a description (graph nodes, module paths, settings); each fusion kind (mbkernels.planner.kinds) says which
of the patterns are its matches and builds their fused modules (a kind may also find a pattern of its own with
GraphView's helpers), mbkernels.nn.rewrite the rewritten forward, which the planner proves on a probe like every
swap.
"""
import inspect
import operator
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.fx as fx
from torch.fx import _symbolic_trace
import torch.nn.functional as F
from torch import nn

from .. import activations
from .layers import carried_activation, check_norm, is_plain_sequential
from .padding import overrides_forward, static_padding

VALUE = object()  # in a call spec: an argument that is a value of the caller's graph (a tensor), not a constant


class CaptureError(Exception):
    """A forward that cannot be captured; the message is the reason the report shows."""


@dataclass
class Capture:
    """A module's forward as a graph, with every submodule a leaf.

    parameters: forward's parameters (self aside) in order; tensors: those that are graph placeholders (values);
    concrete: the others, with the value the graph was specialised to (a call with other values runs the stock
    forward); calls: how the forward calls each submodule path, [(args, kwargs)] with VALUE for graph values;
    shapes: for a forward that computes with its input's shape (TensorFlow 'SAME' padding from x.shape), the shape of
    each tensor the graph was specialised to (None: the graph holds for every shape)."""
    module: nn.Module
    graph: fx.Graph
    parameters: list
    tensors: list
    concrete: dict
    calls: dict = field(default_factory=dict)
    shapes: Optional[dict] = None


class _LeafTracer(fx.Tracer):
    """Every submodule is a leaf: the graph is the module's own forward code. A module the forward builds as it
    runs (segmentation_models_pytorch's encoders put their registered stem modules in a new nn.Sequential) is no
    submodule: it is traced through, down to the registered modules it calls."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True

    def call_module(self, m: nn.Module, forward, args, kwargs):
        try:
            self.path_of_module(m)
        except NameError:
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)


def _untraced():
    """A context in which nn.Module calls and attribute reads are the real ones again during an fx trace (torch.fx
    patches them while it traces; its own reverting context is private API, kept to this one place)."""
    return _symbolic_trace._maybe_revert_all_patches()


class _ShapeTracer(_LeafTracer):
    """Traces with real values alongside (the forward runs once on `inputs`): what the forward computes from
    shapes alone (x.shape, x.size(2), their arithmetic) is a plain Python value, so `int(x.shape[-2])` and
    `if height % stride` work and the graph holds constants specialised to the inputs' shapes. A branch on a
    tensor's values still fails, as in symbolic tracing: that would specialise the graph to the data."""

    def __init__(self, inputs: dict):
        super().__init__()
        self.inputs = inputs  # parameter name -> value
        self.values = {}  # node -> its value on the inputs

    def value(self, argument):
        return fx.node.map_aggregate(argument, lambda v: self.values[v.node] if isinstance(v, fx.Proxy) else v)

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, proxy_factory_fn=None):
        if kind == "placeholder":
            value = self.inputs.get(target)
        elif kind == "get_attr":
            with _untraced():
                value = operator.attrgetter(target)(self.root)
        else:
            real_args, real_kwargs = self.value(args), self.value(kwargs)
            with _untraced():  # the real modules and functions, not the tracer's patched ones
                if kind == "call_function":
                    value = target(*real_args, **real_kwargs)
                elif kind == "call_method":
                    value = getattr(real_args[0], target)(*real_args[1:], **real_kwargs)
                else:
                    value = self.root.get_submodule(target)(*real_args, **real_kwargs)
            if not isinstance(value, torch.Tensor) and target is not getattr:  # from shapes: a constant
                return value
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        self.values[proxy.node] = value
        return proxy


def _erase_dead_shape_reads(graph: fx.Graph) -> None:
    """The shape reads a _ShapeTracer left behind (their values became constants: x.shape, a weight's shape),
    unused, erased."""
    for node in reversed(list(graph.nodes)):
        if not node.users and node.op in ("call_function", "call_method", "get_attr") and not node.is_impure():
            graph.erase_node(node)


def _is_constant(value) -> bool:
    if isinstance(value, (tuple, list)):
        return all(_is_constant(v) for v in value)
    return value is None or isinstance(value, (bool, int, float, str, torch.dtype, torch.device))


def call_spec(args: tuple, kwargs: dict) -> tuple:
    """A call's arguments as a spec: graph values become VALUE, constants stay; None when an argument is neither."""
    spec_args, spec_kwargs = [], {}
    for value, store in [(v, None) for v in args] + [(v, k) for k, v in kwargs.items()]:
        if isinstance(value, fx.Node):
            value = VALUE
        elif not _is_constant(value):
            return None
        if store is None:
            spec_args.append(value)
        else:
            spec_kwargs[store] = value
    return tuple(spec_args), spec_kwargs


def forward_parameters(module: nn.Module) -> list:
    """forward's parameters (self aside); CaptureError for *args / **kwargs, which a graph cannot stand in for."""
    parameters = list(inspect.signature(type(module).forward).parameters.values())[1:]
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in parameters):
        raise CaptureError("its forward takes *args or **kwargs")
    return parameters


def capture(module: nn.Module, call: Optional[tuple] = None, example: Optional[dict] = None) -> Capture:
    """`module`'s forward as a graph (eval mode: what inference runs). `call` is how its parent calls it (a
    call_spec): constants there become the graph's specialisation; without one, parameters with a default are
    specialised to it and the others are values. A forward that computes with its input's shape cannot be traced
    symbolically; given `example` (tensor parameter name -> an input it gets), it is traced on that input, the graph
    specialised to its shapes (Capture.shapes: the caller guards on them). CaptureError says why a forward cannot be
    captured (control flow on tensor values, *args, a call the tracer cannot follow)."""
    if is_plain_sequential(module) or not overrides_forward(module, nn.Module):
        raise CaptureError("nothing to capture")
    parameters = forward_parameters(module)
    bound = {}
    if call is not None:
        try:
            bound = inspect.signature(type(module).forward).bind(None, *call[0], **call[1]).arguments
        except TypeError as error:
            raise CaptureError(f"its parent calls it with arguments its forward does not take ({error})") from None
    concrete = {}
    for p in parameters:
        if p.name in bound:
            if bound[p.name] is not VALUE:
                concrete[p.name] = bound[p.name]
        elif p.default is not inspect.Parameter.empty:
            concrete[p.name] = p.default
    tensors = [p.name for p in parameters if p.name not in concrete]
    training = module.training
    module.training = False  # the graph is what inference runs; training runs the stock forward
    shapes = None
    try:
        graph = _LeafTracer().trace(module, concrete_args=dict(concrete))
    except Exception as error:  # whatever stops the tracer: this forward is left to the stock code
        if example is None or set(example) != set(tensors):
            raise CaptureError(_capture_failure(error)) from None
        try:
            with torch.no_grad():
                graph = _ShapeTracer({**concrete, **example}).trace(module, concrete_args=dict(concrete))
        except Exception:  # the symbolic trace's reason is the one to report
            raise CaptureError(_capture_failure(error)) from None
        _erase_dead_shape_reads(graph)
        shapes = {name: tuple(example[name].shape) for name in tensors}
    finally:
        module.training = training
    _drop_specialisation_checks(graph, [p.name for p in parameters], concrete)
    calls = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls.setdefault(node.target, []).append(call_spec(node.args, node.kwargs))
    return Capture(module, graph, [p.name for p in parameters], tensors, concrete, calls, shapes)


def _capture_failure(error: Exception) -> str:
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    if isinstance(error, fx.proxy.TraceError) and "control flow" in text:
        return f"its forward branches on tensor values, which a graph cannot capture ({text})"
    return f"its forward cannot be captured as a graph: {type(error).__name__}: {text}"


def _drop_specialisation_checks(graph: fx.Graph, names: list, concrete: dict) -> None:
    """fx keeps a placeholder per specialised parameter and asserts its value; the capture's caller checks the
    values itself (before choosing the graph), so both go: the graph takes the values alone."""
    order = {node: i for i, node in enumerate(graph.nodes)}
    placeholders = [node for node in graph.nodes if node.op == "placeholder"]
    for node, name in zip(placeholders, names):
        if name in concrete:
            checks, frontier = set(), [node]
            while frontier:
                for user in frontier.pop().users:
                    if user not in checks:
                        checks.add(user)
                        frontier.append(user)
            for check in sorted(checks, key=order.__getitem__, reverse=True):
                graph.erase_node(check)
            graph.erase_node(node)
    graph.lint()


# ------------------------------------------------------------------------------------------------ patterns
@dataclass
class ConvRun:
    """[pad ->] conv -> [BatchNorm] -> [activation] in a graph."""
    nodes: list  # every node of the run, in graph order
    input: fx.Node
    output: fx.Node
    conv: str  # the conv module's path in the captured module
    padding: Optional[list]  # [top, bottom, left, right] with any pad node merged; None: TF 'SAME' per call
    pad_before: Optional[list]  # a pad node's own [top, bottom, left, right], merged above
    norm: Optional[str]  # the BatchNorm's path
    activation: str  # the spec applied last
    depthwise: bool
    pointwise: bool  # 1x1, groups 1, stride 1, no padding: a block's expand or project conv


@dataclass
class SEMatch:
    """x * gate(expand(act(reduce(mean_hw(x))))) in a graph (expand None: the one-layer effective SE)."""
    nodes: list
    input: fx.Node
    output: fx.Node
    reduce: str
    expand: Optional[str]
    norm: Optional[str]
    activation: str
    gate: str


@dataclass
class BlockMatch:
    """[expand ->] depthwise -> [SE -> [activation]] -> project [+ input] in a graph."""
    nodes: list
    input: fx.Node
    output: fx.Node
    expand: Optional[ConvRun]
    dw: ConvRun
    se: Optional[SEMatch]
    post_se_activation: str
    project: ConvRun
    residual: bool


@dataclass
class Matches:
    runs: list  # ConvRuns (every one found; a block or an SE may hold some)
    ses: list
    blocks: list
    refused: list  # (module path, reason): convs and pools found that no pattern takes, and why
    view: "GraphView"  # the pattern helpers over the graph, for a fusion kind that finds a pattern of its own


_ELEMENTWISE_FUNCTIONS = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, operator.iadd, operator.imul,
    operator.itruediv, operator.isub,
    torch.add, torch.sub, torch.mul, torch.div, torch.true_divide, torch.neg, torch.sigmoid, torch.tanh, torch.relu,
    torch.clamp, torch.clip, torch.clamp_min, torch.clamp_max, torch.erf, torch.exp, torch.minimum, torch.maximum,
    F.relu, F.relu6, F.hardtanh, F.hardswish, F.hardsigmoid, F.silu, F.gelu, F.leaky_relu, F.sigmoid, F.tanh,
    F.elu, F.mish, F.softplus, F.dropout, torch.nn.functional.relu_, torch.nn.functional.leaky_relu_,
}
_ELEMENTWISE_METHODS = {
    "sigmoid", "sigmoid_", "relu", "relu_", "tanh", "tanh_", "clamp", "clamp_", "clamp_min", "clamp_min_",
    "clamp_max", "clamp_max_", "clip", "clip_", "mul", "mul_", "add", "add_", "div", "div_", "sub", "sub_", "neg",
    "erf", "exp", "hardswish", "hardsigmoid",
}
_RESHAPE_METHODS = {"view", "reshape", "flatten", "squeeze", "unsqueeze", "expand_as", "view_as", "contiguous"}
_RESHAPE_FUNCTIONS = {torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, operator.getitem}
_MAX_REGION = 8  # nodes in one activation expression: hardswish written out is five


class GraphView:
    """Pattern helpers over one captured graph: elementwise regions and the activations they compute, conv runs,
    zero pads, global pools, reshape chains, SE layers."""

    def __init__(self, capture: Capture):
        self.capture = capture
        self.graph = capture.graph
        self.order = {node: i for i, node in enumerate(self.graph.nodes)}

    def module(self, node: fx.Node) -> Optional[nn.Module]:
        if node.op != "call_module":
            return None
        return self.capture.module.get_submodule(node.target)

    def only_user(self, node: fx.Node) -> Optional[fx.Node]:
        return next(iter(node.users)) if len(node.users) == 1 else None

    # ---- elementwise expressions (activations, gates)
    def elementwise(self, node: fx.Node) -> bool:
        constants_only = all(_is_constant(a) for a in list(node.args) + list(node.kwargs.values())
                             if not isinstance(a, fx.Node))
        if not constants_only:
            return False
        if node.op == "call_module":
            module = self.module(node)
            return (activations.identify_activation(module) is not None
                    or activations.identify_gate(module) is not None)
        if node.op == "call_function":
            return node.target in _ELEMENTWISE_FUNCTIONS
        return node.op == "call_method" and node.target in _ELEMENTWISE_METHODS

    def region_after(self, value: fx.Node, identify) -> tuple:
        """(name, nodes) of the longest elementwise expression of `value` alone that consumes every use of it and
        that `identify` (activations.identify_activation / identify_gate) names; ("identity", []) when none does."""
        region, inside = [], {value}
        for node in list(self.graph.nodes)[self.order[value] + 1:]:
            if len(region) == _MAX_REGION:
                break
            inputs = node.all_input_nodes
            if inputs and all(i in inside for i in inputs) and self.elementwise(node):
                region.append(node)
                inside.add(node)
        for end in range(len(region), 0, -1):
            nodes = region[:end]
            members = set(nodes)
            if not set(value.users) <= members or any(not set(n.users) <= members for n in nodes[:-1]):
                continue
            name = identify(self.function_of(value, nodes))
            if name is not None and name != "identity":
                return name, nodes
        return "identity", []

    def function_of(self, value: fx.Node, nodes: list):
        """The expression `nodes` computes from `value`, as a function of one tensor."""
        def run(t):
            env = {value: t}
            for node in nodes:
                args = fx.node.map_arg(node.args, env.__getitem__)
                kwargs = fx.node.map_arg(node.kwargs, env.__getitem__)
                if node.op == "call_module":
                    env[node] = self.module(node)(*args, **kwargs)
                elif node.op == "call_function":
                    env[node] = node.target(*args, **kwargs)
                else:
                    env[node] = getattr(args[0], node.target)(*args[1:], **kwargs)
            return env[nodes[-1]]
        return run

    # ---- conv runs
    def conv_run(self, node: fx.Node, refused: list) -> Optional[ConvRun]:
        conv = self.module(node)
        if not isinstance(conv, nn.Conv2d) or len(node.args) != 1 or node.kwargs:
            return None
        try:
            if conv.padding_mode != "zeros":
                raise ValueError(f"conv has padding_mode={conv.padding_mode!r}; only zero padding is fused")
            padding = static_padding(conv)
        except ValueError as error:
            refused.append((node.target, str(error)))
            return None
        nodes, source = [node], node.args[0]
        pad = self.zero_pad(source) if isinstance(source, fx.Node) else None
        if pad is not None and padding is not None and len(source.users) == 1:
            padding = [a + b for a, b in zip(padding, pad)]
            nodes.insert(0, source)
            source = source.args[0]
        else:
            pad = None
        last, norm, activation = node, None, "identity"
        user = self.only_user(node)
        if user is not None and isinstance(self.module(user), nn.BatchNorm2d) and user.args == (node,):
            try:
                check_norm(self.module(user))
            except ValueError as error:
                refused.append((user.target, str(error)))
            else:
                norm, last = user.target, user
                nodes.append(user)
                carried = carried_activation(self.module(user))
                if carried is not None:
                    activation = activations.identify_activation(carried)
                    if activation is None:
                        refused.append((user.target, f"activation {type(carried).__name__} has no fused kernel"))
                        return None
        if activation == "identity":
            activation, region = self.region_after(last, activations.identify_activation)
            nodes += region
        depthwise = conv.groups == conv.in_channels > 1
        pointwise = (tuple(conv.kernel_size) == (1, 1) and conv.groups == 1 and tuple(conv.stride) == (1, 1)
                     and padding == [0, 0, 0, 0])
        if not depthwise and norm is None and activation == "identity":
            return None  # nothing to fold into a plain conv
        return ConvRun(nodes, source, nodes[-1], node.target, padding, pad, norm, activation, depthwise, pointwise)

    def zero_pad(self, node: fx.Node) -> Optional[list]:
        """[top, bottom, left, right] of a zero-padding node (ZeroPad2d / ConstantPad2d(0) module, F.pad with
        zeros), else None."""
        module = self.module(node)
        if isinstance(module, nn.ConstantPad2d) and float(module.value) == 0.0 and len(node.args) == 1:
            left, right, top, bottom = module.padding
            return [top, bottom, left, right]
        if node.op == "call_function" and node.target is F.pad and len(node.args) >= 2:
            pads = node.args[1]
            mode = node.kwargs.get("mode", node.args[2] if len(node.args) > 2 else "constant")
            value = node.kwargs.get("value", node.args[3] if len(node.args) > 3 else None)
            if (mode == "constant" and (value is None or value == 0) and isinstance(pads, (tuple, list))
                    and len(pads) == 4 and all(isinstance(p, int) and p >= 0 for p in pads)):
                left, right, top, bottom = pads
                return [top, bottom, left, right]
        return None

    # ---- squeeze-excite
    def pooled_input(self, node: fx.Node) -> Optional[fx.Node]:
        """x when node is a global average pool of x over H and W (keeping or dropping the 1x1 plane)."""
        module = self.module(node)
        if isinstance(module, nn.AdaptiveAvgPool2d) and module.output_size in (1, (1, 1)) and len(node.args) == 1:
            return node.args[0]
        if node.op == "call_function" and node.target is F.adaptive_avg_pool2d:
            size = node.args[1] if len(node.args) > 1 else node.kwargs.get("output_size")
            return node.args[0] if size in (1, (1, 1), [1, 1]) else None
        if (node.op == "call_method" and node.target == "mean") or (node.op == "call_function"
                                                                       and node.target is torch.mean):
            dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
            if isinstance(dims, (tuple, list)) and sorted(d % 4 for d in dims) == [2, 3]:
                return node.args[0]
        return None

    def skip_reshapes(self, node: fx.Node) -> tuple:
        """(first node after node's chain of reshapes (views, flatten, unsqueeze, [:, :, None, None], identities),
        the reshape nodes passed); each node of the chain must have one user."""
        passed = []
        while True:
            user = self.only_user(node)
            if user is None or not self.reshapes(user, node):
                return user, passed
            passed.append(user)
            node = user

    def reshapes(self, node: fx.Node, source: fx.Node) -> bool:
        if node.all_input_nodes and node.all_input_nodes[0] is not source:
            return False
        if node.op == "call_method" and node.target in _RESHAPE_METHODS:
            return True
        if node.op == "call_function" and node.target in _RESHAPE_FUNCTIONS:
            return node.args[0] is source
        module = self.module(node)
        return module is not None and activations.identify_activation(module) == "identity" and len(node.args) == 1

    def layer(self, node: Optional[fx.Node]) -> Optional[nn.Module]:
        """The SE layer a node calls (an nn.Linear or a 1x1 Conv2d with groups 1 and no padding), or None."""
        module = self.module(node) if node is not None else None
        if isinstance(module, nn.Linear):
            return module
        if isinstance(module, nn.Conv2d) and tuple(module.kernel_size) == (1, 1) and module.groups == 1:
            try:
                return module if static_padding(module) == [0, 0, 0, 0] else None
            except ValueError:
                return None
        return None

    def squeeze_excite(self, pool: fx.Node) -> Optional[SEMatch]:
        x = self.pooled_input(pool)
        if x is None:
            return None
        nodes = [pool]
        first, passed = self.skip_reshapes(pool)
        nodes += passed
        if self.layer(first) is None:
            return None
        nodes.append(first)
        reduce, expand, norm, activation = first.target, None, None, "identity"
        hidden = first
        user = self.only_user(first)
        if user is not None and isinstance(self.module(user), nn.modules.batchnorm._BatchNorm) \
                and self.module(user).running_mean is not None:
            norm, hidden = user.target, user
            nodes.append(user)
        gate, region = self.region_after(hidden, activations.identify_gate)
        if gate == "identity":  # two layers: the activation, then the expand layer and the gate
            activation, region = self.region_after(hidden, activations.identify_activation)
            after = region[-1] if region else hidden
            second, passed = self.skip_reshapes(after)
            if self.layer(second) is None:
                return None
            nodes += region + passed + [second]
            expand = second.target
            gate, region = self.region_after(second, activations.identify_gate)
            if gate == "identity":
                return None
        nodes += region
        product, passed = self.skip_reshapes(nodes[-1])
        nodes += passed
        if product is None or not self.scales(product, nodes[-1], x):
            return None
        nodes.append(product)
        return SEMatch(nodes, x, product, reduce, expand, norm, activation, gate)

    @staticmethod
    def scales(node: fx.Node, scale: fx.Node, x: fx.Node) -> bool:
        """node is x * scale (either order; a function, an operator or a method)."""
        multiply = ((node.op == "call_function" and node.target in (operator.mul, torch.mul))
                    or (node.op == "call_method" and node.target == "mul"))
        return multiply and not node.kwargs and set(node.args) == {scale, x} and len(node.args) == 2

    # ---- blocks
    def block(self, dw: ConvRun, producer: dict, se_of: dict) -> Optional[BlockMatch]:
        """The block around a depthwise run: producer maps a node to the pointwise run that outputs it, se_of a
        node to the SE that takes it."""
        if dw.padding is None or self.module_at(dw.conv).out_channels != self.module_at(dw.conv).in_channels:
            return None
        expand = producer.get(dw.input)
        if expand is not None and len(expand.output.users) != 1:
            expand = None
        x = expand.input if expand is not None else dw.input
        nodes = (expand.nodes if expand else []) + dw.nodes
        after, se, post = dw.output, se_of.get(dw.output), "identity"
        if se is not None:
            if set(dw.output.users) != {se.nodes[0], se.output}:
                return None
            nodes += se.nodes
            post, region = self.region_after(se.output, activations.identify_activation)
            nodes += region
            after = region[-1] if region else se.output
        project = next((run for run in producer.values() if run.input is after), None)
        if project is None or len(after.users) != 1:
            return None
        nodes += project.nodes
        output, residual = project.output, False
        user = self.only_user(project.output)
        if (user is not None and not user.kwargs and len(user.args) == 2 and set(user.args) == {project.output, x}
                and ((user.op == "call_function" and user.target in (operator.add, torch.add))
                     or (user.op == "call_method" and user.target == "add"))):
            output, residual = user, True
            nodes.append(user)
        return BlockMatch(sorted(nodes, key=self.order.__getitem__), x, output, expand, dw, se, post, project,
                          residual)

    def module_at(self, path: str) -> nn.Module:
        return self.capture.module.get_submodule(path)


def is_whole_forward(capture: Capture, match) -> bool:
    """Whether a match is all its module's forward computes: it reads the one input and its output is returned."""
    output = next(node for node in capture.graph.nodes if node.op == "output")
    return match.input.op == "placeholder" and output.args[0] is match.output


def find(capture: Capture) -> Matches:
    """Every conv run, SE and block in a captured graph (they may overlap: the planner picks)."""
    g = GraphView(capture)
    refused = []
    runs = [run for run in (g.conv_run(node, refused) for node in list(g.graph.nodes) if node.op == "call_module")
            if run is not None]
    ses = [se for se in (g.squeeze_excite(node) for node in list(g.graph.nodes)) if se is not None]
    se_nodes = {node for se in ses for node in se.nodes}
    runs = [run for run in runs if not se_nodes & set(run.nodes)]  # an SE's layers are the SE's
    pointwise = {run.output: run for run in runs if run.pointwise}
    se_of = {se.input: se for se in ses}
    blocks = [block for block in (g.block(run, pointwise, se_of) for run in runs if run.depthwise) if block]
    return Matches(runs, ses, blocks, refused, g)

