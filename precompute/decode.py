"""Decode clip segments to RGB arrays, inline or in worker processes with a per-clip timeout.

Workers are spawned (not forked: the parent holds CUDA contexts and threads) and need only this module,
PyAV, NumPy and PIL; spawn also re-imports the main script, so entry points should import heavy modules
lazily. A clip that hangs or crashes the decoder costs one worker, which is killed and replaced; the run
goes on and the clip is reported as failed.

Resizing uses PIL (LANCZOS): it filters over the whole source footprint when shrinking (no aliasing on
1080p -> 480p), it is what diffusers' video processor uses for PIL input, and it keeps torch out of the workers
(a torch import per worker costs seconds and hundreds of MB). The crop is applied as PIL's `box`, so cropping
and resizing are one resampling pass with sub-pixel placement.
"""

from __future__ import annotations

import io
import itertools
import queue
import signal
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from multiprocessing import get_context
from multiprocessing.connection import Connection, wait
from multiprocessing.context import SpawnContext

import av
import numpy as np
from PIL import Image

from crepa.errors import UserError
from precompute.video_refs import DatasetRow, ShardMember

VideoSource = str | bytes | ShardMember | DatasetRow
"""A local video path, the encoded file's bytes, or a reference to them read when the video is opened; all pickle."""

_READY = "ready"


def read_video(source: VideoSource) -> str | bytes:
    """A path, or the encoded bytes: references are read here, so bytes exist only while a video is open."""
    return source.read() if isinstance(source, ShardMember | DatasetRow) else source


def open_video(source: VideoSource) -> av.container.InputContainer:
    """Open `source` for reading with PyAV."""
    data = read_video(source)
    file = io.BytesIO(data) if isinstance(data, bytes) else data
    return av.open(file, mode="r", metadata_errors="ignore")


def stream_fps(stream: av.video.stream.VideoStream) -> float:
    """Nominal frame rate of `stream`; frame indices everywhere are counted at this rate."""
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    if not rate:
        raise UserError("the video stream reports no frame rate")
    return float(rate)


def decode_segment(source: VideoSource, frame_indices: Sequence[int], bucket: tuple[int, int], crop: str) -> np.ndarray:
    """Frames `frame_indices` of `source` resized to `bucket` (width, height): uint8 (F, H, W, 3) RGB.

    Seeks to the keyframe before the first index when the stream has timestamps and stops after the last,
    so a window late in a long video does not decode the whole file. Repeated indices (fps upsampling) are
    decoded once.
    """
    wanted = set(frame_indices)
    first, last = min(wanted), max(wanted)
    images: dict[int, Image.Image] = {}
    with open_video(source) as container:
        stream = container.streams.video[0]
        for index, frame in _indexed_frames(container, stream, first):
            if index in wanted:
                images[index] = fit_to_bucket(frame.to_image(), bucket, crop)
            if index >= last:
                break
    missing = sorted(wanted - images.keys())
    if missing:
        raise UserError(
            f"the video ended before frame {missing[0]} ({len(images)} of {len(wanted)} frames decoded); "
            "its frame count metadata is wrong or the file is truncated"
        )
    return np.stack([np.asarray(images[i]) for i in frame_indices])  # (F, H, W, 3)


def _indexed_frames(
    container: av.container.InputContainer, stream: av.video.stream.VideoStream, first: int
) -> Iterator[tuple[int, av.VideoFrame]]:
    """(index from the stream start, frame) pairs from some frame at or before `first` onwards.

    After a seek the first frame's index comes from its timestamp and the rest are counted, which matches
    counting from the start for constant-rate video. If the seek lands past `first`, or frames carry no
    timestamps, decoding restarts from the beginning.
    """
    origin = stream.start_time or 0
    if first > 0 and stream.time_base:
        fps = stream_fps(stream)
        container.seek(origin + int(first / fps / stream.time_base), stream=stream, backward=True)
        frames = container.decode(stream)
        head = next(frames, None)
        if head is not None and head.pts is not None:
            start = round(float((head.pts - origin) * stream.time_base) * fps)
            if 0 <= start <= first:
                yield start, head
                yield from enumerate(frames, start=start + 1)
                return
        container.seek(origin, stream=stream, backward=True)
    yield from enumerate(container.decode(stream))


def fit_to_bucket(image: Image.Image, bucket: tuple[int, int], crop: str) -> Image.Image:
    """`image` resized to `bucket` (width, height) in one LANCZOS pass, after a centre crop to the bucket's aspect
    (crop="center") or stretched (crop="none")."""
    return image.resize(bucket, Image.Resampling.LANCZOS, box=_crop_box(image.size, bucket, crop))


def _crop_box(size: tuple[int, int], bucket: tuple[int, int], crop: str) -> tuple[float, float, float, float]:
    """Source region (left, top, right, bottom) that maps onto the bucket."""
    width, height = size
    if crop == "none":
        return 0.0, 0.0, float(width), float(height)
    if crop != "center":
        raise UserError(f"crop={crop!r} is unknown; use center or none")
    aspect = bucket[0] / bucket[1]
    if width / height > aspect:  # too wide: keep full height
        crop_width = height * aspect
        return (width - crop_width) / 2, 0.0, (width + crop_width) / 2, float(height)
    crop_height = width / aspect
    return 0.0, (height - crop_height) / 2, float(width), (height + crop_height) / 2


@dataclass(frozen=True)
class DecodeTask:
    """One segment to decode. The pool calls `run()` in a worker: subclasses may run other work there."""

    task_id: int | str
    """Returned with the result; results arrive in completion order."""
    source: VideoSource
    """Path, encoded bytes, or a reference read in the worker when the task runs."""
    frame_indices: tuple[int, ...]
    """Source frame indices, in output order (repeats allowed)."""
    size: tuple[int, int]
    """(width, height) of the output frames: the bucket."""
    crop: str = "center"
    """center or none, as in the dataset config."""

    def run(self) -> np.ndarray:
        """The decoded (F, H, W, 3) uint8 frames."""
        return decode_segment(self.source, self.frame_indices, self.size, self.crop)


@dataclass(frozen=True)
class DecodeResult:
    """Outcome of one task: frames, or why there are none."""

    task_id: int | str
    """The task's id."""
    frames: np.ndarray | None = None
    """(F, H, W, 3) uint8 RGB when the decode succeeded."""
    error: str | None = None
    """Why it failed: the exception, a timeout or a dead worker."""

    @property
    def ok(self) -> bool:
        """True when `frames` holds the decoded clip."""
        return self.error is None


def _run_task(task: DecodeTask) -> DecodeResult:
    try:
        return DecodeResult(task.task_id, frames=task.run())
    except Exception as error:
        return DecodeResult(task.task_id, error=f"{type(error).__name__}: {error}")


def _worker_main(conn: Connection) -> None:
    """Run tasks from `conn` until it sends None or closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it stops the workers
    conn.send(_READY)
    while True:
        try:
            task = conn.recv()
        except EOFError:
            return
        if task is None:
            return
        conn.send(_run_task(task))


class _Worker:
    """One decode process, the parent's end of its pipe, and the task it is running."""

    def __init__(self, context: SpawnContext) -> None:
        self.conn, child_conn = context.Pipe()
        self.process = context.Process(target=_worker_main, args=(child_conn,), daemon=True, name="crepa-decode")
        self.process.start()
        child_conn.close()  # so the parent sees EOF when the worker dies
        self.ready = False
        self.task_id: int | str | None = None
        self.deadline = float("inf")

    @property
    def idle(self) -> bool:
        return self.ready and self.task_id is None

    def start(self, task: DecodeTask, timeout_s: float) -> None:
        # An idle worker is blocked in recv, so this send cannot deadlock even for a large in-memory video.
        self.conn.send(task)
        self.task_id = task.task_id
        self.deadline = time.monotonic() + timeout_s

    def death_reason(self) -> str:
        self.process.join(timeout=1.0)
        code = self.process.exitcode
        if code is None:
            return "the decode worker closed its pipe"
        if code < 0:
            return f"the decode worker died from signal {signal.Signals(-code).name}; the clip may be corrupt"
        return f"the decode worker exited with code {code}"

    def ask_to_exit(self) -> None:
        """Tell an idle worker to leave its loop (it exits once it reads this)."""
        try:
            self.conn.send(None)
        except OSError:  # already gone
            pass

    def stop(self, kill: bool) -> None:
        """Reap the process (no zombie): after `ask_to_exit` wait for it a little, else SIGKILL it now."""
        if not kill:
            self.process.join(timeout=5.0)
        if self.process.is_alive():
            self.process.kill()
        self.process.join()
        self.process.close()
        self.conn.close()


class DecodePool:
    """Decode tasks in `num_workers` processes, each task limited to `timeout_s`; 0 workers decodes inline.

    Use as a context manager. `map` starts decoding at once (before its first result is asked for, so
    decoding can run behind model loading) and keeps at most 2*num_workers tasks in flight (running, queued,
    or finished but not yet consumed), so the workers keep decoding while the caller is busy with a result.
    """

    def __init__(self, num_workers: int, timeout_s: float = 60.0) -> None:
        if num_workers < 0:
            raise UserError(f"num_workers must be >= 0 (0 decodes in this process), got {num_workers}")
        if timeout_s <= 0:
            raise UserError(f"the decode timeout must be > 0 seconds, got {timeout_s}")
        self.num_workers = num_workers
        self.timeout_s = timeout_s
        self._context = get_context("spawn")
        self._workers: list[_Worker] = []
        self._stop = threading.Event()
        self._manager: threading.Thread | None = None
        self._wake: tuple[Connection, Connection] | None = None  # (reader, writer): rouses the manager thread
        self._closed = False

    def __enter__(self) -> DecodePool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def map(self, tasks: Iterable[DecodeTask]) -> Iterator[DecodeResult]:
        """One result per task, in completion order; a failed task yields a result with `error` set."""
        if self._closed:
            raise RuntimeError("this DecodePool is closed; create a new one")
        if self.num_workers == 0:
            return (_run_task(task) for task in tasks)
        return self._map_in_workers(tasks)

    def close(self) -> None:
        """Stop the workers and reap them (idempotent)."""
        self._closed = True
        self._stop_manager()
        idle = [worker for worker in self._workers if worker.task_id is None]
        for worker in idle:
            worker.ask_to_exit()  # all at once, so they wind down in parallel
        for worker in self._workers:
            worker.stop(kill=worker not in idle)
        self._workers.clear()

    def _map_in_workers(self, tasks: Iterable[DecodeTask]) -> Iterator[DecodeResult]:
        if self._manager is not None:
            raise RuntimeError("DecodePool.map is already running; exhaust or close the previous iterator first")
        inbox: queue.SimpleQueue[DecodeTask] = queue.SimpleQueue()
        outbox: queue.SimpleQueue[DecodeResult | BaseException] = queue.SimpleQueue()
        self._wake = self._context.Pipe(duplex=False)
        self._stop.clear()
        self._manager = threading.Thread(
            target=self._serve, args=(inbox, outbox, self._wake[0]), name="crepa-decode-manager", daemon=True
        )
        self._manager.start()
        pending = iter(tasks)
        in_flight = self._submit(pending, inbox, 2 * self.num_workers)  # decoding starts before the first next()
        return self._results(pending, inbox, outbox, in_flight)

    def _submit(self, pending: Iterator[DecodeTask], inbox: queue.SimpleQueue, count: int) -> int:
        """Hand up to `count` more tasks to the manager thread; returns how many there were."""
        sent = 0
        for task in itertools.islice(pending, count):
            inbox.put(task)
            self._wake[1].send_bytes(b"")
            sent += 1
        return sent

    def _results(self, pending: Iterator[DecodeTask], inbox: queue.SimpleQueue, outbox: queue.SimpleQueue,
                 in_flight: int) -> Iterator[DecodeResult]:
        """Results as they finish; each one consumed makes room for the next task."""
        try:
            while in_flight:
                result = outbox.get()
                if isinstance(result, BaseException):
                    raise result
                yield result
                in_flight += self._submit(pending, inbox, 1) - 1
        finally:
            self._stop_manager()

    def _stop_manager(self) -> None:
        if self._manager is None:
            return
        self._stop.set()
        self._wake[1].send_bytes(b"")
        self._manager.join()
        for conn in self._wake:
            conn.close()
        self._manager = self._wake = None

    def _serve(self, inbox: queue.SimpleQueue, outbox: queue.SimpleQueue, wake: Connection) -> None:
        """Manager thread: hand tasks to idle workers, collect results, kill workers past their deadline."""
        backlog: deque[DecodeTask] = deque()
        try:
            while not self._stop.is_set():
                while not inbox.empty():
                    backlog.append(inbox.get())
                while backlog and len(self._workers) < self.num_workers:  # first tasks, or replacing a lost worker
                    self._workers.append(_Worker(self._context))
                for worker in self._workers:
                    if backlog and worker.idle:
                        worker.start(backlog.popleft(), self.timeout_s)
                deadlines = [w.deadline for w in self._workers if w.task_id is not None]
                timeout = max(0.0, min(deadlines) - time.monotonic()) if deadlines else None
                ready = wait(
                    [wake, *(w.conn for w in self._workers), *(w.process.sentinel for w in self._workers)], timeout
                )
                while wake.poll():
                    wake.recv_bytes()
                for worker in list(self._workers):
                    self._check(worker, ready, outbox)
        except BaseException as error:  # surfaced to the caller by map()
            outbox.put(error)
        finally:
            # Tasks still running belong to an abandoned map(): stop those workers so their results cannot
            # leak into the next one.
            for worker in [w for w in self._workers if w.task_id is not None]:
                worker.stop(kill=True)
                self._workers.remove(worker)

    def _check(self, worker: _Worker, ready: list, outbox: queue.SimpleQueue) -> None:
        """Take `worker`'s message if it sent one; drop it if it died or ran past its deadline."""
        reason = None
        if worker.conn in ready:
            try:
                message = worker.conn.recv()
            except (EOFError, OSError):
                reason = worker.death_reason()
            else:
                if isinstance(message, str):  # _READY
                    worker.ready = True
                else:
                    worker.task_id, worker.deadline = None, float("inf")
                    outbox.put(message)
                return
        elif worker.process.sentinel in ready:
            reason = worker.death_reason()
        elif worker.task_id is not None and time.monotonic() >= worker.deadline:
            reason = f"timed out after {self.timeout_s:g} s; the clip may be corrupt, or raise the decode timeout"
        if reason is None:
            return
        if not worker.ready:
            raise RuntimeError(f"a decode worker failed to start ({reason}); run with 0 workers to see the error")
        task_id = worker.task_id
        worker.stop(kill=True)
        self._workers.remove(worker)
        if task_id is not None:
            outbox.put(DecodeResult(task_id, error=reason))
