"""Stage "data": rendered rooms and the three question sets, each written once and reused on a rerun.

    data/train, data/heldout          synthetic rooms (data/synth.py), different seeds
    data/base_tasks/tasks.json        stage 0: general tasks + a small share of spatial-format QA (train rooms)
    data/finetune_tasks/tasks.json    stage 1: general tasks only -- GASP sees no 3D VQA (train rooms)
    data/heldout_qa/tasks.json        downstream: spatial QA on the held-out rooms only
"""

from __future__ import annotations

from pathlib import Path

from gasp_vlm.demo.plan import DemoPlan


def _scenes_complete(root: Path, count: int) -> bool:
    from gasp_vlm.data.scene import list_scene_dirs

    return root.is_dir() and len(list_scene_dirs(root)) >= count and (root / ".complete").exists()


def make_data(out: Path, plan: DemoPlan, progress: bool = True) -> dict[str, Path]:
    """Scenes + question sets under ``out/data`` (skipping what a previous run finished)."""
    from gasp_vlm.data.scene_tasks import GENERAL_TASKS, SPATIAL_TASKS, make_task_set
    from gasp_vlm.data.synth import synth_dataset

    data = out / "data"
    sets = {"train": (plan.train_scenes, 2 * plan.seed), "heldout": (plan.heldout_scenes, 2 * plan.seed + 1)}
    for name, (count, seed) in sets.items():
        root = data / name
        if _scenes_complete(root, count):
            continue
        synth_dataset(root, count, plan.scene_frames, plan.size, seed=seed + 1000,
                      camouflage_fraction=plan.camouflage_fraction, progress=progress, overwrite=True)
        (root / ".complete").write_text("ok\n")
    clip = dict(num_frames=plan.qa_clip_frames, clip_stride=plan.qa_clip_stride)
    # task seeds: 3 per demo seed, one per set, so no set shares draws with another
    task_sets = {
        "base_tasks": (data / "train", {**{t: plan.base_general for t in GENERAL_TASKS},
                                        **{t: plan.base_spatial for t in SPATIAL_TASKS}}, 3 * plan.seed),
        "finetune_tasks": (data / "train", {t: plan.finetune_general for t in GENERAL_TASKS}, 3 * plan.seed + 1),
        "heldout_qa": (data / "heldout", {t: plan.heldout_questions for t in SPATIAL_TASKS}, 3 * plan.seed + 2),
    }
    paths = {"train": data / "train", "heldout": data / "heldout"}
    for name, (scenes, counts, seed) in task_sets.items():
        path = data / name / "tasks.json"
        if not path.exists():
            make_task_set(scenes, data / name, counts, seed=seed, **clip)
        paths[name] = path
    return paths
