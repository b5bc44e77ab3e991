#!/usr/bin/env python3
"""Peak memory of `moe-edge pack`: runs each binary's pack of one model (in turn, one at a time)
and prints its peak resident set size (the kernel's maxrss of the child), wall time, the source
model's bytes and the expert file's bytes, as one JSON object per binary.

    tools/pack_memory.py --model /tmp/olmoe-s --binary target/release/moe-edge -- --dense int8

`pack` reads one expert (or one dense layer) at a time, so its peak is bounded by the largest
dense matrix, not by the model: compare with an older binary given as a second --binary.
"""
import argparse
import json
import os
import resource
import shutil
import subprocess
import tempfile
import time


def model_bytes(path):
    d = path if os.path.isdir(path) else os.path.dirname(path)
    return sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d) if f.startswith("model.onnx"))


def measure(binary, model, extra):
    out = tempfile.mkdtemp(prefix="moe-edge-pack-memory-")
    target = os.path.join(out, "pack")
    # a fresh Python child per pack: RUSAGE_CHILDREN's maxrss is the largest of all children
    probe = (
        "import resource, subprocess, sys, json\n"
        "subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL)\n"
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
    )
    t0 = time.time()
    run = subprocess.run(["python3", "-c", probe, binary, "pack", model, "-o", target, *extra],
                         capture_output=True, text=True, check=True)
    seconds = time.time() - t0
    peak_kib = int(run.stdout.split()[-1])
    experts = os.path.getsize(os.path.join(target, "experts.bin"))
    shutil.rmtree(out)
    return dict(binary=binary, peak_rss_mib=round(peak_kib / 1024, 1), seconds=round(seconds, 1),
                model_bytes=model_bytes(model), expert_file_bytes=experts)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--binary", action="append", required=True)
    ap.add_argument("pack_args", nargs="*", help="after --: arguments given to pack")
    args = ap.parse_args()
    for b in args.binary:
        print(json.dumps(measure(b, args.model, args.pack_args)), flush=True)


if __name__ == "__main__":
    main()
