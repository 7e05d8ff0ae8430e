"""Feature extractors: any model (``torch.nn.Module`` or callable) plus its preprocessing, with a stable fingerprint.

The fingerprint (sha256 of name + weights digest + preprocessing description) keys the on-disk feature cache
(:mod:`streamloader.data.feature_cache`): change the weights or the preprocessing and the features are recomputed.

Plug in a model you already have (streamloader itself never downloads weights and does not need torchvision)::

    # EfficientNet from torchvision: the guide's EfficientNetFeatureExtractor
    weights = torchvision.models.EfficientNet_B0_Weights.DEFAULT
    net = torchvision.models.efficientnet_b0(weights=weights)
    extractor = FeatureExtractor(torch.nn.Sequential(net.features, net.avgpool), weights.transforms(),
                                 name="efficientnet_b0/IMAGENET1K_V1", feature_dims=1280)

    # CLIP from open_clip: a bound method of a Module works, its module's weights are fingerprinted
    model, _, preprocess = open_clip.create_model_and_transforms("ViT-B-32", pretrained="laion2b_s34b_b79k")
    extractor = FeatureExtractor(model.encode_image, preprocess, name="open_clip/ViT-B-32/laion2b", feature_dims=512)

    extractor.extract("data/00000007.jpg")      # 1-D float32 tensor, like the guide's .extract(image_path)

``preprocess`` maps an RGB PIL image to a ``[3, H, W]`` tensor; its ``repr`` (memory addresses removed) describes
it in the fingerprint, or pass ``preprocess_description=``. A plain function as model is fingerprinted by its
qualified name only: give it a ``name`` that changes with its weights. :class:`TinyCNN` and
:func:`tiny_cnn_extractor` are a seeded toy model for demos and tests, not a useful image model.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
from typing import Any, Callable, Dict, Optional, Protocol, Sequence, Tuple, Union, runtime_checkable

import numpy as np
import torch
from torch import nn

from streamloader.data.images import load_image

log = logging.getLogger(__name__)

__all__ = [
    "FeatureExtractorProtocol",
    "FeatureExtractor",
    "ImagePreprocess",
    "TinyCNN",
    "tiny_cnn_extractor",
    "weights_digest",
    "describe_preprocess",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


@runtime_checkable
class FeatureExtractorProtocol(Protocol):
    """What the dataset and ``precompute_features`` need from an extractor (:class:`FeatureExtractor` has it all).

    ``fingerprint`` (hex digest) keys the feature cache; ``preprocess`` runs in DataLoader workers (keep it
    picklable); ``forward_batch`` gets a ``[B, 3, H, W]`` batch and returns ``[B, D]`` float32 on the CPU.
    """

    fingerprint: str
    feature_dims: Optional[int]

    def preprocess(self, image: Any) -> torch.Tensor: ...

    def forward_batch(self, batch: torch.Tensor) -> torch.Tensor: ...

    def extract(self, image_path: str) -> torch.Tensor: ...


def weights_digest(model: Any) -> str:
    """sha256 over a module's state_dict (names, dtypes, shapes, bytes), or the qualified name of a callable."""
    module = _module_of(model)
    if module is None:
        return "callable:" + _qualname(model)
    digest = hashlib.sha256()
    if module is not model:  # a bound method: which method matters too
        digest.update(_qualname(model).encode())
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return "sha256:" + digest.hexdigest()


def _module_of(model: Any) -> Optional[nn.Module]:
    """The Module holding a model's weights: the model itself or the owner of a bound method (else None)."""
    module = model if isinstance(model, nn.Module) else getattr(model, "__self__", None)
    return module if isinstance(module, nn.Module) else None


def _qualname(obj: Any) -> str:
    target = getattr(obj, "__func__", obj)
    name = getattr(target, "__qualname__", None) or type(target).__qualname__
    return f"{getattr(target, '__module__', None) or type(target).__module__}.{name}"


def describe_preprocess(preprocess: Any) -> str:
    """A stable text for a preprocessing callable: its ``description``, its repr without addresses, or its name."""
    described = getattr(preprocess, "description", None)
    if isinstance(described, str):
        return described
    if callable(preprocess) and hasattr(preprocess, "__qualname__"):  # functions and methods
        return _qualname(preprocess)
    return _ADDRESS.sub("", repr(preprocess))


class FeatureExtractor:
    """A model plus its preprocessing, with a stable ``fingerprint`` (see module docstring for EfficientNet/CLIP).

    ``FeatureExtractor(model, preprocess, name=None, feature_dims=None)``; ``extract(path)`` gives one 1-D
    float32 CPU tensor (the guide's API), ``forward_batch(batch)`` many. Model outputs are flattened per image
    (``[B, C, 1, 1]`` → ``[B, C]``). The fingerprint is computed once, at first use: after changing the weights,
    build a new extractor. ``forward_batch`` switches a Module to ``eval()`` mode.
    """

    def __init__(self, model: Union[nn.Module, Callable[[torch.Tensor], Any]], preprocess: Callable[[Any], Any],
                 name: Optional[str] = None, feature_dims: Optional[int] = None, *,
                 preprocess_description: Optional[str] = None):
        if not callable(model) or not callable(preprocess):
            raise TypeError("model and preprocess must be callable")
        self.model = model
        self.preprocess = preprocess
        self.name = name or _qualname(type(model) if isinstance(model, nn.Module) else model)
        self.feature_dims = feature_dims
        self.preprocess_description = preprocess_description or describe_preprocess(preprocess)
        self._fingerprint: Optional[str] = None
        self._weights: Optional[str] = None

    def __repr__(self) -> str:
        return (f"FeatureExtractor(name={self.name!r}, feature_dims={self.feature_dims}, "
                f"preprocess={self.preprocess_description!r})")

    @property
    def weights_digest(self) -> str:
        """Digest of the model's weights (see :func:`weights_digest`), computed once."""
        if self._weights is None:
            self._weights = weights_digest(self.model)
        return self._weights

    @property
    def fingerprint(self) -> str:
        """sha256 hex of (name, weights digest, preprocessing description): the feature cache's extractor key."""
        if self._fingerprint is None:
            payload = {"name": self.name, "weights": self.weights_digest, "preprocess": self.preprocess_description}
            self._fingerprint = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
        return self._fingerprint

    def describe(self) -> Dict[str, Any]:
        """What the fingerprint covers (written next to the cached features as ``extractor.json``)."""
        return {"name": self.name, "weights": self.weights_digest, "preprocess": self.preprocess_description,
                "feature_dims": self.feature_dims}

    @property
    def device(self) -> torch.device:
        """Where the model's parameters live (CPU for a parameterless model or a plain callable)."""
        module = _module_of(self.model)
        if module is not None:
            for tensor in module.parameters():
                return tensor.device
        return torch.device("cpu")

    def to(self, device: Union[str, torch.device]) -> "FeatureExtractor":
        """Move the model to ``device``; returns self."""
        module = _module_of(self.model)
        if module is not None:
            module.to(device)
        return self

    def forward_batch(self, batch: torch.Tensor) -> torch.Tensor:
        """Features of a ``[B, 3, H, W]`` batch: ``[B, D]`` float32 on the CPU."""
        module = _module_of(self.model)
        if module is not None and module.training:
            module.eval()
        # no_grad, not inference_mode: inference tensors could not be inputs of a model trained on them later.
        with torch.no_grad():
            out = self.model(batch.to(self.device, non_blocking=True))
            if isinstance(out, (tuple, list)):
                out = out[0]
            out = out.reshape(out.shape[0], -1).float().cpu()
        if self.feature_dims is None:
            self.feature_dims = int(out.shape[1])
        elif out.shape[1] != self.feature_dims:
            raise ValueError(f"{self.name}: model gave {out.shape[1]} features per image, expected {self.feature_dims}")
        return out

    def extract_image(self, image: Any) -> torch.Tensor:
        """Features of one RGB PIL image: a 1-D float32 CPU tensor."""
        return self.forward_batch(self.preprocess(image).unsqueeze(0))[0]

    def extract(self, image_path: str, storage_options: Optional[Dict[str, Any]] = None) -> torch.Tensor:
        """Features of the image at ``image_path`` (plain path through ``open`` and hooks, or fsspec URL)."""
        return self.extract_image(load_image(image_path, storage_options=storage_options))

    def __getstate__(self) -> Dict[str, Any]:
        # Workers get the fingerprint ready-made instead of re-hashing the weights each.
        _ = self.fingerprint
        return self.__dict__.copy()


class ImagePreprocess:
    """PIL image → ``[3, size, size]`` float tensor: resize (bilinear, aspect not kept), scale to [0, 1], normalize."""

    def __init__(self, size: Union[int, Tuple[int, int]] = 64, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD):
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self._mean = torch.tensor(self.mean).view(3, 1, 1)
        self._std = torch.tensor(self.std).view(3, 1, 1)

    def __call__(self, image: Any) -> torch.Tensor:
        from PIL import Image

        if image.mode != "RGB":
            image = image.convert("RGB")
        if image.size != self.size:
            image = image.resize(self.size, Image.BILINEAR)
        chw = np.asarray(image).transpose(2, 0, 1).astype(np.float32)
        return (torch.from_numpy(chw).div_(255.0) - self._mean) / self._std

    @property
    def description(self) -> str:
        """Stable text for fingerprints."""
        return f"ImagePreprocess(size={self.size}, mean={self.mean}, std={self.std}, resample=bilinear)"

    def __repr__(self) -> str:
        return self.description


class TinyCNN(nn.Module):
    """Three strided 3x3 convolutions + global average pooling, initialized from ``seed``: a demo/test model only.

    Same seed (and torch version) → same weights → same fingerprint, in every process.
    """

    def __init__(self, feature_dims: int = 32, width: int = 8, seed: int = 0):
        super().__init__()
        with torch.random.fork_rng(devices=[]):  # seeded init without disturbing the caller's RNG
            torch.manual_seed(seed)
            self.body = nn.Sequential(
                nn.Conv2d(3, width, 3, stride=2, padding=1), nn.ReLU(),
                nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),
                nn.Conv2d(2 * width, feature_dims, 3, stride=2, padding=1), nn.ReLU(),
                nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            )
        self.feature_dims = feature_dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def tiny_cnn_extractor(feature_dims: int = 32, input_size: int = 64, seed: int = 0, width: int = 8) -> FeatureExtractor:
    """A :class:`FeatureExtractor` around :class:`TinyCNN` (demos and tests; real use plugs in EfficientNet/CLIP).

    Usage: ``LaionAestheticsDataset("data/labels.tsv", "data", tiny_cnn_extractor())``.
    """
    model = TinyCNN(feature_dims=feature_dims, width=width, seed=seed)
    return FeatureExtractor(model, ImagePreprocess(input_size), name=f"streamloader.TinyCNN/seed={seed}/width={width}",
                            feature_dims=feature_dims)
