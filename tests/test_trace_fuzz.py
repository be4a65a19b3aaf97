"""Issue 14: random mutations of saved traces fail only with TraceFormatError naming the file.

Fixed seed, fixed number of mutations (about 30 s on one core): byte flips, overwritten runs of
bytes, truncation, inserted and deleted bytes, anywhere in the file (header length, JSON header,
tensor data). A mutated file may still load (e.g. an id changed to another valid id); when it does
not, the error must be the package's TraceFormatError and name the file.
"""

import random

import pytest
import torch

from reference_impl import RoutingTrace
from reference_impl.errors import TraceFormatError

pytestmark = pytest.mark.slow

NUM_MUTATIONS = 30000


def _mutate(data: bytes, rng: random.Random) -> bytes:
    b = bytearray(data)
    kind = rng.randrange(6)
    # half the mutations hit the 8-byte length + JSON header, where the parser is most exposed
    header_end = 8 + int.from_bytes(data[:8], "little")
    pos = rng.randrange(header_end) if rng.random() < 0.5 else rng.randrange(len(b))
    if kind == 0:
        b[pos] ^= 1 << rng.randrange(8)
    elif kind == 1:
        for i in range(pos, min(len(b), pos + rng.randint(1, 16))):
            b[i] = rng.randrange(256)
    elif kind == 2:
        del b[rng.randrange(len(b)):]
    elif kind == 3:
        b[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
    elif kind == 4:
        del b[pos : pos + rng.randint(1, 8)]
    else:
        b[pos] = rng.choice(b'{}[]",:0123456789-')
    return bytes(b)


def test_mutated_traces_fail_only_with_trace_format_error(tmp_path):
    g = torch.Generator().manual_seed(0)
    ids = torch.stack([torch.randperm(16, generator=g)[:2] for _ in range(12 * 3)]).view(12, 3, 2)
    valid = torch.ones(12, dtype=torch.bool)
    valid[[2, 7]] = False
    original = tmp_path / "trace.safetensors"
    RoutingTrace(ids, 16, valid, rows_per_seq=(5, 4, 3)).save(original, metadata={"run": "fuzz"})
    data = original.read_bytes()
    rng = random.Random(1234)
    path = tmp_path / "mutated.safetensors"
    failures = loaded = 0
    for _ in range(NUM_MUTATIONS):
        path.write_bytes(_mutate(data, rng))
        try:
            RoutingTrace.load(path)
            loaded += 1
        except TraceFormatError as err:
            assert str(path) in str(err), err
            failures += 1
        except Exception as err:  # noqa: BLE001 - the point of the test
            pytest.fail(f"mutation raised {type(err).__name__} instead of TraceFormatError: {err}")
    assert failures > NUM_MUTATIONS // 2  # the mutations really do break files
    assert failures + loaded == NUM_MUTATIONS
