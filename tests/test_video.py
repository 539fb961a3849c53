"""Frame sampling against real decoders on videos whose frame i shows the code of i."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from tc_llava.data.video import VideoReadError, _PyAVClip, frame_indices, read_frames, sample_frames

NUM_FRAMES = 64
FPS = 8
SIZE = 64
# (suffix, codec, options): near-lossless settings, short GOPs so that seeking is exercised.
CONTAINERS = {
    "h264.mp4": ("libx264", {"qp": "0", "g": "5", "bf": "2"}),
    "vp8.webm": ("libvpx", {"crf": "4", "b": "2M", "g": "5"}),
    "vp9.webm": ("libvpx-vp9", {"lossless": "1", "g": "5"}),
    "h264.mkv": ("libx264", {"qp": "0", "g": "7"}),
    "mpeg4.avi": ("mpeg4", {"qscale": "1", "g": "6"}),
}
BACKENDS = ("decord", "pyav")


def code_frame(i: int) -> np.ndarray:
    """Left half gray level encodes i % 8, right half i // 8, levels 32 apart."""
    frame = np.empty((SIZE, SIZE, 3), np.uint8)
    frame[:, : SIZE // 2] = (i % 8) * 32 + 16
    frame[:, SIZE // 2 :] = (i // 8) * 32 + 16
    return frame


def read_codes(frames: np.ndarray) -> list[int]:
    """Invert code_frame, refusing any pixel more than 10 levels off its nominal value."""
    left = frames[:, 8 : SIZE - 8, 8 : SIZE // 2 - 8].reshape(len(frames), -1).astype(int)
    right = frames[:, 8 : SIZE - 8, SIZE // 2 + 8 : SIZE - 8].reshape(len(frames), -1).astype(int)
    low = np.round((left.mean(1) - 16) / 32).astype(int)
    high = np.round((right.mean(1) - 16) / 32).astype(int)
    assert np.abs(left - (low * 32 + 16)[:, None]).max() <= 10
    assert np.abs(right - (high * 32 + 16)[:, None]).max() <= 10
    return (low + 8 * high).tolist()


def write_video(path: Path, codec: str, options: dict[str, str], num_frames: int = NUM_FRAMES) -> Path:
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=FPS)
        stream.width = stream.height = SIZE
        stream.pix_fmt = "yuv420p"
        stream.options = options
        for i in range(num_frames):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(code_frame(i), format="rgb24")))
        container.mux(stream.encode())
    return path


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("media")
    paths = {name: write_video(root / name, codec, opts) for name, (codec, opts) in CONTAINERS.items()}
    folder = root / "frames"
    folder.mkdir()
    for i in range(1, 21):
        Image.fromarray(code_frame(i)).save(folder / f"{i:05d}.jpg", quality=95)
    paths["frames"] = folder
    gif = [Image.fromarray(code_frame(i)) for i in range(12)]
    gif[0].save(root / "clip.gif", save_all=True, append_images=gif[1:], duration=125, loop=0)
    paths["gif"] = root / "clip.gif"
    Image.fromarray(code_frame(42)).save(root / "still.png")
    paths["png"] = root / "still.png"
    return paths


def test_frame_indices_hand_computed():
    # seg = 63/8 = 7.875: int(3.9375 + round(7.875 i)); round(31.5) = 32 (half to even)
    assert frame_indices(8, 8, 63) == [3, 11, 19, 27, 35, 42, 50, 58]
    # bound 1.0-3.5 s at 8 fps: frames 8..28, seg = 5
    assert frame_indices(4, 8, 63, bound=(1.0, 3.5)) == [10, 15, 20, 25]
    # frame folder 00001..00010 at 3 fps: seg = 9/4 = 2.25; round(4.5) = 4
    assert frame_indices(4, 3, 10, first_idx=1) == [2, 4, 6, 9]
    # end beyond the video is clipped to max_frame: frames 40..63, seg = 11.5
    assert frame_indices(2, 8, 63, bound=(5.0, 100.0)) == [45, 57]
    # start before first_idx is clipped to it
    assert frame_indices(3, 3, 9, bound=(-2.0, 3.0), first_idx=1) == [2, 5, 7]


def _expected(strategy: str, num: int, bound: tuple[float, float] | None) -> list[int]:
    if strategy == "middle":
        return frame_indices(num, FPS, NUM_FRAMES - 1, bound)
    lo, hi = (0, NUM_FRAMES - 1) if bound is None else (round(bound[0] * FPS), round(bound[1] * FPS))
    return np.linspace(lo, hi, num).round().astype(int).tolist()


@pytest.mark.parametrize("name", list(CONTAINERS))
@pytest.mark.parametrize("strategy", ["middle", "uniform"])
@pytest.mark.parametrize("bound", [None, (1.0, 3.5)])
def test_backends_return_the_formula_frames(media, name, strategy, bound):
    results = {}
    for backend in BACKENDS:
        frames, indices = sample_frames(media[name], 8, strategy, bound=bound, backend=backend)
        assert frames.dtype == np.uint8 and frames.shape == (8, SIZE, SIZE, 3)
        assert indices == _expected(strategy, 8, bound)
        assert read_codes(frames) == indices
        results[backend] = frames
    np.testing.assert_array_equal(results["decord"], results["pyav"])


@pytest.mark.parametrize("num", [16, 32])
def test_many_frames_and_threads(media, num):
    frames, indices = sample_frames(media["h264.mp4"], num, backend="decord", num_threads=2)
    assert indices == frame_indices(num, FPS, NUM_FRAMES - 1)
    assert read_codes(frames) == indices
    frames_av, _ = sample_frames(media["h264.mp4"], num, backend="pyav", num_threads=2)
    np.testing.assert_array_equal(frames, frames_av)


def test_pyav_seeking_matches_sequential_decode(media):
    clip = _PyAVClip(media["vp8.webm"], num_threads=1)
    try:
        wanted = [0, 4, 5, 17, 18, 40, 63]
        seeking = clip._decode_seeking(wanted)
        sequential = clip._decode_sequential(wanted)
    finally:
        clip.close()
    assert seeking is not None
    assert [read_codes(seeking[i][None])[0] for i in wanted] == wanted
    for i in wanted:
        np.testing.assert_array_equal(seeking[i], sequential[i])


@pytest.mark.parametrize("backend", BACKENDS)
def test_frame_folder(media, backend):
    frames, indices = sample_frames(media["frames"], 4, backend=backend)
    assert indices == frame_indices(4, 3, 20, first_idx=1)
    assert read_codes(frames) == indices
    frames, indices = sample_frames(media["frames"], 4, bound=(1.0, 5.0), fps=2)
    assert indices == frame_indices(4, 2, 20, bound=(1.0, 5.0), first_idx=1)
    assert min(indices) >= 2 and max(indices) <= 10
    assert read_codes(frames) == indices


def test_gif_is_read_like_a_video(media):
    frames, indices = sample_frames(media["gif"], 4, backend="decord")
    assert indices == frame_indices(4, 8, 11)
    assert read_codes(frames) == indices


def test_still_image_is_repeated(media):
    frames, indices = sample_frames(media["png"], 5, strategy="random", seed=0)
    assert indices == [0] * 5
    assert read_codes(frames) == [42] * 5


@pytest.mark.parametrize("backend", BACKENDS)
def test_random_is_seeded_and_one_per_segment(media, backend):
    first, idx_a = sample_frames(media["h264.mp4"], 8, "random", backend=backend, seed=7)
    again, idx_b = sample_frames(media["h264.mp4"], 8, "random", backend=backend, seed=7)
    assert idx_a == idx_b
    np.testing.assert_array_equal(first, again)
    assert [i // 8 for i in idx_a] == list(range(8))  # 64 frames, 8 segments of 8
    assert read_codes(first) == idx_a
    draws = {tuple(sample_frames(media["h264.mp4"], 8, "random", backend=backend, seed=s)[1]) for s in range(6)}
    assert len(draws) > 1
    _, bounded = sample_frames(media["h264.mp4"], 4, "random", bound=(1.0, 3.5), backend=backend, seed=1)
    segments = [(8, 13), (13, 18), (18, 23), (23, 29)]  # frames 8..28 cut at linspace(8, 29, 5)
    assert all(lo <= i < hi for i, (lo, hi) in zip(bounded, segments))


def test_random_with_more_segments_than_frames(media):
    _, indices = sample_frames(media["h264.mp4"], 8, "random", bound=(0.0, 0.5), backend="pyav", seed=0)
    assert all(0 <= i <= 4 for i in indices) and indices == sorted(indices)


def _zero_frame_avi(path: Path) -> Path:
    container = av.open(str(path), "w")
    stream = container.add_stream("mpeg4", rate=FPS)
    stream.width = stream.height = SIZE
    stream.pix_fmt = "yuv420p"
    container.start_encoding()
    container.close()
    return path


@pytest.mark.parametrize("backend", BACKENDS)
def test_errors_name_the_path(tmp_path, backend):
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(np.random.default_rng(0).bytes(4096))
    empty = tmp_path / "empty_frames"
    empty.mkdir()
    cases = {
        tmp_path / "missing.mp4": "no such file",
        corrupt: "could not",
        _zero_frame_avi(tmp_path / "zero.avi"): "no frames",
        empty: "no frames",
    }
    for path, reason in cases.items():
        with pytest.raises(VideoReadError, match=str(path)) as info:
            sample_frames(path, 4, backend=backend)
        assert info.value.path == str(path) and reason in info.value.reason


def test_bad_arguments_and_bounds(media):
    path = media["h264.mp4"]
    with pytest.raises(VideoReadError, match="unknown backend 'opencv'"):
        sample_frames(path, 4, backend="opencv")
    with pytest.raises(VideoReadError, match="unknown strategy 'dense'"):
        sample_frames(path, 4, strategy="dense")
    with pytest.raises(VideoReadError, match="selects no frame"):
        sample_frames(path, 4, bound=(20.0, 30.0))


@pytest.mark.parametrize("name", list(CONTAINERS))
def test_torchcodec_agrees_or_says_how_to_install(media, name):
    try:
        frames, indices = sample_frames(media[name], 8, bound=(1.0, 3.5), backend="torchcodec")
    except ImportError as e:
        assert "pip install" in str(e)
        return
    reference, _ = sample_frames(media[name], 8, bound=(1.0, 3.5), backend="decord")
    assert read_codes(frames) == indices
    np.testing.assert_array_equal(frames, reference)


def test_fps_sampling_follows_the_duration(media):
    """64 frames at 8 fps = 8 s: 2 per second gives 16 segment middles; the count is capped, and a
    bound shortens the clip; an image stays the frames asked for."""
    frames, indices = sample_frames(media["h264.mp4"], 32, "fps", backend="pyav", sample_fps=2)
    assert indices == frame_indices(16, 8, 63) and read_codes(frames) == indices
    assert sample_frames(media["h264.mp4"], 10, "fps", backend="pyav", sample_fps=2)[1] == frame_indices(10, 8, 63)
    assert sample_frames(media["h264.mp4"], 32, "fps", (1.0, 3.5), backend="pyav", sample_fps=1)[1] == \
        frame_indices(3, 8, 63, bound=(1.0, 3.5))
    with pytest.raises(VideoReadError, match="strategy 'fps' needs sample_fps > 0"):
        sample_frames(media["h264.mp4"], 8, "fps", backend="pyav")


@pytest.mark.parametrize("name, total, first", [("h264.mp4", NUM_FRAMES, 0), ("frames", 20, 1)])
def test_read_frames_decodes_the_indices_the_caller_chooses(media, name, total, first):
    """A sampler that is not ours gets the clip's length and rate and is given exactly its frames; a frame
    folder's index 0 is its file 00001.jpg."""
    given = {}

    def choose(count: int, rate: float) -> list[int]:
        given.update(count=count, rate=rate)
        return [0, 3, count - 1]

    frames, indices, fps, count = read_frames(media[name], choose, backend="pyav")
    assert given == {"count": total, "rate": fps} and count == total and indices == [0, 3, total - 1]
    assert fps == (FPS if name != "frames" else 3.0)
    assert read_codes(frames) == [i + first for i in indices]
    with pytest.raises(VideoReadError, match=f"not all within 0..{total - 1}"):
        read_frames(media[name], lambda count, rate: [count], backend="pyav")
