from stts_jax.data import throughput
from tests.data import videos


def test_decode_preprocess_rate_counts_frames(tmp_path):
  paths = [videos.write_video(str(tmp_path / f"v{i}"), videos.moving_frames(20, 48, 64, seed=i), 10.0)
           for i in range(2)]
  r = throughput.decode_preprocess_rate(paths, max_frames=8, max_fps=2.0, image_size=126, min_seconds=0.0)
  assert r["videos"] == 2 and r["frames"] == 2 * 4          # 2 s at 10 fps, capped at 2 fps -> 4 frames
  assert min(r["decode_fps"], r["preprocess_fps"], r["total_fps"], r["total_fps_cpu"]) > 0
