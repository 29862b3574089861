"""CREPA scores against values computed by hand and against a per-frame reference loop."""

import math

import pytest
import torch
import torch.nn.functional as F

from crepa.loss import crepa_loss, crepa_scores, resample_grid

W1 = math.exp(-1.0)
W2 = math.exp(-2.0)


def one_hot_clip(indices, dim, grid=(2, 2), scale=1.0):
    """(1, F, h, w, dim): frame f carries scale * e_{indices[f]} at every token."""
    frames = torch.zeros(1, len(indices), *grid, dim)
    for f, k in enumerate(indices):
        frames[0, f, ..., k] = scale
    return frames


@pytest.fixture
def teacher3():
    return one_hot_clip([0, 1, 2], 3)


@pytest.fixture
def student3():
    # s(0,1) = 1, s(1,1) = 1, s(2,0) = 1, every other s(f,k) = 0. Scale checks normalisation.
    return one_hot_clip([1, 1, 0], 3, scale=3.0)


def per_frame(student, teacher, **kw):
    """Scores with S_b = sum_f A(f), so the expected A(f) can be checked through their sum."""
    return crepa_scores(student, teacher, normalize_by_frames=False, **kw)


@pytest.mark.parametrize(
    "options, expected_a",
    [
        (dict(distance=0), [0.0, 1.0, 0.0]),
        (dict(distance=1), [W1, 1.0, 0.0]),
        (dict(distance=2), [0.0, 1.0, W2]),
        (dict(distance=5), [0.0, 1.0, W2]),  # d > F-1 clamps to F-1
        (dict(distance=2, cumulative=True), [W1, 1.0, W2]),
        (dict(distance=1, normalize_neighbour_sum=True), [W1 / (1 + W1), 1 / (1 + 2 * W1), 0.0]),
        (dict(distance=1, tau=2.0), [math.exp(-0.5), 1.0, 0.0]),
    ],
)
def test_hand_computed_scores(student3, teacher3, options, expected_a):
    scores = per_frame(student3, teacher3, **options)
    assert scores.per_video.item() == pytest.approx(sum(expected_a), abs=1e-6)
    assert scores.alignment_score.item() == pytest.approx(sum(expected_a) / 3, abs=1e-6)
    assert scores.similarity_self.item() == pytest.approx(1 / 3, abs=1e-6)
    framed = crepa_scores(student3, teacher3, **options)
    assert framed.per_video.item() == pytest.approx(sum(expected_a) / 3, abs=1e-6)


def test_edge_frames_only_see_existing_neighbours():
    # Student frame f matches teacher frames f-1 and f+1 equally; edges have one neighbour.
    teacher = one_hot_clip([0, 1, 2, 3], 4, grid=(1, 1))
    student = torch.zeros(1, 4, 1, 1, 4)
    for f in range(4):
        for k in (f - 1, f + 1):
            if 0 <= k < 4:
                student[0, f, 0, 0, k] = 1.0
    scores = crepa_scores(student, teacher, distance=1, normalize_by_frames=False)
    inv2 = 1 / math.sqrt(2)
    expected = [W1 * 1.0, W1 * 2 * inv2, W1 * 2 * inv2, W1 * 1.0]  # edges have norm 1, middle sqrt(2)
    assert scores.per_video.item() == pytest.approx(sum(expected), abs=1e-6)


def test_single_frame_is_framewise_repa():
    teacher = torch.randn(2, 1, 3, 3, 8)
    scores = crepa_scores(teacher * 2.0, teacher, distance=3, cumulative=True)
    assert torch.allclose(scores.per_video, torch.ones(2))
    assert scores.alignment_score.item() == pytest.approx(1.0, abs=1e-6)


def reference_scores(student, teacher, distance, tau, cumulative, normalize_by_frames, normalize_neighbour_sum):
    """Straightforward per-frame loops over the DESIGN formula (same grid on both sides)."""
    p = F.normalize(student.flatten(2, 3), dim=-1)
    y = F.normalize(teacher.flatten(2, 3), dim=-1)
    batch, frames = p.shape[:2]
    d = min(distance, frames - 1)
    offsets = list(range(1, d + 1)) if cumulative else ([d] if d > 0 else [])
    per_video, all_a = [], []
    for b in range(batch):
        total = 0.0
        for f in range(frames):
            sim = (p[b, f][None] * y[b]).sum(-1).mean(-1)  # (F,) s(f, k) for every k
            a, applied = sim[f], 0.0
            for o in offsets:
                w = math.exp(-o / tau)
                if f + o < frames:
                    a, applied = a + w * sim[f + o], applied + w
                if f - o >= 0:
                    a, applied = a + w * sim[f - o], applied + w
            if normalize_neighbour_sum:
                a = a / (1 + applied)
            all_a.append(a)
            total = total + a
        per_video.append(total / frames if normalize_by_frames else total)
    return torch.stack(per_video), torch.stack(all_a).mean()


@pytest.mark.parametrize("distance", [0, 1, 2, 7])
@pytest.mark.parametrize("cumulative", [False, True])
@pytest.mark.parametrize("normalize_neighbour_sum", [False, True])
@pytest.mark.parametrize("normalize_by_frames", [False, True])
def test_matches_reference_loop(distance, cumulative, normalize_neighbour_sum, normalize_by_frames):
    torch.manual_seed(0)
    student = torch.randn(2, 5, 3, 4, 6, dtype=torch.float64)
    teacher = torch.randn(2, 5, 3, 4, 6, dtype=torch.float64)
    options = dict(distance=distance, tau=0.7, cumulative=cumulative, normalize_by_frames=normalize_by_frames,
                   normalize_neighbour_sum=normalize_neighbour_sum)
    got = crepa_scores(student, teacher, **options)
    want_video, want_mean = reference_scores(student, teacher, **options)
    torch.testing.assert_close(got.per_video, want_video)
    torch.testing.assert_close(got.alignment_score, want_mean)


def test_gradients_reach_student_not_teacher():
    student = torch.randn(1, 4, 3, 3, 8, requires_grad=True)
    teacher = torch.randn(1, 4, 5, 5, 8, requires_grad=True)
    crepa_loss(crepa_scores(student, teacher, distance=2), weight=0.5).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None


def smooth_pattern(height, width, dim=24, transpose=False):
    """(1, 2, h, w, dim) smooth zero-mean spatial pattern sampled at pixel centres of [0,1]^2."""
    u = (torch.arange(height) + 0.5) / height
    v = (torch.arange(width) + 0.5) / width
    uu, vv = torch.meshgrid(u, v, indexing="ij")
    if transpose:  # the same pattern with its two spatial axes swapped
        uu, vv = vv, uu
    gen = torch.Generator().manual_seed(1)
    a = torch.randint(0, 3, (dim,), generator=gen).float()
    b = torch.randint(0, 3, (dim,), generator=gen).float()
    a[a + b == 0] = 1.0
    c = torch.rand(dim, generator=gen) * 2 * math.pi
    feats = torch.cos(2 * math.pi * (a * uu[..., None] + b * vv[..., None]) + c)
    return feats.expand(1, 2, height, width, dim).clone()


def test_spatial_alignment_keeps_geometry():
    teacher = smooth_pattern(37, 37)
    student = smooth_pattern(30, 52)
    aligned = crepa_scores(student, teacher, distance=0).alignment_score.item()
    assert aligned > 0.95

    transposed = smooth_pattern(30, 52, transpose=True)
    shuffled = student.flatten(2, 3)[:, :, torch.randperm(30 * 52)].reshape(student.shape)
    assert crepa_scores(transposed, teacher, distance=0).alignment_score.item() < aligned - 0.3
    assert crepa_scores(shuffled, teacher, distance=0).alignment_score.item() < aligned - 0.3


def test_pooled_mode_compares_frame_means():
    student = torch.randn(1, 3, 4, 4, 5)
    teacher = torch.randn(1, 3, 2, 6, 5)
    got = crepa_scores(student, teacher, distance=0, spatial_align=False)
    want = F.cosine_similarity(student.mean(dim=(2, 3)), teacher.mean(dim=(2, 3)), dim=-1).mean()
    torch.testing.assert_close(got.alignment_score, want)


def test_student_with_more_tokens_is_resampled_with_gradient():
    student = torch.randn(1, 2, 8, 8, 4, requires_grad=True)
    teacher = torch.randn(1, 2, 4, 4, 4)
    crepa_scores(student, teacher).per_video.sum().backward()
    assert student.grad.abs().sum() > 0


def test_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="agree on batch, frames and channels"):
        crepa_scores(torch.randn(1, 3, 2, 2, 4), torch.randn(1, 4, 2, 2, 4))
    with pytest.raises(ValueError, match="tau"):
        crepa_scores(torch.randn(1, 3, 2, 2, 4), torch.randn(1, 3, 2, 2, 4), tau=0.0)


@pytest.mark.parametrize("size_in, size_out", [((30, 52), (37, 37)), ((8, 8), (4, 4)), ((3, 5), (6, 2)),
                                               ((4, 4), (4, 7))])
def test_resample_grid_matches_antialiased_bilinear_interpolation(size_in, size_out):
    tokens = torch.randn(2, 3, *size_in, 5, dtype=torch.float64)
    channel_first = tokens.reshape(6, *size_in, 5).permute(0, 3, 1, 2)
    want = F.interpolate(channel_first, size=size_out, mode="bilinear", align_corners=False, antialias=True)
    got = resample_grid(tokens, size_out)
    torch.testing.assert_close(got, want.permute(0, 2, 3, 1).reshape(2, 3, *size_out, 5))
