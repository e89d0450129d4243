"""Episode datasets: support rules, masks, seeding, batching (pseudo and supervised)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from fss_core.data.episodes import (
    EpochBatchSampler,
    EpochKeyed,
    PseudoEpisodeDataset,
    SupervisedEpisodeDataset,
    collate_episodes,
    epoch_keyed,
)
from fss_core.data.images import save_label, save_rgb
from fss_core.data.layouts import ImageRecord
from fss_core.pseudo.task_index import PseudoTaskIndex, similarity_prior, valid_pseudo_classes

SIZE = 48
NO_AUG = dict(size=SIZE, scale_range=(1.0, 1.0), rotate_degrees=0.0)  # only flip/blur remain: masks stay exact


def blob(mask: np.ndarray, value: int, top: int, left: int, side: int) -> None:
    mask[top:top + side, left:left + side] = value


@pytest.fixture(scope="module")
def pseudo_data(tmp_path_factory):
    """9 images: cluster 1 in all but the last, cluster 2 in images 0-5, cluster 3 in 6-7, cluster 4 only in 8."""
    root = tmp_path_factory.mktemp("pseudo")
    rng = np.random.default_rng(0)
    masks, paths = {}, {}
    for i in range(9):
        image_id = f"img{i}"
        mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
        if i < 8:
            blob(mask, 1, 2 + i, 3 + 2 * i, 12)
        if i < 6:
            blob(mask, 2, 28, 5 + i, 14)
        if i in (6, 7):
            blob(mask, 3, 30, 20, 10)
        if i == 8:
            blob(mask, 4, 10, 10, 20)
        masks[image_id] = mask
        save_label(root / "masks" / f"{image_id}.png", mask)
        paths[image_id] = root / "images" / f"{image_id}.png"
        save_rgb(paths[image_id], rng.integers(0, 256, size=(SIZE, SIZE, 3), dtype=np.uint8))
    ids = list(masks)
    occ = [(n, c, a) for n, i in enumerate(ids) for c, a in valid_pseudo_classes(masks[i], min_area=20)]
    occ_image, occ_cluster, occ_area = (np.asarray(x) for x in zip(*occ))
    protos = rng.standard_normal((len(occ), 6)).astype(np.float32)
    offsets, rows = similarity_prior(occ_cluster, protos)
    index = PseudoTaskIndex(image_ids=ids, num_clusters=5, min_area=20, background_span=0.99, prior_max=5000,
                            prior_candidates=20000, occ_image=occ_image.astype(np.int32),
                            occ_cluster=occ_cluster.astype(np.int16), occ_area=occ_area.astype(np.int64),
                            occ_prototype=protos, prior_offsets=offsets, prior_rows=rows)
    return index, paths, root / "masks", masks


def matches_either_flip(mask: torch.Tensor, expected: np.ndarray) -> bool:
    got = mask.numpy()
    return np.array_equal(got, expected) or np.array_equal(got, expected[:, ::-1])


def test_pseudo_queries_are_images_with_a_cluster_shared_by_another_image(pseudo_data):
    index, paths, mask_dir, _ = pseudo_data
    dataset = PseudoEpisodeDataset(index, paths, mask_dir, shots=1, **NO_AUG)
    assert len(dataset) == 8  # img8's only cluster appears nowhere else
    assert {dataset[i].query_id for i in range(len(dataset))} == {f"img{i}" for i in range(8)}


def test_pseudo_supports_are_distinct_and_never_the_query(pseudo_data):
    index, paths, mask_dir, _ = pseudo_data
    dataset = PseudoEpisodeDataset(index, paths, mask_dir, shots=5, **NO_AUG)
    eligible = [r for r in range(index.num_occurrences) if index.occ_cluster[r] in (1, 2)]
    rng = np.random.default_rng(0)
    for _ in range(50):
        for row in eligible:
            supports = dataset.support_occurrences(row, rng)
            images = index.occ_image[supports]
            assert len(set(images.tolist())) == 5
            assert index.occ_image[row] not in images
            assert np.all(index.occ_cluster[supports] == index.occ_cluster[row])
    for i in range(len(dataset)):
        episode = dataset[i]
        assert episode.query_id not in episode.support_ids
        if episode.class_id in (1, 2):  # clusters with at least 5 other images
            assert len(set(episode.support_ids)) == 5


def test_pseudo_supports_fall_back_to_other_cluster_members_then_to_replacement(pseudo_data, caplog):
    index, paths, mask_dir, _ = pseudo_data
    heads = [index.prior(r)[:1] for r in range(index.num_occurrences)]  # keep only the most similar
    offsets = np.concatenate([[0], np.cumsum([len(h) for h in heads])]).astype(np.int64)
    short = PseudoTaskIndex(**{**vars(index), "prior_offsets": offsets, "prior_rows": np.concatenate(heads)})
    dataset = PseudoEpisodeDataset(short, paths, mask_dir, shots=3, **NO_AUG)
    rng = np.random.default_rng(1)
    for row in np.flatnonzero(short.occ_cluster == 1):
        supports = dataset.support_occurrences(int(row), rng)
        assert short.prior(int(row))[0] in supports  # the prior's candidate is always used
        images = short.occ_image[supports]
        assert len(set(images.tolist())) == 3 and short.occ_image[row] not in images
    with caplog.at_level(logging.WARNING, logger="fss_core.data.episodes"):
        for row in np.flatnonzero(short.occ_cluster == 3):  # two images: one candidate for three shots
            supports = dataset.support_occurrences(int(row), rng)
            assert len(supports) == 3 and set(short.occ_image[supports].tolist()) == {6, 7} - {short.occ_image[row]}
    assert len([r for r in caplog.records if "with replacement" in r.message]) == 1


def test_pseudo_masks_are_the_chosen_cluster_and_ignore_stays_ignore(pseudo_data):
    index, paths, mask_dir, masks = pseudo_data
    dataset = PseudoEpisodeDataset(index, paths, mask_dir, shots=2, **NO_AUG)
    for epoch in range(3):
        dataset.set_epoch(epoch)
        for i in range(len(dataset)):
            e = dataset[i]
            assert e.query_img.shape == (3, SIZE, SIZE) and e.support_imgs.shape == (2, 3, SIZE, SIZE)
            assert e.query_hw == (SIZE, SIZE) and not e.query_padding.any() and not e.support_padding.any()
            assert matches_either_flip(e.query_mask, (masks[e.query_id] == e.class_id).astype(np.int64))
            for sid, smask in zip(e.support_ids, e.support_masks):
                assert matches_either_flip(smask, (masks[sid] == e.class_id).astype(np.int64))
    augmented = PseudoEpisodeDataset(index, paths, mask_dir, shots=2, size=40, scale_range=(0.9, 1.1),
                                     rotate_degrees=10.0, seed=3)
    values = torch.cat([torch.cat([e.query_mask.flatten(), e.support_masks.flatten()])
                        for e in (augmented[i] for i in range(len(augmented)))])
    assert set(values.unique().tolist()) <= {0, 1, 255} and 1 in values.tolist()


def test_pseudo_episodes_are_reproducible_per_seed_and_epoch(pseudo_data):
    index, paths, mask_dir, _ = pseudo_data
    kwargs = dict(shots=2, size=40, scale_range=(0.9, 1.1), rotate_degrees=10.0, seed=5)
    a = PseudoEpisodeDataset(index, paths, mask_dir, **kwargs)
    b = PseudoEpisodeDataset(index, paths, mask_dir, **kwargs)
    a.set_epoch(2)
    b.set_epoch(2)
    order_a = [a[i] for i in (3, 1, 0)]
    order_b = [b[i] for i in (0, 1, 3)][::-1]
    for x, y in zip(order_a, order_b):
        assert x.support_ids == y.support_ids and x.class_id == y.class_id
        for name in ("query_img", "query_mask", "query_padding", "support_imgs", "support_masks", "support_padding"):
            assert torch.equal(getattr(x, name), getattr(y, name)), name
    b.set_epoch(3)
    assert any(not torch.equal(a[i].query_img, b[i].query_img) for i in range(len(a)))


def assert_same_episode(x, y) -> None:
    assert (x.query_id, x.support_ids, x.class_id) == (y.query_id, y.support_ids, y.class_id)
    for name in ("query_img", "query_mask", "query_padding", "support_imgs", "support_masks", "support_padding"):
        assert torch.equal(getattr(x, name), getattr(y, name)), name


def test_an_epoch_key_gives_the_episode_of_that_epoch(pseudo_data):
    index, paths, mask_dir, _ = pseudo_data
    kwargs = dict(shots=2, size=40, scale_range=(0.9, 1.1), rotate_degrees=10.0, seed=5)
    stateful = PseudoEpisodeDataset(index, paths, mask_dir, **kwargs)
    keyed = PseudoEpisodeDataset(index, paths, mask_dir, **kwargs)
    assert epoch_keyed(keyed) is keyed
    stateful.set_epoch(2)
    for i in range(len(keyed)):
        assert_same_episode(stateful[i], keyed[(2, i)])
    assert keyed.epoch == 0  # a key leaves the dataset's own epoch alone
    assert any(not torch.equal(keyed[(2, i)].query_img, keyed[(3, i)].query_img) for i in range(len(keyed)))


def test_decoded_images_are_kept_across_epochs_within_the_budget_and_change_no_episode(pseudo_data, monkeypatch):
    import pickle

    import fss_core.data.episodes as episodes

    index, paths, mask_dir, _ = pseudo_data
    decoded = []
    real_load = episodes.load_rgb
    monkeypatch.setattr(episodes, "load_rgb", lambda path, **kw: decoded.append(path) or real_load(path, **kw))
    kwargs = dict(shots=2, size=40, scale_range=(0.9, 1.1), rotate_degrees=10.0, seed=5)
    uncached = PseudoEpisodeDataset(index, paths, mask_dir, decode_cache_mb=0, **kwargs)
    cached = PseudoEpisodeDataset(index, paths, mask_dir, **kwargs)
    for epoch in (0, 1, 2):
        for i in range(len(cached)):
            assert_same_episode(uncached[(epoch, i)], cached[(epoch, i)])
    uses = 3 * len(cached) * 3  # 3 epochs x episodes x (query + 2 supports)
    assert len(cached.decoded) == 8  # every image of an episode, img8 never
    assert len(decoded) == uses + 8  # the uncached dataset decodes on every use, the cached one once per image
    pair = cached.decoded.load(paths["img0"], mask_dir / "img0.png")
    assert not pair[0].flags.writeable and not pair[1].flags.writeable  # a transform cannot corrupt it
    assert cached.decoded.used_bytes == 8 * (SIZE * SIZE * 3 + SIZE * SIZE)

    room_for_two = PseudoEpisodeDataset(index, paths, mask_dir, decode_cache_mb=2.5 * SIZE * SIZE * 4 / 2**20, **kwargs)
    for i in range(len(room_for_two)):
        assert_same_episode(room_for_two[(0, i)], cached[(0, i)])
    assert len(room_for_two.decoded) == 2 and room_for_two.decoded.used_bytes <= room_for_two.decoded.budget_bytes

    copy = pickle.loads(pickle.dumps(cached))  # what a loader worker receives
    assert len(copy.decoded) == 0 and copy.decoded.used_bytes == 0
    assert copy.decoded.budget_bytes == cached.decoded.budget_bytes
    assert_same_episode(copy[(1, 0)], cached[(1, 0)])
    with pytest.raises(ValueError, match="decode_cache_mb"):
        PseudoEpisodeDataset(index, paths, mask_dir, decode_cache_mb=-1, **kwargs)


@pytest.mark.parametrize(("n", "batch_size", "seed"), [(10, 3, 7), (13, 4, 0), (6, 1, 123), (5, 5, 2)])
def test_epoch_batch_sampler_keeps_the_order_of_a_shuffling_dataloader(n, batch_size, seed):
    sampler = EpochBatchSampler(n, batch_size, seed)
    for epoch in (0, 1, 4):
        loader = DataLoader(range(n), batch_size=batch_size, shuffle=True, drop_last=True,
                            generator=torch.Generator().manual_seed(seed + epoch))
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler) == n // batch_size
        assert batches == [[(epoch, i) for i in batch.tolist()] for batch in loader]


def test_epoch_keyed_sets_the_epoch_of_a_stateful_dataset_when_it_changes():
    class Stateful:
        def __init__(self):
            self.epoch, self.calls = 0, 0

        def set_epoch(self, epoch):
            self.epoch, self.calls = epoch, self.calls + 1

        def __len__(self):
            return 4

        def __getitem__(self, i):
            return self.epoch, i

    dataset = Stateful()
    keyed = epoch_keyed(dataset)
    assert isinstance(keyed, EpochKeyed) and len(keyed) == 4
    assert [keyed[(0, 1)], keyed[(0, 2)], keyed[(3, 0)], keyed[(3, 1)]] == [(0, 1), (0, 2), (3, 0), (3, 1)]
    assert dataset.calls == 2
    assert EpochKeyed(range(4))[(5, 2)] == 2  # no set_epoch: plain indexing


def test_persistent_loader_workers_draw_the_episodes_of_each_epoch(labelled):
    from fss_core.training.trainer import train_loader

    records, _ = labelled
    dataset = SupervisedEpisodeDataset(records, classes=[1, 2, 3], shots=2, size=32, min_area=50,
                                       area_reference=None, seed=4)
    epochs = {}
    for workers in (0, 1):
        loader = train_loader(dataset, batch_size=5, seed=9, num_workers=workers)
        epochs[workers], pids = [], []
        for epoch in (0, 1):
            loader.batch_sampler.set_epoch(epoch)
            epochs[workers].append(list(loader))
            pids.append([w.pid for w in loader._iterator._workers] if workers else [])
        assert len(pids[0]) == workers and pids[0] == pids[1]  # the same processes served both epochs
        del loader
    reference, persistent = epochs[0], epochs[1]
    by_query = [{q: b.query_img[k] for b in batches for k, q in enumerate(b.query_id)} for batches in reference]
    shared = by_query[0].keys() & by_query[1].keys()
    assert shared and any(not torch.equal(by_query[0][q], by_query[1][q]) for q in shared)  # epochs differ
    for batches_0, batches_1 in zip(reference, persistent):
        assert len(batches_0) == len(batches_1) == len(dataset) // 5
        for x, y in zip(batches_0, batches_1):
            assert (x.query_id, x.support_ids, x.class_id.tolist()) == (y.query_id, y.support_ids, y.class_id.tolist())
            for name in ("query_img", "query_mask", "query_padding", "support_imgs", "support_masks",
                         "support_padding", "class_id", "query_hw"):
                assert torch.equal(getattr(x, name), getattr(y, name)), name
            # a worker's batch arrives as one shared buffer (one file descriptor), the others' not
            assert len({t.untyped_storage().data_ptr() for t in vars(y).values() if torch.is_tensor(t)}) == 1
            assert y.query_img.untyped_storage().is_shared() and not x.query_img.untyped_storage().is_shared()


def test_collate_stacks_episodes_for_a_dataloader(pseudo_data):
    index, paths, mask_dir, _ = pseudo_data
    dataset = PseudoEpisodeDataset(index, paths, mask_dir, shots=2, **NO_AUG)
    batch = next(iter(DataLoader(dataset, batch_size=3, collate_fn=collate_episodes)))
    assert batch.query_img.shape == (3, 3, SIZE, SIZE) and batch.support_imgs.shape == (3, 2, 3, SIZE, SIZE)
    assert batch.support_masks.shape == (3, 2, SIZE, SIZE) and batch.query_padding.dtype == torch.bool
    assert batch.class_id.tolist() == [dataset[i].class_id for i in range(3)]
    assert batch.query_hw.tolist() == [[SIZE, SIZE]] * 3 and len(batch.support_ids[0]) == 2


# --- supervised -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """12 images; image i's main object is class i % 3 + 1 (15x15, 255 border); even images also
    hold 4 px of class (i + 1) % 3 + 1, below the area threshold."""
    root = tmp_path_factory.mktemp("labelled")
    rng = np.random.default_rng(1)
    records, labels = [], {}
    for i in range(12):
        label = np.zeros((SIZE, 40), dtype=np.uint8)
        blob(label, 255, 4 + i, 5, 17)
        blob(label, i % 3 + 1, 5 + i, 6, 15)
        if i % 2 == 0:
            blob(label, (i + 1) % 3 + 1, 40, 30, 2)
        image_id = f"s{i:02d}"
        save_label(root / f"{image_id}.png", label)
        save_rgb(root / f"{image_id}.jpg", rng.integers(0, 256, size=(SIZE, 40, 3), dtype=np.uint8))
        records.append(ImageRecord(image_id, root / f"{image_id}.jpg", root / f"{image_id}.png", "train"))
        labels[image_id] = label
    return records, labels


def test_supervised_episodes_use_only_the_given_classes_and_subset(labelled):
    records, labels = labelled
    subset = [r.image_id for r in records[:9]]
    dataset = SupervisedEpisodeDataset(records, classes=[1, 2], shots=2, min_area=50, area_reference=None,
                                       image_ids=subset, seed=0, **NO_AUG)
    assert len(dataset) == 6  # images 0-8 of class 1 or 2; the 4-px blobs do not qualify
    pad_columns = np.zeros((SIZE, SIZE), dtype=bool)
    pad_columns[:, :4] = pad_columns[:, 44:] = True
    for epoch in range(3):
        dataset.set_epoch(epoch)
        for i in range(len(dataset)):
            e = dataset[i]
            assert e.class_id in (1, 2)
            assert e.query_id in subset and set(e.support_ids) <= set(subset)
            assert e.query_id not in e.support_ids and len(set(e.support_ids)) == 2
            for image_id, mask, padding in [(e.query_id, e.query_mask, e.query_padding),
                                            *zip(e.support_ids, e.support_masks, e.support_padding)]:
                label = labels[image_id]
                assert (label == e.class_id).sum() >= 50
                expected = np.where(label == 255, 255, label == e.class_id).astype(np.int64)
                expected = np.pad(expected, ((0, 0), (4, 4)), constant_values=255)  # 40 wide -> centred in 48
                assert matches_either_flip(mask, expected)
                assert torch.equal(padding, torch.from_numpy(pad_columns))


def test_supervised_evaluation_episodes_are_fixed_and_padded_top_left(labelled):
    records, _ = labelled
    dataset = SupervisedEpisodeDataset(records, classes=[3], shots=1, size=32, min_area=50, area_reference=None,
                                       seed=0, train=False)
    first = [dataset[i] for i in range(len(dataset))]
    dataset.set_epoch(4)
    again = [dataset[i] for i in range(len(dataset))]
    assert [e.support_ids for e in first] == [e.support_ids for e in again]
    assert all(torch.equal(x.query_img, y.query_img) for x, y in zip(first, again))
    e = first[0]
    assert e.query_hw == (SIZE, 40) and e.query_mask.shape == (32, 32)
    assert torch.all(e.query_padding[:, 24:]) and not e.query_padding[:, :24].any()  # 48x40 -> 32x(26.7 -> 24)


def test_supervised_rejects_unknown_subset_ids_and_unlabelled_records(labelled):
    records, _ = labelled
    with pytest.raises(ValueError, match="not in records"):
        SupervisedEpisodeDataset(records, classes=[1], image_ids=["nope"])
    unlabelled = [ImageRecord("u", records[0].image_path, None, None)]
    with pytest.raises(ValueError, match="no label_path"):
        SupervisedEpisodeDataset(unlabelled, classes=[1])


def test_pseudo_supports_can_repeat_like_the_reference_when_distinct_supports_is_off(pseudo_data):
    index, paths, mask_dir, _ = pseudo_data
    reference = PseudoEpisodeDataset(index, paths, mask_dir, shots=5, distinct_supports=False, **NO_AUG)
    rng = np.random.default_rng(0)
    repeated = 0
    for _ in range(20):
        for row in np.flatnonzero(np.isin(index.occ_cluster, (1, 2))):
            supports = reference.support_occurrences(int(row), rng)
            assert len(supports) == 5 and set(supports.tolist()) <= set(index.prior(int(row)).tolist())
            assert index.occ_image[row] not in index.occ_image[supports]
            repeated += len(set(supports.tolist())) < 5
    assert repeated > 0  # drawn with replacement: this seed repeats a support
    episodes = [reference[i] for i in range(len(reference))]
    assert all(e.query_id not in e.support_ids for e in episodes)
    assert any(len(set(e.support_ids)) < 5 for e in episodes if e.class_id in (1, 2))  # clusters of >= 6 images

    one_shot = [PseudoEpisodeDataset(index, paths, mask_dir, shots=1, distinct_supports=flag, **NO_AUG)
                for flag in (True, False)]
    for i in range(len(one_shot[0])):  # one shot: both settings draw the same support
        assert one_shot[0][i].support_ids == one_shot[1][i].support_ids


def test_images_above_max_side_are_shrunk_on_loading_also_in_loader_workers(labelled):
    """A large photo is loaded as its copy shrunk to max_side (the label by nearest neighbour), so
    the crops cover as much of it as of a small image; the area rule counts in the copy's pixels;
    a loader worker's copy of the dataset shrinks alike."""
    import pickle

    from PIL import Image

    from fss_core.data.episodes import DecodedSamples

    records, labels = labelled
    record = records[0]
    image, label = DecodedSamples(0, max_side=24).load(record.image_path, record.label_path)
    assert image.shape == (24, 20, 3) and label.shape == (24, 20)
    np.testing.assert_array_equal(label, np.asarray(Image.fromarray(labels[record.image_id]).resize((20, 24),
                                                                                                   Image.NEAREST)))
    kept, _ = DecodedSamples(0).load(record.image_path, record.label_path)
    assert kept.shape == (SIZE, 40, 3)  # not above max_side, or none given: as stored

    # 50 px of the copy are 200 px of the 48x40 image: the 15x15 objects (225 px) still qualify
    dataset = SupervisedEpisodeDataset(records, classes=[1, 2, 3], shots=1, min_area=50, area_reference=None,
                                       train=False, seed=0, max_side=24, **NO_AUG)
    assert len(dataset) == len(SupervisedEpisodeDataset(records, classes=[1, 2, 3], shots=1, min_area=200,
                                                        area_reference=None, train=False, seed=0, **NO_AUG))
    # 57 px of the copy are 228 px: no object is large enough any more
    assert len(SupervisedEpisodeDataset(records, classes=[1, 2, 3], min_area=57, area_reference=None, max_side=24,
                                        **NO_AUG)) == 0
    in_worker = pickle.loads(pickle.dumps(dataset))
    for episode in (dataset[0], in_worker[0]):
        assert episode.query_hw == (24, 20)
        assert episode.query_img.shape == (3, SIZE, SIZE)


def test_a_large_jpeg_is_decoded_small_for_an_episode_and_a_label_of_another_size_is_still_refused(tmp_path):
    from PIL import Image

    from fss_core.data.episodes import DecodedSamples

    photo = np.asarray(Image.fromarray(np.random.default_rng(2).integers(0, 256, (4, 5, 3), dtype=np.uint8))
                       .resize((200, 160)))
    Image.fromarray(photo).save(tmp_path / "photo.jpg", quality=95)
    label = np.zeros((160, 200), dtype=np.uint8)
    label[40:120, 50:150] = 1
    save_label(tmp_path / "photo.png", label)
    image, small = DecodedSamples(0, max_side=40).load(tmp_path / "photo.jpg", tmp_path / "photo.png")
    assert image.shape == (32, 40, 3) and small.shape == (32, 40)
    assert small.sum() == 16 * 20  # the 80x100 object, a fifth of its sides
    save_label(tmp_path / "short.png", label[:150])
    with pytest.raises(ValueError, match="label is 150x200 but image"):
        DecodedSamples(0, max_side=40).load(tmp_path / "photo.jpg", tmp_path / "short.png")
