"""`loralab serve` on SmolLM2 with the committed adapter, once per engine: the llama.cpp gateway
(chosen by `--engine auto` where llama.cpp is built) answers exactly as the torch engine does, with
the same routes, key, adapter names and metrics, and takes its llama-server down with it."""

import concurrent.futures
import os
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from helpers.data import first_eval_row_per_task
from helpers.serving import start_server

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]
KEY = "engines-key"
QUESTIONS = 5




def _answers(url: str, model: str, questions: int = QUESTIONS) -> list[str]:
    from openai import OpenAI

    client = OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=120)
    rows = first_eval_row_per_task(questions)
    return [client.chat.completions.create(model=model, messages=[{"role": "user", "content": r["question"]}], max_tokens=24,
                                           temperature=0).choices[0].message.content for r in rows]


def _children(pid: int) -> list[int]:
    return [int(c) for task in Path(f"/proc/{pid}/task").iterdir() for c in (task / "children").read_text().split()]


def _metric(url: str, name: str) -> float:
    text = urllib.request.urlopen(url + "/metrics").read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


@pytest.fixture(scope="module")
def torch_answers(smol_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("torch-engine")
    process, url = start_server(smol_dir, root, api_key=KEY, adapters={"medical": str(REPO / "lora")})
    try:
        return {model: _answers(url, model) for model in ("medical", smol_dir.name)}
    finally:
        process.terminate()
        process.wait(timeout=60)


def test_auto_picks_llama_cpp_which_answers_as_the_torch_engine(llama_server_built, smol_dir, torch_answers, tmp_path):
    process, url = start_server(smol_dir, tmp_path, api_key=KEY, engine="auto", adapters={"medical": str(REPO / "lora")})
    server = []
    try:
        log = (tmp_path / "server.log").read_text()
        assert "engine: llama.cpp" in log, log
        server = [pid for pid in _children(process.pid) if "llama-server" in Path(f"/proc/{pid}/cmdline").read_text()]
        assert len(server) == 1
        for model in ("medical", smol_dir.name):  # F16 GGUF in llama.cpp vs fp32 PyTorch: the same greedy answers
            assert _answers(url, model) == torch_answers[model], model
        assert torch_answers["medical"] != torch_answers[smol_dir.name]  # the adapter is applied per request

        models = ["medical", smol_dir.name] * 4  # concurrent, mixed: all answered
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            texts = list(pool.map(lambda m: _answers(url, m, questions=1)[0], models))
        assert texts == [torch_answers[m][0] for m in models]
        assert _metric(url, "loralab_requests_total") == 2 * QUESTIONS + 8
        assert _metric(url, "loralab_time_to_first_token_seconds_count") == 2 * QUESTIONS + 8

        request = urllib.request.Request(url + "/v1/models")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request)
        assert refused.value.code == 401
    finally:
        process.terminate()
        process.wait(timeout=120)
    deadline = time.time() + 15
    while time.time() < deadline and os.path.exists(f"/proc/{server[0]}"):
        time.sleep(0.2)
    assert not os.path.exists(f"/proc/{server[0]}")  # no orphaned llama-server
