"""Datasets: manifests (JSONL/CSV) → preprocessed samples → batches, plus the synthetic world.

Reading order: columns.py (column names, and which one a user meant) → manifest.py (rows on disk;
folder.py writes them from a folder of files)
→ dataset.py (rows → samples, bad rows skipped; cache_size.py: whether its cache fits in memory)
→ collate.py (samples → Batch) → loader.py (seeded, resumable DataLoader; skip accounting).
"""

from mmembed.data.collate import Batch, collate, label_ids
from mmembed.data.dataset import ManifestDataset, Sample, Skipped
from mmembed.data.folder import FolderManifests, write_folder_manifests
from mmembed.data.loader import EpochBatchSampler, SkipCounter, build_loader
from mmembed.data.manifest import Manifest, Row, read_manifest

from mmembed.data.synth import WorldSummary, describe_scene, generate_world

__all__ = [
    "read_manifest",
    "write_folder_manifests",
    "FolderManifests",
    "Manifest",
    "Row",
    "ManifestDataset",
    "Sample",
    "Skipped",
    "Batch",
    "collate",
    "label_ids",
    "build_loader",
    "EpochBatchSampler",
    "SkipCounter",
    "generate_world",
    "describe_scene",
    "WorldSummary",
]
