"""Any timm or torchvision classification network as a backbone: ``timm:<name>`` and ``tv:<name>``.

Both give the maps of the network's stages (one per resolution, shallow to deep), the global
average of the last as the embedding, and xmodal's own classifier ``fc``, for an input of any
number of channels (L: 1, ab: 2, depth: 1), so they teach or learn in every recipe:

- ``timm:<name>``: ``timm.create_model(name, features_only=True, in_chans=C)``; the maps are
  timm's ``feature_info`` stages;
- ``tv:<name>``: ``torchvision.models.get_model(name)`` with its first convolution rebuilt for C
  channels; the maps come from :func:`torchvision.models.feature_extraction.create_feature_extractor`
  at the last node of the feature trunk at each resolution (found by one pass of a small input).

Nothing is downloaded: ``weights`` is a local state-dict file of the same architecture (the
network's own parameter names; a 3-channel first convolution is summed to C channels, timm's
``adapt_input_conv``). Pre-activation maps (AB) are not offered.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import timm
import torch
import torchvision
from timm.models import adapt_input_conv
from torch import Tensor, nn
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

from xmodal.errors import ConfigError
from xmodal.models.base import Backbone
from xmodal.models.registry import PREFIX_FACTORIES
from xmodal.safeload import load_tensors

#: Input side of the one pass that finds a torchvision network's stages (large enough for five halvings).
_PROBE_SIZE = 64


def _local_weights(arch: str, weights: Optional[str]) -> Optional[dict[str, Tensor]]:
    """The state dict in the local file ``weights`` (read as tensors only), or ``None``."""
    if weights is None:
        return None
    path = Path(weights)
    if not path.is_file():
        raise ConfigError(f"{arch}: weights={weights!r} is not a file; give a local state-dict file "
                          "(nothing is downloaded)")
    state = load_tensors(path, f"{arch} weights={weights}", "give a state dict saved with torch.save")
    return state.get("state_dict", state) if isinstance(state, dict) else state


def _adapt_first_conv(state: dict[str, Tensor], model: nn.Module, in_channels: int) -> dict[str, Tensor]:
    """``state`` with any 4-d weight whose input channels differ from ``model``'s summed to fit."""
    own = model.state_dict()
    out = dict(state)
    for key, value in state.items():
        if key in own and value.dim() == 4 and own[key].dim() == 4 and value.shape[1] != own[key].shape[1] \
                and own[key].shape[1] == in_channels:
            out[key] = adapt_input_conv(in_channels, value)
    return out


def _load(arch: str, model: nn.Module, state: dict[str, Tensor], in_channels: int) -> None:
    state = {k: v for k, v in _adapt_first_conv(state, model, in_channels).items() if k in model.state_dict()}
    missing, _ = model.load_state_dict(state, strict=False)
    if missing:
        raise ConfigError(f"{arch}: the weights file lacks {len(missing)} of the network's tensors "
                          f"(e.g. {missing[0]!r}); expected a state dict of this architecture")


class TimmBackbone(Backbone):
    """A timm network's feature stages (``features_only``), pooled, with xmodal's classifier."""

    def __init__(self, arch: str, name: str, in_channels: int, num_classes: int, weights: Optional[str]) -> None:
        if name not in timm.list_models():
            near = timm.list_models(f"*{name[:6]}*")[:3]
            raise ConfigError(f"{arch}: timm has no model {name!r}" + (f"; near: {', '.join(near)}" if near else ""))
        state = _local_weights(arch, weights)
        trunk = timm.create_model(name, pretrained=False, features_only=True, in_chans=in_channels)
        if state is not None:
            # the classifier's tensors of a full state dict are simply not among the trunk's
            _load(arch, trunk, state, in_channels)
        super().__init__(arch, in_channels, trunk.feature_info.channels()[-1], num_classes)
        self.trunk = trunk

    def forward_maps(self, x: Tensor) -> list[Tensor]:
        return list(self.trunk(x))


def _first_conv(model: nn.Module) -> tuple[str, nn.Conv2d]:
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            return name, module
    raise ConfigError(f"{type(model).__name__} has no convolution to read images with")


def _trunk_nodes(model: nn.Module) -> list[str]:
    """Candidate stage ends: the last graph node inside each direct child of the feature trunk
    (``features.<i>`` where the network has a ``features`` trunk, else each top-level module
    before pooling), in the order the forward runs them; nodes of both the train and eval graphs."""
    train, evaluation = get_graph_node_names(model)
    trunk = hasattr(model, "features")
    heads = ("avgpool", "fc", "classifier", "head", "heads", "flatten", "dropout")
    last: dict[str, str] = {}
    for node in train:
        parts = node.split(".")
        if trunk:
            if parts[0] != "features" or len(parts) < 2:
                continue
            group = ".".join(parts[:2])
        else:
            if parts[0].startswith(heads) or node == "x":
                continue
            group = parts[0]
        last[group] = node
    return [node for node in last.values() if node in evaluation]


class TorchvisionBackbone(Backbone):
    """A torchvision classification network's feature trunk, one map per resolution, pooled,
    with xmodal's classifier."""

    def __init__(self, arch: str, name: str, in_channels: int, num_classes: int, weights: Optional[str]) -> None:
        known = torchvision.models.list_models(module=torchvision.models)
        if name not in known:
            raise ConfigError(f"{arch}: torchvision has no classification model {name!r}")
        model = torchvision.models.get_model(name, weights=None)
        state = _local_weights(arch, weights)
        if state is not None:
            _load(arch, model, state, 3)
        conv_name, conv = _first_conv(model)
        if in_channels != conv.in_channels:
            new = nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                            conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode)
            with torch.no_grad():
                new.weight.copy_(adapt_input_conv(in_channels, conv.weight))
                if conv.bias is not None:
                    new.bias.copy_(conv.bias)
            model.set_submodule(conv_name, new)
        nodes = _trunk_nodes(model)
        probe = create_feature_extractor(model.eval(), return_nodes=nodes)
        with torch.no_grad():
            shapes = {n: t.shape for n, t in probe(torch.zeros(1, in_channels, _PROBE_SIZE, _PROBE_SIZE)).items()}
        stages: dict[int, str] = {}
        for node in nodes:  # the last 4-d node at each resolution
            if len(shapes[node]) == 4:
                stages[shapes[node][-1]] = node
        chosen = [stages[size] for size in sorted(stages, reverse=True)]
        trunk = create_feature_extractor(model.train(), train_return_nodes=chosen, eval_return_nodes=chosen)
        super().__init__(arch, in_channels, shapes[chosen[-1]][1], num_classes)
        self.trunk, self.stage_nodes = trunk, chosen

    def forward_maps(self, x: Tensor) -> list[Tensor]:
        out = self.trunk(x)
        return [out[node] for node in self.stage_nodes]


class ModuleBackbone(Backbone):
    """A user's own network: the maps are the outputs of the graph nodes ``maps`` (shallow to
    deep; :func:`torchvision.models.feature_extraction.get_graph_node_names` lists them), the
    embedding the output of node ``embedding`` (``(B, D)``) or the global average of the last map."""

    def __init__(self, module: nn.Module, maps: Sequence[str], in_channels: int, num_classes: int = 0,
                 embedding: Optional[str] = None, arch: str = "module", probe_size: int = _PROBE_SIZE) -> None:
        if not maps:
            raise ValueError("maps is empty: name the graph nodes whose outputs are the stages' maps")
        nodes = list(maps) + ([embedding] if embedding else [])
        train, evaluation = get_graph_node_names(module)
        unknown = [n for n in nodes if n not in train or n not in evaluation]
        if unknown:
            raise ValueError(f"{arch}: no graph node {unknown[0]!r}; nodes: {', '.join(train[:12])}, ...")
        mode = module.training
        trunk = create_feature_extractor(module, train_return_nodes=nodes, eval_return_nodes=nodes)
        trunk.eval()
        with torch.no_grad():
            out = trunk(torch.zeros(1, in_channels, probe_size, probe_size))
        trunk.train(mode)
        width = out[embedding].shape[1] if embedding else out[maps[-1]].shape[1]
        super().__init__(arch, in_channels, width, num_classes)
        self.trunk, self.map_nodes, self.embedding_node = trunk, list(maps), embedding
        self._last: Optional[dict[str, Tensor]] = None

    def forward_maps(self, x: Tensor) -> list[Tensor]:
        self._last = self.trunk(x)
        return [self._last[node] for node in self.map_nodes]

    def forward_embedding(self, last_map: Tensor) -> Tensor:
        if self.embedding_node is None:
            return super().forward_embedding(last_map)
        return torch.flatten(self._last[self.embedding_node], 1)


def from_module(module: nn.Module, maps: Sequence[str], in_channels: int, num_classes: int = 0,
                embedding: Optional[str] = None) -> ModuleBackbone:
    """Any ``nn.Module`` as a backbone every xmodal loss and the :class:`xmodal.distiller.Distiller`
    accept: ``maps`` name the graph nodes of its stages, ``embedding`` (optional) the node of its
    pooled embedding; ``num_classes`` adds xmodal's classifier (KD reads its logits)."""
    return ModuleBackbone(module, maps, in_channels, num_classes, embedding)


def timm_model(arch: str, in_channels: int, num_classes: int, weights: Optional[str] = None) -> TimmBackbone:
    """``timm:<name>``: any timm model's feature stages; ``weights`` a local state-dict file."""
    return TimmBackbone(arch, arch.removeprefix("timm:"), in_channels, num_classes, weights)


def torchvision_model(arch: str, in_channels: int, num_classes: int,
                      weights: Optional[str] = None) -> TorchvisionBackbone:
    """``tv:<name>``: any torchvision classification model's trunk; ``weights`` a local state-dict file."""
    return TorchvisionBackbone(arch, arch.removeprefix("tv:"), in_channels, num_classes, weights)


PREFIX_FACTORIES["timm:"] = timm_model
PREFIX_FACTORIES["tv:"] = torchvision_model
