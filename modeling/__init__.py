"""Self-contained MemoryLlama model definition (these sibling files are what checkpoints ship as remote code).

Imported as `memoryllm_hf.modeling`, it registers MemoryLlama with the transformers Auto classes, so installed
checkpoints load without `trust_remote_code`. (This file is not part of the remote code.)
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .atomic_io import atomic_write, folder_lock, update_folder
from .configuration_memory_llama import MemoryLlamaConfig
from .memory_adapters import READ, WRITE
from .memory_fields import MEMORY_FIELDS, MemoryChangedOnDiskError, MemoryStateError, seeded_rng_state, torch_dtype
from .memory_files import (
    INDEX_FILE,
    LONG_TERM_FILE,
    MEMORY_FILE,
    MEMORY_PARTS,
    PREVIOUS_DIR,
    SEGMENTS_DIR,
    folder_head,
    model_owned_files,
    save_memory_to_folder,
    stage_memory_files,
    state_file_groups,
    whole_pool_bytes,
)
from .memory_journal import MAX_JOURNAL_RECORDS, journal_status, read_folder_memory, restore_previous
from .memory_loading import check_settings
from .memory_placement import PLACEMENTS, user_turn_marker
from .memory_reads import READS
from .memory_settings import check_device
from .memory_state import MemoryState, stored_content_hash
from .memory_store import MemoryBlock
from .memory_text import CallNumbers, check_length, is_blank_text, split_ids
from .memory_transition import LazyPool, long_term_after, next_state
from .modeling_memory_llama import MemoryLlamaForCausalLM, MemoryLlamaModel
from .mplus_memory import MPlusMemory

AutoConfig.register(MemoryLlamaConfig.model_type, MemoryLlamaConfig, exist_ok=True)
AutoModelForCausalLM.register(MemoryLlamaConfig, MemoryLlamaForCausalLM, exist_ok=True)
AutoModel.register(MemoryLlamaConfig, MemoryLlamaModel, exist_ok=True)

__all__ = [
    "PLACEMENTS",
    "READ",
    "READS",
    "WRITE",
    "INDEX_FILE",
    "LONG_TERM_FILE",
    "MEMORY_FIELDS",
    "MEMORY_FILE",
    "MEMORY_PARTS",
    "MAX_JOURNAL_RECORDS",
    "PREVIOUS_DIR",
    "SEGMENTS_DIR",
    "journal_status",
    "whole_pool_bytes",
    "CallNumbers",
    "LazyPool",
    "MemoryBlock",
    "MemoryChangedOnDiskError",
    "MemoryLlamaConfig",
    "MemoryLlamaForCausalLM",
    "MemoryLlamaModel",
    "MemoryState",
    "MemoryStateError",
    "MPlusMemory",
    "atomic_write",
    "check_device",
    "check_settings",
    "check_length",
    "folder_lock",
    "is_blank_text",
    "long_term_after",
    "model_owned_files",
    "next_state",
    "read_folder_memory",
    "restore_previous",
    "folder_head",
    "save_memory_to_folder",
    "seeded_rng_state",
    "split_ids",
    "stage_memory_files",
    "state_file_groups",
    "user_turn_marker",
    "stored_content_hash",
    "torch_dtype",
    "update_folder",
]
