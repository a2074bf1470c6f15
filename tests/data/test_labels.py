"""build_labels must equal AF1's per-token masking loop on every input."""
import torch
from hypothesis import given, settings, strategies as st

from megaflamingo.data.labels import build_labels

IDS = {"media": 3, "eoc": 4, "sep": 5, "pad": 1, "bos": 2, "eos": 2}
LLAMA_IDS = {"media": 4, "eoc": 5, "sep": 6, "pad": 1, "bos": 2, "eos": 3}


def af1_reference(input_ids, ids):
    """A literal re-statement of AF1's loop in foundation/chat train_utils (test oracle only)."""
    labels = input_ids.clone()
    labels[labels == ids["pad"]] = -100
    labels[:, :2] = -100
    labels[labels == ids["media"]] = -100
    for i in range(labels.shape[0]):
        shouldmask = True
        for j in range(labels.shape[1]):
            if shouldmask and (labels[i][j] != ids["eos"]):
                masked_value = -100
            else:
                masked_value = labels[i][j]
            if labels[i][j] == ids["sep"]:
                shouldmask = False
            elif labels[i][j] == ids["eoc"]:
                shouldmask = True
            labels[i][j] = masked_value
        if labels[i][-1] not in [-100, ids["eos"], ids["pad"], ids["eoc"]]:
            for j in range(labels.shape[1] - 1, -1, -1):
                if labels[i][j] not in [-100, ids["eos"], ids["eoc"]]:
                    labels[i][j] = -100
                else:
                    break
    return labels


def _check(x, ids):
    got = build_labels(x, ids)
    want = af1_reference(x.clone(), ids)
    assert got.dtype == torch.long
    assert torch.equal(got, want), (x, got, want)


# Token alphabet biased towards the special ids so SEP/EOC/eos/pad patterns are dense.
def _rows(ids, vocab=12):
    tok = st.sampled_from(sorted(set(ids.values())) + list(range(7, vocab)))
    return st.integers(1, 24).flatmap(
        lambda T: st.lists(st.lists(tok, min_size=T, max_size=T), min_size=1, max_size=5))


@settings(max_examples=300, deadline=None)
@given(_rows(IDS))
def test_matches_af1_loop_opt_ids(rows):
    _check(torch.tensor(rows), IDS)


@settings(max_examples=200, deadline=None)
@given(_rows(LLAMA_IDS))
def test_matches_af1_loop_llama_ids(rows):
    _check(torch.tensor(rows), LLAMA_IDS)


def test_random_realistic_batches():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        B, T = 4, 64
        x = torch.randint(7, 50, (B, T), generator=g)
        # sprinkle structure: sep/eoc/media/eos and right padding
        for tok, p in ((5, 0.08), (4, 0.08), (3, 0.05), (2, 0.04)):
            x[torch.rand(B, T, generator=g) < p] = tok
        for b in range(B):
            n = int(torch.randint(1, T + 1, (1,), generator=g))
            x[b, n:] = 1
        _check(x, IDS)


def test_adversarial_cases():
    cases = [
        [[5, 5, 7, 8, 4, 2]],            # SEP at 0/1 opens nothing
        [[2, 2, 3, 7, 5, 8, 9]],         # truncated answer erased back to SEP
        [[2, 2, 3, 7, 5, 8, 4, 2]],      # complete answer kept incl. EOC and eos
        [[2, 2, 3, 7, 5, 8, 4, 3, 7, 5, 9, 9]],  # second answer truncated, first survives
        [[2, 2, 7, 5, 3, 8, 4, 2, 1, 1]],  # media inside an answer masked, padding
        [[2, 2, 7, 2, 7, 5, 2, 9, 4, 2]],  # eos inside prompt and answer kept
        [[7, 7, 5, 7, 5, 8, 4, 5, 8]],   # nested SEPs, final open answer truncated
        [[2, 2, 4, 8, 4, 5]],            # ends with SEP (kept? AF1: SEP itself masked)
        [[2]], [[2, 5]], [[9, 9, 9]],    # tiny rows
        [[2, 2, 5, 7, 8, 9, 9], [2, 2, 5, 7, 4, 2, 1]],  # truncation judged per batch column
    ]
    for rows in cases:
        _check(torch.tensor(rows), IDS)


def test_vectorised_on_1d_and_int32():
    x = torch.tensor([2, 2, 3, 7, 5, 8, 4, 2], dtype=torch.int32)
    assert torch.equal(build_labels(x, IDS), af1_reference(x.long()[None], IDS)[0])
