"""The resumable grouped sampler: determinism, sharding, grouping, exact resume and re-sharding."""

from __future__ import annotations

import itertools

from megdet_hpc.data.sampler import ResumableGroupedSampler, group_batches

ARS = [0.75 if i % 3 == 0 else 1.5 for i in range(50)]


def take(sampler: ResumableGroupedSampler, n: int) -> list:
    return list(itertools.islice(iter(sampler), n))


def test_global_batches_are_sharded_and_grouped() -> None:
    world, total = 2, 4
    per_rank = [take(ResumableGroupedSampler(ARS, total, r, world, seed=1), 20) for r in range(world)]
    for step in range(20):
        batch = [k[0] for r in range(world) for k in per_rank[r][step]]
        assert len(batch) == total and len(set(batch)) == total
        assert len({ARS[i] >= 1 for i in batch}) == 1  # one aspect group per global batch
    # Same global batches whatever the world size (1 rank x 4 == 2 ranks x 2).
    single = take(ResumableGroupedSampler(ARS, total, 0, 1, seed=1), 20)
    for step in range(20):
        assert [k[0] for k in single[step]] == [k[0] for r in range(world) for k in per_rank[r][step]]


def test_epoch_covers_each_image_at_most_once_and_seed_matters() -> None:
    s = ResumableGroupedSampler(ARS, 4, 0, 1, seed=0)
    first_epoch = [k[0] for b in take(s, len(s)) for k in b]
    assert len(first_epoch) == len(set(first_epoch)) >= len(ARS) - 2 * 4
    other = [k[0] for b in take(ResumableGroupedSampler(ARS, 4, 0, 1, seed=9), 5) for k in b]
    assert other != first_epoch[:20]


def test_resume_continues_exactly() -> None:
    s = ResumableGroupedSampler(ARS, 4, 0, 2, seed=2)
    stream = take(s, 30)
    epoch, number = stream[16][0][2], stream[16][0][3]
    state = s.state_after(epoch, number)
    r = ResumableGroupedSampler(ARS, 4, 0, 2, seed=2)
    r.load_state_dict(state)
    # Same images, flip seeds and epochs; batch numbers restart in the restored (regrouped) list.
    strip = lambda steps: [[k[:3] for k in step] for step in steps]  # noqa: E731
    assert strip(take(r, 13)) == strip(stream[17:30])


def test_resume_on_other_world_size_neither_repeats_nor_skips() -> None:
    s = ResumableGroupedSampler(ARS, 4, 0, 2, seed=3)
    stream = take(s, 5)
    state = s.state_after(*stream[4][0][2:])
    epoch_images = [i for b in s.epoch_batches(0) for i in b]
    seen = epoch_images[: 5 * 4]
    # Resume on 1 rank with a total batch of 2: the remaining images of the epoch, regrouped.
    r = ResumableGroupedSampler(ARS, 2, 0, 1, seed=3)
    r.load_state_dict(state)
    rest = []
    for batch in iter(r):
        if batch[0][2] != 0:
            break
        rest.extend(k[0] for k in batch)
    assert not set(rest) & set(seen)
    assert sorted(set(rest)) == sorted(set(epoch_images) - set(seen))


def test_group_batches_emits_full_homogeneous_batches() -> None:
    groups = [0, 1, 0, 1, 0, 0, 1]
    assert group_batches(range(7), groups, 2) == [[0, 2], [1, 3], [4, 5]]
