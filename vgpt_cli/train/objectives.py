"""The two training objectives, each as "compute the loss of one optimiser step and accumulate its
gradient": token cross-entropy (teacher forcing) and SCST (self-critical policy gradient, CIDEr-D reward).

Exactness rule that the tests check: each micro-batch's summed loss is divided by the count of the
whole effective batch (all micro-batches, all processes), so batch 2 x 8 and batch 16 give the same
gradient, and so do 2 DDP processes and 1 process with the whole batch. `backward` is the optimiser
step's (optim.OptimiserStep.backward: the fp16 grad scaler's scaling, then backward).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from vgpt_cli.distributed import DistContext
from vgpt_cli.train.attention_supervision import attention_loss_sum
from vgpt_cli.train.data import Batch

Backward = Callable[[torch.Tensor], None]


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Summed cross-entropy over tokens whose label is not -100 (labels are already shifted)."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100,
                           reduction="sum", label_smoothing=label_smoothing)


def unlikelihood_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Token-level unlikelihood (Welleck et al., 2019, "Neural text generation with unlikelihood
    training"), summed: at every target position t, -log(1 - p_t(c)) for each distinct token c among the
    caption's earlier targets that is not the target at t. It makes repeating an earlier word cost
    something unless the reference repeats it (labels as token_loss_sum's; -100 is padding)."""
    B, T, _ = logits.shape
    tokens, real = labels.clamp(min=0), labels != -100
    earlier = torch.ones(T, T, dtype=torch.bool, device=labels.device).tril(-1)          # [t, u]: u < t
    seen_before = ((tokens[:, :, None] == tokens[:, None, :]) & earlier).any(-1)         # [b, u]: a copy of
    candidates = tokens[:, None, :].expand(B, T, T)                                      # [b, t, u]
    use = (earlier & real[:, None, :] & ~seen_before[:, None, :] & real[:, :, None]
           & (candidates != tokens[:, :, None]))
    p = logits.float().log_softmax(-1).gather(2, candidates).exp()
    return (-torch.log1p(-p.clamp(max=1 - 1e-6)) * use).sum()


def autocast_context(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def cross_entropy_step(model: Any, batches: Sequence[Batch], dist: DistContext, backward: Backward, *,
                       precision: str, label_smoothing: float, unlikelihood: float = 0.0,
                       attention_supervision: float = 0.0) -> tuple[float, int, float | None]:
    """Forward and backward of every micro-batch of one step; returns (mean token loss, target tokens),
    both over all processes, and this process's mean visual gate over real tokens (None without gates).
    unlikelihood: the weight of unlikelihood_sum in the gradient (the loss returned stays cross-entropy);
    attention_supervision: the same for attention_loss_sum on batches that carry attention targets."""
    device = dist.device
    n_local = sum(b.n_targets for b in batches)
    n_global = int(dist.all_sum(torch.tensor(float(n_local), dtype=torch.float64)).item())
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    gate_sum = gate_n = 0.0  # for curves.png and --tensorboard
    model.train()
    for i, b in enumerate(batches):
        b = b.to(device)
        last = i == len(batches) - 1
        sync = contextlib.nullcontext() if (last or not dist.enabled) else model.no_sync()
        supervise = bool(attention_supervision) and b.attention_target is not None
        with sync:
            with autocast_context(device, precision):
                out = model(b.features, b.lengths, b.input_ids, b.attention_mask, image_index=b.image_index,
                            return_gates=True, return_attention=supervise)
            part = token_loss_sum(out.logits, b.labels, label_smoothing)
            if out.gates is not None:
                real = b.attention_mask.bool()
                gate_sum, gate_n = gate_sum + out.gates[..., 1][real].float().sum(), gate_n + real.sum()
            trained = part + unlikelihood * unlikelihood_sum(out.logits, b.labels) if unlikelihood else part
            if supervise:
                trained = trained + attention_supervision * attention_loss_sum(out.attention, b.attention_target)
            # DDP averages gradients over processes: scale by world size so the mean is over tokens.
            backward(trained * (dist.world_size / n_global))
            loss_sum += part.detach().double()
    total = dist.all_sum(loss_sum).item() / n_global
    return total, n_global, float(gate_sum / gate_n) if gate_n else None


class _ForwardThrough:
    """The captioner's attributes with another module's forward: sequence_log_probs must run the
    DDP wrapper (so gradients are synchronised) but reads token ids from the captioner."""

    def __init__(self, forward: Any, core: Any):
        self._forward = forward
        self.bos_token_id, self.eos_token_id = core.bos_token_id, core.eos_token_id

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._forward(*args, **kwargs)


def scst_step(model: Any, core: Any, feats: torch.Tensor, lengths: torch.Tensor, references: list[list[str]],
              scorer: Any, dist: DistContext, backward: Backward, *, samples_per_image: int, max_length: int,
              precision: str) -> tuple[float, int, float]:
    """Sample `samples_per_image` captions per image, reward each with CIDEr-D against its image's
    references (baseline: the mean reward of the same image's samples), and backpropagate the policy
    gradient. Returns (loss, sampled tokens, mean reward), loss and reward over all processes."""
    from vgpt_cli.decode import sample, sequence_log_probs

    device, k = dist.device, samples_per_image
    # Sample and score without dropout; the gradient is then taken under the same (eval) policy.
    model.eval()
    with torch.no_grad(), autocast_context(device, precision):
        samples = sample(core, feats, lengths, num_samples=k, max_length=max_length)
    refs = [references[int(i)] for i in samples.image_index]
    _, rewards = scorer.score(samples.texts, refs)
    rewards_t = torch.tensor(rewards, dtype=torch.float32, device=device).view(len(references), k)
    advantage = (rewards_t - rewards_t.mean(1, keepdim=True)).reshape(-1)  # baseline: same image's mean
    n_global = int(dist.all_sum(torch.tensor(float(len(samples.texts)), dtype=torch.float64)).item())
    with autocast_context(device, precision):
        logp = sequence_log_probs(_ForwardThrough(model, core), feats, lengths, samples.token_ids,
                                  samples.mask, samples.image_index)
    loss = -(advantage * logp.sum(1)).sum()
    backward(loss * (dist.world_size / n_global))
    mean_reward = dist.all_sum(torch.tensor(float(rewards.sum()), dtype=torch.float64)).item() / n_global
    return dist.all_sum(loss.detach().double()).item() / n_global, int(samples.mask.sum()), mean_reward
