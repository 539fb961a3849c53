"""Frame sampling from videos, gifs, frame folders and still images.

Every source is reduced to the same small interface (``first_idx``, ``max_frame``,
``fps``, ``read(indices)``) so that index selection is written once and the decoding
backends (decord, PyAV, torchcodec) are interchangeable and must agree frame for frame.
Readers are opened inside each call and never cached: decord readers leak and hang when
shared across DataLoader workers.

One bad input must never stop a run: a path that is not a regular file (a named pipe, a
device) is refused before anything opens it, since opening a pipe blocks until someone writes
to it, and the whole decode runs under a deadline (``timeout``). Both raise
:class:`VideoReadError`, which the training data and the evaluation runner count as the
item's failure.
"""

from __future__ import annotations

import bisect
import os
import stat
import threading
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence, TypeVar

import numpy as np
from PIL import Image

BACKENDS = ("decord", "pyav", "torchcodec")
STRATEGIES = ("middle", "random", "uniform", "fps")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
FRAME_FOLDER_FPS = 3.0  # MVBench's "frame" data (TVQA frames_fps3_hq)
T = TypeVar("T")
DECODE_TIMEOUT = 300.0  # seconds one sample_frames call may take; an hour of video at 16 frames takes seconds


class VideoReadError(ValueError):
    """A media file or folder could not be turned into frames; the message names it."""

    def __init__(self, path: str | Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


class NotRegularFileError(VideoReadError):
    """The path is a named pipe, socket or device: reading it could block forever, so it is never opened."""


class DecodeTimeoutError(VideoReadError):
    """Decoding did not finish within its deadline; the decoder is abandoned, not waited for."""


_KINDS = {stat.S_ISFIFO: "a named pipe (FIFO)", stat.S_ISSOCK: "a socket", stat.S_ISCHR: "a character device",
          stat.S_ISBLK: "a block device"}


def require_regular_file(path: str | Path) -> None:
    """Raise :class:`NotRegularFileError` unless ``path`` is a regular file (symlinks followed).

    ``os.stat`` never blocks on a pipe, unlike opening it, so this runs before any decoder sees the path.
    """
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in _KINDS.items() if test(mode)), "not a regular file")
        raise NotRegularFileError(path, f"is {kind}, not a regular file; media must be regular files")


def frame_indices(
    num_segments: int,
    fps: float,
    max_frame: int,
    bound: tuple[float, float] | None = None,
    first_idx: int = 0,
) -> list[int]:
    """MVBench's segment-middle indices, verbatim, so that evaluation sees its frames."""
    start, end = bound or (-100000, 100000)
    start_idx = max(first_idx, round(start * fps))
    end_idx = min(round(end * fps), max_frame)
    seg_size = float(end_idx - start_idx) / num_segments
    return [int(start_idx + seg_size / 2 + round(seg_size * i)) for i in range(num_segments)]


class _Clip(Protocol):
    """An opened source: valid indices are ``first_idx..max_frame`` at ``fps``."""

    first_idx: int
    max_frame: int
    fps: float

    def read(self, indices: list[int]) -> np.ndarray: ...

    def close(self) -> None: ...


class _DecordClip:
    """decord's VideoReader: length is its packet index, rate is the stream average."""

    first_idx = 0

    def __init__(self, path: Path, num_threads: int):
        try:
            import decord
        except ImportError as e:
            raise ImportError("decord is not installed (its wheels are x86_64 only); use backend='pyav'") from e
        self._path = path
        self._errors = (RuntimeError, decord.DECORDError)
        try:
            self._reader = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=num_threads)
        except self._errors as e:
            raise _diagnose(path, f"decord could not open it as a video ({_first_line(e)})") from e
        if len(self._reader) == 0:
            raise VideoReadError(path, "the video has no frames")
        self.max_frame = len(self._reader) - 1
        self.fps = float(self._reader.get_avg_fps())

    def read(self, indices: list[int]) -> np.ndarray:
        try:
            batch = self._reader.get_batch(indices)
        except self._errors as e:
            raise VideoReadError(self._path, f"decord failed to decode frames {indices} ({_first_line(e)})") from e
        return batch.asnumpy() if hasattr(batch, "asnumpy") else np.asarray(batch)

    def close(self) -> None:
        del self._reader


class _PyAVClip:
    """PyAV reader that indexes packets like decord and seeks to the nearest keyframe.

    Frame ``i`` is the ``i``-th packet in presentation (pts) order, exactly decord's
    definition, so both backends return the same frames. Containers without usable
    timestamps fall back to one sequential decode counting frames.
    """

    first_idx = 0

    def __init__(self, path: Path, num_threads: int):
        import av

        self._av = av
        self._path = path
        self._num_threads = num_threads
        self._container = None
        try:
            self._container = av.open(str(path))
            self._stream = self._container.streams.best("video")
            if self._stream is None:
                raise VideoReadError(path, "the file has no video stream")
            packets = [(p.pts, p.is_keyframe) for p in self._container.demux(self._stream) if p.size]
            if not packets:
                raise VideoReadError(path, "the video has no frames")
        except (av.FFmpegError, VideoReadError) as e:
            self.close()
            if isinstance(e, VideoReadError):
                raise
            raise VideoReadError(path, f"PyAV could not read it as a video ({e})") from e
        self.max_frame = len(packets) - 1
        rate = self._stream.average_rate or self._stream.guessed_rate
        self.fps = float(rate) if rate else 0.0
        self._stream.thread_type = "AUTO"
        self._stream.thread_count = num_threads
        pts = [p for p, _ in packets]
        self._seekable = None not in pts and len(set(pts)) == len(pts)
        if self._seekable:
            order = sorted(range(len(packets)), key=lambda k: packets[k][0])
            self._pts = [packets[k][0] for k in order]
            self._keys = [i for i, k in enumerate(order) if packets[k][1]] or [0]
            self._index_of_pts = {p: i for i, p in enumerate(self._pts)}

    def read(self, indices: list[int]) -> np.ndarray:
        wanted = sorted(set(indices))
        try:
            frames = self._decode_seeking(wanted) if self._seekable else None
            if frames is None:
                frames = self._decode_sequential(wanted)
        except self._av.FFmpegError as e:
            raise VideoReadError(self._path, f"PyAV failed to decode frames {wanted} ({e})") from e
        return np.stack([frames[i] for i in indices])

    def _decode_seeking(self, wanted: list[int]) -> dict[int, np.ndarray] | None:
        """Decode forward from the keyframe before each target; None if timestamps lie."""
        wanted_set = set(wanted)
        frames: dict[int, np.ndarray] = {}
        decoded = None
        position = -1
        for target in wanted:
            if target in frames:
                continue
            key = self._keys[max(0, bisect.bisect_right(self._keys, target) - 1)]
            if decoded is None or key > position or target <= position:
                self._container.seek(self._pts[key], stream=self._stream, backward=True)
                decoded = self._container.decode(self._stream)
            for frame in decoded:
                index = self._index_of_pts.get(frame.pts)
                if index is None:
                    return None
                position = index
                if index in wanted_set:
                    frames[index] = frame.to_ndarray(format="rgb24")
                if index >= target:
                    break
            if target not in frames:
                return None
        return frames

    def _decode_sequential(self, wanted: list[int]) -> dict[int, np.ndarray]:
        """Decode from the start, numbering frames in output order."""
        wanted_set = set(wanted)
        frames: dict[int, np.ndarray] = {}
        decoded = 0
        with self._av.open(str(self._path)) as container:
            stream = container.streams[self._stream.index]
            stream.thread_type = "AUTO"
            stream.thread_count = self._num_threads
            for frame in container.decode(stream):
                if decoded in wanted_set:
                    frames[decoded] = frame.to_ndarray(format="rgb24")
                decoded += 1
                if decoded > wanted[-1]:
                    break
        missing = wanted_set - frames.keys()
        if missing:
            raise VideoReadError(
                self._path, f"only {decoded} of {self.max_frame + 1} frames decode; frame {min(missing)} was requested"
            )
        return frames

    def close(self) -> None:
        if self._container is not None:
            self._container.close()


class _TorchcodecClip:
    """torchcodec's exact-seek VideoDecoder (optional; its CPU builds load the system FFmpeg)."""

    first_idx = 0

    def __init__(self, path: Path, num_threads: int):
        try:
            from torchcodec.decoders import VideoDecoder
        except (ImportError, OSError, RuntimeError) as e:
            raise ImportError(
                "the torchcodec backend needs torchcodec and FFmpeg 4-8 shared libraries: "
                "pip install 'torchcodec>=0.12,<0.14' (CPU builds) and e.g. apt-get install ffmpeg; "
                f"import failed with: {_first_line(e)}"
            ) from e
        self._path = path
        try:
            self._decoder = VideoDecoder(
                str(path), seek_mode="exact", num_ffmpeg_threads=num_threads, dimension_order="NHWC"
            )
        except (RuntimeError, ValueError) as e:
            raise VideoReadError(path, f"torchcodec could not open it as a video ({_first_line(e)})") from e
        meta = self._decoder.metadata
        if not meta.num_frames:
            raise VideoReadError(path, "the video has no frames")
        self.max_frame = meta.num_frames - 1
        self.fps = float(meta.average_fps or 0.0)

    def read(self, indices: list[int]) -> np.ndarray:
        try:
            return self._decoder.get_frames_at(indices).data.numpy()
        except (RuntimeError, IndexError) as e:
            raise VideoReadError(self._path, f"torchcodec failed to decode frames {indices} ({_first_line(e)})") from e

    def close(self) -> None:
        del self._decoder


class _FrameFolderClip:
    """MVBench "frame" data: ``{i:05d}.jpg`` numbered from 1, at a rate the caller knows."""

    first_idx = 1

    def __init__(self, path: Path, fps: float):
        self._path = path
        self.max_frame = sum(1 for _ in path.glob("*.jpg"))
        if self.max_frame == 0:
            raise VideoReadError(path, "the frame folder has no frames (expected 00001.jpg, 00002.jpg, ...)")
        self.fps = fps

    def read(self, indices: list[int]) -> np.ndarray:
        frames = []
        for i in indices:
            file = self._path / f"{i:05d}.jpg"
            try:
                require_regular_file(file)
                with Image.open(file) as image:
                    frames.append(np.asarray(image.convert("RGB")))
            except OSError as e:
                raise VideoReadError(file, f"frame {i} of the folder is missing or unreadable ({e})") from e
        if len({f.shape for f in frames}) > 1:
            raise VideoReadError(self._path, f"frames differ in size: {sorted({f.shape for f in frames})}")
        return np.stack(frames)

    def close(self) -> None:
        pass


class _ImageClip:
    """A still image is a one-frame clip; callers repeat it to T frames as PLLaVA does."""

    first_idx = 0
    max_frame = 0
    fps = 1.0

    def __init__(self, path: Path):
        try:
            with Image.open(path) as image:
                self._frame = np.asarray(image.convert("RGB"))
        except OSError as e:
            raise VideoReadError(path, f"could not read it as an image ({e})") from e

    def read(self, indices: list[int]) -> np.ndarray:
        return np.repeat(self._frame[None], len(indices), axis=0)

    def close(self) -> None:
        pass


def _diagnose(path: Path, decord_reason: str) -> VideoReadError:
    """decord's open errors are opaque; PyAV names the actual fault (no stream, no frames)."""
    try:
        _PyAVClip(path, 1).close()
    except VideoReadError as e:
        return VideoReadError(path, f"{e.reason}; {decord_reason}")
    return VideoReadError(path, f"{decord_reason}; PyAV opens it, so backend='pyav' may work")


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _open(path: Path, backend: str, fps: float | None, num_threads: int) -> _Clip:
    if path.is_dir():
        return _FrameFolderClip(path, FRAME_FOLDER_FPS if fps is None else fps)
    require_regular_file(path)
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return _ImageClip(path)
    if suffix == ".gif" or backend == "pyav":  # decord cannot measure most gifs' length
        return _PyAVClip(path, num_threads)
    if backend == "decord":
        return _DecordClip(path, num_threads)
    return _TorchcodecClip(path, num_threads)


def _select(
    clip: _Clip,
    path: Path,
    num_frames: int,
    strategy: str,
    bound: tuple[float, float] | None,
    fps: float,
    seed: int | None,
    sample_fps: float | None,
) -> list[int]:
    if isinstance(clip, _ImageClip):
        return [0] * num_frames
    if fps <= 0:
        raise VideoReadError(path, "the container reports no frame rate; pass fps=")
    start, end = bound or (-100000, 100000)
    lo = max(clip.first_idx, round(start * fps))
    hi = min(round(end * fps), clip.max_frame)
    if lo > hi:
        raise VideoReadError(
            path, f"bound {bound} s selects no frame of {clip.max_frame - clip.first_idx + 1} frames at {fps:g} fps"
        )
    if strategy == "fps":  # sample_fps frames per second of the clip, at most num_frames, at least one
        if sample_fps is None or not sample_fps > 0:
            raise VideoReadError(path, f"strategy 'fps' needs sample_fps > 0 (frames per second), got {sample_fps!r}")
        num_frames = min(num_frames, max(1, round((hi - lo + 1) / fps * sample_fps)))
        strategy = "middle"
    if strategy == "middle":
        return frame_indices(num_frames, fps, clip.max_frame, bound, clip.first_idx)
    if strategy == "uniform":
        return np.linspace(lo, hi, num_frames).round().astype(int).tolist()
    edges = np.linspace(lo, hi + 1, num_frames + 1).astype(int)
    starts = edges[:-1]
    stops = np.maximum(edges[1:], starts + 1)
    return np.random.default_rng(seed).integers(starts, stops).tolist()


def sample_frames(
    path: str | Path,
    num_frames: int,
    strategy: str = "middle",
    bound: tuple[float, float] | None = None,
    backend: str = "decord",
    fps: float | None = None,
    seed: int | None = None,
    num_threads: int = 1,
    sample_fps: float | None = None,
    timeout: float | None = DECODE_TIMEOUT,
) -> tuple[np.ndarray, list[int]]:
    """Read ``num_frames`` RGB frames ``uint8 [T, H, W, 3]`` and the indices they came from.

    ``strategy``: ``middle`` (MVBench segment middles, evaluation), ``random`` (one
    uniformly drawn frame per segment, seeded, training), ``uniform`` (rounded linspace) or
    ``fps`` (``sample_fps`` frames per second of the clip as segment middles, at most
    ``num_frames``: the frame count follows the duration).
    ``bound`` clips to ``(start_s, end_s)``. ``fps`` overrides the container's rate and is
    the rate of a frame folder (default 3). Frame folder indices are file numbers (from 1).
    ``num_threads`` goes to the decoder: some webm decode only with 1 thread.
    ``timeout`` (seconds, None: no deadline) bounds the whole read: past it
    :class:`DecodeTimeoutError` is raised and the decoder, stuck in a daemon thread, is left behind.
    Anything but a regular file (or a folder of them) raises :class:`NotRegularFileError` unopened.
    """
    path = Path(path)
    if strategy not in STRATEGIES:
        raise VideoReadError(path, f"unknown strategy {strategy!r}; expected one of {STRATEGIES}")
    if num_frames < 1:
        raise VideoReadError(path, f"num_frames must be >= 1, got {num_frames}")
    _check_read(path, backend, timeout)

    def read() -> tuple[np.ndarray, list[int]]:
        clip = _open(path, backend, fps, num_threads)
        try:
            indices = _select(clip, path, num_frames, strategy, bound, clip.fps if fps is None else fps, seed,
                              sample_fps)
            frames = clip.read(indices)
        finally:
            clip.close()
        return np.ascontiguousarray(frames, dtype=np.uint8), indices

    if timeout is None:
        return read()
    return _with_deadline(read, path, timeout)


def read_frames(
    path: str | Path,
    choose: Callable[[int, float], Sequence[int]],
    backend: str = "decord",
    fps: float | None = None,
    num_threads: int = 1,
    timeout: float | None = DECODE_TIMEOUT,
) -> tuple[np.ndarray, list[int], float, int]:
    """Frames chosen by the caller: ``choose(total_frames, fps)`` returns 0-based indices into the clip's frames.

    For samplers that are not ours (a model family's processor decides which frames it takes, from the
    video's length and rate): only the chosen frames are decoded. Returns ``uint8 [T, H, W, 3]`` frames, the
    chosen indices, the rate and the frame count ``choose`` was given. A frame folder's frame ``i`` is its file
    ``i + 1``; a still image is one frame at 1 fps. ``backend``, ``fps``, ``num_threads`` and ``timeout`` are
    :func:`sample_frames`'s.
    """
    path = Path(path)
    _check_read(path, backend, timeout)

    def read() -> tuple[np.ndarray, list[int], float, int]:
        clip = _open(path, backend, fps, num_threads)
        try:
            rate = clip.fps if fps is None else fps
            if not rate > 0:
                raise VideoReadError(path, "the container reports no frame rate; pass fps=")
            total = clip.max_frame - clip.first_idx + 1
            indices = [int(i) for i in choose(total, rate)]
            if any(not 0 <= i < total for i in indices):
                raise VideoReadError(path, f"frame indices {indices} are not all within 0..{total - 1}")
            frames = clip.read([i + clip.first_idx for i in indices])
        finally:
            clip.close()
        return np.ascontiguousarray(frames, dtype=np.uint8), indices, rate, total

    if timeout is None:
        return read()
    return _with_deadline(read, path, timeout)


def _check_read(path: Path, backend: str, timeout: float | None) -> None:
    if backend not in BACKENDS:
        raise VideoReadError(path, f"unknown backend {backend!r}; expected one of {BACKENDS}")
    if timeout is not None and not timeout > 0:
        raise VideoReadError(path, f"timeout must be a number of seconds > 0 or None, got {timeout!r}")
    if not path.exists():
        raise VideoReadError(path, "no such file or directory")


def _with_deadline(read: Callable[[], T], path: Path, timeout: float) -> T:
    """``read()`` in a daemon thread, waited for at most ``timeout`` s.

    Decoders block inside C calls that no signal interrupts, and a DataLoader worker has no
    other thread to watch it, so the caller waits on a thread instead of on the decoder. A
    daemon thread never holds up the process's exit.
    """
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = read()
        except BaseException as e:  # handed to the caller, which re-raises it
            outcome["error"] = e

    thread = threading.Thread(target=run, name=f"decode {path.name}", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise DecodeTimeoutError(path, f"decoding took longer than its timeout of {timeout:g} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]
