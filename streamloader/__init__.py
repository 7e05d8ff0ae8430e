"""streamloader — train on a remote DagsHub (or any fsspec) dataset repository as if it were on local disk.

The public names are imported lazily so that ``import streamloader`` stays cheap (no torch import) and
DataLoader workers started with ``spawn`` pay only for what they use.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    # errors
    "StreamloaderError": "streamloader.errors",
    "AuthenticationError": "streamloader.errors",
    "InvalidTokenError": "streamloader.errors",
    "RemoteError": "streamloader.errors",
    "HostUnreachableError": "streamloader.errors",
    "RemoteFileNotFoundError": "streamloader.errors",
    "RevisionNotFoundError": "streamloader.errors",
    "RepositoryNotFoundError": "streamloader.errors",
    "PagingError": "streamloader.errors",
    "IntegrityError": "streamloader.errors",
    "DataFormatError": "streamloader.errors",
    "MountError": "streamloader.errors",
    # transport / filesystem
    "DagsHubClient": "streamloader.remote.client",
    "RetryPolicy": "streamloader.remote.client",
    "DagsHubFileSystem": "streamloader.remote.filesystem",
    # hooks
    "install_hooks": "streamloader.hooks",
    "uninstall_hooks": "streamloader.hooks",
    "activate_from_env": "streamloader.hooks",
    "prefetch": "streamloader.hooks.warmup",
    "PrefetchJob": "streamloader.remote.prefetch",
    "PrefetchResult": "streamloader.remote.prefetch",
    # auth / cache
    "login": "streamloader.auth",
    "resolve_token": "streamloader.auth",
    "FileCache": "streamloader.cache",
    "cache_info": "streamloader.cache",
    "prune": "streamloader.cache",
    "Token": "streamloader.auth",
    "is_interactive": "streamloader.auth",
    # labels.tsv
    "LabelRow": "streamloader.data.labels",
    "LabelReader": "streamloader.data.labels",
    "read_labels": "streamloader.data.labels",
    "write_labels": "streamloader.data.labels",
    "filter_labels": "streamloader.data.filters",
    "LabelFilter": "streamloader.data.filters",
    "FilterResult": "streamloader.data.filters",
    # LAION-Aesthetics dataset, features, training
    "LaionAestheticsDataset": "streamloader.data.laion",
    "LAIONAestheticsDataset": "streamloader.data.laion",
    "FeatureExtractor": "streamloader.data.features",
    "tiny_cnn_extractor": "streamloader.data.features",
    "FeatureCache": "streamloader.data.feature_cache",
    "precompute_features": "streamloader.data.precompute",
    "train_valid_split": "streamloader.data.split",
    "train_regressor": "streamloader.data.train",
    "run_aesthetic_demo": "streamloader.data.train",
    # Keras (optional extra streamloader[keras]): the guide's data generator as a keras.utils.PyDataset
    "LaionAestheticsPyDataset": "streamloader.data.keras_dataset",
    "LAIONAestheticsDataGenerator": "streamloader.data.keras_dataset",
    # DALLE2-compatible loaders (also under streamloader.dataloaders)
    "ImageEmbeddingDataset": "streamloader.data.tar_embeddings",
    "create_image_embedding_dataloader": "streamloader.data.tar_embeddings",
    "EmbeddingReader": "streamloader.data.embedding_reader",
    "get_reader": "streamloader.data.embedding_reader",
    "PriorEmbeddingDataset": "streamloader.data.embedding_splits",
    "make_splits": "streamloader.data.embedding_splits",
    # FUSE mount (for readers that bypass Python)
    "mount": "streamloader.fusemount",
    "unmount": "streamloader.fusemount",
    # server
    "DagsHubServer": "streamloader.server",
    "ServerFaults": "streamloader.server",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'streamloader' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list:
    return __all__
