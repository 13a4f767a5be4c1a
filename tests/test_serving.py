"""`qilin-med-vl serve`: the embedded demo model with its HiA adapter behind transformers serve's OpenAI-compatible
API, on 127.0.0.1. Concurrent requests with two base64 images each, streamed and not, must answer exactly what
`qilin_med_vl.inference` answers for the same input; bad images are a 400 naming the problem."""

import base64
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from transformers.utils.import_utils import is_serve_available

from qilin_med_vl import load_image
from qilin_med_vl.cli import build_parser
from qilin_med_vl.cli.serve import run
from qilin_med_vl.inference import generate_answers, user_message
from qilin_med_vl.loading import DEMO_EXAMPLES_DIR, DEMO_MODEL_DIR, default_adapter, load_model_and_processor
from qilin_med_vl.modeling.modeling_hia import hia_is_active
from qilin_med_vl.serving import CONTINUOUS_BATCHING_UNSUPPORTED, build_app, decode_data_url

pytestmark = pytest.mark.skipif(not is_serve_available(), reason="needs transformers' serving extra")

MAX_TOKENS = 24
SERVED_NAME = "qilin-med-vl-demo"
# Two images per request, with the questions the demo model was trained to compare.
REQUESTS = [
    (("before.png", "after.png"), "两张图片相比有什么变化？", False),
    (("normal.png", "osteophyte.png"), "两张图片相比有什么变化？", True),
    (("postop.png", "before.png"), "请描述这两张图像。", False),
    (("after.png", "normal.png"), "请描述这两张图像。", True),
]


def data_url(path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def chat_body(image_urls, question, stream=False, max_tokens=MAX_TOKENS) -> dict:
    content = [{"type": "image_url", "image_url": {"url": url}} for url in image_urls]
    content.append({"type": "text", "text": question})
    return {"model": SERVED_NAME, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "temperature": 0, "stream": stream}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def app():
    return build_app(DEMO_MODEL_DIR, "auto", served_model_name=SERVED_NAME, device="cpu")


@pytest.fixture(scope="module")
def server(app):
    """An HTTP client of the app served by uvicorn on 127.0.0.1, stopped after the module's tests."""
    import httpx
    import uvicorn

    port = free_port()
    uvicorn_server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uvicorn_server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uvicorn_server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
        yield client
    uvicorn_server.should_exit = True
    thread.join(timeout=10)
    assert not thread.is_alive(), "the server did not stop"


def ask(client, body: dict) -> str:
    """The answer's text, read from the JSON response or put together from the server-sent events."""
    if not body["stream"]:
        response = client.post("/v1/chat/completions", json=body)
        assert response.status_code == 200, response.text
        assert response.json()["model"] == SERVED_NAME
        choice = response.json()["choices"][0]
        assert choice["finish_reason"] in ("stop", "length")
        return choice["message"]["content"]
    pieces, finish_reason = [], None
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[len("data: "):])
            assert "error" not in event, event
            choice = event["choices"][0]
            pieces.append(choice["delta"].get("content") or "")
            finish_reason = choice.get("finish_reason") or finish_reason
    assert finish_reason in ("stop", "length")
    return "".join(pieces)


@pytest.fixture(scope="module")
def expected():
    """`qilin_med_vl.inference`'s greedy answers to REQUESTS, from the demo model loaded on its own, with HiA."""
    model, processor = load_model_and_processor(str(DEMO_MODEL_DIR), default_adapter(str(DEMO_MODEL_DIR)))
    assert hia_is_active(model)
    return [
        generate_answers(model, processor, [[user_message([str(DEMO_EXAMPLES_DIR / name) for name in names],
                                                          question)]], max_new_tokens=MAX_TOKENS)[0]
        for names, question, _ in REQUESTS
    ]


def test_concurrent_requests_answer_what_generate_answers(app, server, expected):
    bodies = [chat_body([data_url(DEMO_EXAMPLES_DIR / name) for name in names], question, stream)
              for names, question, stream in REQUESTS]
    with ThreadPoolExecutor(len(bodies)) as pool:
        answers = list(pool.map(lambda body: ask(server, body), bodies))
    assert answers == expected
    assert all(expected), expected
    # The served model has HiA on, so each answer above went through HiA: its pre-hook raises when a prefill with
    # images has no high_res_pixel_values, and the reference answers use the adapter too.
    (served,) = app.state.model_manager.loaded_models.values()
    (hia_config,) = served.model.peft_config.values()
    assert hia_is_active(served.model) and served.processor.image_processor.high_res_size == hia_config.high_res_size


def test_openai_client(server, expected):
    """OpenAI's own client, streaming, and its error message for a refused image."""
    from openai import BadRequestError, OpenAI

    client = OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)
    names, question, _ = REQUESTS[0]
    body = chat_body([data_url(DEMO_EXAMPLES_DIR / name) for name in names], question)
    stream = client.chat.completions.create(model=SERVED_NAME, messages=body["messages"], max_tokens=MAX_TOKENS,
                                            temperature=0, stream=True)
    answer = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert answer == expected[0]
    body = chat_body(["https://example.org/x.png"], question)
    with pytest.raises(BadRequestError, match="images must be base64 data URLs"):
        client.chat.completions.create(model=SERVED_NAME, messages=body["messages"], max_tokens=MAX_TOKENS)


@pytest.mark.parametrize(
    "url, problem",
    [
        ("data:image/png;base64," + base64.b64encode(b"not an image at all").decode(), "neither a readable image"),
        ("data:image/png;base64,***not base64***", "not valid base64"),
        ("data:image/png,plain", "is not base64"),
        ("https://example.org/x.png", "base64 data URLs"),
        (str(DEMO_EXAMPLES_DIR / "before.png"), "base64 data URLs"),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
def test_bad_image_is_a_400_naming_it(server, url, problem, stream):
    good = data_url(DEMO_EXAMPLES_DIR / "before.png")
    response = server.post("/v1/chat/completions", json=chat_body([good, url], "这是什么？", stream))
    assert response.status_code == 400, response.text
    error = response.json()["error"]  # OpenAI's error body, whose message OpenAI's clients show
    assert error["type"] == "invalid_request_error"
    detail = error["message"]
    assert detail.startswith("message 0, image 1: ") and problem in detail, detail
    assert "qilin-serve-" not in detail  # the temporary file is not named


def test_requests_for_other_models_and_messages_it_cannot_read_are_refused(server):
    body = chat_body([data_url(DEMO_EXAMPLES_DIR / "before.png")], "这是什么？")
    assert server.post("/v1/chat/completions", json={**body, "model": "gpt2"}).status_code == 400
    video = {"role": "user", "content": [{"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AA=="}}]}
    response = server.post("/v1/chat/completions", json={**body, "messages": [video]})
    assert response.status_code in (400, 422), response.text
    assert server.post("/v1/audio/transcriptions").status_code == 404
    models = server.get("/v1/models").json()["data"]
    assert [entry["id"] for entry in models] == [SERVED_NAME]
    assert server.get("/health").json() == {"status": "ok"}


def test_a_prompt_over_the_length_limit_is_a_400(server):
    # 17 images of 64 tokens each are over the demo model's 1024 tokens.
    body = chat_body([data_url(DEMO_EXAMPLES_DIR / "before.png")] * 17, "这是什么？")
    response = server.post("/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    assert "over the limit of 1024" in response.json()["error"]["message"]


def test_command_line_arguments_and_continuous_batching_refused_with_the_reason(capsys):
    parser = build_parser()
    args = parser.parse_args(["serve", "./model", "--adapter", "hia", "--port", "9000", "--quantization", "bnb-4bit"])
    assert (args.model, args.adapter, args.host, args.port, args.device, args.quantization) == (
        "./model", "hia", "127.0.0.1", 9000, "auto", "bnb-4bit")
    assert args.handler is run
    assert parser.parse_args(["serve"]).model is None and parser.parse_args(["serve"]).adapter == "auto"
    with pytest.raises(ValueError, match="pixel_values") as error:
        run(parser.parse_args(["serve", "--continuous-batching"]))
    assert str(error.value) == CONTINUOUS_BATCHING_UNSUPPORTED
    assert capsys.readouterr().err == ""  # refused before anything is loaded or announced
    with pytest.raises(ValueError, match="pixel_values"):
        build_app(DEMO_MODEL_DIR, continuous_batching=True)


def test_a_dicom_data_url_is_read_like_the_dicom_file():
    pytest.importorskip("pydicom")
    from pydicom.data import get_testdata_file

    path = get_testdata_file("CT_small.dcm", download=False)  # shipped with pydicom
    with open(path, "rb") as file:
        url = "data:application/dicom;base64," + base64.b64encode(file.read()).decode()
    assert np.array_equal(np.asarray(decode_data_url(url)), np.asarray(load_image(path)))


def test_responses_api_reads_images_the_same_way(server, expected):
    """`/v1/responses` (OpenAI's newer API) goes through the same image handling: the same answer as `generate`,
    and a URL it would have to fetch is refused."""
    (names, question, _) = REQUESTS[0]
    content = [{"type": "input_image", "image_url": data_url(DEMO_EXAMPLES_DIR / name)} for name in names]
    content.append({"type": "input_text", "text": question})
    body = {"model": SERVED_NAME, "input": [{"role": "user", "content": content}], "max_output_tokens": MAX_TOKENS,
            "temperature": 0, "stream": False}
    response = server.post("/v1/responses", json=body)
    assert response.status_code == 200, response.text
    texts = [part["text"] for item in response.json()["output"] if item.get("type") == "message"
             for part in item["content"] if part.get("type") == "output_text"]
    assert "".join(texts).strip() == expected[0]
    content[0]["image_url"] = "https://example.org/x.png"
    refused = server.post("/v1/responses", json=body)
    assert refused.status_code == 400 and "base64 data URLs" in refused.json()["error"]["message"]


def test_text_completions_endpoint_answers(server):
    """`/v1/completions` (text only, no chat template) continues the prompt as greedy `generate` does."""
    model, processor = load_model_and_processor(str(DEMO_MODEL_DIR), default_adapter(str(DEMO_MODEL_DIR)))
    prompt_ids = processor.tokenizer("膝关节", return_tensors="pt").input_ids
    output_ids = model.generate(prompt_ids, max_new_tokens=4, do_sample=False,
                                pad_token_id=processor.tokenizer.pad_token_id)
    expected = processor.tokenizer.decode(output_ids[0, prompt_ids.shape[1]:], skip_special_tokens=True)
    response = server.post("/v1/completions", json={"model": SERVED_NAME, "prompt": "膝关节", "max_tokens": 4,
                                                    "temperature": 0})
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["text"] == expected
