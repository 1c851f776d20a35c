"""mmembed: multimodal shared embeddings."""

from mmembed.modality import Modality

__version__ = "0.1.0"
__all__ = ["Modality", "__version__"]
