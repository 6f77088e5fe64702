"""The real engine: model config, paged KV cache, flat batches, our forward, loaders, drafters and the
torch ``Executor`` that the shared ``ServingLoop`` drives."""

from .batch import BatchBuilder, FlatBatch, tree_ancestor_mask
from .config import ModelConfig, RopeScaling, UnsupportedModel
from .drafters import Drafter, ModelDrafter, NgramDrafter
from .executor import TorchExecutor
from .kv_cache import BlockAllocator, KVCache, OutOfBlocks
from .loader import ModelNotFound, load_model, tiny_random_model
from .model import Transformer
from .recorder import AcceptanceRecorder

__all__ = [
    "AcceptanceRecorder", "BatchBuilder", "BlockAllocator", "Drafter", "FlatBatch", "KVCache", "ModelConfig",
    "ModelDrafter", "ModelNotFound", "NgramDrafter", "OutOfBlocks", "RopeScaling", "TorchExecutor", "Transformer",
    "UnsupportedModel", "load_model", "tiny_random_model", "tree_ancestor_mask",
]
