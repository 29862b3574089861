"""CREPA score kernel: `crepa_scores` (one similarity per neighbour offset over frame slices) against a
straightforward loop over frames and neighbours, forward plus backward, at the shapes of a real step.

Default shapes are Wan 2.1 at 480x832x81 (21 latent frames, 30x52 tokens per frame) aligned to DINOv2-g/14
at 518 px square (37x37 patches, D=1536). Both kernels share the grid alignment, so the comparison isolates
the similarity and neighbour arithmetic that the loop would do frame by frame.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from bench.common import markdown_table, median, parser, record, spread, time_alternating
from crepa.loss import align_grids, crepa_scores, neighbour_offsets


def looped_per_video(student: torch.Tensor, teacher: torch.Tensor, distance: int, tau: float) -> torch.Tensor:
    """S_b as a reader of the formula would first write it: one dot product per (clip, frame, neighbour)."""
    p, y = align_grids(student, teacher.detach().to(student.dtype), spatial_align=True)
    p, y = F.normalize(p, dim=-1), F.normalize(y, dim=-1)
    batch, frames = p.shape[:2]
    per_video = []
    for b in range(batch):
        total = p.new_zeros(())
        for f in range(frames):
            score = (p[b, f] * y[b, f]).sum(-1).mean()
            for offset in neighbour_offsets(distance, frames, cumulative=False):
                weight = math.exp(-offset / tau)
                for g in (f - offset, f + offset):
                    if 0 <= g < frames:
                        score = score + weight * (p[b, f] * y[b, g]).sum(-1).mean()
            total = total + score
        per_video.append(total / frames)
    return torch.stack(per_video)


def main() -> None:
    args = _arguments()
    device = torch.device(args.device)
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(args.batch, args.frames, *args.student, args.dim, generator=generator).to(device)
    teacher = torch.randn(args.batch, args.frames, *args.teacher, args.dim, generator=generator).to(device)
    student.requires_grad_(True)

    def vectorised() -> torch.Tensor:
        return crepa_scores(student, teacher, distance=args.distance).per_video

    def looped() -> torch.Tensor:
        return looped_per_video(student, teacher, args.distance, 1.0)

    torch.testing.assert_close(vectorised(), looped(), rtol=1e-4, atol=1e-5)  # same maths before timing it

    def step(kernel):
        def run() -> None:
            student.grad = None
            kernel().sum().backward()
        return run

    times = time_alternating({"crepa_scores": step(vectorised), "per-frame loop": step(looped)}, args.rounds,
                             warmup=2, device=device)
    base = median(times["crepa_scores"])
    rows = [[name, spread([t * 1e3 for t in values]), f"{median(values) / base:.2f}"] for name, values in times.items()]
    table = markdown_table(["kernel (fwd+bwd)", "ms, median [min, max]", "time / crepa_scores"], rows)
    shapes = (f"B={args.batch}, F={args.frames}, student {args.student[0]}x{args.student[1]}, teacher "
              f"{args.teacher[0]}x{args.teacher[1]}, D={args.dim}, distance {args.distance}, {args.rounds} rounds")
    verdict = (f"The per-frame loop takes {median(times['per-frame loop']) / base:.2f}x the time of `crepa_scores` "
               f"({shapes}); both give the same scores (checked to 1e-4).")
    record("Loss kernel", f"{table}\n\n{verdict}", enabled=not args.no_record)


def _arguments():
    parser_ = parser(__doc__.splitlines()[0])
    parser_.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser_.add_argument("--batch", type=int, default=1)
    parser_.add_argument("--frames", type=int, default=21)
    parser_.add_argument("--student", type=int, nargs=2, default=(30, 52), metavar=("H", "W"))
    parser_.add_argument("--teacher", type=int, nargs=2, default=(37, 37), metavar=("H", "W"))
    parser_.add_argument("--dim", type=int, default=1536)
    parser_.add_argument("--distance", type=int, default=1)
    parser_.add_argument("--rounds", type=int, default=10)
    return parser_.parse_args()


if __name__ == "__main__":
    main()
