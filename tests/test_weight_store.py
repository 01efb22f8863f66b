"""The weight-delta format and the versioned store: low-rank vs dense, atomic versions, bit-identical rebuilds."""

from __future__ import annotations

import pytest
import torch

from shared.delta import MatrixDelta, tensor_sha256
from shared.weight_store import LocalWeightStore, StoreError, build_manifest, lineage, rebuild
from tests.test_editing_model import REQUESTS, _hp, stats  # noqa: F401 - fixture re-export
from workers.editing.editor import Editor
from workers.editing.layout import ModelLayout


def test_low_rank_when_smaller_dense_otherwise() -> None:
    torch.manual_seed(0)
    small = MatrixDelta.from_factors("w", torch.randn(64, 3), torch.randn(128, 3))
    assert small.is_low_rank and small.rank == 3 and small.nbytes == (64 + 128) * 3 * 4
    big = MatrixDelta.from_factors("w", torch.randn(8, 6), torch.randn(8, 6))  # rank 6 costs 96 > 64 dense
    assert not big.is_low_rank and big.nbytes == 8 * 8 * 4
    torch.testing.assert_close(big.dense(), (big.dense_delta.double()).float())
    with pytest.raises(ValueError, match="shape"):
        small.apply(torch.zeros(3, 3))


def test_round_trip_through_tensors_is_exact() -> None:
    torch.manual_seed(1)
    delta = MatrixDelta.from_factors("layer.w", torch.randn(16, 2), torch.randn(40, 2), transposed=True)
    again = MatrixDelta.from_tensors("layer.w", delta.to_tensors(), transposed=True)
    weight = torch.randn(16, 40)
    assert torch.equal(delta.apply(weight), again.apply(weight))
    assert again.transposed


def _put(store: LocalWeightStore, version: int, parent: int, deltas, weights: dict[str, torch.Tensor]) -> None:
    manifest = build_manifest(version, parent, "model-x", [f"e{version}"], "alphaedit", deltas,
                              {d.name: tensor_sha256(weights[d.name]) for d in deltas})
    store.put(manifest, deltas, {"keys.1": torch.ones(2, 2)})


def test_store_follows_parent_links_and_detects_corruption(tmp_path) -> None:
    torch.manual_seed(2)
    store = LocalWeightStore(tmp_path)
    base = {"w": torch.randn(6, 10)}
    current = dict(base)
    chain_weights = {}
    for version, parent in [(1, 0), (2, 1), (3, 1)]:  # version 2 was rolled back: 3 builds on 1
        start = chain_weights.get(parent, base)["w"]
        delta = MatrixDelta.from_factors("w", torch.randn(6, 1), torch.randn(10, 1))
        current = {"w": delta.apply(start)}
        chain_weights[version] = current
        _put(store, version, parent, [delta], current)
    assert store.versions() == [1, 2, 3]
    assert [m.version for m in lineage(store, 3)] == [1, 3]
    seen = []
    rebuilt = rebuild(store, base, 3, on_version=lambda m, aux: seen.append((m.version, sorted(aux))))
    assert torch.equal(rebuilt["w"], chain_weights[3]["w"])
    assert seen == [(1, ["keys.1"]), (3, ["keys.1"])]

    path = store.delta_path(3)
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(StoreError, match="checksum"):
        rebuild(store, base, 3)
    with pytest.raises(StoreError, match="not in the store"):
        store.manifest(9)


@pytest.mark.parametrize("model_fixture", ["tiny_llama", "tiny_gpt2"])
def test_rebuild_from_base_and_deltas_is_bit_identical(model_fixture, request, tiny_tokenizer, stats, tmp_path):  # noqa: F811
    """Three sequential batches with the real editor; the store rebuilds every version bit for bit."""
    model = request.getfixturevalue(model_fixture)
    layout = ModelLayout.from_model(model)
    hp = _hp(algo="memit", layers=(1, 2))
    base = {layout.weight_name(layer): layout.get_weight(model, layer) for layer in hp.layers}
    editor = Editor(model, tiny_tokenizer, hp, stats, "tiny")
    store = LocalWeightStore(tmp_path / "store")
    snapshots = {}
    for version, batch in enumerate([REQUESTS[:1], REQUESTS[1:2], REQUESTS[2:]], start=1):
        result = editor.apply(batch)
        assert all(d.transposed == (model_fixture == "tiny_gpt2") for d in result.deltas)
        checksums = editor.checksums()
        manifest = build_manifest(version, version - 1, "tiny", result.edit_ids, hp.algo, result.deltas, checksums)
        store.put(manifest, result.deltas, {})
        snapshots[version] = {n: layout.get_weight(model, int(n.split(".")[2])) for n in base}
    for version, expected in snapshots.items():
        rebuilt = rebuild(store, base, version)
        for name, weight in expected.items():
            assert torch.equal(rebuilt[name], weight), (version, name)
