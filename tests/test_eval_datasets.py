"""Every benchmark layout: episodes are reproducible from the seed, load, and missing data is explained."""

import pytest

from eval_fixtures import WRITERS
from insid3_fast.errors import InputError
from insid3_fast.eval.correspondence import SPair71k
from insid3_fast.eval.datasets import SEGMENTATION_DATASETS, build_dataset

FOLDS = {"coco": 1, "lvis": 2, "pascal_part": 0, "paco_part": 0, "isaid": 0}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    for name, writer in WRITERS.items():
        writer(str(root))
    return str(root)


@pytest.mark.parametrize("name", sorted(SEGMENTATION_DATASETS))
def test_same_seed_same_episodes(data_root, name):
    fold = FOLDS.get(name, 0)
    shots = [1] if name == "permis" else [1, 2]
    for k in shots:
        a = build_dataset(name, data_root, fold, k).plan(12, seed=0)
        b = build_dataset(name, data_root, fold, k).plan(12, seed=0)
        assert [e.to_json() for e in a] == [e.to_json() for e in b]
        ds = build_dataset(name, data_root, fold, k)
        for e in a[:4]:
            ep = ds.load(e)
            assert len(ep.reference_images) == k == len(ep.reference_masks)
            assert ep.target_mask.dtype.is_floating_point is False
            assert tuple(ep.target_mask.shape) == (ep.target_image.height, ep.target_image.width)
            assert all(r != e.target for r in e.references)
            assert 0 <= e.class_id < ds.num_classes


@pytest.mark.parametrize("name", ["coco", "lvis", "isic", "paco_part"])
def test_other_seed_other_episodes(data_root, name):
    ds = build_dataset(name, data_root, FOLDS.get(name, 0), 1)
    assert [e.to_json() for e in ds.plan(12, 0)] != [e.to_json() for e in ds.plan(12, 1)]


@pytest.mark.parametrize("name", sorted(SEGMENTATION_DATASETS) + ["spair"])
def test_missing_data_says_what_and_where(tmp_path, name):
    with pytest.raises(InputError) as info:
        if name == "spair":
            SPair71k(str(tmp_path))
        else:
            build_dataset(name, str(tmp_path), 0, 1)
    msg = str(info.value)
    assert str(tmp_path) in msg and "docs/eval.md" in msg and "<data-root>" in msg


def test_bad_fold_and_shots(data_root):
    with pytest.raises(InputError):
        build_dataset("coco", data_root, 4, 1)
    with pytest.raises(InputError):
        build_dataset("isic", data_root, 0, 0)
    with pytest.raises(InputError):
        build_dataset("permis", data_root, 0, 2)


def test_spair_pairs(data_root):
    ds = SPair71k(data_root)
    p = ds.pair(0)
    assert len(ds) == 6 and p.source_kps.shape == p.target_kps.shape and p.category == "cat"
