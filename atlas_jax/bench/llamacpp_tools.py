"""llama.cpp's own benchmark tools, `llama-bench` and `llama-batched-bench`, as `bench decode`'s
strongest baseline: llama.cpp as it ships, beside the Python-driven rows of `decode_llamacpp`.

- `build_tools(sdist=None, force=False)`: build the two tools ONCE into
  `$ATLAS_CACHE/llamacpp-tools/<version>/` (<version> = the installed llama-cpp-python, pinned in
  pyproject) from the llama.cpp source vendored in that version's sdist (`pip download`, or a file
  given with `--sdist`). Configured as llama-cpp-python's own CPU build (its CMakeLists.txt: Release,
  LLAMA_BUILD_COMMON=ON, GGML_NATIVE left at its default, i.e. -march=native) with the tools on and
  the libraries linked in statically (BUILD_SHARED_LIBS=OFF: two self-contained binaries to stage;
  the same ggml/llama code). Staged in a temporary directory and renamed when complete; an existing
  build is reused. Benchmarks only: never part of the test install.
  `python scripts/build_llamacpp_tools.py [--sdist FILE] [--force]`.
- `find_tools(dir)`: the two binaries in a build directory, or None.
- `llama_bench(...)` / `batched_bench(...)`: run one tool on a GGUF file and parse its output
  (`parse_llama_bench_json`, `parse_batched_bench_jsonl`); each row keeps the exact command line.

AMX: llama.cpp's CPU "extra" buffer types (AMX, repack) are what `export.llamacpp.open_llama`
turns off (use_extra_bufts) for the Python rows; the tools' switch for them is `--repack 0`
(llama-bench) and `--no-repack` (batched-bench, llama.cpp's common args). `EXTRA_BUFTS_OFF`.
Peak RSS is the tool's own (VmHWM while it runs, `_run_tool`), not wait4's, which is the parent's.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from atlas_jax.errors import AtlasError
from atlas_jax.files import DirLock, cache_dir, writable_dir

TOOLS = ("llama-bench", "llama-batched-bench")
BUILD_SCRIPT = "python scripts/build_llamacpp_tools.py"
PACKAGE = "llama-cpp-python"
# llama-cpp-python's CMakeLists.txt for a CPU build (LLAMA_BUILD_COMMON=ON; LLAMA_CURL is gone from
# this llama.cpp), plus the tools; tests, examples, server and HTTPS are not needed for two tools.
CMAKE_FLAGS = ("-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_BUILD_COMMON=ON",
               "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
               "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_OPENSSL=OFF")


class ToolsError(AtlasError):
    pass


def installed_version() -> str:
    try:
        return importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise ToolsError(f"{PACKAGE} is not installed; pip install -e '.[llama-cpp]' (its version names "
                         f"the llama.cpp to build)") from None


def default_dir(version: str | None = None) -> Path:
    """$ATLAS_CACHE/llamacpp-tools/<version>/ (the installed llama-cpp-python's version)."""
    return cache_dir() / "llamacpp-tools" / (version or installed_version())


def find_tools(directory: str | Path) -> dict[str, Path] | None:
    """{tool name: path} when both binaries are in `directory` (or its bin/), else None."""
    directory = Path(directory)
    for d in (directory, directory / "bin"):
        found = {t: d / t for t in TOOLS}
        if all(p.is_file() and os.access(p, os.X_OK) for p in found.values()):
            return found
    return None


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _run(cmd: list[str], what: str, fix: str, cwd: Path | None = None, progress: bool = False) -> None:
    """Run `cmd`; its output goes to a log, progress lines ([ 12%] ...) are echoed when asked."""
    log = tempfile.NamedTemporaryFile("w+", prefix="atlas-lcpp-", suffix=".log", delete=False)
    with log:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                errors="replace")
        last = ""
        for line in proc.stdout:
            log.write(line)
            if progress and line.startswith("[") and "%]" in line[:8]:
                pct = line[:7]
                if pct != last:  # one line per step of progress, not per file
                    _say(f"  {line.rstrip()}")
                    last = pct
        rc = proc.wait()
    if rc != 0:
        with open(log.name, errors="replace") as f:
            tail = " | ".join(ln.strip() for ln in f.read().strip().splitlines()[-3:])
        raise ToolsError(f"{what} failed (exit {rc}; log {log.name}): {tail}; {fix}")
    os.unlink(log.name)


def _check_build_tools() -> str:
    if not shutil.which("cmake"):
        raise ToolsError("cmake not found on PATH; install it (apt-get install cmake, or pip install cmake)")
    cxx = os.environ.get("CXX") or next((c for c in ("c++", "g++", "clang++") if shutil.which(c)), None)
    if not cxx or not shutil.which(cxx.split()[0]):
        raise ToolsError("no C++ compiler found (c++, g++, clang++ or $CXX); install one "
                         "(apt-get install build-essential)")
    return cxx


def _download_sdist(version: str, into: Path) -> Path:
    _say(f"downloading the {PACKAGE}=={version} sdist (pip download) ...")
    _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", f"{PACKAGE}=={version}",
          "-d", str(into)], f"pip download {PACKAGE}=={version}",
         f"check the network, or download it elsewhere and pass {BUILD_SCRIPT} --sdist FILE.tar.gz")
    found = sorted(into.glob("*.tar.gz"))
    if not found:
        raise ToolsError(f"pip download {PACKAGE}=={version}: no .tar.gz in {into}; pass --sdist FILE.tar.gz")
    return found[0]


def _extract_llamacpp(sdist: Path, into: Path) -> Path:
    """vendor/llama.cpp of the sdist, extracted under `into`. -> its source directory."""
    try:
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers() if "/vendor/llama.cpp/" in m.name + "/"
                       and m.name.split("/", 1)[-1].startswith("vendor/llama.cpp")]
            if not members:
                raise ToolsError(f"--sdist {sdist}: no vendor/llama.cpp inside; give the {PACKAGE} source "
                                 f"archive (pip download --no-binary :all: {PACKAGE}==VERSION)")
            tar.extractall(into, members=members, filter="data")
    except (tarfile.TarError, OSError) as e:
        raise ToolsError(f"--sdist {sdist}: cannot read it as a .tar.gz ({e}); download it again") from None
    top = members[0].name.split("/", 1)[0]
    src = into / top / "vendor" / "llama.cpp"
    if not (src / "CMakeLists.txt").is_file():
        raise ToolsError(f"--sdist {sdist}: vendor/llama.cpp has no CMakeLists.txt; download the sdist again")
    return src


def build_tools(sdist: str | Path | None = None, force: bool = False, jobs: int = 2,
                root: str | Path | None = None) -> Path:
    """Build llama-bench and llama-batched-bench into <root>/<version>/ (default root:
    $ATLAS_CACHE/llamacpp-tools) unless already there (`force`: build again). -> that directory."""
    version = installed_version()
    root = writable_dir(Path(root) if root else default_dir(version).parent, "llamacpp-tools")
    dest = root / version
    if find_tools(dest) and not force:
        _say(f"llama.cpp tools for {PACKAGE} {version} already built in {dest} (--force builds again)")
        return dest
    if sdist is not None and not Path(sdist).is_file():
        raise ToolsError(f"--sdist {sdist}: file not found; give the {PACKAGE}-{version} .tar.gz, or leave "
                         f"--sdist out to pip download it")
    cxx = _check_build_tools()
    with DirLock(root, "llamacpp-tools", "another build is running; wait for it"), \
            tempfile.TemporaryDirectory(prefix="atlas-lcpp-build-") as tmp:
        tmp = Path(tmp)
        t0 = time.time()
        sdist = Path(sdist) if sdist else _download_sdist(version, tmp / "sdist")
        if f"-{version}." not in sdist.name and f"-{version}-" not in sdist.name:
            _say(f"note: {sdist.name} does not name version {version} (the installed {PACKAGE}); building it anyway")
        _say(f"extracting vendor/llama.cpp from {sdist.name} ...")
        src = _extract_llamacpp(sdist, tmp / "src")
        build = tmp / "build"
        configure = ["cmake", "-S", str(src), "-B", str(build), *CMAKE_FLAGS]
        _say("configuring: " + shlex.join(configure))
        _run(configure, "cmake configure", "read the log; a missing compiler or cmake < 3.14 is the usual cause")
        compile_cmd = ["cmake", "--build", str(build), "--target", *TOOLS, f"-j{jobs}"]
        _say(f"building {' and '.join(TOOLS)} with -j{jobs} (several minutes on 2 cores): " + shlex.join(compile_cmd))
        _run(compile_cmd, "cmake --build", "read the log", progress=True)
        built = find_tools(build)
        if not built:
            raise ToolsError(f"cmake --build finished but {', '.join(TOOLS)} are not in {build}/bin; read the log")
        stage = Path(tempfile.mkdtemp(prefix=f".{version}.tmp-", dir=root))
        for name, path in built.items():
            shutil.copy2(path, stage / name)
        info = {"package": PACKAGE, "version": version, "sdist": sdist.name,
                "sdist_sha256": hashlib.sha256(sdist.read_bytes()).hexdigest(), "cmake": configure[5:],
                "build": compile_cmd[3:], "cxx": cxx, "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "minutes": round((time.time() - t0) / 60, 1)}
        (stage / "build-info.json").write_text(json.dumps(info, indent=1) + "\n")
        if dest.exists():  # --force: the old build moves aside, then goes
            old = Path(tempfile.mkdtemp(prefix=f".{version}.old-", dir=root))
            os.replace(dest, old / version)
            shutil.rmtree(old)
        os.replace(stage, dest)
    _say(f"built {', '.join(TOOLS)} in {dest} ({info['minutes']} min)")
    return dest


def build_cli(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="build_llamacpp_tools.py", description=__doc__.split("\n")[0])
    p.add_argument("--sdist", help=f"a {PACKAGE} source .tar.gz already downloaded (default: pip download it)")
    p.add_argument("--force", action="store_true", help="build again even when the tools are there")
    p.add_argument("--jobs", type=int, default=2, help="parallel compile jobs (default 2)")
    p.add_argument("--dir", help="the root to build into (default: $ATLAS_CACHE/llamacpp-tools)")
    args = p.parse_args(argv)
    dest = build_tools(args.sdist, args.force, args.jobs, args.dir)
    print(dest)
    return 0


# --------------------------------------------------------------------------- running the tools
# Both tools run with llama.cpp's defaults (KV cache f16, flash attention auto, n_batch 2048 /
# n_ubatch 512, extra buffer types on) except the sizes, the threads and the output format. If a
# run dies of a signal (the AMX extra-buffer crash `open_llama` works around), it is run again with
# the extra buffers off, and the row says so.
# llama-batched-bench prints its results through llama.cpp's asynchronous logger, which is leaked on
# purpose at exit (common/log.cpp, common_log_main: "may cause logs to be lost", llama.cpp #22142):
# a short run can end before its last lines are written. Such a run is repeated (3 at most).
LOST_LINES = "llama.cpp's logger can drop a run's last lines at exit"
FLASH_ATTN = {-1: "auto", 0: "off", 1: "on"}  # llama_flash_attn_type, as both tools print it
EXTRA_BUFTS_OFF = {"llama-bench": ["--repack", "0"], "llama-batched-bench": ["--no-repack"]}


def not_built_row(directory: Path) -> dict:
    return {"skipped": f"llama.cpp tools not built in {directory}; run {BUILD_SCRIPT} (or pass --llamacpp-tools DIR)"}


def parse_llama_bench_json(text: str) -> dict:
    """llama-bench -o json (a JSON list, one object per test) -> {"pp": test, "tg": test}: the test
    with n_prompt > 0 is prompt processing, the one with n_gen > 0 generation (tokens/s: avg_ts)."""
    start = text.find("[")
    tests = json.loads(text[start:text.rindex("]") + 1]) if start >= 0 else []
    out = {}
    for t in tests:
        kind = "pp" if t.get("n_prompt", 0) > 0 and t.get("n_gen", 0) == 0 else \
            "tg" if t.get("n_gen", 0) > 0 and t.get("n_prompt", 0) == 0 else None
        if kind:
            out[kind] = t
    if set(out) != {"pp", "tg"}:
        raise ValueError(f"llama-bench -o json: expected a pp and a tg test, got {sorted(out) or 'none'}")
    return out


def parse_batched_bench_jsonl(text: str) -> list[dict]:
    """llama-batched-bench --output-format jsonl: one JSON object per (pp, tg, pl) line (keys pp, tg,
    pl, t_pp, speed_pp = S_PP t/s, t_tg, speed_tg = S_TG t/s, ...); other lines (llama.cpp's log) are skipped."""
    rows = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{") and '"speed_pp"' in line:
            rows.append(json.loads(line))
    if not rows:
        raise ValueError("llama-batched-bench --output-format jsonl: no result line in its output")
    return rows


def _run_tool(cmd: list[str]) -> tuple[int, str, str, float]:
    """(exit code, negative for a signal; stdout; stderr; the tool's peak RSS in MiB).
    The peak is VmHWM of /proc/<pid>/status, read every 20 ms while the tool runs (it only grows, so
    the last read misses at most the final 20 ms): wait4's ru_maxrss would be the Python parent's,
    which Linux carries over as an exec'd child's high-water mark (about 340 MiB here, for a tool
    that peaks at 12)."""
    from atlas_jax.bench.common import status_mib

    peak = 0.0
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL)  # returns after exec
        while proc.poll() is None:
            try:
                peak = max(peak, status_mib("VmHWM", proc.pid))
            except OSError:  # exited between poll and read
                pass
            time.sleep(0.02)
        out.seek(0)
        err.seek(0)
        return proc.returncode, out.read().decode(errors="replace"), err.read().decode(errors="replace"), peak


def _run_with_fallback(tool: str, cmd: list[str]) -> tuple[str, str, float, list[str], str]:
    """Run; if it dies of a signal, again with the extra buffer types off.
    -> (stdout, stderr, peak RSS MiB, the command that gave them, the extra-buffers note)."""
    import signal

    rc, out, err, rss = _run_tool(cmd)
    note = "on (llama.cpp's default)"
    if rc < 0:
        name = signal.Signals(-rc).name
        cmd = cmd + EXTRA_BUFTS_OFF[tool]
        rc, out, err, rss = _run_tool(cmd)
        note = f"off ({' '.join(EXTRA_BUFTS_OFF[tool])}): the default run died of {name}"
    if rc != 0:
        tail = " | ".join(ln.strip() for ln in (err or out).strip().splitlines()[-3:])
        raise RuntimeError(f"{tool} exited {rc}: {tail}")
    return out, err, rss, cmd, note


def llama_bench(binary: Path, gguf: str, prompt_len: int, new_tokens: int, reps: int, threads: int) -> dict:
    """llama-bench: pp<prompt_len> and tg<new_tokens> at batch 1 (one sequence), -r reps.
    -> {"results": {"batch_1": {prefill_tokens_per_s, decode_tokens_per_s, ...}}, "command": ...}."""
    cmd = [str(binary), "-m", gguf, "-p", str(prompt_len), "-n", str(new_tokens), "-r", str(reps),
           "-t", str(threads), "-o", "json"]
    out, err, rss, cmd, note = _run_with_fallback("llama-bench", cmd)
    tests = parse_llama_bench_json(out)
    pp, tg = tests["pp"], tests["tg"]
    kv = pp["type_k"] if pp["type_k"] == pp["type_v"] else f"K {pp['type_k']}, V {pp['type_v']}"
    row = {"prefill_tokens_per_s": pp["avg_ts"], "decode_tokens_per_s": tg["avg_ts"],
           "prefill_samples_ts": pp.get("samples_ts"), "decode_samples_ts": tg.get("samples_ts"),
           "peak_rss_mib": round(rss, 1)}
    return {"results": {"batch_1": row}, "command": shlex.join(cmd), "kv_cache": kv,
            "flash_attn": FLASH_ATTN.get(pp.get("flash_attn"), pp.get("flash_attn")), "n_batch": pp.get("n_batch"),
            "n_ubatch": pp.get("n_ubatch"),
            "extra_bufts": note, "build_commit": pp.get("build_commit"), "peak_rss_mib": round(rss, 1),
            "note": "pp and tg are separate tests; tg starts from an empty context (llama-bench's default depth 0)"}


def batched_bench(binary: Path, gguf: str, prompt_len: int, new_tokens: int, batches: list[int], reps: int,
                  threads: int) -> dict:
    """llama-batched-bench, one run per batch size B (its own peak RSS): B sequences of prompt_len
    tokens, then new_tokens decode steps of B tokens; -npl B repeated 1 + reps times, the first
    dropped as warm-up, median of the rest (a run missing result lines is repeated: LOST_LINES).
    S_PP -> prefill tokens/s, S_TG -> decode tokens/s."""
    import statistics

    res: dict = {"results": {}, "commands": {}}
    for b in batches:
        cmd = [str(binary), "-m", gguf, "-c", str(b * (prompt_len + new_tokens)), "-npp", str(prompt_len),
               "-ntg", str(new_tokens), "-npl", ",".join([str(b)] * (1 + reps)), "-t", str(threads),
               "-tb", str(threads), "--output-format", "jsonl"]
        for attempt in range(1, 4):  # its last lines can be lost at exit (see LOST_LINES)
            out, err, rss, cmd, note = _run_with_fallback("llama-batched-bench", cmd)
            lines = [r for r in out.splitlines() + err.splitlines() if '"speed_pp"' in r]
            lines = [r for r in parse_batched_bench_jsonl("\n".join(lines)) if r["pl"] == b] if lines else []
            if len(lines) == 1 + reps:
                break
        if not lines:
            raise RuntimeError(f"llama-batched-bench -npl {b}: no result line in 3 runs ({LOST_LINES})")
        timed = lines[1:] or lines
        res["results"][f"batch_{b}"] = {
            "prefill_tokens_per_s": statistics.median(r["speed_pp"] for r in timed),
            "decode_tokens_per_s": statistics.median(r["speed_tg"] for r in timed),
            "prefill_samples_ts": [r["speed_pp"] for r in lines], "decode_samples_ts": [r["speed_tg"] for r in lines],
            "peak_rss_mib": round(rss, 1)}
        res["commands"][f"batch_{b}"] = shlex.join(cmd)
        res["results"][f"batch_{b}"]["runs"] = attempt
        res.update(kv_cache="f16 (llama.cpp's -ctk/-ctv default, not passed)",
                   flash_attn=FLASH_ATTN.get(lines[0].get("flash_attn"), lines[0].get("flash_attn")),
                   n_batch=lines[0].get("n_batch"),
                   n_ubatch=lines[0].get("n_ubatch"), extra_bufts=note)
    res["command"] = " ; ".join(res["commands"].values())
    res["peak_rss_mib"] = max(r["peak_rss_mib"] for r in res["results"].values())
    return res


def tool_rows(directory: Path | None, gguf: str, prompt_len: int, new_tokens: int, batches: list[int], reps: int,
              threads: int) -> dict[str, dict]:
    """{"llama-bench": row, "llama-batched-bench": row} for one GGUF file; a tool that fails is its
    row's one-line "error", tools not built are a one-line "skipped" each."""
    directory = Path(directory) if directory else default_dir()
    found = find_tools(directory)
    if not found:
        return {t: not_built_row(directory) for t in TOOLS}
    rows = {}
    for tool, run in (("llama-bench", lambda: llama_bench(found["llama-bench"], gguf, prompt_len, new_tokens, reps,
                                                          threads)),
                      ("llama-batched-bench", lambda: batched_bench(found["llama-batched-bench"], gguf, prompt_len,
                                                                    new_tokens, batches, reps, threads))):
        try:
            rows[tool] = run()
        except (RuntimeError, ValueError, KeyError, OSError) as e:
            rows[tool] = {"error": " ".join(str(e).split())}
    return rows
