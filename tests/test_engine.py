"""The in-flight batching engine (tidar_runtime.engine) over the demo model exported with 4 rows.

Exactness: a request decodes the same tokens whatever shares the batch: greedy token for token
equal to the prompt decoded alone by the loop (`generate_*`), seeded sampling equal to the
same request run alone. Rows are reused: more requests than rows, admitted as rows free up.
"""

import threading

import pytest

from tests.serve_fixtures import BATCH, demo_batch_artifact
from tidar_runtime import SamplingParams, generate_ar, generate_tidar
from tidar_runtime.backends.ort import OrtBackend
from tidar_runtime.engine import Engine, QueueFull, open_engine
from tidar_runtime.errors import TiDARError
from tidar_runtime.tokenizer import folder_tokenizer

PROMPTS = ["def read_config(path):\n", "import os\n", "class Foo:\n", "    return x\n",
           "for i in range(10):\n", "x = ", "    if not os.path.isdir(path):\n", "# the main loop\n"]
MAX_TOKENS = [24, 8, 30, 12, 20, 6, 16, 10]  # rows finish at different steps and are reused
SAMPLED = SamplingParams(temperature=0.9, top_k=50, top_p=0.95, seed=11)
EOS = 0


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    return demo_batch_artifact(tmp_path_factory)


@pytest.fixture(scope="module")
def backend(art):
    return OrtBackend(art)


@pytest.fixture(scope="module")
def tok(art):
    return folder_tokenizer(art)


class PassLog:
    def __init__(self):
        self.passes = []

    def on_pass(self, kind, seconds, tokens):
        self.passes.append((kind, len(tokens)))


@pytest.mark.parametrize("mode", ["tidar", "ar"])
def test_greedy_in_a_mixed_batch_equals_alone(backend, tok, mode):
    solo = (generate_tidar if mode == "tidar" else generate_ar)
    ids = [tok.encode(p).ids for p in PROMPTS]
    want = [solo(backend, i, n, stop_tokens=[EOS]).tokens for i, n in zip(ids, MAX_TOKENS)]
    engine = Engine(backend, mode=mode, tokenizer=tok, stop_tokens=[EOS], thread=False)
    log = PassLog()
    engine.add_listener(log)
    handles, greedy = [], []
    for k, (p, n) in enumerate(zip(PROMPTS, MAX_TOKENS)):
        greedy.append(engine.submit(p, max_tokens=n))
        handles.append(greedy[-1])
        if k % 3 == 1:  # sampled neighbours share the batch (and make it request logits)
            handles.append(engine.submit(PROMPTS[(k + 3) % len(PROMPTS)], max_tokens=14,
                                         params=SamplingParams(1.0, seed=k)))
    engine.run_until_idle()
    assert [h.result().tokens for h in greedy] == want
    assert all(h.result().finish_reason == "length" for h in greedy)
    assert all(h.result().text == tok.decode(h.result().tokens) for h in greedy)
    # more requests than rows: some were admitted (prefill) after decode steps had run
    kinds = [k for k, _ in log.passes]
    assert len(handles) > BATCH and "prefill" in kinds[kinds.index("step"):]
    assert max(n for k, n in log.passes if k == "step") == BATCH
    snap = engine.snapshot()
    assert (snap.active_rows, snap.queue_depth, snap.finished["length"]) == (0, 0, len(handles))
    assert snap.tokens_generated == sum(len(h.result().tokens) for h in handles)
    engine.close()


def test_seeded_sample_in_batch_equals_alone(backend, tok):
    prompt, n = PROMPTS[0], 24
    alone_engine = Engine(backend, tokenizer=tok, stop_tokens=[EOS], thread=False)
    alone = alone_engine.submit(prompt, max_tokens=n, params=SAMPLED).result().tokens
    alone_engine.close()
    # the same generator stream as row 0 of generate_*: the CLI's `generate --seed 11` gives it too
    assert alone == generate_tidar(backend, tok.encode(prompt).ids, n, SAMPLED, stop_tokens=[EOS]).tokens
    engine = Engine(backend, tokenizer=tok, stop_tokens=[EOS], thread=False)
    others = [engine.submit(p, max_tokens=m, params=SamplingParams(0.8, seed=i) if i % 2 else SamplingParams())
              for i, (p, m) in enumerate(zip(PROMPTS[1:6], MAX_TOKENS[1:6]))]
    mine = engine.submit(prompt, max_tokens=n, params=SAMPLED)  # waits for a free row, lands in another row
    again = engine.submit(prompt, max_tokens=n, params=SAMPLED)
    engine.run_until_idle()
    assert mine.result().tokens == alone == again.result().tokens
    assert len({tuple(h.result().tokens) for h in others}) > 1
    differ = engine.submit(prompt, max_tokens=n, params=SamplingParams(0.9, 50, 0.95, seed=12))
    assert differ.result().tokens != alone  # another seed, another sample (checks the test can fail)
    engine.close()


def test_stop_strings_stop_tokens_and_events(backend, tok):
    engine = Engine(backend, tokenizer=tok, stop_tokens=[EOS], thread=False)
    prompt = PROMPTS[6]
    free = engine.submit(prompt, max_tokens=40).result()
    text = free.text
    stop = text[12:15]
    cut = text.find(stop)
    assert 0 < cut < len(text)
    h = engine.submit(prompt, max_tokens=40, stop=["NEVER-SEEN", stop])
    events = list(h)
    c = h.result()
    assert c.finish_reason == "stop" and c.text == text[:cut]
    assert "".join(e.text for e in events) == c.text and events[-1].finish_reason == "stop"
    assert [t for e in events for t in e.tokens] == c.tokens
    assert c.tokens == free.tokens[: len(c.tokens)] and stop in tok.decode(c.tokens)
    assert stop not in tok.decode(c.tokens[:-1])  # the tokens end with the one that completed the stop string
    stop_id = free.tokens[7]
    first = free.tokens.index(stop_id)
    c = engine.submit(prompt, max_tokens=40, stop_tokens=[stop_id]).result()
    assert c.finish_reason == "stop" and c.tokens == free.tokens[:first]
    assert engine.submit(prompt, max_tokens=3).result().tokens == free.tokens[:3]
    engine.close()


def test_abort_frees_the_row_for_a_waiting_request(backend, tok):
    engine = Engine(backend, tokenizer=tok, stop_tokens=[EOS], max_queue=8, thread=False)
    long = [engine.submit(p, max_tokens=100) for p in PROMPTS[:BATCH + 1]]
    engine.step()  # admits 4, one pass
    snap = engine.snapshot()
    assert (snap.active_rows, snap.queue_depth) == (BATCH, 1)
    victim = long[1]
    assert victim.abort() and not engine.abort(victim.id)  # a second abort is a no-op
    engine.step()  # the aborted row is freed before this pass, and the waiting request takes it
    assert victim.done and victim.result().finish_reason == "abort"
    assert victim.result().tokens and victim.result().tokens == \
        generate_tidar(backend, tok.encode(PROMPTS[1]).ids, 100, stop_tokens=[EOS]).tokens[: len(victim.result().tokens)]
    snap = engine.snapshot()
    assert (snap.active_rows, snap.queue_depth) == (BATCH, 0)  # the waiting request took the freed row
    waiting = engine.submit(PROMPTS[5], max_tokens=5)
    assert engine.snapshot().queue_depth == 1
    assert engine.abort(waiting.id) and waiting.result(timeout=0).finish_reason == "abort"
    assert waiting.result().tokens == [] and engine.snapshot().queue_depth == 0
    assert not engine.abort("no-such-request")
    for h in long:
        h.abort()
    engine.step()
    assert engine.snapshot().active_rows == 0 and engine.snapshot().finished["abort"] == BATCH + 2
    engine.close()


def test_bad_requests_are_one_line_errors(backend, tok):
    engine = Engine(backend, tokenizer=tok, max_queue=1, thread=False)
    with pytest.raises(TiDARError, match="prompt is empty"):
        engine.submit([])
    with pytest.raises(TiDARError, match="does not fit the KV cache of 256 slots"):
        engine.submit(list(range(2, 300)))
    with pytest.raises(TiDARError, match=r"token id 4096 is outside the vocabulary \(0\.\.4095\)"):
        engine.submit([5, 4096])
    with pytest.raises(TiDARError, match="max_tokens must be an integer >= 1"):
        engine.submit("x", max_tokens=0)
    with pytest.raises(TiDARError, match="prompt token id #0 is not an integer"):
        engine.submit(["a", "b"])
    with pytest.raises(TiDARError, match="stop strings must be non-empty"):
        engine.submit("x", stop=[""])
    h = engine.submit("x", max_tokens=2, request_id="r1")
    with pytest.raises(TiDARError, match="already in use"):
        engine.submit("y", request_id="r1")
    with pytest.raises(QueueFull, match="queue is full"):
        engine.submit("y")
    engine.run_until_idle()
    assert len(h.result().tokens) == 2
    engine.submit("y", request_id="r1").result()  # a finished id may be used again
    engine.close()
    with pytest.raises(TiDARError, match="closed"):
        engine.submit("x")
    bare = Engine(backend, thread=False)  # no tokenizer: ids only
    with pytest.raises(TiDARError, match="needs the artifact's tokenizer"):
        bare.submit("text")
    with pytest.raises(TiDARError, match="stop strings need"):
        bare.submit([5, 6], stop=["\n"])
    assert bare.submit([5, 6], max_tokens=3).result().text is None
    bare.close()


def test_threaded_engine_serves_concurrent_submitters(art, backend, tok):
    """The background step thread with 8 submitting threads: each gets its own tokens, in order,
    in its event stream; nothing is lost or duplicated; close() stops the thread."""
    ids = [tok.encode(p).ids for p in PROMPTS]
    want = [generate_tidar(backend, i, n, stop_tokens=[EOS]).tokens for i, n in zip(ids, MAX_TOKENS)]
    engine = open_engine(art, max_queue=16)
    got: dict[int, tuple] = {}

    def client(k):
        h = engine.submit(PROMPTS[k], max_tokens=MAX_TOKENS[k])
        streamed = [t for ev in h for t in ev.tokens]
        got[k] = (streamed, h.result(timeout=60).tokens)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert [got[k][0] for k in range(len(PROMPTS))] == want
    assert [got[k][1] for k in range(len(PROMPTS))] == want
    late = engine.submit(PROMPTS[0], max_tokens=200)
    engine.close()  # aborts what is left and joins the thread
    assert late.result(timeout=10).finish_reason == "abort" and not engine._thread.is_alive()


def test_drain_lets_live_requests_finish_then_ends_the_rest(art):
    """drain(timeout): new requests are refused (QueueFull), live ones finish within the timeout;
    with no time left, what still runs ends with finish_reason "abort"."""
    engine = open_engine(art, max_queue=4)
    short = engine.submit(PROMPTS[0], max_tokens=5)
    done = []
    drainer = threading.Thread(target=lambda: done.append(engine.drain(60)))
    drainer.start()
    with pytest.raises(QueueFull, match="shutting down"):
        for _ in range(1000):  # until the drain has begun
            engine.submit(PROMPTS[1], max_tokens=2).abort()
    drainer.join(timeout=120)
    assert done == [0] and short.result(timeout=0).finish_reason == "length"
    engine = open_engine(art, max_queue=4)
    long = engine.submit(PROMPTS[0], max_tokens=200)
    next(iter(long))  # decoding
    assert engine.drain(0) == 1 and long.result(timeout=10).finish_reason == "abort"
