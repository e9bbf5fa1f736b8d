"""llama.cpp's llama-server, the server a CPU user would pick instead of ours, on the same load side by side.

    ./dev.sh bench --peers            # the full run plus this suite
    ./dev.sh bench --only peers       # this suite alone (writes bench/out/RESULTS.md)

llama-server (OpenAI-compatible, continuous batching over --parallel slots, runtime LoRA with --lora)
is built once from the llama.cpp source vendored in llama-cpp-python's source package on PyPI
(LLAMA_CPP_PYTHON), with cmake, into LORA_BENCH_CACHE/peers (about 7 minutes on 2 cores); never by
the tests. The benchmark's base model is converted with the vendored converters to GGUF F16 and Q8_0,
and adapter 0 to a GGUF LoRA (bench/gguf_convert.py), also once.

Like for like: the same prompts and token counts (checked: both servers count the same prompt tokens),
greedy with EOS ignored, the same number of threads (llama.cpp's -t and -tb at the cores OpenVINO
uses), as many parallel slots as the widest load. Each pair of runs alternates which server goes
first. What cannot be made equal is in `differs`, written into RESULTS.md.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from bench.artifacts import Artifacts
from bench.ceilings import openvino_threads
from bench.load import LoadResult, http_load
from bench.model import build_once, default_cache
from bench.plan import Figure, Plan, median_pair
from bench.prompts import PromptFactory
from bench.server import Server, free_port, publish, stop

LLAMA_CPP_PYTHON = "0.3.36"  # its vendor/llama.cpp is the peer's source
SENTENCEPIECE = "0.2.3"  # the converter imports it before it looks for a BPE tokenizer
CMAKE_OPTIONS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DGGML_NATIVE=ON",  # -march=native: the CPU features this machine has, as a user building it gets
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",  # it would download the web page
)
HERE = Path(__file__).resolve().parent
DIFFERS = (
    "attention: ours paged (openvino-genai continuous batching, u8 KV cache), llama.cpp's unified KV cache in f16",
    "compute: ours f32 with 16-bit or int8 weights decompressed (the version's pinned numerics); llama.cpp "
    "multiplies F16 weights in f16/f32 and Q8_0 weights with activations quantized to 8 bits",
    "int8: ours NNCF per-channel asymmetric int8; llama.cpp Q8_0, symmetric int8 in blocks of 32 with one f16 scale",
    "runtime LoRA: ours switches adapters per request (the adapter chosen by model name); llama.cpp's --lora "
    "applies the one loaded adapter to every request, so its side never switches",
)


def _log(msg: str) -> None:
    print(f"[bench peers] {msg}", flush=True)


@dataclass(frozen=True)
class LlamaCpp:
    root: Path

    @property
    def server(self) -> Path:
        return self.root / "bin" / "llama-server"

    @property
    def src(self) -> Path:
        return self.root / "src"

    def converter_env(self) -> dict[str, str]:
        paths = [str(self.src), str(self.src / "gguf-py"), str(self.root / "pylib")]
        if os.environ.get("PYTHONPATH"):
            paths.append(os.environ["PYTHONPATH"])
        return dict(os.environ, PYTHONPATH=os.pathsep.join(paths))


def _run(cmd: list[str], log: Path, **kw: Any) -> None:
    with open(log, "ab") as out:
        out.write(f"$ {' '.join(cmd)}\n".encode())
        out.flush()
        subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, check=True, **kw)


def _build(out: Path, log: Path) -> None:
    out.mkdir(parents=True)
    with tempfile.TemporaryDirectory(prefix="llama-cpp-") as tmp:
        _log(f"downloading llama-cpp-python {LLAMA_CPP_PYTHON}'s source package")
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--dest", tmp,
              f"llama-cpp-python=={LLAMA_CPP_PYTHON}"], log)
        (sdist,) = Path(tmp).glob("llama_cpp_python-*.tar.gz")
        with tarfile.open(sdist) as tar:
            tar.extractall(tmp, filter="data")
        shutil.move(Path(tmp) / sdist.name.removesuffix(".tar.gz") / "vendor" / "llama.cpp", out / "src")
        t0 = time.monotonic()
        _log(f"building llama-server with cmake (about 7 minutes on 2 cores; log {log})")
        build = Path(tmp) / "build"
        _run(["cmake", "-S", str(out / "src"), "-B", str(build), *CMAKE_OPTIONS], log)
        _run(["cmake", "--build", str(build), "--target", "llama-server", "-j", str(os.cpu_count() or 1)], log)
        (out / "bin").mkdir()
        shutil.copy2(build / "bin" / "llama-server", out / "bin" / "llama-server")
        _log(f"built in {time.monotonic() - t0:.0f} s")
    _run([sys.executable, "-m", "pip", "install", "--quiet", "--target", str(out / "pylib"),
          f"sentencepiece=={SENTENCEPIECE}"], log)


def ensure_llama_cpp(log: Path) -> LlamaCpp:
    log.parent.mkdir(parents=True, exist_ok=True)
    final = default_cache() / "peers" / f"llama-cpp-python-{LLAMA_CPP_PYTHON}"
    return LlamaCpp(build_once(final, lambda out: _build(out, log)))


@dataclass(frozen=True)
class Ggufs:
    root: Path

    def model(self, outtype: str) -> Path:
        return self.root / f"base-{outtype}.gguf"

    @property
    def adapter(self) -> Path:
        return self.root / "adapter0-f16.gguf"


def _convert(llama: LlamaCpp, out: Path, art: Artifacts, log: Path) -> None:
    out.mkdir(parents=True)
    wrapper = HERE / "gguf_convert.py"
    env = llama.converter_env()
    for outtype in ("f16", "q8_0"):
        _log(f"converting the base to GGUF {outtype}")
        _run([sys.executable, str(wrapper), str(llama.src / "convert_hf_to_gguf.py"), str(art.sources.base),
              "--outtype", outtype, "--outfile", str(out / f"base-{outtype}.gguf")], log, env=env)
    _log("converting adapter 0 to a GGUF LoRA")
    _run([sys.executable, str(wrapper), str(llama.src / "convert_lora_to_gguf.py"), "--base", str(art.sources.base),
          "--outtype", "f16", "--outfile", str(out / "adapter0-f16.gguf"), str(art.sources.adapters[0])],
         log, env=env)


def ensure_ggufs(llama: LlamaCpp, art: Artifacts, log: Path) -> Ggufs:
    final = default_cache() / "peers" / f"gguf-{art.root.name}-{LLAMA_CPP_PYTHON}"
    return Ggufs(build_once(final, lambda out: _convert(llama, out, art, log)))


class LlamaServer:
    """llama-server on a free port with `parallel` slots, as a context manager that waits until it is ready."""

    def __init__(self, llama: LlamaCpp, model: Path, log: Path, *, parallel: int, context: int,
                 lora: Path | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        threads = str(openvino_threads())
        self.cmd = [str(llama.server), "-m", str(model), "--host", "127.0.0.1", "--port", str(self.port),
                    "-t", threads, "-tb", threads, "--parallel", str(parallel), "-c", str(context * parallel),
                    "--no-webui", *(["--lora", str(lora)] if lora else [])]
        self.log_path = log
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> LlamaServer:
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama-server exited with {self.proc.returncode}; see {self.log_path}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.__exit__()
        raise RuntimeError(f"llama-server was not ready within 120 s; see {self.log_path}")

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            stop(self.proc, signal.SIGTERM)
        self._log.close()


def _prompt_tokens(url: str, path: str, model: str, prompt: str) -> tuple[int, str]:
    body = {"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0.0}
    answer = httpx.post(url + path, json=body, timeout=120).json()
    return answer["usage"]["prompt_tokens"], answer["choices"][0]["text"]


@dataclass(frozen=True)
class Case:
    key: str  # fp16, int8, lora
    title: str
    ours: str  # the model name on our server
    gguf: str  # outtype of the peer's model
    lora: bool = False


CASES = (
    Case("fp16", "fp16 IR vs GGUF F16", "base_fp16", "f16"),
    Case("int8", "int8 IR vs GGUF Q8_0", "base_int8", "q8_0"),
    Case("lora", "runtime LoRA (adapter 0 on the fp16 base) vs llama.cpp --lora on F16", "adapter0", "f16", True),
)


def build_repository(art: Artifacts, repository: Path) -> None:
    """The fp16 base twice: plain, and with adapter 0 on it (a base with adapters registered runs its own
    requests slower, which would not be like for like with a GGUF F16 served without a LoRA)."""
    publish(repository, "base_fp16", art.ir("base_fp16"), kind="base")
    publish(repository, "base_int8", art.ir("base_int8"), kind="base")
    publish(repository, "lora_base", art.ir("base_fp16"), kind="base")
    publish(repository, "adapter0", art.sources.adapters[0], kind="adapter", base="lora_base",
            alpha=art.sources.alpha(0))


def measure_peers(
    plan: Plan, art: Artifacts, prompts: PromptFactory, logs: Path
) -> tuple[list[Figure], dict[str, Any]]:
    """Per case and concurrency, `repeats` pairs of runs, ours and llama.cpp's alternating which goes first."""
    llama = ensure_llama_cpp(logs / "llama-cpp-build.log")
    ggufs = ensure_ggufs(llama, art, logs / "gguf-convert.log")
    repository = plan.work / "repo-peers"
    build_repository(art, repository)
    wide = max(plan.concurrencies)
    context = plan.prompt_tokens + plan.max_tokens + 16
    figures: list[Figure] = []
    details: dict[str, Any] = {"differs": list(DIFFERS), "threads": openvino_threads(),
                               "llama_server": {"llama_cpp_python": LLAMA_CPP_PYTHON, "cmake": list(CMAKE_OPTIONS)}}
    with Server(repository, logs / "server-peers.log") as ours:
        for case in CASES:
            gguf = ggufs.model(case.gguf)
            lora = ggufs.adapter if case.lora else None
            with LlamaServer(llama, gguf, logs / f"llama-server-{case.key}.log", parallel=wide, context=context,
                             lora=lora) as theirs:
                probe = prompts.make()
                checked = {
                    "ours": _prompt_tokens(ours.url, "/v3/completions", case.ours, probe),
                    "llama.cpp": _prompt_tokens(theirs.url, "/v1/completions", "peer", probe),
                }
                sides = {
                    "ours": lambda batch, c, model=case.ours: http_load(
                        ours.url, [model], batch, c, plan.max_tokens),
                    "llama.cpp": lambda batch, c: http_load(
                        theirs.url, ["peer"], batch, c, plan.max_tokens, path="/v1/completions", live="/health"),
                }
                for side in sides.values():  # warm: KV cache allocation, kernels, the adapter's first use
                    asyncio.run(side(prompts.batch(2), 2))
                case_details: dict[str, Any] = {"prompt_tokens_and_first_words": checked, "cmd": theirs.cmd}
                for c in plan.concurrencies:
                    runs: dict[str, list[LoadResult]] = {"ours": [], "llama.cpp": []}
                    for r in range(plan.repeats):
                        order = ["ours", "llama.cpp"] if r % 2 == 0 else ["llama.cpp", "ours"]
                        for side in order:
                            runs[side].append(asyncio.run(sides[side](prompts.batch(plan.requests[c]), c)))
                    figures += _figures(case, c, runs, checked)
                    case_details[f"c{c}"] = {k: [x.summary() for x in v] for k, v in runs.items()}
                details[case.key] = case_details
    return figures, details


def _figures(
    case: Case, c: int, runs: dict[str, list[LoadResult]], checked: dict[str, tuple[int, str]]
) -> list[Figure]:
    pairs = list(zip(runs["ours"], runs["llama.cpp"], strict=True))  # each pair ran back to back
    ours_tok, peer_tok = median_pair([(a.tok_s, b.tok_s) for a, b in pairs])
    ours_ttft, peer_ttft = median_pair([(a.ttft_p50 * 1000, b.ttft_p50 * 1000) for a, b in pairs])
    tok, ttft = {"ours": ours_tok, "llama.cpp": peer_tok}, {"ours": ours_ttft, "llama.cpp": peer_ttft}
    failed = {k: sum(x.failed for x in v) for k, v in runs.items()}
    same_prompt = checked["ours"][0] == checked["llama.cpp"][0]
    # A ratio is only a result when both sides did the same work and answered every request.
    fair = same_prompt and not any(failed.values())
    note = "; ".join(
        [f"{n} failed on {k}" for k, n in failed.items() if n]
        + ([] if same_prompt else [f"prompt tokens differ: {checked['ours'][0]} vs {checked['llama.cpp'][0]}"])
    )
    peer = f"llama.cpp llama-server, GGUF {case.gguf.upper()}" + (" + LoRA" if case.lora else "")
    return [
        Figure(f"peers.{case.key}.throughput.c{c}", f"vs llama.cpp, {case.title}: throughput, {c} client(s)",
               tok["ours"], tok["llama.cpp"], "tok/s", peer, ">= 1 (ratio)",
               met=fair and tok["ours"] >= tok["llama.cpp"], note=note),
        Figure(f"peers.{case.key}.ttft.c{c}", f"vs llama.cpp, {case.title}: time to first token (p50), {c} client(s)",
               ttft["ours"], ttft["llama.cpp"], "ms", peer, "<= 1 (ratio)",
               met=fair and ttft["ours"] <= ttft["llama.cpp"], note=note),
    ]


def expected_figures(plan: Plan) -> list[str]:
    return [
        f"peers.{case.key}.{what}.c{c}" for case in CASES for c in plan.concurrencies for what in ("throughput", "ttft")
    ]
