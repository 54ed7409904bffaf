"""The ``gasp`` lmms-eval model: any gasp-vlm adapter (preset, HF folder, ``gasp export`` folder) behind
lmms-eval's ``lmms`` interface, so base and GASP models get the preprocessing ``gasp eval`` gives them.

    lmms_eval --model gasp --model_args pretrained=runs/export,max_num_frames=32 --tasks ...

Only imported by lmms-eval (through the plugin registration in ``gasp_vlm.lmms_plugin``).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
import torch.distributed as dist
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from lmms_eval.api.registry import register_model
from tqdm import tqdm

from gasp_vlm.bench.media import VideoFrameCache
from gasp_vlm.lmms_plugin.convert import (Decoding, cut_at_stops, decoding_of, group_choices, loglikelihood_results,
                                          media_frames, run_rounds, to_request)


def _int_or_none(v: Any) -> int | None:
    return None if v in (None, "", "None") else int(v)


@register_model("gasp")
class GaspLMM(lmms):
    """model_args: pretrained (preset name, HF directory or exported GASP model), device (auto), dtype (auto),
    max_num_frames (32: uniform frames per video, ``gasp eval``'s rule), min_pixels / max_pixels (Qwen per-frame
    budget, default the model's), max_new_tokens (default when a task sets none), frame_mode, seed; batch_size
    comes from lmms-eval's --batch_size.

    Several processes (``accelerate launch -m lmms_eval ...`` or ``torchrun --nproc-per-node N -m lmms_eval ...``):
    each rank loads the model on its own device (``cuda:LOCAL_RANK`` with device=auto) and answers the documents
    lmms-eval's evaluator gives it; the evaluator gathers the results on rank 0. The process group is started
    here when the launcher has not (NCCL on GPUs, gloo on CPUs): lmms-eval's own fallback is gloo, which cannot
    gather the CUDA tensors it then builds on ``self.device``."""

    is_simple = True

    def __init__(self, pretrained: str = "tiny-qwen2.5-vl", device: str = "auto", dtype: str = "auto",
                 batch_size: int | str = 1, max_num_frames: int | str = 32, min_pixels: int | str | None = None,
                 max_pixels: int | str | None = None, max_new_tokens: int | str = 128, frame_mode: str | None = None,
                 seed: int | str = 0, video_cache_bytes: int | str = 1 << 30, max_batch_size: Any = None,
                 **kwargs: Any) -> None:
        super().__init__()
        del max_batch_size  # lmms-eval always passes it (for auto batch sizing); batches are batch_size here
        if kwargs:
            raise ValueError(f"gasp model: unknown model_args {sorted(kwargs)}")
        from gasp_vlm.models import load_adapter
        from gasp_vlm.models.runtime import launcher_rank, resolve_device, resolve_dtype

        rank, world, _ = launcher_rank()
        dev = resolve_device(device)
        self._device = torch.device(dev)
        if world > 1:
            self._rank, self._world_size = rank, world
            if dist.is_available() and not dist.is_initialized():
                if self._device.type == "cuda":
                    torch.cuda.set_device(self._device)
                dist.init_process_group("nccl" if self._device.type == "cuda" else "gloo")
        self.adapter = load_adapter(pretrained, dtype=resolve_dtype(dtype, dev), device=dev, seed=int(seed),
                                    frame_mode=frame_mode or None)
        self.batch_size = max(1, int(batch_size))
        self.frames = int(max_num_frames)
        self.max_new_tokens = int(max_new_tokens)
        pixels = {k: _int_or_none(v) for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels))}
        self.pixels = {k: v for k, v in pixels.items() if v is not None} or None
        self.videos = VideoFrameCache(int(video_cache_bytes))  # questions about one video share its decode

    @property
    def device(self) -> torch.device:  # lmms-eval's evaluator builds its rank-count tensors here
        return self._device

    def _doc(self, doc_id: int, task: str, split: str) -> Any:  # lmms-eval's argument order
        return self.task_dict[task][split][doc_id]

    def _request(self, context: str, doc_to_visual: Any, doc: Any) -> dict:
        visuals = doc_to_visual(doc) if doc_to_visual is not None else None
        return to_request(context, visuals, self.frames, self.pixels, self.videos)

    def generate_until(self, requests: list[Instance]) -> list[str]:
        args = [r.args for r in requests]
        decodings = [decoding_of(gk, self.max_new_tokens) for _, gk, *_ in args]
        groups: dict[tuple, list[int]] = defaultdict(list)  # one batched generate per decoding setting
        for i, d in enumerate(decodings):
            groups[d.key()].append(i)
        out: list[str | None] = [None] * len(args)
        bar = tqdm(total=len(args), disable=self.rank != 0, desc="gasp generate")
        for idx in groups.values():
            for s in range(0, len(idx), self.batch_size):
                chunk = idx[s:s + self.batch_size]
                reqs = [self._request(args[i][0], args[i][2], self._doc(*args[i][3:6])) for i in chunk]
                d = decodings[chunk[0]]
                texts = self.adapter.generate(reqs, max_new_tokens=d.max_new_tokens, **dict(d.sampling))
                for i, text in zip(chunk, texts):
                    out[i] = cut_at_stops(text, decodings[i].until)
                    self.cache_hook.add_partial("generate_until", (args[i][0], args[i][1]), out[i])
                bar.update(len(chunk))
        bar.close()
        return [o or "" for o in out]

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """Each option's summed log-probability as the assistant answer (``adapter.score_choices``: the
        answer's end-of-turn token included), the options of one question scored together."""
        items, visual_of = [], {}
        for context, target, doc_to_visual, doc_id, task, split in (r.args for r in requests):
            doc = self._doc(doc_id, task, split)
            continuation = target(doc) if callable(target) else target  # multiple_choice: the option string
            items.append(((doc_id, task, split), context, str(continuation)))
            visual_of[(doc_id, task, split)] = doc_to_visual
        keys, choices, where = group_choices(items)
        scores: list[list[float]] = []
        for s in tqdm(range(0, len(keys), self.batch_size), disable=self.rank != 0, desc="gasp loglikelihood"):
            chunk = keys[s:s + self.batch_size]
            reqs = [self._request(ctx, visual_of[key], self._doc(*key)) for key, ctx in chunk]
            scores += self.adapter.score_choices([media_frames(r) for r in reqs], [r["prompt"] for r in reqs],
                                                 choices[s:s + self.batch_size])
        return loglikelihood_results(scores, where)

    def generate_until_multi_round(self, requests: list[Instance]) -> list[list[str]]:
        """Per doc the list of its rounds' answers (a list: lmms-eval passes lists through to the task)."""
        res = []
        for context, gen_kwargs, doc_to_visual, doc_to_text, doc_id, task, split in (r.args for r in requests):
            doc = self._doc(doc_id, task, split)
            d = decoding_of({k: v for k, v in (gen_kwargs or {}).items() if k != "until"}, self.max_new_tokens)

            def answer(ctx: str, visuals: Any, d: Decoding = d) -> str:
                req = to_request(ctx, visuals, self.frames, self.pixels, self.videos)
                return self.adapter.generate([req], max_new_tokens=d.max_new_tokens, **dict(d.sampling))[0]

            res.append(run_rounds((context, doc_to_visual(doc) if doc_to_visual else None), doc, doc_to_text, answer))
        return res
