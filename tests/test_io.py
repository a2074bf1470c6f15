"""megaflamingo.io: the torn-tail repair of append-only JSONL files."""
from megaflamingo.io import cut_torn_tail


def test_cut_torn_tail_keeps_whole_lines_only(tmp_path):
    p = tmp_path / "pred.jsonl"
    whole = b"".join(b'{"id": "%d"}\n' % i for i in range(3))
    p.write_bytes(whole + b'{"id": "3", "pre')
    assert cut_torn_tail(p) == len(b'{"id": "3", "pre') and p.read_bytes() == whole
    assert cut_torn_tail(p) == 0 and p.read_bytes() == whole  # a whole file is left alone
    # A torn line longer than the first look-back window; a file that is one torn line.
    long_tail = b'{"id": "x", "prediction": "' + b"a" * 200_000
    p.write_bytes(whole + long_tail)
    assert cut_torn_tail(p) == len(long_tail) and p.read_bytes() == whole
    p.write_bytes(b'{"id": "only')
    assert cut_torn_tail(p) == len(b'{"id": "only') and p.read_bytes() == b""
    assert cut_torn_tail(tmp_path / "missing.jsonl") == 0
