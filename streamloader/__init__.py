"""streamloader — train on a remote DagsHub (or any fsspec) dataset repository as if it were on local disk.

The names a user calls, imported lazily so that ``import streamloader`` stays cheap (no torch, no requests) and
DataLoader workers started with ``spawn`` pay only for what they use. Everything else lives in its subpackage:
``streamloader.errors`` (every error type), ``streamloader.auth`` (tokens), ``streamloader.cache``,
``streamloader.remote`` (client, repository snapshot, prefetch results and jobs), ``streamloader.data`` (labels,
features, training helpers), ``streamloader.dataloaders`` (the DALLE2-pytorch drop-in), ``streamloader.server``
(the local DagsHub-compatible server)::

    from streamloader import install_hooks, prefetch
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, List

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    # errors: the base classes (every specific one is in streamloader.errors)
    "StreamloaderError": "streamloader.errors",
    "AuthenticationError": "streamloader.errors",
    "RemoteError": "streamloader.errors",
    "DataFormatError": "streamloader.errors",
    "MountError": "streamloader.errors",
    # auth
    "login": "streamloader.auth",
    # hooks and prefetch
    "install_hooks": "streamloader.hooks",
    "uninstall_hooks": "streamloader.hooks",
    "activate_from_env": "streamloader.hooks",
    "prefetch": "streamloader.hooks.warmup",
    # filesystem / cache
    "DagsHubFileSystem": "streamloader.remote.filesystem",
    "FileCache": "streamloader.cache",
    # labels.tsv
    "read_labels": "streamloader.data.labels",
    "filter_labels": "streamloader.data.filters",
    # LAION-Aesthetics dataset and features (the guide's names too)
    "LaionAestheticsDataset": "streamloader.data.laion",
    "LAIONAestheticsDataset": "streamloader.data.laion",
    "FeatureExtractor": "streamloader.data.features",
    "tiny_cnn_extractor": "streamloader.data.features",
    "precompute_features": "streamloader.data.precompute",
    "train_valid_split": "streamloader.data.split",
    # Keras (optional extra streamloader[keras]): the guide's data generator as a keras.utils.PyDataset
    "LaionAestheticsPyDataset": "streamloader.data.keras_dataset",
    # DALLE2-compatible loaders (all of them under streamloader.dataloaders)
    "ImageEmbeddingDataset": "streamloader.data.tar_embeddings",
    "create_image_embedding_dataloader": "streamloader.data.tar_embeddings",
    "get_reader": "streamloader.data.embedding_reader",
    "make_splits": "streamloader.data.embedding_splits",
    # FUSE mount (for readers that bypass Python)
    "mount": "streamloader.fusemount",
    "unmount": "streamloader.fusemount",
}

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time __getattr__ imports each name on first use
    from streamloader.auth import login
    from streamloader.cache import FileCache
    from streamloader.data.embedding_reader import get_reader
    from streamloader.data.embedding_splits import make_splits
    from streamloader.data.features import FeatureExtractor, tiny_cnn_extractor
    from streamloader.data.filters import filter_labels
    from streamloader.data.keras_dataset import LaionAestheticsPyDataset
    from streamloader.data.labels import read_labels
    from streamloader.data.laion import LAIONAestheticsDataset, LaionAestheticsDataset
    from streamloader.data.precompute import precompute_features
    from streamloader.data.split import train_valid_split
    from streamloader.data.tar_embeddings import ImageEmbeddingDataset, create_image_embedding_dataloader
    from streamloader.errors import AuthenticationError, DataFormatError, MountError, RemoteError, StreamloaderError
    from streamloader.fusemount import mount, unmount
    from streamloader.hooks import activate_from_env, install_hooks, uninstall_hooks
    from streamloader.hooks.warmup import prefetch
    from streamloader.remote.filesystem import DagsHubFileSystem

# a literal list, so that static tools read it (tests/test_public_api.py checks it against _EXPORTS)
__all__ = ["AuthenticationError", "DagsHubFileSystem", "DataFormatError", "FeatureExtractor", "FileCache",
           "ImageEmbeddingDataset", "LAIONAestheticsDataset", "LaionAestheticsDataset", "LaionAestheticsPyDataset",
           "MountError", "RemoteError", "StreamloaderError", "activate_from_env",
           "create_image_embedding_dataloader", "filter_labels", "get_reader", "install_hooks", "login",
           "make_splits", "mount", "precompute_features", "prefetch", "read_labels", "tiny_cnn_extractor",
           "train_valid_split", "uninstall_hooks", "unmount", "__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'streamloader' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> List[str]:
    return sorted(set(__all__) | set(globals()))
