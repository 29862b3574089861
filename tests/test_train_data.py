"""Batches from samples: the same values in the main process and in DataLoader workers, without needless copies."""

import functools

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from train.data import batch_tensor, collate, to_tensors


def sample(index: int, tokens: int) -> dict:
    rng = np.random.default_rng(index)
    return to_tensors({"key": f"k{index}", "fps": 24.0 + index,
                       "latents": rng.standard_normal((4, 3, 2, 2), dtype=np.float32),
                       "teacher": rng.standard_normal((3, 2, 2, 8)).astype(np.float16),
                       "text": rng.standard_normal((tokens, 6)).astype(np.float16),
                       "text_pooled": rng.standard_normal(5).astype(np.float16)})


def reference(samples: list[dict], text_length: int) -> dict:
    """What a batch must hold: stacked arrays, text zero-padded (or cut) to text_length, a mask of real tokens."""
    text = torch.zeros(len(samples), text_length, 6)
    mask = torch.zeros(len(samples), text_length, dtype=torch.bool)
    for row, s in enumerate(samples):
        length = min(len(s["text"]), text_length)
        text[row, :length], mask[row, :length] = s["text"][:length], True
    return {"keys": [s["key"] for s in samples], "latents": torch.stack([s["latents"] for s in samples]),
            "teacher": torch.stack([s["teacher"] for s in samples]), "text": text, "text_mask": mask,
            "text_pooled": torch.stack([s["text_pooled"] for s in samples]),
            "fps": torch.tensor([s["fps"] for s in samples])}


def assert_batches_equal(got: dict, want: dict) -> None:
    assert got.keys() == want.keys() and got["keys"] == want["keys"]
    for name in ("latents", "teacher", "text", "text_mask", "text_pooled", "fps"):
        assert got[name].dtype == want[name].dtype and got[name].shape == want[name].shape
        assert torch.equal(got[name], want[name]), name


def test_collate_pads_cuts_and_stacks():
    samples = [sample(0, 3), sample(1, 9), sample(2, 5)]
    for batch in (samples[:1], samples):
        assert_batches_equal(collate(batch, text_length=7), reference(batch, 7))
    assert collate(samples, text_length=7)["text"].dtype == torch.float32
    assert samples[1]["teacher"].dtype == torch.float16  # the teacher keeps its storage dtype


def test_a_clip_without_a_recorded_frame_rate_has_nan_fps():
    unknown = sample(1, 2) | {"fps": None}  # cached before clips recorded their frame rate
    assert collate([sample(0, 3), unknown], text_length=4)["fps"].isnan().tolist() == [False, True]


def test_one_sample_in_the_main_process_is_not_copied():
    one = sample(0, 3)
    batch = collate([one], text_length=4)
    assert batch["teacher"].data_ptr() == one["teacher"].data_ptr()
    assert batch["latents"].data_ptr() == one["latents"].data_ptr()


class Samples(Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> dict:
        return sample(index, 2 + index)


def test_batches_from_workers_equal_those_of_the_main_process():
    collate_fn = functools.partial(collate, text_length=5)
    for batch_size in (1, 2):
        loader = DataLoader(Samples(), batch_size=batch_size, num_workers=1, collate_fn=collate_fn)
        for index, batch in enumerate(loader):
            rows = range(index * batch_size, (index + 1) * batch_size)
            assert_batches_equal(batch, reference([sample(i, 2 + i) for i in rows], 5))


def test_batch_tensor_takes_any_dtype():
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.bool):
        tensor = batch_tensor((2, 3, 0), dtype)
        assert tensor.dtype == dtype and tensor.shape == (2, 3, 0) and tensor.is_contiguous()
