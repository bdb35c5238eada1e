"""Measurements inside a captioner during training, shared by the benchmarks (realphoto, grounding)."""

from __future__ import annotations


def gradient_path(model, batch) -> dict:
    """One teacher-forced pass + backward on `batch` (eval mode: no dropout), SRAU or plain cross-attention
    alike. Per block: the share of visual channels open (1 - g > tau, with the tau in force; 1 without
    gates), the image's share of the block's output (norm of its visual part over the linguistic part:
    (1 - g) 1[..] C against g 1[..] A with SRAU, mean_k C_k against A without), and the gradient norms that
    reach the cross-attention and the visual encoder (parameters that train at this step)."""
    import math

    import torch

    import vgpt_cli.model.captioner as cap

    real = batch.attention_mask.bool()
    blocks: list[dict] = []

    def norms(ling, vis) -> dict:
        sel = real  # (B, T): real caption positions
        ln, vn = float(ling[sel].norm(dim=-1).mean()), float(vis[sel].norm(dim=-1).mean())
        return {"visual_over_linguistic": vn / max(ln, 1e-9)}

    def srau(a, c, gates, t, want_gates=True):
        with torch.no_grad():
            g = gates(a, c)
            open_ = ((1 - g) > t)
            sel = real[:, None, :].expand(g.shape[:3])
            ling = (torch.where(g > t, g, 0.0) * a.unsqueeze(1)).sum(1)
            vis = (torch.where(open_, 1 - g, 0.0) * c).sum(1)
            blocks.append({"open": float(open_[sel].float().mean()), **norms(ling, vis)})
        return srau_orig(a, c, gates, t, want_gates)

    def residual(a, c):
        with torch.no_grad():
            blocks.append({"open": 1.0, **norms(a, c.mean(dim=1))})
        return residual_orig(a, c)

    srau_orig, residual_orig = cap.srau_combine, cap.residual_combine
    was, fused = model.training, model.fused_inference
    cap.srau_combine, cap.residual_combine = srau, residual
    model.eval()
    model.fused_inference = False
    try:
        model.zero_grad(set_to_none=True)
        out = model(batch.features, batch.lengths, batch.input_ids, batch.attention_mask, labels=batch.labels,
                    image_index=batch.image_index)
        out.loss.backward()
    finally:
        cap.srau_combine, cap.residual_combine = srau_orig, residual_orig
        model.train(was)
        model.fused_inference = fused

    def norm(params) -> float:
        sq = [q.grad.detach().float().pow(2).sum() for q in params if q.grad is not None]
        return float(torch.stack(sq).sum().sqrt()) if sq else 0.0

    xattn = [norm(x.parameters()) for x in model.xattn]
    rec = {"loss": round(float(out.loss.detach()), 4),
           "open_visual_channels": [round(b["open"], 3) for b in blocks],
           "image_share": [round(b["visual_over_linguistic"], 4) for b in blocks],
           "xattn_grad": [float(f"{v:.3g}") for v in xattn],
           "xattn_grad_total": float(f"{math.sqrt(sum(v * v for v in xattn)):.3g}"),
           "encoder_grad": float(f"{norm(model.encoder.parameters()):.3g}")}
    model.zero_grad(set_to_none=True)
    return rec
