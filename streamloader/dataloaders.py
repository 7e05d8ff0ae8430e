"""The ``dalle2_pytorch.dataloaders`` import path: switch by changing only the import line.

    from streamloader.dataloaders import ImageEmbeddingDataset, create_image_embedding_dataloader
    from streamloader.dataloaders import get_reader, make_splits
"""
from __future__ import annotations

from streamloader.data.tar_embeddings import ImageEmbeddingDataset, create_image_embedding_dataloader
from streamloader.data.embedding_reader import EmbeddingReader, get_reader
from streamloader.data.embedding_splits import PriorEmbeddingDataset, make_splits
from streamloader.data.tars import raise_on_error, skip_and_count, warn_and_continue

__all__ = [
    "ImageEmbeddingDataset",
    "create_image_embedding_dataloader",
    "EmbeddingReader",
    "PriorEmbeddingDataset",
    "get_reader",
    "make_splits",
    "raise_on_error",
    "skip_and_count",
    "warn_and_continue",
]
