"""Instruction-tuning data: LLaVA-Video-178K style conversations, mixtures of them, their media.

- conversations.py: records -> whole-conversation entries (roles, placeholders, validation);
- mixture.py: mixture YAML files (json_path, media_root, sampling, weight);
- video.py: frame indices first (uniform | fps), then decoding only those frames by seeking;
- dataset.py: InstructionSet, the mixture as one index space;
- generated.py: the built-in toy set (``data.instructions: generated``).
"""

from gasp_vlm.train.instructions.conversations import Entry, InstructionFormatError, load_entries, parse_record
from gasp_vlm.train.instructions.dataset import InstructionSet
from gasp_vlm.train.instructions.generated import make_instruction_set
from gasp_vlm.train.instructions.mixture import MixtureEntry, load_mixture, select
from gasp_vlm.train.instructions.video import (MediaError, VideoOptions, choose_indices, decode_frames, fps_indices,
                                               probe_video, read_media, read_video, uniform_indices)

__all__ = ["Entry", "InstructionFormatError", "InstructionSet", "MediaError", "MixtureEntry", "VideoOptions",
           "choose_indices", "decode_frames", "fps_indices", "load_entries", "load_mixture", "make_instruction_set", "parse_record", "probe_video",
           "read_media", "read_video", "select", "uniform_indices"]
