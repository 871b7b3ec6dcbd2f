"""Float64 eager references written straight from SPEC.md section 2.

Independent of minorsft.losses on purpose: a formula error there must make a test
fail. ``dtype`` lets the same code run "eager in the input dtype" for the error bar.
"""
import torch
import torch.nn.functional as F


def token_logprobs(logits, labels, ignore_index=-100, temperature=1.0, dtype=torch.float64):
    """``[B, T]`` log softmax(z / tau)[y] in ``dtype`` (upcast first), 0 where masked."""
    mask = labels != ignore_index
    z = logits.to(dtype) / temperature
    lp = torch.log_softmax(z, dim=-1).gather(-1, labels.clamp(min=0).long()[..., None])[..., 0]
    return torch.where(mask, lp, torch.zeros_like(lp))


def seq_terms(logits, labels, ref_logits=None, ref_logprobs=None, ignore_index=-100,
              temperature=1.0, dtype=torch.float64):
    mask = labels != ignore_index
    lp = token_logprobs(logits, labels, ignore_index, temperature, dtype)
    S = lp.sum(-1)
    m = mask.sum(-1).to(dtype)
    if ref_logits is not None:
        S_ref = token_logprobs(ref_logits.detach(), labels, ignore_index, temperature, dtype).sum(-1)
    elif ref_logprobs.dim() == 2:
        S_ref = torch.where(mask, ref_logprobs.to(dtype), torch.zeros((), dtype=dtype)).sum(-1)
    else:
        S_ref = ref_logprobs.to(dtype)
    return S, S_ref, m


def loss(kind, logits, labels, *, ref_logits=None, ref_logprobs=None, beta=0.1,
         length_norm="outside", loss_type="sigmoid", label_smoothing=0.0, ignore_index=-100,
         reduction="mean", temperature=1.0, num_items_in_batch=None, dtype=torch.float64):
    """Loss and metrics dict, exactly as SPEC.md states them."""
    if kind == "sft":
        mask = labels != ignore_index
        lp = token_logprobs(logits, labels, ignore_index, temperature, dtype)
        if reduction == "none":
            return -lp, {}
        if reduction == "sum":
            return -lp.sum(), {}
        n = mask.sum() if num_items_in_batch is None else num_items_in_batch
        return -lp.sum() / max(int(n), 1), {}
    S, S_ref, m = seq_terms(logits, labels, ref_logits, ref_logprobs, ignore_index, temperature, dtype)
    r = S - S_ref
    valid = m > 0
    ms = m.clamp(min=1)
    if kind == "minor_sft":
        if length_norm == "outside":
            per = -(2 / (beta * ms)) * F.logsigmoid(beta * r)
        elif length_norm == "inside":
            per = -F.logsigmoid(beta * r / ms)
        else:
            per = -F.logsigmoid(beta * r)
        metrics = {"deviation": (r / ms)[valid].mean() if valid.any() else r.new_zeros(()),
                   "logps": S[valid].mean() if valid.any() else r.new_zeros(()),
                   "ref_logps": S_ref[valid].mean() if valid.any() else r.new_zeros(())}
    else:
        P = r.shape[0] // 2
        rw, rl, mw, ml = r[:P], r[P:], ms[:P], ms[P:]
        d = rw - rl
        eps = label_smoothing
        if kind == "minor_dpo":
            per = -F.logsigmoid(beta * rw - beta * torch.clamp(rl, min=0))
        elif loss_type == "sigmoid":
            per = -(1 - eps) * F.logsigmoid(beta * d) - eps * F.logsigmoid(-beta * d)
        elif loss_type == "ipo":
            per = ((rw / mw - rl / ml) - 1 / (2 * beta)) ** 2
        elif loss_type == "hinge":
            per = torch.relu(1 - beta * d)
        elif loss_type == "robust":
            per = (-(1 - eps) * F.logsigmoid(beta * d) + eps * F.logsigmoid(-beta * d)) / (1 - 2 * eps)
        valid = valid[:P] & valid[P:]
        k = valid.sum().clamp(min=1)
        Sw, Sl = S[:P].detach(), S[P:].detach()
        metrics = {"rewards/chosen": (beta * rw.detach() * valid).sum() / k,
                   "rewards/rejected": (beta * rl.detach() * valid).sum() / k,
                   "rewards/accuracies": ((rw > rl).to(dtype) * valid).sum() / k,
                   "rewards/margins": (beta * d.detach() * valid).sum() / k,
                   "logps/chosen": (Sw * valid).sum() / k,
                   "logps/rejected": (Sl * valid).sum() / k}
    per = torch.where(valid, per, torch.zeros_like(per))
    if reduction == "none":
        return per, metrics
    if reduction == "sum":
        return per.sum(), metrics
    return per.sum() / valid.sum().clamp(min=1), metrics
