"""Streaming shards to many ranks: exact batch counts per rank, disjoint samples, URLs, checks before step 0."""

from __future__ import annotations

import collections
import os
import subprocess
import sys

import numpy as np
import pytest
from torch.utils.data import DataLoader

from crepa.cache.wds import export_webdataset, read_index
from train.config import TrainConfig
from train.data import WebDatasetClips
from train.loader import check_shards, default_family


def sample(i: int, group: str = "g", repeats: int = 1) -> dict:
    return {"__key__": f"clip{i:03d}", "latents.npy": np.full((2, 1, 2, 2), i, np.float16),
            "text.npy": np.zeros((3, 4), np.float32), "teacher.npy": np.zeros((1, 2, 2, 4), np.float16),
            "json": {"group": group, "num_repeats": repeats}}


def shards(folder, sizes: list[int], **kw) -> list[str]:
    """Shards holding `sizes` samples each, numbered on across shards."""
    samples, start = [], 0
    for size in sizes:
        samples.append([sample(i, **kw) for i in range(start, start + size)])
        start += size
    urls = []
    for index, part in enumerate(samples):
        urls += export_webdataset(part, str(folder / f"s{index}"))
    return urls


def stream(urls: list[str], rank: int, world: int, batches: int, batch_size: int = 2, **kw) -> WebDatasetClips:
    return WebDatasetClips(urls, batch_size, seed=1, with_teacher=True, batches_per_epoch=batches, rank=rank,
                           world=world, **kw)


def keys(batches) -> list[str]:
    return [s["key"] for batch in batches for s in batch]


@pytest.mark.parametrize("sizes", [[2] * 8, [9, 1, 1, 1], [8]], ids=["even", "uneven", "fewer-shards-than-ranks"])
def test_every_rank_and_worker_yields_its_exact_share(tmp_path, sizes):
    urls = shards(tmp_path, sizes)
    per_rank = sum(sizes) // (2 * 2)
    for workers in (1, 2):
        got = [[list(stream(urls, rank, 2, per_rank).slot_batches(w, workers)) for w in range(workers)]
               for rank in range(2)]
        for rank in got:
            assert sum(len(w) for w in rank) == per_rank
            assert all(len(batch) == 2 for w in rank for batch in w)
        if sizes != [9, 1, 1, 1]:  # shards (or samples) divide evenly: every slot reads its own samples once
            slots = [keys(w) for rank in got for w in rank]
            assert len(set().union(*slots)) == sum(len(s) for s in slots)


def test_two_loader_workers_give_the_rank_its_share(tmp_path):
    urls = shards(tmp_path, [2] * 4)
    seen = []
    for rank in range(2):
        loader = DataLoader(stream(urls, rank, 2, 2), batch_size=None, num_workers=2)
        batches = list(loader)
        assert len(batches) == 2
        seen.append(set(keys(batches)))
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == 8


def test_epochs_reshuffle_the_shards_between_ranks(tmp_path):
    urls = shards(tmp_path, [1] * 8)
    data = stream(urls, 0, 2, 2)
    orders = []
    for epoch in range(4):
        data.set_epoch(epoch)
        orders.append(data.slot_shards(0, 1)[0])
    assert len({tuple(o) for o in orders}) > 1


def test_num_repeats_of_clips_and_run_multiply(tmp_path):
    export_webdataset([sample(0, repeats=3), sample(1)], str(tmp_path))
    index = read_index(str(tmp_path))
    assert index.repeated == [4]
    total = sum(index.repeated) * 2
    got = list(stream(index.urls, 0, 1, total, batch_size=1, num_repeats=2).slot_batches(0, 1))
    assert collections.Counter(keys(got)) == {"clip000": 6, "clip001": 2}


def test_shards_for_another_family_or_encoder_fail_before_step_0(tmp_path):
    meta = {"family": "wan", "teacher_set": "abc", "encoder": "dinov2_vits14"}
    export_webdataset([sample(0)], str(tmp_path), meta=meta)
    index = read_index(str(tmp_path))
    with pytest.raises(ValueError, match="exported for family wan, not --family ltxvideo"):
        check_shards(index, TrainConfig(cache=str(tmp_path), family="ltxvideo"), with_teacher=True)
    with pytest.raises(ValueError, match=r"set abc \(encoder dinov2_vits14\), not --crepa-encoder dinov2_vitg14"):
        check_shards(index, TrainConfig(cache=str(tmp_path), family="wan", crepa_encoder="dinov2_vitg14"), True)
    check_shards(index, TrainConfig(cache=str(tmp_path), family="wan", crepa_encoder="dinov2_vits14"), True)
    assert default_family(str(tmp_path)) == "wan"


def test_shards_indexed_after_export_keep_the_teacher_encoder(tmp_path, trained_cache, tiny_models):
    from crepa.cache.export import export_view
    from crepa.cache.wds import write_index_for

    out = str(tmp_path / "shards")
    export_view(trained_cache, out)
    os.remove(os.path.join(out, "shards.json"))
    index = write_index_for(out)
    check_shards(index, TrainConfig(cache=out, family="wan", crepa_encoder=tiny_models["dinov2"]), with_teacher=True)


def test_family_defaults_to_the_caches(trained_cache):
    assert default_family(trained_cache) == "wan"


def run(command: list[str]) -> subprocess.CompletedProcess:
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


TRAIN = ["--crepa-block-index", "1", "--max-train-steps", "2", "--report-to", "none", "--dataloader-num-workers", "0",
         "--lora-rank", "4"]


def test_export_with_no_option_then_train_from_a_file_url(tmp_path, trained_cache, tiny_models):
    out = str(tmp_path / "shards")
    run([sys.executable, "-m", "crepa_cli", "cache", "export", "--format", "wds", trained_cache, out])
    assert sorted(os.listdir(out)) == ["cache-000000.tar", "prompts.tar", "shards.json"]
    run_dir = str(tmp_path / "run")
    done = run([sys.executable, "-m", "crepa_cli", "train", "--cache", f"file://{out}", "--model", tiny_models["wan"],
                "--output-dir", run_dir, *TRAIN])
    assert "3 clips in 1 shards" in done.stdout
    assert os.path.exists(os.path.join(run_dir, "pytorch_lora_weights.safetensors"))


def test_two_ranks_train_from_local_shards(tmp_path, trained_cache, tiny_models):
    from crepa.cache.export import export_view

    out = str(tmp_path / "shards")
    export_view(trained_cache, out, maxcount=2)
    run_dir = str(tmp_path / "run")
    done = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "train",
                "--cache", out, "--family", "wan", "--model", tiny_models["wan"], "--output-dir", run_dir, *TRAIN])
    assert "3 clips in 2 shards, 2 process(es)" in done.stdout
    assert os.path.exists(os.path.join(run_dir, "pytorch_lora_weights.safetensors"))


def test_a_cache_of_several_families_needs_a_choice(tmp_path, trained_cache):
    import shutil

    from crepa.cache.store import CacheStore

    cache = str(tmp_path / "cache")
    shutil.copytree(trained_cache, cache)
    store = CacheStore.open(cache, "a")
    [plan] = store.plans().values()
    store.write_plan("other", {**plan, "family": "ltxvideo"})
    with pytest.raises(ValueError, match="families ltxvideo, wan; choose one with --family"):
        default_family(cache)
    done = subprocess.run([sys.executable, "-m", "crepa_cli", "cache", "export", cache, str(tmp_path / "shards")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "families ltxvideo, wan; choose one with --family" in done.stderr
    run([sys.executable, "-m", "crepa_cli", "cache", "export", "--family", "wan", cache, str(tmp_path / "shards")])
    assert read_index(str(tmp_path / "shards")).meta["family"] == "wan"
