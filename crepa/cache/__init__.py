"""The cache contract shared by precompute (writer) and training (reader)."""

from crepa.cache.keys import bytes_identity, clip_key, file_identity, fingerprint, text_key
from crepa.cache.store import (
    FEATURE_KINDS,
    SCHEMA_VERSION,
    CacheStore,
    FeatureSet,
    SegmentWriter,
    VerifyReport,
)

__all__ = [
    "FEATURE_KINDS",
    "SCHEMA_VERSION",
    "CacheStore",
    "FeatureSet",
    "SegmentWriter",
    "VerifyReport",
    "bytes_identity",
    "clip_key",
    "file_identity",
    "fingerprint",
    "text_key",
]
