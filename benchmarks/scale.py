#!/usr/bin/env python
"""compeft at scale: the README's CLI commands on a sharded Llama-shaped bf16 checkpoint of >= 1B parameters.

    python benchmarks/scale.py                          # ~1.1B params (TinyLlama shape), 3 fine-tunes, every case
    python benchmarks/scale.py --params 6.74e9 --finetunes 1 --no-library   # the 7B case (Llama-2-7B: 32 layers)
    python benchmarks/scale.py --quick                  # ~49M params, 2 shards, smoke run (2-3 minutes here)
    python benchmarks/scale.py --workdir DIR --keep     # keep the checkpoints and outputs

What it does (see ``benchmarks/README.md``, "Scale"):

1. writes a base checkpoint with safetensors, shard by shard (``model-0000i-of-0000N.safetensors``,
   greedy sharding at ``--shard-size``, 2 GB by default, at least 2 shards), with real Llama names
   and shapes, a real ``LlamaConfig`` (``config.json``) and ``model.safetensors.index.json``;
   weights N(0, 0.02) (norms 1 + N(0, 0.02)), one seeded generator per tensor;
2. writes ``--finetunes`` fine-tunes = base + Student-t(df=3) x ``--delta-rel`` x RMS(base tensor) on
   every tensor, added in float32 and rounded once to bf16, with the base's sharding, one tensor
   (in row chunks) at a time so that memory stays bounded;
3. runs each case in its own subprocess with the package's ``compeft`` CLI and default options
   (``compress``, ``inspect --json``, ``verify``, ``decompress --base``, ``merge --method ties
   --base``, ``library build --workers W``), and the references: ``safetensors.torch.load_file`` of
   every base shard in a fresh process (kept: the whole base in memory, skipped when it is more than
   half the free memory; dropped: one shard at a time), the write floor (``load_file`` +
   ``save_file`` + fsync of every shard) and the interpreter start-up with the imports; wall time,
   the case's peak RSS (``os.wait4``'s ``ru_maxrss`` in a small launcher process: the largest single
   process of the tree) and the peaks of the whole process tree's RSS, anonymous and file-backed
   memory, sampled every 0.25 s from ``/proc/PID/status`` (Dask workers are summed in);
4. checks every output: ``restored/`` and ``merged/`` load with
   ``AutoModelForCausalLM.from_pretrained`` (below 3B parameters; above, ``safe_open`` of every
   tensor against the base's shapes and dtypes), and sampled tensors of ``restored/`` equal
   base + the decoded expert (``compeft.open(f).to_dense``) bit for bit.

Prints a table and writes JSON to ``benchmarks/results/<date>-<commit>-scale[-7b|-quick].json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import torch
from safetensors import safe_open
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import fmt_b, git_info, machine_info, table_row, versions, write_report  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
GiB = 1 << 30
MiB = 1 << 20
INDEX = "model.safetensors.index.json"
CHUNK = 1 << 24  # elements generated at a time (64 MB of float32 per temporary)

# Llama families: (hidden, intermediate, heads, kv heads, vocab). The layer count is chosen to hit --params.
FAMILIES = [
    (3e8, dict(hidden_size=512, intermediate_size=1408, num_attention_heads=8, num_key_value_heads=8, vocab_size=32000)),
    # TinyLlama-1.1B's shape (22 layers give 1.10B parameters)
    (3e9, dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=32, num_key_value_heads=4, vocab_size=32000)),
    # Llama-2-7B's shape (32 layers give 6.74B parameters)
    (math.inf, dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                    vocab_size=32000)),
]


# ---------------------------------------------------------------------------------------------
# the checkpoint


def llama_shapes(cfg: dict[str, Any]) -> list[tuple[str, tuple[int, ...]]]:
    """Tensor names and shapes in the order of LlamaForCausalLM's state_dict (untied lm_head)."""
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    head_dim = h // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * head_dim
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (v, h))]
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        out += [(p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, h)),
                (p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
                (p + "mlp.down_proj.weight", (h, i)),
                (p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,))]
    out += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
    return out


def numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def llama_config(params: float) -> dict[str, Any]:
    fam = next(f for limit, f in FAMILIES if params < limit)
    one = llama_shapes({**fam, "num_hidden_layers": 1})
    zero = llama_shapes({**fam, "num_hidden_layers": 0})
    fixed = sum(numel(s) for _, s in zero)
    per_layer = sum(numel(s) for _, s in one) - fixed
    layers = max(1, round((params - fixed) / per_layer))
    return {**fam, "num_hidden_layers": layers}


def plan_shards(shapes: list[tuple[str, tuple[int, ...]]], max_bytes: int) -> list[list[str]]:
    """Greedy in state_dict order, like transformers' shard_checkpoint: a new shard when the next
    tensor would overflow ``max_bytes`` (a tensor larger than that gets a shard of its own)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes:
        b = numel(shape) * 2
        if shards[-1] and size + b > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += b
    return shards


def shard_files(n: int) -> list[str]:
    return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def _gen(seed: list[int]) -> torch.Generator:
    s = 0
    for x in seed:  # a stable 63-bit mix of the seed list
        s = (s * 1_000_003 + x + 1) % (1 << 63)
    return torch.Generator().manual_seed(s)


def base_tensor(name: str, shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    out = torch.empty(shape, dtype=torch.bfloat16)
    flat = out.view(-1)
    for start in range(0, flat.numel(), CHUNK):
        n = min(CHUNK, flat.numel() - start)
        x = torch.randn(n, generator=g).mul_(0.02)
        if name.endswith("norm.weight"):
            x.add_(1.0)
        flat[start:start + n] = x
    return out


def student_t3(n: int, g: torch.Generator) -> torch.Tensor:
    """Student-t with 3 degrees of freedom: Z / sqrt(chi2_3 / 3), chi2_3 a sum of 3 squared normals."""
    z = torch.randn(n, generator=g)
    c = torch.randn(3, n, generator=g).square_().sum(0).div_(3.0).sqrt_()
    return z.div_(c)


def finetune_tensor(base: torch.Tensor, rel: float, g: torch.Generator) -> torch.Tensor:
    """base + t3 * rel * RMS(base), added in float32 and rounded once to bf16."""
    flat_b = base.reshape(-1)
    rms = float(flat_b.float().square().mean().sqrt()) if flat_b.numel() <= CHUNK else \
        math.sqrt(sum(float(flat_b[s:s + CHUNK].float().square().sum()) for s in range(0, flat_b.numel(), CHUNK))
                  / flat_b.numel())
    out = torch.empty_like(base)
    flat = out.view(-1)
    for start in range(0, flat.numel(), CHUNK):
        n = min(CHUNK, flat.numel() - start)
        d = student_t3(n, g).mul_(rel * rms)
        flat[start:start + n] = d.add_(flat_b[start:start + n].float())
    return out


def write_base(root: Path, cfg: dict[str, Any], max_shard: int, seed: int, log) -> dict[str, Any]:
    from transformers import LlamaConfig
    shapes = llama_shapes(cfg)
    shape_of = dict(shapes)
    index_of = {name: i for i, (name, _) in enumerate(shapes)}
    shards = plan_shards(shapes, max_shard)
    files = shard_files(len(shards))
    root.mkdir(parents=True, exist_ok=True)
    LlamaConfig(**cfg, max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=False,
                torch_dtype="bfloat16").to_json_file(str(root / "config.json"))
    total = sum(numel(s) for _, s in shapes)
    weight_map = {n: f for names, f in zip(shards, files) for n in names}
    (root / INDEX).write_text(json.dumps({"metadata": {"total_size": total * 2}, "weight_map": weight_map}, indent=2))
    for names, f in zip(shards, files):
        t0 = time.perf_counter()
        tensors = {n: base_tensor(n, shape_of[n], _gen([seed, 0, index_of[n]])) for n in names}
        save_file(tensors, str(root / f), metadata={"format": "pt"})
        log(f"  base {f}: {len(names)} tensors, {fmt_b((root / f).stat().st_size)} in {time.perf_counter() - t0:.1f} s")
        del tensors
    return {"shards": files, "tensors": len(shapes), "params": total}


def write_finetune(base: Path, out: Path, ft: int, rel: float, seed: int, log) -> None:
    index = json.loads((base / INDEX).read_text())
    out.mkdir(parents=True, exist_ok=True)
    for item in base.iterdir():
        if item.suffix == ".json":
            shutil.copy2(item, out / item.name)
    names = list(index["weight_map"])
    index_of = {n: i for i, n in enumerate(names)}
    for f in sorted(set(index["weight_map"].values())):
        t0 = time.perf_counter()
        tensors = {}
        with safe_open(str(base / f), framework="pt") as h:
            for n in h.keys():
                tensors[n] = finetune_tensor(h.get_tensor(n), rel, _gen([seed, ft + 1, index_of[n]]))
        save_file(tensors, str(out / f), metadata={"format": "pt"})
        log(f"  ft{ft + 1} {f}: {fmt_b((out / f).stat().st_size)} in {time.perf_counter() - t0:.1f} s")
        del tensors


# ---------------------------------------------------------------------------------------------
# measuring one command in its own process


def tree_rss(proc: psutil.Process) -> dict[str, int]:
    """RSS of the process tree, summed, split as /proc/PID/status does: anonymous memory (the heap:
    what the process really needs) and file-backed pages (mapped files, e.g. safetensors' mmap: page
    cache the kernel can drop)."""
    total = {"rss": 0, "anon": 0, "file": 0}
    try:
        procs = [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return total
    for p in procs:
        try:
            for line in Path(f"/proc/{p.pid}/status").read_text().splitlines():
                key, _, value = line.partition(":")
                if key in ("VmRSS", "RssAnon", "RssFile"):
                    total[{"VmRSS": "rss", "RssAnon": "anon", "RssFile": "file"}[key]] += int(value.split()[0]) * 1024
        except (OSError, ValueError, psutil.Error):
            pass
    return total


def measure(name: str, argv: list[str], logdir: Path, log, interval: float = 0.25,
            env: dict[str, str] | None = None, cwd: Path | None = None) -> dict[str, Any]:
    """Run ``argv`` in a fresh process: wall time, ru_maxrss of the child (os.wait4), the sampled
    peak RSS of the whole process tree and its timeline (one point per second)."""
    out_path, err_path, ru_path = logdir / f"{name}.out", logdir / f"{name}.err", logdir / f"{name}.rusage.json"
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        start = time.perf_counter()
        # through a small launcher: a child forked from this (large) process inherits its RSS high-water
        # mark in ru_maxrss (Linux records the old mm's peak at exec), so the launcher forks the case
        p = subprocess.Popen([sys.executable, "-S", "-c", LAUNCHER, str(ru_path), *argv], stdout=out, stderr=err,
                             cwd=cwd, env=env)
        ps = psutil.Process(p.pid)
        peak = {"rss": 0, "anon": 0, "file": 0}
        timeline: list[tuple[float, int, int, int]] = []
        done = threading.Event()

        def sample() -> None:
            last = -1.0
            while not done.is_set():
                r = tree_rss(ps)
                for k in peak:
                    peak[k] = max(peak[k], r[k])
                now = time.perf_counter() - start
                if now - last >= 1.0:  # seconds, RSS, anonymous, file-backed (MiB)
                    timeline.append((round(now, 1), r["rss"] // MiB, r["anon"] // MiB, r["file"] // MiB))
                    last = now
                done.wait(interval)

        th = threading.Thread(target=sample, daemon=True)
        th.start()
        p.wait()
        wall = time.perf_counter() - start
        done.set()
        th.join()
    ru = json.loads(ru_path.read_text())
    rc = ru["rc"]
    res = {"argv": [Path(a).name if a == sys.executable else a for a in argv], "rc": rc, "wall_s": wall,
           "wall_child_s": ru["wall_s"], "maxrss_mib": ru["maxrss_kib"] / 1024, "tree_rss_peak_sampled_mib": peak["rss"] / MiB,
           "tree_anon_peak_sampled_mib": peak["anon"] / MiB, "tree_file_peak_sampled_mib": peak["file"] / MiB,
           "user_s": ru["user_s"], "sys_s": ru["sys_s"], "major_faults": ru["majflt"], "rss_timeline_mib": timeline}
    tail = err_path.read_text(errors="replace")[-3000:]
    if rc != 0:
        res["stderr_tail"] = tail
        log(f"  {name}: FAILED rc={rc} after {wall:.1f} s\n{tail}")
    else:
        log(f"  {name}: {wall:.1f} s, maxrss {res['maxrss_mib']:.0f} MiB, tree peak {peak['rss'] / MiB:.0f} MiB "
            f"(anon {peak['anon'] / MiB:.0f}, file {peak['file'] / MiB:.0f})")
    return res


LAUNCHER = """
import os, sys, time, json
t = time.perf_counter()
pid = os.fork()
if pid == 0:
    try:
        os.execvp(sys.argv[2], sys.argv[2:])
    finally:
        os._exit(127)
_, status, ru = os.wait4(pid, 0)
wall = time.perf_counter() - t
with open(sys.argv[1], "w") as f:
    json.dump({"rc": os.waitstatus_to_exitcode(status), "wall_s": wall, "maxrss_kib": ru.ru_maxrss,
               "user_s": ru.ru_utime, "sys_s": ru.ru_stime, "majflt": ru.ru_majflt}, f)
"""


def py(code: str, *args: str) -> list[str]:
    return [sys.executable, "-c", code, *args]


LOAD_CODE = """
import sys, glob
from safetensors.torch import load_file
keep = sys.argv[2] == "keep"
held = {}
for f in sorted(glob.glob(sys.argv[1] + "/*.safetensors")):
    d = load_file(f)
    for t in d.values():  # every page touched (load_file maps the file: materialised, not just mapped)
        t.view(-1)[::2048].float().sum()
    if keep:
        held.update(d)
    del d
print(len(held))
"""

WARMUP_CODE = """
import sys, torch, compeft
tv = {"a.weight": torch.randn(256, 256).bfloat16(), "b.weight": torch.randn(64, 256).bfloat16()}
e = compeft.compress(tv)
e.save(sys.argv[1])
e = compeft.open(sys.argv[1])
w = {k: torch.zeros_like(v) for k, v in tv.items()}
compeft.apply(e, w)
e.state_dict()
compeft.merge([e, e], method="ties")
"""

# The write floor of a restore: every base shard read and written again with safetensors, fsynced
# (what decompress --base and merge --base must at least do, with no residual added).
WRITE_CODE = """
import sys, glob, os, shutil
from safetensors.torch import load_file, save_file
out = sys.argv[2]
os.makedirs(out, exist_ok=True)
for f in sorted(glob.glob(sys.argv[1] + "/*.safetensors")):
    dest = os.path.join(out, os.path.basename(f))
    save_file(load_file(f), dest, metadata={"format": "pt"})
    fd = os.open(dest, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
shutil.rmtree(out)
"""

HF_LOAD_CODE = """
import sys, json, torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], torch_dtype=torch.bfloat16)
n = sum(p.numel() for p in m.parameters())
x = torch.tensor([[1, 2, 3, 4]])
with torch.no_grad():
    logits = m(x).logits
print(json.dumps({"params": n, "dtype": str(next(m.parameters()).dtype), "logits_finite": bool(torch.isfinite(logits).all()),
                  "class": type(m).__name__}))
"""

# Shapes and dtypes of every tensor of a directory against the base; a sample of restored tensors
# against base + the decoded expert (where the residual is nonzero: (base.float() + tau).bf16).
CHECK_CODE = """
import sys, json, glob, os, torch, compeft
from safetensors import safe_open
base, out, cpeft, mode = sys.argv[1:5]
def tensors(d):
    where = {}
    for f in sorted(glob.glob(d + "/*.safetensors")):
        with safe_open(f, framework="pt") as h:
            for n in h.keys():
                where[n] = f
    return where
b, o = tensors(base), tensors(out)
res = {"tensors_base": len(b), "tensors_out": len(o), "names_equal": sorted(b) == sorted(o), "shape_dtype_mismatch": []}
for n, f in o.items():
    with safe_open(f, framework="pt") as h:
        s = h.get_slice(n)
        shape, dtype = s.get_shape(), s.get_dtype()
    with safe_open(b[n], framework="pt") as h:
        s = h.get_slice(n)
        if (s.get_shape(), s.get_dtype()) != (shape, dtype):
            res["shape_dtype_mismatch"].append(n)
res["index_present"] = os.path.exists(out + "/model.safetensors.index.json")
res["config_present"] = os.path.exists(out + "/config.json")
if mode == "restored":
    e = compeft.open(cpeft)
    names = list(o)
    want_names = ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight",
                  "model.layers.1.self_attn.k_proj.weight", "model.norm.weight", "lm_head.weight"]
    sample = [n for n in want_names if n in o] or names[:3]
    res["sampled"] = {}
    for n in sample:
        with safe_open(b[n], framework="pt") as h:
            bt = h.get_tensor(n)
        with safe_open(o[n], framework="pt") as h:
            rt = h.get_tensor(n)
        tau = e.to_dense(n)
        want = torch.where(tau != 0, (bt.float() + tau.float()).to(bt.dtype), bt)
        res["sampled"][n] = {"equal": bool(torch.equal(rt, want)), "mismatches": int((rt != want).sum()),
                             "changed_vs_base": float((rt != bt).float().mean())}
    res["sample_equal"] = all(v["equal"] for v in res["sampled"].values())
elif mode == "merged":
    names = list(o)
    res["sampled"] = {}
    for n in [n for n in ("model.layers.0.mlp.up_proj.weight", "lm_head.weight", "model.norm.weight") if n in o]:
        with safe_open(b[n], framework="pt") as h:
            bt = h.get_tensor(n)
        with safe_open(o[n], framework="pt") as h:
            rt = h.get_tensor(n)
        res["sampled"][n] = {"changed_vs_base": float((rt != bt).float().mean()), "finite": bool(torch.isfinite(rt.float()).all())}
print(json.dumps(res))
"""


# export-lora's adapter on the base with PEFT: every lora_A/B of the file loaded (none missing or
# unexpected), and for sampled modules ΔW = scaling · B·A against the decoded τ: the relative error
# must be the SVD tail export-lora reported (sqrt(1 - share of ‖ΔW‖² kept)).
PEFT_LOAD_CODE = """
import sys, json, torch, compeft
from transformers import AutoModelForCausalLM
from peft import PeftModel
from safetensors import safe_open
base, lora, cpeft = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(base, torch_dtype=torch.bfloat16)
peft_model = PeftModel.from_pretrained(model, lora)
params = dict(peft_model.named_parameters())
loaded = 0
with safe_open(lora + "/adapter_model.safetensors", framework="pt") as h:
    names = list(h.keys())
    for n in names:
        key = n.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight", ".lora_B.default.weight")
        loaded += int(key in params and torch.equal(params[key].detach(), h.get_tensor(n).to(params[key].dtype)))
report = json.load(open(sys.argv[4]))
expert = compeft.open(cpeft)
mods = dict(peft_model.named_modules())
sampled = {}
for short in ("layers.0.self_attn.q_proj", "layers.1.mlp.down_proj", "lm_head"):
    full = [m for m in mods if m.endswith(short) and hasattr(mods[m], "get_delta_weight")]
    if not full:
        continue
    delta = mods[full[0]].get_delta_weight("default").float()
    name = [n for n in expert.names if n.endswith(short + ".weight")][0]
    tau = expert.to_dense(name).float()
    share = report["kept"][short] if short in report["kept"] else report["kept"].get(name[:-len(".weight")])
    err = float((delta.double() - tau.double()).norm() / tau.double().norm())  # (float32 norms of 65M entries err by 1 %)
    sampled[short] = {"relative_error": err, "svd_tail": (1 - share) ** 0.5 if share is not None else None}
with torch.no_grad():
    logits = peft_model(torch.tensor([[1, 2, 3, 4]])).logits
print(json.dumps({"lora_tensors": len(names), "loaded_equal": loaded, "sampled": sampled,
                  "logits_finite": bool(torch.isfinite(logits).all())}))
"""


def dir_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.rglob("*") if f.is_file())


def free_gib() -> float:
    return psutil.virtual_memory().available / GiB


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=float, default=1.1e9,
                    help="target parameter count (default 1.1e9: 22 layers of TinyLlama; 6.74e9: Llama-2-7B's 32 layers)")
    ap.add_argument("--quick", action="store_true", help="~50M parameters in 2 shards (smoke run)")
    ap.add_argument("--finetunes", type=int, default=3, help="fine-tunes to build (merge and library need 3)")
    ap.add_argument("--shard-size", type=float, default=2e9, help="max shard bytes (default 2e9)")
    ap.add_argument("--delta-rel", type=float, default=1e-3, help="residual scale relative to RMS(base tensor)")
    ap.add_argument("--library-workers", type=int, default=1, help="compeft library build --workers (default 1)")
    ap.add_argument("--no-merge", action="store_true")
    ap.add_argument("--no-library", action="store_true")
    ap.add_argument("--lora-rank", type=int, default=32, help="export-lora --rank of the first fine-tune (0: skip)")
    ap.add_argument("--no-hf-load", action="store_true", help="skip AutoModelForCausalLM loads of the outputs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--snapshot", action="store_true",
                    help="run the cases on a copy of compeft/ taken at the start (the tree is being edited)")
    ap.add_argument("--workdir", type=Path, help="default: a temporary directory under /work/scale-tmp")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--reuse", action="store_true", help="reuse checkpoints already in --workdir (same settings)")
    ap.add_argument("--out", type=Path, help="JSON path")
    args = ap.parse_args(argv)
    if args.quick:
        args.params = 5e7

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    git = git_info()
    cfg = llama_config(args.params)
    shapes = llama_shapes(cfg)
    n_params = sum(numel(s) for _, s in shapes)
    total_bytes = n_params * 2
    max_shard = int(args.shard_size)
    if total_bytes <= max_shard * 1.05 or args.quick:  # at least 2 shards
        max_shard = total_bytes // 2 + 4 * max(numel(s) for _, s in shapes)
    shards = plan_shards(shapes, max_shard)
    if len(shards) < 2:
        max_shard = total_bytes // 2 + 2 * max(numel(s) for _, s in shapes)
        shards = plan_shards(shapes, max_shard)
    big = n_params >= 3e9
    tag = "-quick" if args.quick else ("-7b" if n_params >= 5e9 else "")
    nft = args.finetunes
    do_merge = nft >= 3 and not args.no_merge
    do_library = nft >= 1 and not args.no_library

    if args.workdir is None:
        Path("/work/scale-tmp").mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix="scale-", dir="/work/scale-tmp"))
    else:
        work = args.workdir
        work.mkdir(parents=True, exist_ok=True)
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    base = work / "base"
    fts = [work / f"ft{i + 1}" for i in range(nft)]
    log(f"{n_params:,} params ({cfg['num_hidden_layers']} layers, hidden {cfg['hidden_size']}), {len(shards)} shards "
        f"of <= {fmt_b(max_shard)}, {nft} fine-tunes, work dir {work}, {free_gib():.1f} GiB available")

    record: dict[str, Any] = {
        "benchmark": "scale", "mode": "quick" if args.quick else "full", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "git": git, "machine": machine_info(), "versions": versions(), "notes": [],
        "data": {"params": n_params, "llama_config": cfg, "tensors": len(shapes), "shard_max_bytes": max_shard,
                 "base": "N(0, 0.02) per entry (norms 1 + N(0, 0.02)), bf16",
                 "finetune": f"base + Student-t(df=3) x {args.delta_rel:g} x RMS(base tensor), f32 add, one bf16 rounding",
                 "delta_rel": args.delta_rel, "seed": args.seed, "finetunes": nft},
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
    }
    try:
        import transformers
        record["versions"]["transformers"] = transformers.__version__
    except ImportError:
        pass

    # 1-2: checkpoints
    t0 = time.perf_counter()
    if not (args.reuse and (base / INDEX).exists()):
        log("writing the base")
        record["data"]["base_files"] = write_base(base, cfg, max_shard, args.seed, log)["shards"]
    record["data"]["base_write_s"] = time.perf_counter() - t0
    for i, ft in enumerate(fts):
        t0 = time.perf_counter()
        if not (args.reuse and (ft / INDEX).exists() and len(list(ft.glob("*.safetensors"))) == len(shards)):
            log(f"writing fine-tune {i + 1}")
            write_finetune(base, ft, i, args.delta_rel, args.seed, log)
        record["data"][f"ft{i + 1}_write_s"] = time.perf_counter() - t0
    shard_sizes = sorted(f.stat().st_size for f in base.glob("*.safetensors"))
    largest = shard_sizes[-1]
    target_rss = (2 * largest + GiB) / MiB
    record["data"].update(shard_bytes=shard_sizes, largest_shard_bytes=largest, base_bytes=sum(shard_sizes),
                          dense_residual_bf16_bytes=total_bytes,
                          target_peak_rss_mib=target_rss)
    # how many entries of a fine-tune differ from the base (bf16 rounding swallows small deltas)
    name = shapes[1][0]
    index = json.loads((base / INDEX).read_text())
    with safe_open(str(base / index["weight_map"][name]), framework="pt") as h:
        bt = h.get_tensor(name)
    with safe_open(str(fts[0] / index["weight_map"][name]), framework="pt") as h:
        ftt = h.get_tensor(name)
    record["data"]["changed_fraction_sample"] = {name: float((bt != ftt).float().mean())}
    del bt, ftt

    compeft_bin = shutil.which("compeft") or str(Path(sys.executable).parent / "compeft")
    cases: dict[str, Any] = {}
    env = dict(os.environ)
    if args.snapshot:
        # the package as it is now, copied: edits to the working tree during a long run do not reach it
        snap = work / "snapshot"
        shutil.rmtree(snap, ignore_errors=True)
        shutil.copytree(REPO / "compeft", snap / "compeft", ignore=shutil.ignore_patterns("__pycache__"))
        env["PYTHONPATH"] = str(snap) + os.pathsep + env.get("PYTHONPATH", "")
        diff = subprocess.run(["git", "diff", "HEAD", "--", "compeft"], capture_output=True, text=True, cwd=REPO).stdout
        untracked = subprocess.run(["git", "ls-files", "--others", "--exclude-standard", "--", "compeft"],
                                   capture_output=True, text=True, cwd=REPO).stdout.split()
        import hashlib
        record["git"]["snapshot"] = {"diff_sha256": hashlib.sha256(diff.encode()).hexdigest()[:16],
                                     "diff_lines": len(diff.splitlines()), "untracked": untracked}
        check = subprocess.run([sys.executable, "-c", "import compeft, compeft.api, compeft.cli; print(compeft.__file__)"],
                               capture_output=True, text=True, env=env, cwd=work)
        if check.returncode != 0 or str(snap) not in check.stdout:
            raise SystemExit(f"the snapshot does not import: {check.stderr[-1000:]}{check.stdout}")
        (work / "snapshot.diff").write_text(diff)

    def case(key: str, argv: list[str]) -> dict[str, Any]:
        log(f"case {key} ({free_gib():.1f} GiB available)")
        avail = free_gib()
        cases[key] = measure(key, argv, logs, log, env=env, cwd=work)
        cases[key]["available_gib_before"] = round(avail, 2)
        return cases[key]

    # the reference: load the base with safetensors (page cache warm: the files were just written or read)
    for _ in range(1):
        subprocess.run(["cat", *map(str, sorted(base.glob("*.safetensors")))], stdout=subprocess.DEVNULL, check=False)
    keep_fits = sum(shard_sizes) < 0.5 * free_gib() * GiB
    if keep_fits:
        case("ref_load_base_kept", py(LOAD_CODE, str(base), "keep"))
    else:
        record["notes"].append(f"the whole base ({fmt_b(sum(shard_sizes))}) is more than half the available memory: "
                               "the reference is load_file one shard at a time only")
    case("ref_load_base_per_shard", py(LOAD_CODE, str(base), "drop"))
    ref_key = "ref_load_base_kept" if keep_fits else "ref_load_base_per_shard"
    case("ref_write_base", py(WRITE_CODE, str(base), str(work / "ref_write")))
    case("ref_startup", py("import torch, numba, safetensors.torch, compeft"))  # the fixed cost in every case
    # warm-up: Numba's cache (compile on first use is not part of a user's steady state)
    case("warmup_numba", py(WARMUP_CODE, str(work / "warmup.cpeft")))

    cpeft = [work / f"ft{i + 1}.cpeft" for i in range(nft)]
    for i in range(nft):
        case(f"compress_ft{i + 1}", [compeft_bin, "compress", str(fts[i]), "--base", str(base), "-o", str(cpeft[i])])
    inspect = subprocess.run([compeft_bin, "inspect", "--json", str(cpeft[0])], capture_output=True, text=True, env=env, cwd=work)
    meta: dict[str, Any] = {}
    if inspect.returncode == 0:
        summary = json.loads(inspect.stdout)
        m = summary.get("metadata", {})
        meta = {k: m.get(k) for k in ("scope", "alpha_rule", "alpha", "density", "sigma", "threshold", "source",
                                     "created_by")}
        meta["totals"] = summary.get("totals")
        meta["metadata_keys"] = sorted(m)
    else:
        record["notes"].append(f"inspect --json failed: {inspect.stderr[-500:]}")
    record["cpeft_metadata"] = meta
    case("verify_ft1", [compeft_bin, "verify", str(cpeft[0])])
    restored = work / "restored"
    case("decompress_ft1", [compeft_bin, "decompress", str(cpeft[0]), "--base", str(base), "-o", str(restored)])
    lora = work / "lora"
    if args.lora_rank:
        case("export_lora_ft1", [compeft_bin, "export-lora", str(cpeft[0]), "--rank", str(args.lora_rank), "-o", str(lora),
                                 "--json", "-q"])
        if cases["export_lora_ft1"]["rc"] == 0:
            (work / "lora-report.json").write_text((logs / "export_lora_ft1.out").read_text())
    merged = work / "merged"
    if do_merge:
        case("merge_ties3", [compeft_bin, "merge", *map(str, cpeft[:3]), "--method", "ties", "--base", str(base),
                             "-o", str(merged)])
    if do_library:
        lib = work / "lib"
        case(f"library_build{len(fts)}_w{args.library_workers}",
             [compeft_bin, "library", "build", *map(str, fts), "--base", str(base), "--out", str(lib),
              "--workers", str(args.library_workers), "--json"])

    # checks
    checks: dict[str, Any] = {}
    for what, d in (("restored", restored), ("merged", merged)):
        if not d.exists():
            continue
        r = measure(f"check_{what}", py(CHECK_CODE, str(base), str(d), str(cpeft[0]), what), logs, log, env=env, cwd=work)
        checks[what] = json.loads((logs / f"check_{what}.out").read_text() or "null") if r["rc"] == 0 else r
        if not big and not args.no_hf_load:
            r = measure(f"hf_load_{what}", py(HF_LOAD_CODE, str(d)), logs, log, env=env, cwd=work)
            checks[f"{what}_from_pretrained"] = (json.loads((logs / f"hf_load_{what}.out").read_text().strip().splitlines()[-1])
                                                 if r["rc"] == 0 else {"rc": r["rc"], "stderr_tail": r.get("stderr_tail")})
            checks[f"{what}_from_pretrained"]["wall_s"] = r["wall_s"]
            checks[f"{what}_from_pretrained"]["maxrss_mib"] = r["maxrss_mib"]
    if (work / "lora-report.json").exists():
        report = json.loads((work / "lora-report.json").read_text())
        kept = sorted(report.get("kept", {}).values())
        checks["lora"] = {"modules": len(kept), "left_out": len(report.get("left_out", {})),
                          "kept_min": kept[0] if kept else None, "kept_median": statistics.median(kept) if kept else None,
                          "adapter_bytes": dir_bytes(lora)}
        if not big and not args.no_hf_load:
            r = measure("peft_load_lora", py(PEFT_LOAD_CODE, str(base), str(lora), str(cpeft[0]), str(work / "lora-report.json")), logs, log, env=env,
                        cwd=work)
            checks["lora_from_pretrained"] = (json.loads((logs / "peft_load_lora.out").read_text().strip().splitlines()[-1])
                                              if r["rc"] == 0 else {"rc": r["rc"], "stderr_tail": r.get("stderr_tail")})
    if do_library and (logs / f"library_build{len(fts)}_w{args.library_workers}.out").exists():
        text = (logs / f"library_build{len(fts)}_w{args.library_workers}.out").read_text()
        try:
            checks["library_report"] = json.loads(text)
        except json.JSONDecodeError:
            checks["library_report"] = text[-2000:]
    record["checks"] = checks

    # sizes
    sizes = {"cpeft_bytes": [p.stat().st_size for p in cpeft if p.exists()], "dense_residual_bf16_bytes": total_bytes,
             "largest_shard_bytes": largest}
    if sizes["cpeft_bytes"]:
        sizes["ratio_dense_over_cpeft"] = total_bytes / sizes["cpeft_bytes"][0]
        sizes["bits_per_param"] = 8 * sizes["cpeft_bytes"][0] / n_params
    if restored.exists():
        sizes["restored_bytes"] = dir_bytes(restored)
    record["sizes"] = sizes
    record["cases"] = cases

    # table
    ref = cases[ref_key]["wall_s"]
    rows = []
    if keep_fits:
        rows.append(table_row("ref: load_file every base shard (kept)", f"{ref:.1f} s",
                              f"{cases['ref_load_base_kept']['maxrss_mib']:.0f} MiB", None, None, "reference"))
    rows.append(table_row("ref: load_file one shard at a time", f"{cases['ref_load_base_per_shard']['wall_s']:.1f} s",
                          f"{cases['ref_load_base_per_shard']['maxrss_mib']:.0f} MiB", None, None, "reference"))
    rows.append(table_row("ref: load_file + save_file + fsync every shard", f"{cases['ref_write_base']['wall_s']:.1f} s",
                          f"{cases['ref_write_base']['maxrss_mib']:.0f} MiB", None, None, "reference (write floor)"))
    rows.append(table_row("ref: interpreter + imports (torch, numba)", f"{cases['ref_startup']['wall_s']:.1f} s",
                          f"{cases['ref_startup']['maxrss_mib']:.0f} MiB", None, None, "reference"))
    comp = [cases[f"compress_ft{i + 1}"] for i in range(nft)]
    record["compress_median"] = {"wall_s": statistics.median(c["wall_s"] for c in comp),
                                 "maxrss_mib": statistics.median(c["maxrss_mib"] for c in comp)}
    bounded = {"compress_ft1", "merge_ties3"}
    for key, c in cases.items():
        if key.startswith("warmup"):
            continue
        if key.startswith("ref_"):
            continue
        rss = max(c["maxrss_mib"], c["tree_rss_peak_sampled_mib"])
        ok = c["rc"] == 0
        if key in bounded or (key.startswith("compress_") and nft == 1):
            rows.append(table_row(f"{key}: peak RSS vs 2 x shard + 1 GiB", f"{rss:.0f} MiB", f"{target_rss:.0f} MiB",
                                  rss / target_rss, 1.0, "" if ok else f"rc={c['rc']}"))
            anon = c.get("tree_anon_peak_sampled_mib")
            if anon is not None:
                rows.append(table_row(f"{key}: peak anonymous RSS (no mapped files)", f"{anon:.0f} MiB",
                                      f"{target_rss:.0f} MiB", anon / target_rss, 1.0,
                                      f"file-backed peak {c['tree_file_peak_sampled_mib']:.0f} MiB" if ok else f"rc={c['rc']}"))
        if key.startswith(("decompress", "merge")):
            floor = cases["ref_write_base"]["wall_s"]
            rows.append(table_row(f"{key}: wall vs write floor", f"{c['wall_s']:.1f} s", f"{floor:.1f} s", c["wall_s"] / floor,
                                  None, ""))
        rows.append(table_row(f"{key}: wall vs base load", f"{c['wall_s']:.1f} s", f"{ref:.1f} s", c["wall_s"] / ref, None,
                              f"RSS {rss:.0f} MiB" if ok else f"FAILED rc={c['rc']}"))
    if sizes.get("cpeft_bytes"):
        rows.append(table_row("ft1.cpeft vs dense bf16 residual", fmt_b(sizes["cpeft_bytes"][0]), fmt_b(total_bytes),
                              sizes["cpeft_bytes"][0] / total_bytes, None,
                              f"{sizes['bits_per_param']:.3f} bits/param"))
    for what in ("restored", "merged"):
        if what in checks:
            ch = checks[what]
            good = isinstance(ch, dict) and ch.get("names_equal") and not ch.get("shape_dtype_mismatch") \
                and ch.get("sample_equal", True)
            hf = checks.get(f"{what}_from_pretrained")
            hf_ok = hf is None or (hf.get("params") == n_params and hf.get("logits_finite"))
            rows.append(table_row(f"check {what}/", "shapes+dtypes" + (", values" if what == "restored" else "")
                                  + ("" if hf is None else ", from_pretrained"), "", None, None,
                                  "pass" if good and hf_ok else "FAIL"))
    if "lora" in checks:
        pl = checks.get("lora_from_pretrained") or {}
        tails_ok = all(abs(v["relative_error"] - v["svd_tail"]) < 1e-2 for v in pl.get("sampled", {}).values()
                       if v.get("svd_tail") is not None)
        good = pl.get("lora_tensors") == pl.get("loaded_equal") and pl.get("logits_finite") and tails_ok
        rows.append(table_row("check lora/", f"{checks['lora']['modules']} modules, median ‖ΔW‖² kept "
                              f"{checks['lora']['kept_median']:.3f}", fmt_b(checks["lora"]["adapter_bytes"]), None, None,
                              ("pass" if good else "FAIL") if pl else "not loaded"))
    record["table"] = rows
    out = args.out or REPO / "benchmarks" / "results" / f"{datetime.date.today().isoformat()}-{git['short']}-scale{tag}.json"
    record["notes"].append("peak RSS: max of the child's ru_maxrss (largest single process) and the sampled "
                           "(0.25 s) sum over its process tree; page cache warm for the base where it fits in RAM")
    write_report(record, f"compeft scale ({record['mode']}): {n_params:,} params, {len(shards)} shards, largest "
                 f"{fmt_b(largest)}, commit {git['short']}{' (compeft dirty)' if git['compeft_dirty'] else ''}", out)
    if not args.keep and args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    elif not args.keep:
        log(f"--workdir given: left in place ({work})")
    failed = [k for k, c in cases.items() if c["rc"] != 0]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
