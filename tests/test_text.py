"""TextAssembler: incremental text equals a decode of the whole sequence, stop strings cut it, and
the work per token does not grow with the text already generated (tidar_runtime.text)."""

import random

import pytest

from tidar_runtime.request import MAX_STOP_CHARS, GenerationRequest
from tidar_runtime.errors import FieldError
from tidar_runtime.text import TextAssembler

# a byte-level toy vocabulary: ASCII letters, a space, and the bytes of multi-byte characters
_CHARS = ["a", "b", " ", "é", "€", "😀", "\n"]
VOCAB = {i: c.encode() for i, c in enumerate(_CHARS)}
for _c in ("é", "€", "😀"):  # single bytes: a character split over tokens
    for _b in _c.encode():
        VOCAB[len(VOCAB)] = bytes([_b])


class CountingDecode:
    """decode(ids) over VOCAB (invalid UTF-8 shown as U+FFFD), counting the ids it was given."""

    def __init__(self):
        self.work = 0

    def __call__(self, ids):
        self.work += len(ids)
        return b"".join(VOCAB[i] for i in ids).decode("utf-8", errors="replace")


def _run(ids, stop=()):
    decode = CountingDecode()
    text = TextAssembler(decode, stop)
    pieces = []
    for t in ids:
        pieces.append(text.push([t]))
        if text.stopped:
            break
    pieces.append(text.finish())
    return "".join(pieces), text, decode


def _whole_bytes(rng, n):
    """n tokens whose bytes form valid UTF-8 (split characters are completed)."""
    ids = []
    while len(ids) < n:
        c = rng.choice(_CHARS)
        if len(c.encode()) > 1 and rng.random() < 0.5:
            ids += [k for b in c.encode() for k, v in VOCAB.items() if v == bytes([b])]
        else:
            ids.append(_CHARS.index(c))
    return ids


@pytest.mark.parametrize("seed", range(6))
def test_pieces_equal_the_whole_decode_and_stop_strings_cut_it(seed):
    rng = random.Random(seed)
    ids = _whole_bytes(rng, 300)
    full = CountingDecode()(ids)
    got, text, _ = _run(ids)
    assert got == full == text.text
    stop = full[100:103]
    got, text, _ = _run(ids, [stop, "never seen"])
    assert text.stopped and got == full[: full.find(stop)] == text.text


def test_stop_matching_is_linear_in_the_generated_text():
    """A stop string of the largest allowed length that never matches, over 3000 tokens: the
    decoder sees a bounded window per token, and the held-back text stays under the stop length."""
    ids = [0] * 3000  # "aaaa..."
    stop = "a" * (MAX_STOP_CHARS - 1) + "b"  # every tail is a prefix of it: the worst case for holding back
    got, text, decode = _run(ids, [stop])
    assert not text.stopped and got == "a" * 3000
    assert decode.work <= 8 * len(ids)  # a whole-text decode per token would be ~4.5 million


def test_request_model_names_the_field():
    with pytest.raises(FieldError) as e:
        GenerationRequest("\ud800 lone")
    assert e.value.field == "prompt" and "lone surrogate" in str(e.value)
    with pytest.raises(FieldError) as e:
        GenerationRequest("x", stop=["a" * (MAX_STOP_CHARS + 1)])
    assert e.value.field == "stop"
    with pytest.raises(FieldError) as e:
        GenerationRequest("x", include_usage="no")
    assert e.value.field == "stream_options.include_usage"
    assert e.value.named("include_usage").startswith("include_usage must be")
    assert GenerationRequest([1, 2], stop="x").stop == ("x",)
