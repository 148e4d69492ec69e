"""Chat: templates kept by import, rendered in Jinja's sandbox, used by `generate --chat` and by
POST /v1/chat/completions; eos lists stop a decode on every id.

The HTTP and generate tests run the demo artifact (tests/serve_fixtures.py, exported once per
session) with a chat template added beside its tokenizer: the turn ends with <|mask|>, a
special token other than its eos <|endoftext|>, so both must be stop ids. Rendering is compared
with transformers' apply_chat_template on a checkpoint imported from a tiny GGUF file.
"""

from __future__ import annotations

import json
import shutil

import pytest

for _mod in ("fastapi", "uvicorn", "httpx"):
    pytest.importorskip(_mod, reason=f"the chat server tests need {_mod}: pip install 'tidar-export[serve,test]'")

import httpx  # noqa: E402

from tests.gguf_files import CHATML, EOS, IM_END, MASK, write_gguf  # noqa: E402
from tests.serve_fixtures import demo_batch_artifact, serving  # noqa: E402
from tidar_export import cli  # noqa: E402
from tidar_runtime import SamplingParams, generate_tidar  # noqa: E402
from tidar_runtime.backends.ort import OrtBackend  # noqa: E402
from tidar_runtime.chat import ChatTemplate, artifact_chat, check_messages  # noqa: E402
from tidar_runtime.engine import open_engine  # noqa: E402
from tidar_runtime.manifest import load_manifest  # noqa: E402
from tidar_runtime.errors import TiDARError  # noqa: E402
from tidar_runtime.errors import FieldError  # noqa: E402
from tidar_runtime.server import create_app, parse_chat_completion  # noqa: E402
from tidar_runtime.tokenizer import folder_tokenizer, load_tokenizer  # noqa: E402

MODEL = "demo-chat"
# The demo model writes Python: a system message becomes a comment, the turn ends with <|mask|>.
TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'system' %}# {{ m['content'] }}\n"
            "{% elif m['role'] == 'assistant' %}{{ m['content'] }}<|mask|>\n{% else %}{{ m['content'] }}{% endif %}"
            "{% endfor %}")
MESSAGES = [{"role": "system", "content": "utilities"}, {"role": "user", "content": "def read_config(path):\n"}]
END_OF_TURN, DEMO_EOS = 1, 0


def with_manifest(src, dst, **tokenizer):
    """A copy of artifact `src` at `dst` whose manifest's tokenizer section is updated."""
    shutil.copytree(src, dst)
    path = dst / "manifest.json"
    m = json.loads(path.read_text())
    m["tokenizer"].update(tokenizer)
    path.write_text(json.dumps(m, indent=2))
    return dst


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return demo_batch_artifact(tmp_path_factory)


@pytest.fixture(scope="module")
def art(demo, tmp_path_factory):
    dst = tmp_path_factory.mktemp("chat") / "artifact"
    art = with_manifest(demo, dst, chat_template="chat_template.jinja")
    (art / "chat_template.jinja").write_text(TEMPLATE)
    return art


@pytest.fixture(scope="module")
def reference(art):
    """Greedy decode of MESSAGES by the loop alone, stopping on eos and the end-of-turn token."""
    backend, tok = OrtBackend(art), folder_tokenizer(art)
    chat = ChatTemplate(TEMPLATE, tok, eos_ids=[DEMO_EOS])

    def run(messages, n):
        return generate_tidar(backend, chat.encode(messages), n, SamplingParams(), stop_tokens=[0, 1])

    run.tok, run.chat = tok, chat
    return run


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """A checkpoint imported from a tiny GGUF file with a ChatML template."""
    folder = tmp_path_factory.mktemp("tiny")
    write_gguf(folder / "m.gguf")
    assert cli.main(["import", str(folder / "m.gguf"), "-o", str(folder / "ckpt"), "--mask-token-id", str(MASK)]) == 0
    return folder / "ckpt"


# --------------------------------------------------------------------------- rendering


def test_render_equals_transformers(tiny_ckpt):
    from transformers import AutoTokenizer

    tok = load_tokenizer(tiny_ckpt)
    chat = ChatTemplate((tiny_ckpt / "chat_template.jinja").read_text(), tok, eos_ids=[EOS])
    hf = AutoTokenizer.from_pretrained(str(tiny_ckpt))  # reads the checkpoint's tokenizer and template files
    for messages in ([{"role": "user", "content": "the cat"}],
                     [{"role": "system", "content": "be brief"}, {"role": "user", "content": "in a"},
                      {"role": "assistant", "content": "on"}, {"role": "user", "content": "the?"}]):
        assert chat.render(messages) == hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        want = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
        assert chat.encode(messages) == want["input_ids"]
    assert chat.end_of_turn_ids == [IM_END] and chat.stop_ids == [EOS, IM_END]
    assert chat.render([{"role": "user", "content": "x"}]).endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize("source,message", [
    ("{{ messages.__class__.__mro__ }}", "access to attribute '__class__'"),
    ("{{ messages.append(1) }}", "chat template:"),  # the immutable sandbox: no mutation of the inputs
    ("{{ raise_exception('roles must alternate') }}", "chat template: roles must alternate"),
    ("{% for %}", "chat template does not compile"),
])
def test_sandbox_and_template_errors(tiny_ckpt, source, message):
    tok = load_tokenizer(tiny_ckpt)
    with pytest.raises(TiDARError) as e:
        ChatTemplate(source, tok).render([{"role": "user", "content": "hi"}])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_template_helpers(tiny_ckpt):
    chat = ChatTemplate("{{ bos_token }} {{ eos_token }} {{ strftime_now('%Y') }}", load_tokenizer(tiny_ckpt),
                        bos_id=IM_END, eos_ids=[EOS])
    bos, eos, year = chat.render([]).split(" ")
    assert (bos, eos) == ("<|im_end|>", "<|endoftext|>") and year.isdigit() and len(year) == 4


def test_check_messages():
    assert check_messages([{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]) \
        == [{"role": "user", "content": "ab"}]
    for bad, message in (([], "non-empty list"), ([{"role": "king", "content": "x"}], "messages[0].role"),
                         ([{"role": "user", "content": 3}], "messages[0].content must be a string"),
                         ([{"role": "user", "content": [{"type": "image_url"}]}], "only text parts")):
        with pytest.raises(TiDARError, match=message.replace("[", r"\[").replace("]", r"\]")):
            check_messages(bad)


def test_import_keeps_template_of_hf_folders(tiny_ckpt, tmp_path):
    src = tmp_path / "hf"
    shutil.copytree(tiny_ckpt, src)
    (src / "chat_template.jinja").unlink()
    config = json.loads((src / "tokenizer_config.json").read_text())
    (src / "tokenizer_config.json").write_text(json.dumps(config | {"chat_template": CHATML}))
    hf = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps(hf | {"eos_token_id": [EOS, IM_END]}))
    assert cli.main(["import", str(src), "-o", str(tmp_path / "a")]) == 0
    assert (tmp_path / "a" / "chat_template.jinja").read_text() == CHATML  # from tokenizer_config.json
    assert json.loads((tmp_path / "a" / "config.json").read_text())["eos_token_id"] == [EOS, IM_END]  # kept whole
    (src / "tokenizer_config.json").write_text(json.dumps(config))
    (src / "chat_template.jinja").write_text(TEMPLATE)
    assert cli.main(["import", str(src), "-o", str(tmp_path / "b")]) == 0
    assert (tmp_path / "b" / "chat_template.jinja").read_text() == TEMPLATE  # the file, as is


# --------------------------------------------------------------------------- generate --chat


def test_generate_chat_equals_the_loop(art, reference, capsys):
    assert cli.main(["generate", str(art), "--chat", "--system", "utilities", "--prompt", "def read_config(path):\n",
                     "--max-new-tokens", "40", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    want = reference(MESSAGES, 40)
    assert out["token_ids"] == want.tokens and out["text"] == reference.tok.decode(want.tokens)
    assert out["finish_reason"] == want.finish_reason


def test_generate_chat_errors(demo, art, capsys):
    for argv, message in ((["generate", str(demo), "--chat", "--prompt", "x"], "has no chat template"),
                          (["generate", str(art), "--system", "s", "--prompt", "x"], "--system needs --chat"),
                          (["generate", str(art), "--chat", "--prompt-ids", "1,2"], "--chat needs --prompt")):
        assert cli.main(argv) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err


def test_eos_list_stops_on_every_id(demo, tmp_path, capsys):
    """A manifest whose eos_token_id is a list: the engine and `generate` stop on its second id."""
    tok = folder_tokenizer(demo)
    prompt = tok.encode("def read_config(path):\n").ids
    free = generate_tidar(OrtBackend(demo), prompt, 12, SamplingParams(), stop_tokens=[]).tokens
    k = next(i for i in range(2, 12) if free[i] not in free[:i])  # a token's first appearance, not at the start
    art = with_manifest(demo, tmp_path / "art", eos_token_id=[DEMO_EOS, free[k]])
    with open_engine(art) as engine:
        c = engine.submit(prompt, max_tokens=12).result(timeout=60)
    assert c.tokens == free[:k] and c.finish_reason == "stop"
    assert cli.main(["generate", str(art), "--prompt-ids", ",".join(map(str, prompt)), "--max-new-tokens", "12",
                     "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["token_ids"] == free[:k]
    bad = with_manifest(demo, tmp_path / "bad", eos_token_id=[DEMO_EOS, 10**6])
    with pytest.raises(TiDARError, match=r"tokenizer.eos_token_id\[1\]"):
        load_manifest(bad)


# --------------------------------------------------------------------------- serve


@pytest.fixture(scope="module")
def server(art):
    engine = open_engine(art)
    with serving(create_app(engine, MODEL, chat=artifact_chat(art, engine.tokenizer))) as url:
        yield url
    engine.close()


def _sse(lines) -> list:
    return [line[6:] if line == "data: [DONE]" else json.loads(line[6:]) for line in lines if line.startswith("data: ")]


def test_chat_completion_equals_the_loop(server, reference):
    r = httpx.post(f"{server}/v1/chat/completions", timeout=60,
                   json={"model": MODEL, "messages": MESSAGES, "max_tokens": 40, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    want = reference(MESSAGES, 40)
    choice = body["choices"][0]
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-") and body["model"] == MODEL
    assert choice["message"] == {"role": "assistant", "content": reference.tok.decode(want.tokens)}
    assert choice["token_ids"] == want.tokens
    assert choice["finish_reason"] == ("stop" if want.finish_reason == "stop" else "length")
    prompt_len = len(reference.chat.encode(MESSAGES))
    assert body["usage"] == {"prompt_tokens": prompt_len, "completion_tokens": len(want.tokens),
                             "total_tokens": prompt_len + len(want.tokens)}


def test_chat_streaming(server, reference):
    body = {"messages": MESSAGES, "max_completion_tokens": 24, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{server}/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = _sse(r.iter_lines())
    assert events[-1] == "[DONE]"
    usage, chunks = events[-2], events[:-2]
    want = reference(MESSAGES, 24)
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == len(want.tokens)
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == reference.tok.decode(want.tokens)
    assert [t for c in chunks for t in c["choices"][0]["token_ids"]] == want.tokens
    assert chunks[-1]["choices"][0]["finish_reason"] is not None


def test_openai_client_chat(server, reference):
    openai = pytest.importorskip("openai", reason="the OpenAI client test needs openai")
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
    want = reference.tok.decode(reference(MESSAGES, 12).tokens)
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=12, temperature=0)
    assert r.choices[0].message.content == want and r.choices[0].message.role == "assistant"
    parts = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=12, temperature=0, stream=True)
    assert "".join(p.choices[0].delta.content or "" for p in parts if p.choices) == want


def test_errors_in_openai_shape(server):
    for method, path, status in (("GET", "/v1/nothing", 404), ("GET", "/v1/chat/completions", 405),
                                 ("DELETE", "/v1/completions", 405)):
        r = httpx.request(method, f"{server}{path}", timeout=30)
        err = r.json()["error"]
        assert r.status_code == status and err["type"] == "invalid_request_error" and path in err["message"]
        assert set(err) == {"message", "type", "param", "code"}
    r = httpx.post(f"{server}/v1/chat/completions", json={"messages": [{"role": "wizard", "content": "x"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = httpx.post(f"{server}/v1/chat/completions", json={"messages": MESSAGES, "temperature": 9})
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"


def test_chat_without_template_is_a_client_error(reference):
    with pytest.raises(FieldError, match="no chat template") as e:  # a 400 naming the field
        parse_chat_completion({"messages": MESSAGES}, MODEL, None)
    assert e.value.field == "messages"
    req = parse_chat_completion({"messages": MESSAGES, "max_tokens": 5}, MODEL, reference.chat)
    assert req.stop_tokens == (DEMO_EOS, END_OF_TURN) and req.prompt == tuple(reference.chat.encode(MESSAGES))
