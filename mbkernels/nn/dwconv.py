"""DWConvBNAct: a depthwise Conv2d, its BatchNorm and its activation, run as one fused op in inference.

`mbkernels.patch` puts a DWConvBNAct in the conv's place in its parent and a FusedInto placeholder in the
places of the BatchNorm and the activation. The stock modules then live inside the DWConvBNAct, but their
state_dict entries keep the names they had in the parent (see `stock_slots`), so checkpoints load both ways.
"""
from typing import Optional

import torch
from torch import nn

from .. import ops
from .._contract import device_layout, tap_major
from ..match.layers import check_depthwise, check_norm, fused_activation
from ..match.padding import static_padding, tf_same_padding
from .fused import CONV_SETTINGS, NORM_SETTINGS, FusedModule, StandIn


def _load_module_tree(module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors) -> None:
    """What nn.Module.load_state_dict does for one subtree (its load post-hooks aside)."""
    module._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)
    child_metadata = {k: v for k, v in local_metadata.items() if k == "assign_to_params_buffers"}
    for name, child in module._modules.items():
        if child is not None:
            _load_module_tree(child, state_dict, f"{prefix}{name}.", child_metadata, strict, missing, unexpected,
                              errors)


def _forget_keys_loaded_elsewhere(module: "FoldedConvBNAct", incompatible_keys) -> None:
    # bn and act entries sit under their own slots in the parent, where their FusedInto placeholders load them.
    moved = tuple(f"{module._load_prefix}{child}." for child in ("bn", "act"))
    incompatible_keys.missing_keys[:] = [k for k in incompatible_keys.missing_keys if not k.startswith(moved)]


class FoldedConvBNAct(FusedModule):
    """What a conv -> BatchNorm -> activation run folded into one module is, whatever computes it: the stock
    modules inside, the BN folded into the conv's weight and bias, and the stock names in the state_dict.

    conv: an nn.Conv2d (subclasses say which: check_conv); bn: an nn.BatchNorm2d, or a BatchNorm2d subclass that
    carries its activation (timm's BatchNormAct2d), or None; act: a stock or hand-written activation module, or
    None. In training mode, or when autograd needs a graph, the stock modules run unchanged. The folded weights
    are buffers folded when the module is built and refolded whenever a parameter or statistic changes
    (load_state_dict, in-place edits, .to(); `refresh()` after edits through .data), see FusedModule.

    stock_slots (set by `mbkernels.patch`): the names conv, bn and act had in the parent, e.g.
    {"conv": "3", "bn": "4", "act": "5"}; this module takes conv's name, and its state_dict entries are written
    and read under those names, so they equal the stock model's.

    pad_before and activation, when given, add to and replace what conv and act say: a run matched in a forward's
    dataflow (mbkernels.nn.rewrite) may pad before the conv (a ZeroPad2d, F.pad: [top, bottom, left, right]) and
    apply an expression, not a module. The conv's stride, padding and dilation are read again at every refold.
    """

    def __init__(self, conv: nn.Conv2d, bn: Optional[nn.BatchNorm2d] = None, act: Optional[nn.Module] = None,
                 backend: Optional[str] = None, stock_slots: Optional[dict[str, str]] = None, *,
                 pad_before: Optional[list] = None, activation: Optional[str] = None):
        super().__init__()
        self.check_conv(conv)
        if bn is not None:
            check_norm(bn)
        self.activation = activation if activation is not None else fused_activation(bn, act)
        self.pad_before = pad_before
        self.conv = conv
        self.read_conv_settings()
        self.bn = bn if bn is not None else nn.Identity()
        self.act = act if act is not None else nn.Identity()
        self.backend = backend
        self.stock_slots = dict(stock_slots) if stock_slots else None
        self._load_prefix = ""
        self.half_fused = ""  # set by patch: what still runs on its own after this module (see patch_report)
        self.training = conv.training  # built by hand around eval-mode modules, it runs fused at once
        if self.stock_slots:
            self.register_load_state_dict_post_hook(_forget_keys_loaded_elsewhere)
        self.refresh()

    stands_in_for = "conv"  # code that reads its conv's kernel_size, stride, weight... reads the conv's (StandIn)
    writes_through = CONV_SETTINGS

    # ---- what a subclass with another kind of conv changes
    check_conv = staticmethod(check_depthwise)
    static_padding = staticmethod(static_padding)

    @staticmethod
    def stride_dilation(conv: nn.Module) -> tuple:
        return tuple(conv.stride), tuple(conv.dilation)

    def read_conv_settings(self) -> None:
        """The op's stride, dilation and padding ([top, bottom, left, right]; None: computed per call from x's
        size) from the conv as it is now (the conv's own `stride`, `padding`... are answered by the conv: StandIn)."""
        self.op_stride, self.op_dilation = self.stride_dilation(self.conv)
        padding = self.static_padding(self.conv)
        if padding is not None and self.pad_before is not None:
            padding = [a + b for a, b in zip(padding, self.pad_before)]
        self.op_padding = padding

    def padding_for(self, x: torch.Tensor) -> Optional[list[int]]:
        """[top, bottom, left, right] for x (None: the stock modules must run)."""
        return self.op_padding if self.op_padding is not None else tf_same_padding(x.shape[2:], self.conv)

    def conv_weight_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The conv's float32 (weight [C * M, 1, kh, kw], bias), before the BN is folded in."""
        return ops.fold_bn(self.conv, None)

    def _fold_modules(self) -> tuple:
        return self.conv, self.bn

    def _fold_settings(self) -> tuple:
        convs = [self.conv, *self.conv.children()]  # a MixedConv2d's groups
        settings = tuple((c.stride, c.padding, c.dilation) for c in convs if isinstance(c, nn.Conv2d))
        return settings + ((self.bn.eps,) if isinstance(self.bn, nn.BatchNorm2d) else ())

    def folded_conv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The float32 (weight, bias) of the conv with the BN folded in (the conv's settings read again)."""
        self.read_conv_settings()
        weight, bias = self.conv_weight_bias()
        if isinstance(self.bn, nn.BatchNorm2d):
            weight, bias = ops.fold_bn_into(weight, bias, self.bn)
        return weight, bias

    def folded_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The float32 (weight, bias) with BN folded in, as the fused op gets them."""
        self.refresh_if_stale()
        return self.folded_weight, self.folded_bias

    def stock_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))

    # ---- state_dict entries under the stock names (only when placed by patch, i.e. stock_slots is set)
    def _parent_prefix(self, prefix: str) -> Optional[str]:
        if not self.stock_slots:
            return None
        own = self.stock_slots["conv"] + "."
        if not (prefix == own or prefix.endswith("." + own)):
            return None
        return prefix[: len(prefix) - len(own)]

    def state_dict(self, *args, destination=None, prefix="", keep_vars=False):
        destination = super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        parent = self._parent_prefix(prefix)
        if parent is None:
            return destination

        def stock_key(key: str) -> str:  # "<prefix>bn.running_mean" -> "<parent>4.running_mean"
            child, _, rest = key[len(prefix):].partition(".")
            return f"{parent}{self.stock_slots[child]}" + (f".{rest}" if rest else "")

        # Our entries are the last ones written: re-inserting them in order keeps the stock order.
        for key in [k for k in destination if k.startswith(prefix)]:
            destination[stock_key(key)] = destination.pop(key)
        metadata = getattr(destination, "_metadata", None)
        if metadata is not None:
            metadata.pop(prefix[:-1], None)  # ours; conv's entry takes this name
            for key in [k for k in metadata if k.startswith(prefix)]:
                entry = metadata.pop(key)
                if key[len(prefix):].partition(".")[0] in self.stock_slots:  # not for a stand-in Identity act
                    metadata[stock_key(key)] = entry
        return destination

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        self._load_prefix = prefix
        if self._parent_prefix(prefix) is not None:
            # conv's entries carry this slot's own name (it was conv's): hand them to the conv child.
            for key in [k for k in state_dict if k.startswith(prefix)]:
                if key[len(prefix):].partition(".")[0] not in self._modules:
                    state_dict[f"{prefix}conv.{key[len(prefix):]}"] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)

class DWConvBNAct(FoldedConvBNAct):
    """act(bn(conv(x))) for a depthwise conv, computed by `mbkernels.ops.dwconv_bn_act` in inference (see
    FoldedConvBNAct for the rest)."""

    def _fold(self) -> dict:
        weight, bias = self.folded_conv()
        # The layout the backends of its device read, made once here rather than per call.
        return {"folded_weight": device_layout(weight, tap_major), "folded_bias": bias}

    def op_call(self, x: torch.Tensor) -> Optional[tuple]:
        """(op name, its arguments for x, the backend aside), or None where the stock modules must run."""
        weight, bias = self.folded_weights()  # first: a refold reads the conv's settings again
        padding = self.padding_for(x)
        if padding is None:
            return None
        return "dwconv_bn_act", x, weight, bias, self.op_stride, padding, self.op_dilation, self.activation

    def extra_repr(self) -> str:
        conv = self.conv
        text = f"channels={conv.in_channels}, kernel_size={conv.kernel_size}, stride={conv.stride}"
        if conv.out_channels != conv.in_channels:
            text += f", depth_multiplier={conv.out_channels // conv.in_channels}"
        if self.op_padding is None:
            text += ", padding='SAME' (TensorFlow)"
        if tuple(conv.dilation) != (1, 1):
            text += f", dilation={conv.dilation}"
        return text + f", activation={self.activation!r}, fused=True"



class FusedInto(StandIn, nn.Identity):
    """Stands in the parent's slot of a module that now runs inside the DWConvBNAct named `into`, answering its
    public attributes (a BatchNorm's num_features, eps, weight...: StandIn).

    It loads that module's state_dict entries, which keep this slot's name (DWConvBNAct writes them so), and then
    refreshes `owner`'s folded weights (the owner's own load hook runs before this slot, which follows it)."""

    stands_in_for, writes_through = "stock", NORM_SETTINGS

    def __init__(self, into: str, stock: nn.Module, owner: Optional[FoldedConvBNAct] = None):
        super().__init__()
        self.into = into
        object.__setattr__(self, "stock", stock)  # not a child: it is registered inside the DWConvBNAct
        object.__setattr__(self, "owner", owner)  # nor is the owner
        self._version = getattr(type(stock), "_version", 1)  # state_dict metadata as the stock module writes it

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        _load_module_tree(self.stock, state_dict, prefix, local_metadata, strict, missing, unexpected, errors)
        if self.owner is not None:
            self.owner.refresh()

    def extra_repr(self) -> str:
        return f"{type(self.stock).__name__} runs fused in {self.into!r}"
