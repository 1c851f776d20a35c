"""VectorStore: the eligibility masks searches share, kept until rows change, never pickled."""

import pickle

import torch

from mmembed.modality import Modality
from mmembed.retrieval import Index
from mmembed.retrieval.store import VectorStore

D = 4


def unit(n: int, seed: int = 0) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(n, D, generator=torch.Generator().manual_seed(seed)), dim=1)


def truth(store: VectorStore, target: Modality | None) -> list[bool]:
    alive = store.alive if target is None else store.alive & store.modality_mask(target)
    return alive.tolist()


def test_eligible_masks_are_kept_until_rows_change():
    """Every search after one removal (or with a target) built and counted an (N,) mask anew."""
    store = VectorStore(D)
    store.append(unit(6), Modality.IMAGE, ["{}"] * 6)
    store.append(unit(4, 1), Modality.TEXT, ["{}"] * 4)
    assert store.eligible(None) is None  # every row
    image = store.eligible(Modality.IMAGE)
    assert store.eligible(Modality.IMAGE) is image and image.tolist() == truth(store, Modality.IMAGE)
    before = {None: None, Modality.IMAGE: image}
    for change in (lambda: store.remove([2, 7]), lambda: store.append(unit(3, 2), Modality.IMAGE, ["{}"] * 3),
                   lambda: store.remove([0]), store.compact):
        change()
        for target in (None, Modality.IMAGE, Modality.TEXT):
            mask = store.eligible(target)
            assert mask is not before.get(target) or mask is None, (change, target)
            assert store.eligible(target) is mask  # the next search shares it
            assert (mask is None and store.n_dead == 0 and target is None) or mask.tolist() == truth(store, target)
            before[target] = mask
    assert store.eligible(None) is None and store.eligible(Modality.TEXT).sum() == 3  # compacted


def test_a_kept_mask_is_not_changed_by_a_later_removal():
    store = VectorStore(D)
    store.append(unit(5), Modality.IMAGE, ["{}"] * 5)
    store.remove([1])
    mask = store.eligible(None)
    store.remove([3])
    assert mask.tolist() == [True, False, True, True, True] and store.eligible(None)[3].item() is False


def test_a_pickled_store_carries_no_caches():
    store = VectorStore(D)
    store.append(unit(5), Modality.IMAGE, [f'{{"g": {i % 2}}}' for i in range(5)])
    store.remove([1])
    store.eligible(Modality.IMAGE), store.metadata_mask({"g": 1})
    state = store.__getstate__()
    assert "_eligible" not in state and "_columns" not in state
    twin = pickle.loads(pickle.dumps(store))
    twin.remove([3])  # the twin's masks follow its own rows
    assert twin.eligible(None).tolist() == [True, False, True, False, True]
    assert twin.metadata_mask({"g": 1}).tolist() == [False, False, False, False, False]
    assert store.metadata_mask({"g": 1}).tolist() == [False, False, False, True, False]


def test_exact_searches_get_the_kept_mask_and_the_same_hits():
    """The exact backends are handed the store's kept mask (one object across searches), and find what a
    fresh mask found."""
    idx = Index(D, backend="sq8")
    idx.add(unit(30), "image")
    idx.add(unit(20, 1), "text")
    idx.remove([3, 40])
    seen = []
    search = idx._backend.search
    idx._backend.search = lambda store, q, k, mask: seen.append(mask) or search(store, q, k, mask)
    q = unit(1, 2)[0]
    for target in (None, None, "text", "text"):
        hits = idx.search(q, k=50, target=target)
        assert 40 not in [h.id for h in hits] and len(hits) == (48 if target is None else 19)
    assert seen[0] is seen[1] and seen[2] is seen[3] and seen[1] is not seen[2]
    idx.add(unit(1, 3), "text")
    assert len(idx.search(q, k=50, target="text")) == 20 and seen[-1] is not seen[3]
