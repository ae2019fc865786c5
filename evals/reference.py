"""Reference statistics: loaded from an ``.npz`` (ADM's reference batches, ours), or computed from
images once and cached on the store under a key of everything that determines them.

The key covers the image set's content description (shard names, sample counts, sizes; crop size
and decoding), and the feature network's weights fingerprint, so a cached file is reused only when
recomputing would give the same numbers.
"""

from __future__ import annotations

import hashlib
import json
import logging

from cluster import storage
from evals.inception import NETWORK_DESCRIPTION
from evals.sources import ImageSet
from evals.stats import FidStats, load_stats

log = logging.getLogger(__name__)

CACHE_FOLDER = "fid_stats"


def cache_url(image_set: ImageSet, weights_fingerprint: str, cache_dir: str | None) -> str | None:
    """Where the statistics of ``image_set`` are cached; None for sets that are not cached (folders,
    whose files can change under the same name)."""
    if image_set.kind not in ("shards", "npz_images"):
        return None
    if cache_dir is None:
        cache_dir = storage.join(image_set.home, CACHE_FOLDER)
    key = hashlib.sha256(f"{image_set.identity}|{weights_fingerprint}|{NETWORK_DESCRIPTION}".encode()).hexdigest()[:20]
    return storage.join(cache_dir, f"{key}.npz")


def load_reference(image_set: ImageSet, weights_fingerprint: str, cache_dir: str | None) -> FidStats | None:
    """Statistics that need no computing: an ``.npz`` with mu/sigma, or a cache hit."""
    if image_set.kind == "npz_stats":
        return load_stats(image_set.stats_url)  # type: ignore[arg-type]
    url = cache_url(image_set, weights_fingerprint, cache_dir)
    if url and storage.exists(url):
        stats = load_stats(url)
        log.info("reference statistics %s from the cache (%s)", stats.stats_id, url)
        stats.source = f"{image_set.url} (cached at {url})"
        return stats
    return None


def save_reference(stats: FidStats, image_set: ImageSet, weights_fingerprint: str, cache_dir: str | None) -> str | None:
    """Cache computed statistics (best effort: a read-only store only costs a recomputation)."""
    url = cache_url(image_set, weights_fingerprint, cache_dir)
    if url is None:
        return None
    try:
        stats.save(url)
        storage.write_text(url[: -len(".npz")] + ".json", json.dumps({
            "stats_id": stats.stats_id, "source": image_set.url, "count": stats.count, "policy": image_set.policy,
            "identity": image_set.identity, "feature_network": NETWORK_DESCRIPTION,
            "weights_sha256": weights_fingerprint}, indent=2))
    except (storage.StorageError, OSError) as err:
        log.warning("could not cache reference statistics at %s (%s); they will be recomputed next time", url, err)
        return None
    log.info("reference statistics %s cached at %s", stats.stats_id, url)
    return url
