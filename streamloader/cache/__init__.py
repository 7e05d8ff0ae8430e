"""The on-disk cache: a crash-safe, content-addressed file store shared by threads, processes and nodes.

Modules, bottom up: :mod:`~streamloader.cache.verify` (hashing bytes against a key),
:mod:`~streamloader.cache.key` (:class:`CacheKey`), :mod:`~streamloader.cache.entrylock` (the cross-process lock of
one entry), :mod:`~streamloader.cache.scan` (walking, eviction, temp-file sweeping, the shared size total),
:mod:`~streamloader.cache.commit_queue` (the background thread that makes new entries durable),
:mod:`~streamloader.cache.writing` and :mod:`~streamloader.cache.store` (:class:`FileCache`), and
:mod:`~streamloader.cache.report` (what the cache holds, part by part; clearing it). Only the names below are the
package's interface; the modules are internal to the library.
"""
from streamloader.cache.key import CacheKey
from streamloader.cache.store import FileCache, cache_info, default_cache_dir, parse_size, prune

__all__ = ["CacheKey", "FileCache", "cache_info", "default_cache_dir", "parse_size", "prune"]
