"""The rationale store and the teacher client, against in-process fake servers (fast, exact)."""

import asyncio
import json
from pathlib import Path

import httpx
import pytest

from kpod.data.loaders import make_example
from kpod.errors import DataError, TeacherError
from kpod.teacher.client import BudgetExhausted, ChatClient, RetriesExhausted, RetryPolicy, api_key_from_env
from kpod.teacher.generate import GenerationSettings, TeacherPrompt, filter_rationales, generate_rationales
from kpod.teacher.store import RationaleStore


def record(qid: str, sample: int = 0, completion: str = "1 + 1 = 2. Therefore, the answer is 2.", gold="2"):
    return {
        "qid": qid,
        "teacher": "t",
        "prompt_hash": "h",
        "sample": sample,
        "question": f"What is {qid}?",
        "gold_answer": gold,
        "answer_kind": "number",
        "choices": [],
        "completion": completion,
    }


def test_store_appends_once_and_reloads(tmp_path: Path) -> None:
    path = tmp_path / "store.jsonl"
    with RationaleStore(path) as store:
        assert store.append(record("a"))
        assert not store.append(record("a"))  # same key
        assert store.append(record("a", sample=1))
    with RationaleStore(path) as store:
        assert len(store) == 2 and ("a", "t", "h", 1) in store
    assert len(path.read_text().splitlines()) == 2


def test_store_drops_a_torn_last_line(tmp_path: Path) -> None:
    path = tmp_path / "store.jsonl"
    with RationaleStore(path) as store:
        store.append(record("a"))
        store.append(record("b"))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 7])  # cut the last record short
    with RationaleStore(path) as store:
        assert len(store) == 1 and store.repaired_bytes > 0
        store.append(record("b"))
    lines = path.read_text().splitlines()
    assert [json.loads(x)["qid"] for x in lines] == ["a", "b"]


def test_store_refuses_a_foreign_file(tmp_path: Path) -> None:
    path = tmp_path / "store.jsonl"
    path.write_text('{"qid": "a"}\n')
    with pytest.raises(DataError, match="line 1: not a rationale-store record"):
        RationaleStore(path)


OK_BODY = {
    "model": "t",
    "choices": [
        {
            "message": {"role": "assistant", "content": "2 + 2 = 4. Therefore, the answer is 4."},
            "finish_reason": "stop",
        }
    ],
    "usage": {"prompt_tokens": 5, "completion_tokens": 9, "total_tokens": 14},
}


def scripted(responses: list):
    """A transport answering with the scripted responses in order (then repeating the last)."""
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(json.loads(request.content))
        item = responses[min(len(calls) - 1, len(responses) - 1)]
        if isinstance(item, Exception):
            raise item
        return item

    return httpx.MockTransport(handler), calls


FAST = RetryPolicy(max_retries=3, base_s=0.001, cap_s=0.01, max_consecutive_connection_failures=5)


def run(coro):
    return asyncio.run(coro)


async def complete(transport, **kwargs):
    async with ChatClient(
        "http://test/v1", "t", transport=transport, policy=kwargs.pop("policy", FAST), **kwargs
    ) as client:
        return await client.complete([{"role": "user", "content": "hi"}]), client.stats


def test_retries_on_429_5xx_timeouts_and_malformed_bodies() -> None:
    transport, calls = scripted(
        [
            httpx.Response(429, headers={"Retry-After": "0"}),
            httpx.Response(503),
            httpx.ReadTimeout("slow"),
            httpx.Response(200, text="not json"),
            httpx.Response(200, json=OK_BODY),
        ]
    )
    completion, stats = run(complete(transport, policy=RetryPolicy(max_retries=5, base_s=0.001, cap_s=0.01)))
    assert completion.text.endswith("the answer is 4.") and completion.attempts == 5
    assert completion.usage["completion_tokens"] == 9
    assert stats.requests == 5 and stats.retries == 4
    assert set(stats.failures_by_reason) == {
        "HTTP 429",
        "HTTP 503",
        "timeout",
        "malformed response (JSONDecodeError)",
    }
    assert calls[0]["model"] == "t" and calls[0]["messages"][0]["content"] == "hi"


def test_gives_up_after_the_retry_limit() -> None:
    transport, calls = scripted([httpx.Response(500)])
    with pytest.raises(RetriesExhausted, match="HTTP 500"):
        run(complete(transport))
    assert len(calls) == 4  # 1 + 3 retries


@pytest.mark.parametrize("status, message", [(401, "refused the API key"), (404, "rejected the request")])
def test_unfixable_errors_fail_at_once(status: int, message: str) -> None:
    transport, calls = scripted([httpx.Response(status, text="model 'x' not found")])
    with pytest.raises(TeacherError, match=message):
        run(complete(transport, api_key="sk-secret"))
    assert len(calls) == 1


def test_the_api_key_never_shows_in_errors(monkeypatch) -> None:
    monkeypatch.setenv("MY_KEY", "sk-very-secret")
    assert api_key_from_env("MY_KEY") == "sk-very-secret"
    transport, _ = scripted([httpx.Response(401)])
    with pytest.raises(TeacherError) as err:
        run(complete(transport, api_key=api_key_from_env("MY_KEY")))
    assert "sk-very-secret" not in str(err.value)
    monkeypatch.delenv("MY_KEY")
    with pytest.raises(TeacherError, match="MY_KEY"):
        api_key_from_env("MY_KEY")


def test_a_server_that_never_answers_ends_the_run() -> None:
    transport, calls = scripted([httpx.ConnectError("refused")])
    with pytest.raises(TeacherError, match="did not answer 5 times in a row"):
        run(
            complete(
                transport,
                policy=RetryPolicy(
                    max_retries=10, base_s=0.001, cap_s=0.01, max_consecutive_connection_failures=5
                ),
            )
        )
    assert len(calls) == 5


def test_request_budget_counts_retries() -> None:
    transport, calls = scripted([httpx.Response(500), httpx.Response(200, json=OK_BODY)])
    with pytest.raises(BudgetExhausted):
        run(complete(transport, max_requests=1))
    assert len(calls) == 1


def questions(n: int):
    return [
        make_example(qid=f"q{i}", question=f"What is {i} + {i}?", rationale=None, answer=str(2 * i))
        for i in range(n)
    ]


def test_generation_stores_every_sample_once_and_resumes(tmp_path: Path) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        q = body["messages"][-1]["content"]
        i = int(q.split("What is ")[1].split(" ")[0])
        return httpx.Response(
            200,
            json={
                **OK_BODY,
                "choices": [
                    {
                        "message": {"content": f"{i} + {i} = {2 * i}. Therefore, the answer is {2 * i}."},
                        "finish_reason": "stop",
                    }
                ],
            },
        )

    async def go(max_requests=None):
        client = ChatClient(
            "http://test/v1",
            "t",
            transport=httpx.MockTransport(handler),
            policy=FAST,
            max_requests=max_requests,
        )
        with RationaleStore(tmp_path / "s.jsonl") as store:
            summary = await generate_rationales(
                questions(5), client, store, GenerationSettings(n_samples=3, concurrency=2), progress=False
            )
            records = list(store)
        await client.aclose()
        return summary, records

    summary, records = run(go(max_requests=7))
    assert summary.budget_exhausted and summary.generated == 7 and summary.left_undone == 8
    summary, records = run(go())
    assert summary.already_stored == 7 and summary.generated == 8 and summary.left_undone == 0
    assert len(records) == 15 == len({(r["qid"], r["sample"]) for r in records})
    first = records[0]
    assert first["teacher"] == "t" and first["prompt_hash"] == TeacherPrompt().hash
    assert first["messages"][-1]["content"].endswith("A: Let's think step by step.")
    assert {"time", "usage", "temperature", "seed", "latency_s"} <= set(first)
    kept, report = filter_rationales(records)
    assert report.kept == 15 and len({e.qid for e in kept}) == 5


def test_filter_keeps_only_correct_answers() -> None:
    records = [
        record("a"),
        record("b", completion="1 + 1 = 3. Therefore, the answer is 3."),
        record("c", completion="I am not sure how to solve this"),
        record("d", completion="Therefore, the answer is 2."),
        record(
            "e", completion="It costs $1,000.50 in total.\nTherefore, the answer is $1,000.50.", gold="1000.5"
        ),
    ]
    kept, report = filter_rationales(records)
    assert [e.qid for e in kept] == ["a", "e"]
    assert report.dropped == {"wrong answer": 1, "no answer found": 1, "only an answer phrase": 1}
    assert kept[0].rationale == "1 + 1 = 2." and kept[0].provenance["teacher"] == "t"
    kept_all, _ = filter_rationales(records, keep_incorrect=True)
    assert {e.qid for e in kept_all} == {"a", "b", "c", "e"}


def test_samples_that_fail_after_retries_count_as_incomplete_and_a_rerun_retries_them(tmp_path: Path) -> None:
    """One question's requests fail every time: its samples are not stored, the summary (and so
    `kpod teacher generate`'s exit status) says the run is incomplete, and a re-run after the
    server recovers generates exactly those."""
    broken = {"on": True}

    def handler(request: httpx.Request) -> httpx.Response:
        q = json.loads(request.content)["messages"][-1]["content"]
        if broken["on"] and "What is 2 " in q:
            return httpx.Response(500, json={"error": "down"})
        return httpx.Response(200, json=OK_BODY)

    async def go():
        client = ChatClient("http://test/v1", "t", transport=httpx.MockTransport(handler), policy=FAST)
        with RationaleStore(tmp_path / "s.jsonl") as store:
            summary = await generate_rationales(
                questions(4), client, store, GenerationSettings(n_samples=2, concurrency=2), progress=False
            )
        await client.aclose()
        return summary

    summary = run(go())
    assert summary.generated == 6 and summary.failed == 2 and summary.left_undone == 0
    assert summary.incomplete == 2
    assert any("2 samples failed after retries: re-run" in line for line in summary.lines())
    broken["on"] = False
    summary = run(go())
    assert summary.already_stored == 6 and summary.generated == 2 and summary.incomplete == 0
