"""ptx.online: online DPO's pairs, the best and worst sample of each group from their token ids."""
import numpy as np

from ptx import online


def test_preference_batch_pairs_the_best_and_worst_sample_of_each_group_from_their_token_ids():
    # Two groups of three rows in the rollout layout: prompt width 3 (left-aligned), 2 completion tokens.
    tokens = np.array([[0, 1, 5, 10, 11], [0, 1, 5, 12, 0], [0, 1, 5, 13, 14],
                       [1, 6, 7, 20, 21], [1, 6, 7, 22, 23], [1, 6, 7, 24, 0]], np.int32)
    segment = (tokens > 0).astype(np.int32)
    segment[[0, 1, 2], 0] = 0
    seq = {"tokens": tokens, "positions": np.cumsum(segment, 1) - 1, "segment_ids": segment,
           "completion": tokens[:, 3:], "mask": (tokens[:, 3:] > 0).astype(np.float32)}
    batch, tied = online.preference_batch(seq, np.array([0.2, 0.9, 0.1, 0.5, 0.5, 0.5]), 3)
    np.testing.assert_array_equal(tied, [False, True])
    np.testing.assert_array_equal(batch["chosen_inputs"][0], [0, 1, 5, 12])
    # Targets and loss masks of the completion's columns (inputs 2 and 3) alone.
    np.testing.assert_array_equal(batch["chosen_targets"][0], [12, 0])
    np.testing.assert_array_equal(batch["chosen_loss_mask"][0], [1, 0])
    np.testing.assert_array_equal(batch["rejected_targets"][0], [13, 14])
    np.testing.assert_array_equal(batch["rejected_loss_mask"][0], [1, 1])
    np.testing.assert_array_equal(batch["rejected_segment_ids"][0], [0, 1, 1, 1])
    assert batch["prob_chosen"].tolist() == [1.0, 1.0]
