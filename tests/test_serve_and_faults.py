"""Generation against a real server process (`kpod serve` with a tiny model) on 127.0.0.1:
injected faults, a server killed and restarted mid-run, and a generator killed with SIGKILL."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kpod.data.synthetic import arithmetic_examples
from kpod.io import write_jsonl

KPOD = [sys.executable, "-m", "kpod.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(
    model: Path, port: int, *extra: str, env: dict | None = None, stderr: int = subprocess.DEVNULL
) -> subprocess.Popen:
    proc = subprocess.Popen(
        [*KPOD, "serve", str(model), "--port", str(port), "--model-id", "tiny", *extra],
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        env=env,
    )
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return proc
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError("kpod serve exited early") from None
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("kpod serve did not start")


def stop(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.wait(timeout=10)


@pytest.fixture
def data_file(tmp_path: Path) -> Path:
    path = tmp_path / "questions.jsonl"
    write_jsonl(path, [e.to_dict() for e in arithmetic_examples(30, seed=7)])
    return path


def generate_cmd(data: Path, store: Path, port: int, n: int = 2, *extra: str) -> list[str]:
    return [
        *KPOD,
        "teacher",
        "generate",
        str(data),
        "--base-url",
        f"http://127.0.0.1:{port}/v1",
        "--model",
        "tiny",
        "--store",
        str(store),
        "-n",
        str(n),
        "--max-tokens",
        "24",
        "--concurrency",
        "3",
        "--quiet",
        *extra,
    ]


def check_store(store: Path, n_expected: int) -> None:
    lines = store.read_text().splitlines()
    records = [json.loads(line) for line in lines]  # every line is valid JSON
    keys = [(r["qid"], r["teacher"], r["prompt_hash"], r["sample"]) for r in records]
    assert len(keys) == len(set(keys)), "duplicate records"
    assert len(keys) == n_expected, f"{len(keys)} records, expected {n_expected}"


def test_openai_client_talks_to_kpod_serve(tiny_causal: Path) -> None:
    openai = pytest.importorskip("openai")
    port = free_port()
    env = dict(os.environ, SERVE_KEY="sk-test")
    server = start_server(tiny_causal, port, "--api-key-env", "SERVE_KEY", env=env)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-test", max_retries=0)
        assert [m.id for m in client.models.list()] == ["tiny"]
        reply = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "What is 2 + 2?"}], max_tokens=8
        )
        assert reply.choices[0].finish_reason in ("stop", "length")
        assert reply.usage.completion_tokens <= 8 and reply.usage.prompt_tokens > 0
        stream = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "What is 2 + 2?"}], max_tokens=8, stream=True
        )
        chunks = list(stream)
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
        assert chunks[-1].choices[0].finish_reason == "stop"
        # Greedy decoding: the stream spells out the same text as the plain reply.
        assert streamed == reply.choices[0].message.content
        bad = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}])
    finally:
        stop(server)


def test_generation_survives_injected_faults(tiny_causal: Path, data_file: Path, tmp_path: Path) -> None:
    port = free_port()
    server = start_server(tiny_causal, port, "--inject-faults", "0.3")
    store = tmp_path / "store.jsonl"
    try:
        proc = subprocess.run(
            generate_cmd(data_file, store, port), capture_output=True, text=True, timeout=300
        )
    finally:
        stop(server)
    assert proc.returncode == 0, proc.stderr
    check_store(store, 60)
    retries = int(proc.stdout.split(" retries)")[0].rsplit("(", 1)[1])
    assert retries > 5, proc.stdout  # about 30 % of requests failed and were retried


def test_server_killed_and_restarted_mid_run(tiny_causal: Path, data_file: Path, tmp_path: Path) -> None:
    port = free_port()
    server = start_server(tiny_causal, port)
    store = tmp_path / "store.jsonl"
    gen = subprocess.Popen(
        # More retries than the default 6 (about 16 s of backoff): a loaded machine can take longer
        # to restart the server, and a sample that runs out of retries is skipped.
        generate_cmd(data_file, store, port, 3, "--max-retries", "12"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 120
        while (not store.exists() or len(store.read_text().splitlines()) < 15) and time.time() < deadline:
            time.sleep(0.05)
        stop(server)  # SIGKILL: requests in flight see dropped connections
        n_at_kill = len(store.read_text().splitlines())
        time.sleep(1.0)
        server = start_server(tiny_causal, port)
        out, err = gen.communicate(timeout=300)
    finally:
        stop(server)
        if gen.poll() is None:
            gen.kill()
    assert gen.returncode == 0, err
    assert n_at_kill < 90, "the run finished before the server was killed; the test proved nothing"
    check_store(store, 90)


def test_generator_killed_with_sigkill_leaves_a_valid_store(
    tiny_causal: Path, data_file: Path, tmp_path: Path
) -> None:
    port = free_port()
    server = start_server(tiny_causal, port)
    store = tmp_path / "store.jsonl"
    rng = random.Random()
    try:
        for _ in range(2):
            gen = subprocess.Popen(
                generate_cmd(data_file, store, port, 3), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            # Kill at a random moment once generation has started writing.
            deadline = time.time() + 120
            while not store.exists() and time.time() < deadline:
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 1.0))
            gen.send_signal(signal.SIGKILL)
            gen.wait()
            lines = store.read_text().splitlines()
            assert all(json.loads(line) for line in lines)  # valid JSONL right after the kill
            assert store.read_bytes().endswith(b"\n") or not lines
        proc = subprocess.run(
            generate_cmd(data_file, store, port, 3), capture_output=True, text=True, timeout=300
        )
    finally:
        stop(server)
    assert proc.returncode == 0, proc.stderr
    check_store(store, 90)
    assert "already stored" in proc.stdout


def test_a_local_model_as_teacher_uses_the_same_store(tiny_causal: Path, tmp_path: Path) -> None:
    import asyncio

    from kpod.teacher.generate import GenerationSettings, generate_rationales
    from kpod.teacher.local import LocalTeacher
    from kpod.teacher.store import RationaleStore

    teacher = LocalTeacher(str(tiny_causal))
    questions = arithmetic_examples(4, seed=3)
    settings = GenerationSettings(n_samples=2, temperature=0.8, max_tokens=12, concurrency=2)
    with RationaleStore(tmp_path / "store.jsonl") as store:
        first = asyncio.run(generate_rationales(questions, teacher, store, settings, progress=False))
        again = asyncio.run(generate_rationales(questions, teacher, store, settings, progress=False))
        records = list(store)
    assert first.generated + sum(first.skipped.values()) == 8
    assert again.generated == 0 and again.already_stored == first.generated
    assert all(r["teacher"] == str(tiny_causal) and r["usage"]["completion_tokens"] <= 12 for r in records)
    # Sampling with a per-sample seed: the two samples of a question differ.
    by_q: dict[str, list[str]] = {}
    for r in records:
        by_q.setdefault(r["qid"], []).append(r["completion"])
    assert any(len(set(v)) > 1 for v in by_q.values())


def test_a_second_generator_on_the_same_store_is_refused(tiny_causal: Path, tmp_path: Path) -> None:
    """Two real `kpod teacher generate` on one store: the second stops at once (exit 2, naming the
    first's PID) and writes nothing; the store ends with every (question, sample) once, and the
    server was asked each of them once."""
    data = tmp_path / "questions.jsonl"
    write_jsonl(data, [e.to_dict() for e in arithmetic_examples(6, seed=3)])
    port = free_port()
    server = start_server(tiny_causal, port, "--inject-delay", "0.7", "--access-log", stderr=subprocess.PIPE)
    store = tmp_path / "store.jsonl"
    first = second = None
    try:
        deadline = time.time() + 60
        cmd = generate_cmd(data, store, port, 1)
        cmd[cmd.index("--concurrency") + 1] = "1"
        first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        while (not store.exists() or not store.read_text()) and time.time() < deadline:
            time.sleep(0.05)
        assert first.poll() is None, "the first generator finished before the second started"
        second = subprocess.run(
            [*cmd, "--out", str(tmp_path / "second.jsonl")], capture_output=True, text=True, timeout=120
        )
        assert first.poll() is None, "the first generator finished before the second was refused"
        out, err = first.communicate(timeout=120)
    finally:
        for proc in (first, server):
            if proc is not None and proc.poll() is None:
                proc.kill()
        server.wait()
    assert second.returncode == 2, second.stderr
    assert f"{store} is being written by process {first.pid}" in second.stderr
    assert "Traceback" not in second.stderr and not (tmp_path / "second.jsonl").exists()
    assert first.returncode == 0, err
    check_store(store, 6)
    requests = [line for line in server.stderr.read().splitlines() if "POST /v1/chat/completions" in line]
    assert len(requests) == 6, requests
