"""Why narrower weights move captions: for every Linear of a trained captioner's decoder (the LM, the
cross-attention, the vocabulary head), on real activations, how far its input's outlier channels stretch
(max |x| over the 99th percentile of |x|) and how far int8 and fp16 dynamic quantization
(vgpt_cli.model.precision) move its output (|y_q - y| / |y|, Frobenius norms). The activations come from
one teacher-forced pass over the first reference caption of the first --items items of a workspace split,
from their cached features. Rows: the mean and the largest value per kind of layer (q_proj, down_proj, ...).

    python benchmarks/precision_probe.py --workspace WS --model WS/runs/RUN/best --split val   # ~1 min, 2 cores
    python benchmarks/precision_probe.py --smoke     # seconds: a tiny random captioner and random features

Goal: int8's mean output error over all layers <= 2% (beam search keeps its captions near there; fp16's
error is recorded beside it). Writes benchmarks/results/precision_probe.json (--smoke: precision_probe_smoke).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import goal, print_table, tiny_lm, write_results  # noqa: E402


def smoke_inputs(folder: Path):
    """A tiny random captioner, 4 images of random features and 4 captions."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vgpt_cli.model import Captioner, CaptionerConfig

    lm_dir = tiny_lm(folder / "lm")
    torch.manual_seed(0)
    model = Captioner.from_config(CaptionerConfig(lm="tiny", d_in=16, encoder_layers=1),
                                  lm=AutoModelForCausalLM.from_pretrained(lm_dir),
                                  tokenizer=AutoTokenizer.from_pretrained(lm_dir))
    captions = ["a dog runs on the grass", "two children play in the snow", "a man rides a bike", "a red car"]
    return model.eval(), torch.randn(4, 9, 16), torch.full((4,), 9), captions


def workspace_inputs(workspace: Path, model_dir: Path, split: str, items: int):
    from vgpt_cli.decode import pad_features
    from vgpt_cli.evaluate.report import workspace_manifest
    from vgpt_cli.features import open_workspace_store
    from vgpt_cli.model import Captioner
    from vgpt_cli.workspace import Workspace

    ws = Workspace(workspace)
    chosen = [it for it in workspace_manifest(ws).items(split) if it.captions][:items]
    store = open_workspace_store(ws)
    feats, lengths = pad_features([store.get(it.id) for it in chosen])
    return Captioner.from_pretrained(model_dir).eval(), feats, lengths, [it.captions[0] for it in chosen]


def decoder_linears(model) -> dict[str, nn.Linear]:
    """name -> every nn.Linear of the LM and the cross-attention (GPT-2's Conv1D made Linear first)."""
    from vgpt_cli.model.precision import conv1d_as_linear

    conv1d_as_linear(model.lm)
    return {f"{part}.{name}": m for part, module in (("lm", model.lm), ("xattn", model.xattn))
            for name, m in module.named_modules() if isinstance(m, nn.Linear)}


def probe(model, feats, lengths, captions) -> list[dict]:
    from vgpt_cli.model.precision import dynamic_quantize

    linears = decoder_linears(model)
    inputs: dict[str, list[torch.Tensor]] = {name: [] for name in linears}
    hooks = [m.register_forward_hook(lambda mod, args, out, name=name: inputs[name].append(
        args[0].detach().reshape(-1, args[0].shape[-1]))) for name, m in linears.items()]
    batch = model.tokenize(captions)
    with torch.no_grad():
        model(feats, lengths, batch["input_ids"], batch["attention_mask"])
    for h in hooks:
        h.remove()
    rows = []
    for name, lin in linears.items():
        if not inputs[name]:
            continue
        x = torch.cat(inputs[name])
        a = x.abs().flatten()
        p99 = a.kthvalue(max(1, int(0.99 * a.numel()))).values.clamp(min=1e-12)
        row = {"layer": name, "kind": name.split(".")[-1], "outlier_ratio": float(a.max() / p99)}
        with torch.no_grad():
            ref = lin(x)
            for label, dtype in (("int8", torch.qint8), ("fp16", torch.float16)):
                q = dynamic_quantize(nn.Sequential(copy.deepcopy(lin)), dtype)
                row[f"{label}_error"] = float((q(x) - ref).norm() / ref.norm().clamp(min=1e-12))
        rows.append(row)
    return rows


def by_kind(rows: list[dict]) -> list[dict]:
    out = []
    for kind in dict.fromkeys(r["kind"] for r in rows):
        rs = [r for r in rows if r["kind"] == kind]
        entry = {"kind": kind, "layers": len(rs)}
        for key in ("outlier_ratio", "int8_error", "fp16_error"):
            vals = [r[key] for r in rs]
            entry[f"{key} mean"], entry[f"{key} max"] = statistics.mean(vals), max(vals)
        out.append(entry)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workspace", type=Path, help="a workspace with the model's feature store")
    ap.add_argument("--model", type=Path, help="a trained model folder (runs/<run>/best)")
    ap.add_argument("--split", default="val")
    ap.add_argument("--items", type=int, default=8, help="items of the split whose first caption is probed")
    ap.add_argument("--smoke", action="store_true", help="seconds: a tiny random captioner (precision_probe_smoke)")
    args = ap.parse_args()
    torch.manual_seed(0)
    if args.smoke:
        from benchmarks.common import scratch_dir

        model, feats, lengths, captions = smoke_inputs(scratch_dir("precision-probe"))
        source = "tiny random captioner, random features"
    else:
        if args.workspace is None or args.model is None:
            ap.error("give --workspace and --model (a trained model and the workspace of its features), or --smoke")
        model, feats, lengths, captions = workspace_inputs(args.workspace, args.model, args.split, args.items)
        source = f"{args.model} on {len(captions)} {args.split} items of {args.workspace}"
    rows = probe(model, feats, lengths, captions)
    kinds = by_kind(rows)
    print_table(kinds, title=f"per kind of decoder Linear: input outlier ratio, relative output error ({source})")
    int8_mean = statistics.mean(r["int8_error"] for r in rows)
    fp16_mean = statistics.mean(r["fp16_error"] for r in rows)
    print(f"mean relative output error over {len(rows)} layers: int8 {int8_mean:.4f}, fp16 {fp16_mean:.6f}")
    raw = {"source": source, "layers": len(rows), "int8_error_mean": int8_mean, "fp16_error_mean": fp16_mean,
           "by_kind": kinds, "per_layer": rows}
    write_results(__file__, raw, {"int8_mean_output_error": goal(int8_mean, 0.02, higher_is_better=False)},
                  name="precision_probe_smoke" if args.smoke else None)


if __name__ == "__main__":
    main()
