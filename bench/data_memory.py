"""Peak memory of pretraining on a corpus larger than the quickstart's, with and without data.streaming.

A corpus of --megabytes of text (the People's Daily paragraphs, over and over, each copy numbered so that no
two documents are the same) is written to a .txt file; `llmkit pretrain` then trains the tiny recipe's model
--steps steps on it, once reading it into Arrow (the default) and once streamed, each in its own process, with a
small separate validation file (so that both score the same text and the time goes to reading the corpus). The
peak resident memory of each process (its maximum RSS, from the kernel, and the anonymous part of it, polled) and
its wall time are printed, with the ratios, and kept as JSON with --json.

    OMP_NUM_THREADS=1 taskset -c 1 python bench/data_memory.py [--megabytes 200] [--steps 3] [--json memory.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from llmkit.corpora import peoples_daily

POLL = 0.05  # seconds between looks at a process's anonymous memory
TINY_MODEL = ["model.n_layer=1", "model.n_head=2", "model.d_model=32", "model.d_ff=64", "model.max_positions=64",
              "data.block_size=32", "tokenizer.vocab_size=6000", "train.batch_size=8", "train.max_minutes=0",
              "train.eval_every=1000", "train.save_every=1000", "train.eval_batch_size=16", "train.precision=fp32",
              "generate.max_new_tokens=5"]


def write_corpus(path: Path, megabytes: float) -> int:
    """Numbered copies of the corpus's paragraphs, one a line, up to `megabytes`; -> the documents written."""
    paragraphs = [row["text"] for row in peoples_daily()]
    written = documents = 0
    with path.open("w", encoding="utf-8") as file:
        while written < megabytes * 1e6:
            line = f"{documents} {paragraphs[documents % len(paragraphs)]}\n"
            file.write(line)
            written += len(line.encode())
            documents += 1
    return documents


def peak_memory(command: list[str], env: dict) -> dict:
    """Peak memory of a command, which must succeed: its maximum resident set from the kernel (which counts the
    pages of memory-mapped files it read: Arrow files, that the kernel drops first when memory runs short), and
    the largest anonymous part of it (the process's own memory: Python objects, buffers) seen every POLL
    seconds in /proc; in MB, with the wall time."""
    start = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    anonymous = 0.0
    while True:
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            break
        anonymous = max(anonymous, anonymous_mb(process.pid))
        time.sleep(POLL)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status):
        sys.exit(f"{' '.join(command)} failed:\n{process.stderr.read().decode()[-3000:]}")
    return {"peak_rss_mb": round(usage.ru_maxrss / 1024, 1),  # ru_maxrss is in KB on Linux
            "peak_anonymous_mb": round(anonymous, 1), "seconds": round(seconds, 1)}


def anonymous_mb(pid: int) -> float:
    """RssAnon of a running process, in MB (0 once it is gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0.0
    return next((int(line.split()[1]) / 1024 for line in status.splitlines() if line.startswith("RssAnon:")), 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--megabytes", type=float, default=200)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--json", type=Path)
    options = parser.parse_args()

    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        documents = write_corpus(work / "corpus.txt", options.megabytes)
        (work / "validation.txt").write_text("\n".join(row["text"] for row in peoples_daily()[-200:]), encoding="utf-8")
        env = {**os.environ, "LLMKIT_CACHE": str(work / "cache"), "HF_HUB_OFFLINE": "1"}
        results = {}
        for streaming in (False, True):
            settings = [*TINY_MODEL, f"data.source={work / 'corpus.txt'}", f"data.validation_source={work / 'validation.txt'}",
                        f"data.streaming={str(streaming).lower()}", f"train.max_steps={options.steps}",
                        f"run.output_dir={work / 'runs'}", f"run.name=streamed-{streaming}"]
            command = [sys.executable, "-m", "llmkit", "pretrain", "pretrain-zh-tiny",
                       *(arg for setting in settings for arg in ("--set", setting))]
            results["streamed" if streaming else "arrow"] = peak_memory(command, env)
    ratios = {f"{key}_arrow_to_streamed": round(results["arrow"][key] / results["streamed"][key], 2)
              for key in ("peak_rss_mb", "peak_anonymous_mb")}
    report = {"corpus_mb": options.megabytes, "documents": documents, "steps": options.steps, **results, **ratios}
    print(f"corpus: {options.megabytes:g} MB, {documents:,} documents; {options.steps} training steps")
    print(f"{'':10} {'peak RSS':>12} {'of it anonymous':>16} {'wall time':>10}")
    for name, result in results.items():
        print(f"{name:10} {result['peak_rss_mb']:>9,.1f} MB {result['peak_anonymous_mb']:>13,.1f} MB "
              f"{result['seconds']:>9.1f}s")
    print(f"Arrow / streamed: peak RSS {ratios['peak_rss_mb_arrow_to_streamed']:.2f}x, anonymous "
          f"{ratios['peak_anonymous_mb_arrow_to_streamed']:.2f}x")
    if options.json:
        options.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
