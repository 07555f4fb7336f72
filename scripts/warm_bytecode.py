"""Write the bytecode of the third-party modules kpod imports, and only those (`make setup`).

Why: where `PYTHONDONTWRITEBYTECODE` is set (as on the machines this project is developed on), Python never
caches what it compiles, so a module without bytecode from the install is compiled again at every
import: seconds per process for transformers and the rest. Compiling every installed file instead
(uv's `--compile-bytecode`) compiles about 18,000 files, of which a `make demo` run reads about 4,400
(BENCHMARKS.md, "Issue #21, session 31"). This script imports what kpod imports, in two processes,
with bytecode writing switched on for them alone, so the files written are the ones a run reads.

A module left out is not an error: it is compiled at import, as any module without bytecode is. A
name that no longer imports (a package renamed a module) is reported and skipped, not fatal;
`tests/test_setup.py` imports every entry, so that such a drift is seen.
torch's own files are compiled whole by the Makefile (`compileall`): kpod's tests reach far into it
(dynamo, inductor).
"""

import importlib
import subprocess
import sys
import warnings

# Entries are "module" or "module:name,name" (names read from the module, which is how
# transformers' lazily imported classes are loaded). Two groups, one process each: the first is
# everything that stands on torch and transformers, the second what does not.
GROUPS: dict[str, list[str]] = {
    "transformers": [
        "transformers:AutoConfig,AutoModel,AutoModelForCausalLM,AutoModelForSeq2SeqLM,AutoTokenizer,"
        "GgufConfig,DynamicCache,StoppingCriteriaList,TextIteratorStreamer,get_scheduler",
        "transformers.cache_utils",
        "transformers.models.llama.modeling_llama",
        "transformers.models.llama.tokenization_llama",
        "transformers.models.t5.modeling_t5",
        "transformers.modeling_gguf_pytorch_utils",
        "transformers.integrations.ggml",
        "transformers.integrations.gguf.gguf_config_mapping",
        "peft:LoraConfig,PeftModel,TaskType,get_peft_model",
        "peft.utils.transformers_weight_conversion",
        "accelerate:Accelerator",
        "accelerate.utils",
        "safetensors.torch",
        "torch.utils.tensorboard:SummaryWriter",
        "datasets",
        "trl:SFTTrainer",
    ],
    "other": [
        "reasoning_gym",
        "reasoning_gym.arithmetic.gsm_symbolic.generators_00_49",
        "reasoning_gym.arithmetic.gsm_symbolic.generators_50_99",
        "sklearn.cluster",
        "sklearn.metrics",
        "matplotlib.pyplot",
        "matplotlib.backends.backend_agg",
        "gguf",
        "httpx",
        "yaml",
        "tqdm.auto",
        "pytest",
        "hypothesis.strategies",
        "openai:OpenAI,AuthenticationError",
    ],
}


def import_entry(entry: str) -> None:
    """Import one entry ("module" or "module:name,name"); raises what the import raises."""
    module_name, _, names = entry.partition(":")
    module = importlib.import_module(module_name)
    for name in filter(None, names.split(",")):
        getattr(module, name)


def warm(entries: list[str]) -> int:
    """Import each entry with bytecode writing on; return how many failed (each reported)."""
    sys.dont_write_bytecode = False
    failed = 0
    with warnings.catch_warnings():
        # Some packages' sources draw SyntaxWarnings when compiled (reasoning-gym's cellpylib).
        warnings.simplefilter("ignore", SyntaxWarning)
        for entry in entries:
            try:
                import_entry(entry)
            except Exception as error:  # a drifted name must not fail the set-up
                print(f"warm_bytecode: {entry}: {type(error).__name__}: {error}", file=sys.stderr)
                failed += 1
    return failed


def main(argv: list[str]) -> int:
    if argv:
        warm([entry for group in argv for entry in GROUPS[group]])
        return 0  # failures are reported above; the set-up goes on
    processes = [subprocess.Popen([sys.executable, __file__, group]) for group in GROUPS]
    return max(process.wait() for process in processes)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
