"""Training sampler resume and batch chunking; evaluation sharding."""

from conadv.data.sampler import ExactShardSampler, ResumableShardSampler


def test_resume_mid_epoch_yields_exactly_the_remaining_indices():
    full = ResumableShardSampler(103, world_size=2, rank=1, per_device_batch=5, seed=7)
    full.set_epoch(3)
    everything = list(full)
    resumed = ResumableShardSampler(103, world_size=2, rank=1, per_device_batch=5, seed=7)
    resumed.set_epoch(3, start=15)
    assert list(resumed) == everything[15:]
    assert len(resumed) == len(everything) - 15


def test_epochs_differ_and_are_reproducible():
    sampler = ResumableShardSampler(50, 1, 0, 10, seed=1)
    assert sampler.rank_indices(0) != sampler.rank_indices(1)
    assert sampler.rank_indices(1) == ResumableShardSampler(50, 1, 0, 10, seed=1).rank_indices(1)
    sampler.set_epoch(0)
    seeds = [seed for _, seed in sampler]
    assert len(set(seeds)) == len(seeds)


def test_ranks_are_disjoint_and_drop_the_ragged_tail():
    ranks = [ResumableShardSampler(103, 4, r, 5, seed=0).rank_indices(2) for r in range(4)]
    flat = [i for indices in ranks for i in indices]
    assert len(flat) == len(set(flat)) == 100  # 103 // (5 * 4) * 20


def test_global_step_has_the_same_images_for_ranks_or_accumulation():
    """2 ranks x batch 4 per step == 1 rank with 2 micro-batches of 4 per step."""
    one = ResumableShardSampler(64, 1, 0, 4, seed=3).rank_indices(0)
    two = [ResumableShardSampler(64, 2, r, 4, seed=3).rank_indices(0) for r in range(2)]
    for step in range(8):
        accumulated = one[step * 8:(step + 1) * 8]
        distributed = two[0][step * 4:(step + 1) * 4] + two[1][step * 4:(step + 1) * 4]
        assert accumulated == distributed


def test_eval_sharding_counts_every_sample_once():
    shards = [list(ExactShardSampler(10, 3, r)) for r in range(3)]
    assert sorted(i for shard in shards for i in shard) == list(range(10))
    assert [len(s) for s in shards] == [4, 3, 3]
