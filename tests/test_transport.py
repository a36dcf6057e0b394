"""How batches leave the loader workers (data/transport.py): the per-row fields travel inline as numpy arrays, the
pixels in one shared-memory tensor; the main process gets back the tensors it always got, equal to the in-process
loader's on every path (worker crops, device crops, GPU-decode layout, evaluation)."""

from __future__ import annotations

import pickle
from multiprocessing.reduction import ForkingPickler

import numpy as np
import pytest
import torch

from test_stage_sized import woof_shards

from mae_curriculum.data.eval_loader import EvalLoader
from mae_curriculum.data.index import load_index
from mae_curriculum.data.loader import ShardLoader, StreamSpec
from mae_curriculum.data.transforms import AugmentConfig
from mae_curriculum.data.transport import INLINE_BYTES, InlineSmall, collate_rows, inline_small, restore


@pytest.fixture(scope="module")
def woof(tmp_path_factory):
    return woof_shards(tmp_path_factory.mktemp("woof_transport") / "train", n=40)


def test_small_fields_travel_inline_and_come_back_as_the_same_tensors():
    rows = [{"image": torch.full((3, 64, 64), k, dtype=torch.uint8), "label": k, "id": 100 + k, "corrupt": 0,
             "fresh": 1} for k in range(4)]
    ref = collate_rows(rows)
    assert ref["image"].shape == (4, 3, 64, 64) and ref["label"].dtype == torch.int64
    sent = InlineSmall(collate_rows)(rows)
    assert all(isinstance(sent[k], np.ndarray) for k in ("label", "id", "corrupt", "fresh"))
    got = restore(pickle.loads(bytes(ForkingPickler.dumps(sent))))  # what the worker's result queue does
    for k, v in ref.items():
        assert isinstance(got[k], torch.Tensor) and got[k].dtype == v.dtype and torch.equal(got[k], v), k
    with pytest.raises(TypeError, match="'score' is a float"):
        collate_rows([{"image": torch.zeros(1), "score": 0.5}])
    big = torch.zeros(INLINE_BYTES + 1, dtype=torch.uint8)
    assert inline_small({"x": big})["x"] is big  # over the bound: left to shared memory
    assert isinstance(inline_small({"x": big[:INLINE_BYTES]})["x"], np.ndarray)


def test_the_pin_memory_thread_gets_every_field_back_as_a_pinned_tensor(monkeypatch):
    """With pin_memory=True torch's pin-memory thread pins the batch: the inline fields must come back as pinned
    tensors too (a non-blocking copy from pageable memory waits for the device's stream)."""
    from torch.utils.data._utils.pin_memory import pin_memory

    rows = [{"image": torch.zeros(3, 8, 8, dtype=torch.uint8), "label": k, "id": k, "corrupt": 0, "fresh": 1}
            for k in range(4)]
    sent = InlineSmall(collate_rows)(rows)
    assert any(isinstance(v, np.ndarray) for v in sent.values())
    pinned = []
    if not torch.cuda.is_available():  # no pinned memory without a device: record what would be pinned
        monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self, *a, **k: pinned.append(self) or self.clone())
    out = pin_memory(sent)
    assert out.keys() == sent.keys() and all(isinstance(v, torch.Tensor) for v in out.values())
    assert all(v.is_pinned() for v in out.values()) if torch.cuda.is_available() else len(pinned) == len(sent)
    assert torch.equal(out["label"], torch.arange(4)) and torch.equal(restore(out)["label"], torch.arange(4))


def _in_worker_types(loader: ShardLoader) -> dict:
    raw = next(iter(loader.loader))  # as the worker hands it over
    return {k: type(v) for k, v in raw.items()}


@pytest.mark.parametrize("crop, pixels", [("workers", "image"), ("device", "canvas")])
def test_a_worker_hands_over_numpy_fields_and_the_loader_yields_the_in_process_batches(woof, crop, pixels):
    index = load_index(woof)

    def make(workers):
        return ShardLoader(StreamSpec(index, 8, 1, 0, workers, seed=3, shuffle_buffer=16,
                                      augment=AugmentConfig(size=96), crop=crop), decode_device="cpu")

    with make(0) as inproc, make(1) as workers:  # one worker: the in-process plan
        n = workers.steps_in_epoch()
        workers.start_epoch(0, replays=[2] * n)
        types = _in_worker_types(workers)
        assert types[pixels] is torch.Tensor  # the pixels: one shared-memory tensor
        assert all(types[k] is np.ndarray for k in ("label", "id", "corrupt", "fresh")), types
        out = []
        for loader in (inproc, workers):
            loader.start_epoch(1, replays=[2] * n)
            out.append(list(loader))
    assert len(out[0]) == len(out[1]) == n
    for a, b in zip(*out):
        assert a.keys() == b.keys()
        for k in a:
            assert isinstance(b[k], torch.Tensor) and b[k].dtype == a[k].dtype and torch.equal(a[k], b[k]), k


def test_eval_batches_from_workers_equal_the_in_process_ones(woof):
    index = load_index(woof)
    with EvalLoader(index, 8, 1, 0, 64, num_workers=0) as a, EvalLoader(index, 8, 1, 0, 64, num_workers=2) as b:
        x, y = list(a), list(b)
    assert len(x) == len(y) == 5
    assert all(isinstance(v, torch.Tensor) for batch in y for v in batch.values())
    ref = {int(batch["id"][0]): batch for batch in x}  # the workers' batches come in another order
    for batch in y:
        r = ref[int(batch["id"][0])]
        assert batch.keys() == r.keys() and all(torch.equal(batch[k], r[k]) for k in r)
