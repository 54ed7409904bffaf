"""`gasp bench loader`: the per-sample split, the bytes read and the worker throughput it reports."""

from __future__ import annotations

import json

from click.testing import CliRunner

from gasp_vlm.cli import main


def test_bench_loader_reports_the_split_bytes_and_throughput(tmp_path):
    import numpy as np

    from gasp_vlm.data.scene import load_scene
    from gasp_vlm.train.bench_loader import make_bench_dataset

    data = make_bench_dataset(tmp_path / "d", scenes=1, frames=6, size=56, depth_format="float16")
    r = CliRunner().invoke(main, ["bench", "loader", "--data", str(data), "--frames", "3", "--samples", "2",
                                  "--workers", "1", "--max-pixels", str(56 * 56)])
    assert r.exit_code == 0, r.output
    res = json.loads(r.output)
    sc = load_scene(data / "scene_0000")
    per_frame = [sc.image_path(i).stat().st_size + sc.depth_path(i).stat().st_size for i in range(6)]
    # 3 frames of one scene: between the 3 smallest and the 3 largest frames' files
    assert sum(sorted(per_frame)[:3]) <= res["file_bytes_read_per_sample"] <= sum(sorted(per_frame)[-3:])
    assert res["visual_tokens_per_sample"] == 3 * (56 // 28) ** 2 and res["gt_pairs_per_sample"] > 0
    assert set(res["ms_per_sample"]) == {"read", "pixels", "targets", "total"}
    assert res["samples_per_s"] > 0 and res["workers"] == 1 and np.load(sc.depth_path(0)).dtype == np.float16
    r = CliRunner().invoke(main, ["bench", "loader", "--data", str(data), "--manifest", str(data)])
    assert r.exit_code == 2 and "not both" in r.output
