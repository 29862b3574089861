"""A cache writer for the cache tests: run as a script, it commits one entry per segment and says so.

    python cache_crash_writer.py URL COUNT DELAY_S

The tests kill it mid-run and check what it left; they also import `write` to run writers in-process
or in spawned processes, and `arrays_for` to know what every key must read back as.
"""

from __future__ import annotations

import sys
import time
import zlib

import numpy as np

from crepa.cache.store import CacheStore, FeatureSet

IDENTITY = {"vae": "tiny-vae", "dtype": "float16", "sample": "mode"}
DESCRIPTION = {"family": "tiny", "latent_channels": 4, "grid": [2, 8, 8]}
GROUPS = ("f5_h64_w64", "f9_h32_w64")


def group_of(key: str) -> str:
    """Bucket of a key: keys spread over two groups."""
    return GROUPS[zlib.crc32(key.encode()) % len(GROUPS)]


def arrays_for(key: str) -> dict[str, np.ndarray]:
    """Deterministic arrays of one key: fixed fp16 latents (4, 2, 8, 8) and ragged fp32 tokens (n, 16)."""
    rng = np.random.default_rng(zlib.crc32(key.encode()))
    return {
        "latents": rng.standard_normal((4, 2, 8, 8)).astype(np.float16),
        "tokens": rng.standard_normal((int(rng.integers(1, 12)), 16)).astype(np.float32),
    }


def write(
    url: str,
    keys: list[str],
    *,
    writer_id: str | None = None,
    per_segment: int = 1,
    delay_s: float = 0.0,
    announce: bool = False,
) -> FeatureSet:
    """Write the keys not yet committed, `per_segment` entries per segment; print after each commit if asked."""
    store = CacheStore.open(url, mode="a")
    fset = store.feature_set("latents", IDENTITY, DESCRIPTION)
    todo = [key for key in keys if key not in store.keys(fset)]
    with store.writer(fset, ragged=("tokens",), writer_id=writer_id, max_segment_entries=per_segment) as writer:
        for i, key in enumerate(todo, start=1):
            writer.add(key, group_of(key), arrays_for(key), {"source": f"{key}.mp4"})
            if announce and i % per_segment == 0:
                print(f"committed {i // per_segment}", flush=True)
            time.sleep(delay_s)
    return fset


if __name__ == "__main__":
    url, count, delay_s = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    write(url, [f"clip{i:04d}" for i in range(count)], writer_id="crash", delay_s=delay_s, announce=True)
