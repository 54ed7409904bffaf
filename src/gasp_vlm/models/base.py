"""The adapter interface every VLM family implements, and the logic they share."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from gasp_vlm.models.capture import CaptureResult, capture_visual_features
from gasp_vlm.models.layout import FrameTransform, TokenLayout

IGNORE_INDEX = -100  # label of positions without LM loss (HF convention)


class ModelLoadError(ValueError):
    """A model path or name that cannot be loaded (missing config, unknown family, ...)."""


@dataclass
class PreparedBatch:
    """Model inputs for B samples plus where their visual tokens are."""

    inputs: dict[str, torch.Tensor]
    layouts: list[TokenLayout]
    labels: torch.Tensor | None = None  # (B, S) long, -100 except answer tokens

    @property
    def visual_rows(self) -> torch.Tensor:
        """(B, N) sequence indices of the visual tokens of each sample."""
        return torch.stack([lay.positions for lay in self.layouts]).to(self.inputs["input_ids"].device)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "PreparedBatch":
        inputs = {k: v.to(device, non_blocking=non_blocking) if torch.is_tensor(v) else v
                  for k, v in self.inputs.items()}
        labels = self.labels.to(device, non_blocking=non_blocking) if self.labels is not None else None
        return PreparedBatch(inputs, self.layouts, labels)

    def pin_memory(self) -> "PreparedBatch":
        """Page-locked copies of the tensors (DataLoader(pin_memory=True) calls this), so the host->GPU
        copy of the pixels can overlap compute."""
        inputs = {k: v.pin_memory() if torch.is_tensor(v) else v for k, v in self.inputs.items()}
        return PreparedBatch(inputs, self.layouts, self.labels.pin_memory() if self.labels is not None else None)


def as_uint8_frames(frames: Sequence[Any], where: str = "frames") -> list[np.ndarray]:
    """Validate a list of frames (PIL images or (H, W, 3) uint8 arrays) -> list of uint8 arrays, same size."""
    if len(frames) == 0:
        raise ValueError(f"{where}: zero frames given; at least one frame is needed")
    out = []
    for i, f in enumerate(frames):
        arr = np.asarray(f.convert("RGB")) if isinstance(f, Image.Image) else np.asarray(f)
        if arr.ndim != 3 or arr.shape[2] != 3:
            raise ValueError(f"{where}: frame {i} has shape {arr.shape}; expected (H, W, 3) RGB")
        if arr.dtype != np.uint8:
            raise ValueError(f"{where}: frame {i} has dtype {arr.dtype}; expected uint8")
        out.append(arr)
    sizes = {a.shape[:2] for a in out}
    if len(sizes) > 1:
        raise ValueError(f"{where}: frames of mixed sizes {sorted(sizes)}; resize them to one size first")
    return out


def as_turns(prompt: str | None, answer: str | None,
             turns: Sequence[tuple[str, str]] | None) -> list[tuple[str, str]]:
    """The (role, text) turns of a sample: ``turns`` as given (user first, alternating), else the single
    prompt (+ answer) pair. A trailing user turn leaves the assistant turn open (generation)."""
    if turns is None:
        return [("user", prompt or "")] + ([("assistant", answer)] if answer is not None else [])
    turns = list(turns)
    for k, (role, _) in enumerate(turns):
        if role != ("user" if k % 2 == 0 else "assistant"):
            raise ValueError(f"turn {k} has role {role!r}; turns must alternate user/assistant from a user turn")
    if not turns:
        raise ValueError("turns: empty conversation")
    return turns


def text_only_layout(family: str, mode: str, token_px: int) -> TokenLayout:
    """The layout of a sample without media (no visual tokens)."""
    return TokenLayout(family, mode, 0, (0, 0), token_px, (), torch.zeros(0, dtype=torch.long),
                       FrameTransform((0, 0), (0, 0), (1.0, 1.0)))


def pad_sequences(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad id lists -> (ids (B, S), attention_mask (B, S))."""
    s = max(len(x) for x in seqs)
    ids = torch.full((len(seqs), s), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), s), dtype=torch.long)
    for i, x in enumerate(seqs):
        ids[i, : len(x)] = torch.tensor(x, dtype=torch.long)
        mask[i, : len(x)] = 1
    return ids, mask


def left_pad(inputs: dict[str, Any]) -> dict[str, Any]:
    """Right-padded model inputs -> left-padded (generation appends after the last column): every
    (B, S) tensor that lines up with ``attention_mask`` is rotated row by row; pixels are untouched."""
    mask = inputs["attention_mask"]
    out = dict(inputs)
    for key, val in inputs.items():
        if torch.is_tensor(val) and val.shape[:2] == mask.shape:
            rows = [torch.roll(val[i], int(mask.shape[1] - mask[i].sum())) for i in range(len(mask))]
            out[key] = torch.stack(rows)
    return out


class VLMAdapter:
    """One VLM family behind one interface (see docs/DESIGN.md).

    Subclasses set ``family`` and implement ``text_model_config``, ``language_layers``,
    ``_encode_sample`` (frames -> ids + pixel tensors + layout), ``_collate`` and ``_encode_generation``.
    """

    family: str = ""
    hf_model_types: tuple[str, ...] = ()

    def __init__(self, model: nn.Module, tokenizer: Any, processor: Any = None, preset: str | None = None,
                 frame_mode: str | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.processor = processor
        self.preset = preset
        self.frame_mode = frame_mode or self.default_frame_mode

    default_frame_mode = "video"
    frame_modes: tuple[str, ...] = ("video",)
    hf_class: str = ""  # the transformers class ``from_pretrained`` loads a checkpoint with
    processor_class: str = ""  # the HF processor class of the family (exports write it; loads check it)
    # True where the model adds features to the stream between decoder layers (Qwen3-VL's DeepStack):
    # hidden[l] is then captured as layer l+1's input, the stream the next query reads
    adds_between_layers = False

    def preparer(self) -> "VLMAdapter":
        """A copy without the model, for DataLoader workers: encoding (tokeniser, pixels, layouts) needs
        only the tokenizer and the processor settings, and a worker must never hold the weights."""
        import copy

        light = copy.copy(self)
        light.model = None
        return light

    # ---- architecture facts ------------------------------------------------------------------
    @property
    def text_config(self):
        return self.model.config.get_text_config()

    @property
    def num_layers(self) -> int:
        return len(self.decoder_layers())

    @property
    def hidden_size(self) -> int:
        return self.text_config.hidden_size

    @property
    def num_heads(self) -> int:
        return self.text_config.num_attention_heads

    @property
    def num_kv_heads(self) -> int:
        return self.text_config.num_key_value_heads

    @property
    def head_dim(self) -> int:
        return getattr(self.text_config, "head_dim", None) or self.hidden_size // self.num_heads

    def decoder_layers(self) -> nn.ModuleList:
        return self.model.model.language_model.layers

    def vision_module(self) -> nn.Module:
        raise NotImplementedError

    def attn_projections(self, layer: int) -> tuple[nn.Linear, nn.Linear]:
        attn = self.decoder_layers()[layer].self_attn
        return attn.q_proj, attn.k_proj

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ---- text ----------------------------------------------------------------------------------
    def _text(self, s: str) -> list[int]:
        return self.tokenizer.encode(s, add_special_tokens=False)

    def _chatml(self, system: str | None, media: list[int], prompt: str | None, answer: str | None,
                turns: Sequence[tuple[str, str]] | None = None) -> tuple[list[int], list[int]]:
        """ChatML (``self.ids`` has im_start / im_end): an optional system turn, ``media`` (expanded media
        tokens) opening the first user turn; returns (ids, labels). Labels cover each assistant turn's text
        and its <|im_end|> (not the role header, not the newline between turns)."""
        turns = as_turns(prompt, answer, turns)
        start, end, nl = self.ids["im_start"], self.ids["im_end"], self._text("\n")
        ids = [] if system is None else [start] + self._text(f"system\n{system}") + [end] + nl
        labels = [IGNORE_INDEX] * len(ids)
        for k, (role, text) in enumerate(turns):
            if role == "user":
                head = [start] + self._text("user\n") + (media if k == 0 else []) + self._text(text) + [end] + nl
                head += [start] + self._text("assistant\n")
                ids += head
                labels += [IGNORE_INDEX] * len(head)
            else:
                ans = self._text(text) + [end]
                ids += ans
                labels += ans
                if k + 1 < len(turns):
                    ids += nl
                    labels += [IGNORE_INDEX] * len(nl)
        return ids, labels

    # ---- inputs ------------------------------------------------------------------------------
    def prepare_frames(self, samples: Sequence[Sequence[Any]], prompt: str | None = None,
                       answers: Sequence[str | None] | None = None, frame_mode: str | None = None) -> PreparedBatch:
        """B samples of frames (each a list of same-size RGB frames) -> model inputs + layouts.

        ``prompt`` is the user text after the frames; ``answers`` (optional, one per sample) become
        the assistant turn, and only their tokens get LM labels.
        """
        mode = frame_mode or self.frame_mode
        if mode not in self.frame_modes:
            raise ValueError(f"{self.family}: unknown frame mode {mode!r}; choose from {self.frame_modes}")
        if len(samples) == 0:
            raise ValueError("prepare_frames: empty batch")
        answers = list(answers) if answers is not None else [None] * len(samples)
        encoded = [self._encode_sample(as_uint8_frames(frames, f"sample {i}"), prompt, answers[i], mode)
                   for i, frames in enumerate(samples)]
        return self._collate(encoded)

    def _encode_sample(self, frames: list[np.ndarray], prompt: str | None, answer: str | None, mode: str,
                       turns: Sequence[tuple[str, str]] | None = None) -> dict:
        """One sample -> dict(ids, labels, layout, pixels, ...). ``turns`` (role, text), user first, replaces
        prompt/answer for a whole conversation: the media go before the first user text and every
        assistant turn gets labels. ``frames`` may be empty (a text-only sample)."""
        raise NotImplementedError

    def _collate(self, encoded: list[dict]) -> PreparedBatch:
        raise NotImplementedError

    def _token_rows(self, rows: list[list[int]]) -> dict[str, torch.Tensor]:
        """Token id rows -> right-padded ``input_ids`` and ``attention_mask`` (every family's batches)."""
        ids, mask = pad_sequences(rows, self.tokenizer.pad_token_id)
        return {"input_ids": ids, "attention_mask": mask}

    def _prepared(self, encoded: list[dict], inputs: dict[str, Any]) -> PreparedBatch:
        """Encoded samples' model ``inputs`` -> a PreparedBatch with their layouts and padded labels
        (None when no sample has an answer: nothing to score)."""
        labels, _ = pad_sequences([e["labels"] for e in encoded], IGNORE_INDEX)
        has_answer = any(l != IGNORE_INDEX for e in encoded for l in e["labels"])
        return PreparedBatch(inputs, [e["layout"] for e in encoded], labels if has_answer else None)

    # ---- forward -----------------------------------------------------------------------------
    def encode_visual_frozen(self, batch: PreparedBatch) -> dict[str, torch.Tensor]:
        """Inputs with the vision tower run under no_grad (its features passed as ``mm_encoder_outputs``).

        Why: with activation checkpointing, transformers hooks the patch embedding to require grad, so a
        frozen tower would otherwise keep a graph and be recomputed and back-propagated for nothing.
        """
        raise NotImplementedError

    def forward_capture(self, batch: PreparedBatch, what: Sequence[str] = ("hidden",),
                        layers: Sequence[int] | None = None, grad: bool = False,
                        freeze_vision: bool = True, rows: torch.Tensor | None = None) -> CaptureResult:
        """One forward pass capturing per-layer visual-token features (see models/capture.py).

        ``rows`` (B, N) overrides which sequence positions are captured (default: the visual tokens).

        The LM head runs only where a loss needs it: at the positions that predict answer tokens
        (``cap.logits`` (n_answer, V), ``cap.loss`` their mean cross-entropy, HF's own reduction), or at
        the last position only when ``batch.labels`` is None (``cap.logits`` (B, 1, V)). The full
        (B, S, V) logits -- at 6 k tokens and a 152 k vocabulary 1.9 GB bf16 + 3.7 GB upcast -- never exist.
        """
        rows = batch.visual_rows if rows is None else rows
        inputs = self.encode_visual_frozen(batch) if freeze_vision else dict(batch.inputs)
        labels = batch.labels
        # position p predicts token p+1: keep p where labels[p+1] is an answer token
        keep = None if labels is None else F.pad(labels[:, 1:] != IGNORE_INDEX, (0, 1), value=False)
        with torch.set_grad_enabled(grad):
            with capture_visual_features(self.decoder_layers(), rows, what, layers, self.num_heads,
                                         self.head_dim, self.adds_between_layers) as cap:
                out = self.model(**inputs, use_cache=False, logits_to_keep=1 if keep is None else keep)
            cap.logits = out.logits
            if keep is not None:
                answer = labels[:, 1:][keep[:, :-1]]  # (n_answer,) in the row-major order of the mask
                cap.loss = F.cross_entropy(out.logits.float(), answer) if answer.numel() else None
        return cap

    # ---- generation --------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, requests: Sequence[dict], max_new_tokens: int = 16, **gen_kwargs) -> list[str]:
        """Greedy (by default) generation for benchmark requests: dict(prompt, images=[PIL], video=[PIL]).

        Families whose ``_collate_generation`` can batch requests (all shipped ones) run them in one
        left-padded ``generate``; a family without it, one request at a time."""
        encoded = [self._encode_generation(req) for req in requests]
        batched = self._collate_generation(encoded) if len(encoded) > 1 else None
        groups = [left_pad(batched)] if batched is not None else encoded
        return [text for inputs in groups for text in self._generate_texts(inputs, max_new_tokens, **gen_kwargs)]

    def _generate_texts(self, inputs: dict[str, Any], max_new_tokens: int, **gen_kwargs) -> list[str]:
        """One ``model.generate`` over left-padded (or single-row) inputs -> the new text of every row."""
        gen_kwargs.setdefault("do_sample", False)
        inputs = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in inputs.items()}
        n_in = inputs["input_ids"].shape[1]
        out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, pad_token_id=self.tokenizer.pad_token_id,
                                  eos_token_id=self.tokenizer.eos_token_id, **gen_kwargs)
        return [self.tokenizer.decode(row[n_in:], skip_special_tokens=True).strip() for row in out]

    def _collate_generation(self, encoded: list[dict]) -> dict | None:
        """Several ``_encode_generation`` outputs -> one right-padded batch, or None: not batchable."""
        return None

    @torch.no_grad()
    def generate_frames(self, samples: Sequence[Sequence[Any]], prompts: Sequence[str], max_new_tokens: int = 16,
                        **gen_kwargs) -> list[str]:
        """Batched greedy generation with the tokenisation training uses (``prepare_frames`` in the
        adapter's frame mode), the prompts left-padded so every row's answer starts at the same column.
        ``samples``: one frame list per prompt (a single frame = a one-frame clip)."""
        if len(samples) != len(prompts):
            raise ValueError(f"{len(samples)} frame lists for {len(prompts)} prompts")
        encoded = [self._encode_sample(as_uint8_frames(f, where=f"sample {i}"), p, None, self.frame_mode)
                   for i, (f, p) in enumerate(zip(samples, prompts))]
        return self._generate_texts(left_pad(self._collate(encoded).inputs), max_new_tokens, **gen_kwargs)

    @torch.no_grad()
    def score_choices(self, samples: Sequence[Sequence[Any]], prompts: Sequence[str],
                      choices: Sequence[Sequence[str]]) -> list[list[float]]:
        """Closed-set scoring (lmms-eval's ``loglikelihood``): for each prompt, the summed log-probability
        of every candidate answer as the assistant turn, end-of-turn token included (so "4" is not
        credited with the mass of "45"). One forward pass over all (prompt, candidate) pairs, in the
        adapter's frame mode. Returns ``scores[i][j]`` for ``choices[i][j]``."""
        if not len(samples) == len(prompts) == len(choices):
            raise ValueError(f"{len(samples)} frame lists, {len(prompts)} prompts, {len(choices)} choice lists")
        pairs = [(i, c) for i, cs in enumerate(choices) for c in cs]
        if any(not cs for cs in choices):
            raise ValueError("score_choices: a prompt without candidate answers")
        frames = [as_uint8_frames(f, where=f"sample {i}") for i, f in enumerate(samples)]
        batch = self._collate([self._encode_sample(frames[i], prompts[i], c, self.frame_mode)
                               for i, c in pairs]).to(self.device)
        cap = self.forward_capture(batch, what=(), layers=(), grad=False)
        targets = batch.labels[:, 1:]
        mask = targets != IGNORE_INDEX  # (P, S-1), row-major like cap.logits' rows
        logp = torch.log_softmax(cap.logits.float(), dim=-1).gather(1, targets[mask][:, None])[:, 0]
        per_pair = torch.split(logp, mask.sum(1).tolist())
        scores: list[list[float]] = [[] for _ in choices]
        for (i, _), lp in zip(pairs, per_pair):
            scores[i].append(float(lp.sum()))
        return scores

    def _encode_generation(self, request: dict) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    # ---- saving ------------------------------------------------------------------------------
    def save_pretrained(self, out_dir: str | Path) -> None:
        """Write a plain HF checkpoint (safetensors) + tokenizer + a gasp note of the family/frame mode."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(out_dir, safe_serialization=True)
        self.tokenizer.save_pretrained(out_dir)
        (out_dir / "gasp_adapter.json").write_text(json.dumps(
            {"family": self.family, "frame_mode": self.frame_mode, "preset": self.preset, **self.extra_state()},
            indent=2))

    def extra_state(self) -> dict:
        """Adapter settings saved beside a model (gasp_adapter.json) and passed back to ``__init__`` on load."""
        return {}

    @classmethod
    def processor_settings(cls, name: str, cfg: dict) -> dict:
        """``__init__`` kwargs a checkpoint's processor config file (``name``: preprocessor_config.json or
        video_preprocessor_config.json, parsed) fixes; families add theirs."""
        if "image_mean" in cfg:
            return {"image_mean": cfg["image_mean"], "image_std": cfg["image_std"]}
        return {}
