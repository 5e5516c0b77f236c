"""Knowledge distillation (Hinton et al., 2015): recover the accuracy a compressed student lost.

    res = llmasos.distill(teacher, student, windows, alpha=0.5, temperature=2.0, steps=200)
    res.student, res.losses, res.seconds

loss = alpha * CE(student, next tokens) + (1 - alpha) * T^2 * KL(softmax(teacher / T) || softmax(student / T)),
both over every next-token position; T^2 keeps the soft term's gradient scale independent of T.

Pruned students stay pruned: ``masks="auto"`` keeps every weight matrix that holds exact zeros (>= 10% of
it) zero where it is zero now. An nn.Module student gets its gradients masked (a hook) and its weights
re-masked after each step; a Graph student runs as a ``GraphModule`` with the masks applied in forward
and to the stored weights after each step.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from .eval import logits_fn
from .ir.graph import Graph

# a matrix with this fraction of exact zeros counts as pruned: weights dequantized from a low-bit checkpoint
# hold some exact zeros too (SmolLM2's GGUF embedding: 1.03%, its linears < 0.1%), pruning makes >= 10%
AUTO_MASK_MIN_ZEROS = 0.10
_CKPT_PREFIX = "distill_step"


class DistillError(ValueError):
    """Bad arguments to ``distill`` (raised before any work)."""


@dataclass
class DistillResult:
    student: Any             # the trained student: an nn.Module, or a Graph when a Graph was given
    losses: list             # training loss of every step (resumed runs include the checkpointed ones)
    seconds: float           # wall time of this call's training
    module: Any = None       # the nn.Module that was trained (the GraphModule for a Graph student)
    masks: dict = field(default_factory=dict)  # param name -> bool mask kept during training
    resumed_from: int = 0    # the step a checkpoint resumed from (0: fresh start)


def distillation_loss(student_logits, teacher_logits, ids, alpha: float = 0.5, temperature: float = 2.0):
    """The distillation loss on next-token logits [B, S, V] of ids [B, S] (positions 0..S-2 predict 1..S-1)."""
    import torch  # deferred: `import llmasos` (which imports this module) stays torch-free
    import torch.nn.functional as F

    s = student_logits[:, :-1].float()
    t = teacher_logits[:, :-1].float()
    v = s.shape[-1]
    if t.shape[-1] != v:
        raise DistillError(f"teacher vocabulary {t.shape[-1]} differs from the student's {v}")
    loss = s.new_zeros(())
    if alpha > 0:
        loss = loss + alpha * F.cross_entropy(s.reshape(-1, v), ids[:, 1:].reshape(-1))
    if alpha < 1:
        log_ps = F.log_softmax(s / temperature, dim=-1).reshape(-1, v)
        log_pt = F.log_softmax(t / temperature, dim=-1).reshape(-1, v)
        kl = F.kl_div(log_ps, log_pt, log_target=True, reduction="batchmean")  # mean over positions
        loss = loss + (1 - alpha) * temperature ** 2 * kl
    return loss


def _logits(out):
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)):
        return out[0]
    return out


def _check(alpha, temperature, steps, lr, batch_size, checkpoint_every, log_every, data):
    def num(name, v):
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
            raise DistillError(f"{name} must be a number, got {v!r}")
        return float(v)

    def pos_int(name, v):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise DistillError(f"{name} must be an int >= 1, got {v!r}")

    if not 0.0 <= num("alpha", alpha) <= 1.0:
        raise DistillError(f"alpha must be in [0, 1] (weight of the hard-label loss), got {alpha}")
    if not num("temperature", temperature) > 0:
        raise DistillError(f"temperature must be > 0, got {temperature}")
    if not num("lr", lr) > 0:
        raise DistillError(f"lr must be > 0, got {lr}")
    for name, v in (("steps", steps), ("batch_size", batch_size), ("checkpoint_every", checkpoint_every),
                    ("log_every", log_every)):
        pos_int(name, v)
    if hasattr(data, "detach"):
        data = data.detach().cpu().numpy()
    data = np.asarray(data)
    if data.ndim != 2 or data.shape[0] < 1 or data.shape[1] < 2:
        raise DistillError(f"data must be token windows [W, S] with W >= 1 and S >= 2 tokens per row "
                           f"(llmasos.eval.token_windows), got shape {list(data.shape)}")
    if not np.issubdtype(data.dtype, np.integer):
        raise DistillError(f"data must be integer token ids, got {data.dtype}")
    if data.min() < 0:
        raise DistillError(f"data holds a negative token id ({int(data.min())})")
    return data.astype(np.int64)


def _auto_masks(named_params) -> dict:
    masks = {}
    for name, p in named_params:
        if p.ndim >= 2 and p.is_floating_point():
            zero = p.detach() == 0
            if zero.float().mean().item() >= AUTO_MASK_MIN_ZEROS:
                masks[name] = ~zero
    return masks


def _latest_checkpoint(d: Path) -> Optional[Path]:
    found = sorted(d.glob(f"{_CKPT_PREFIX}*.pt"))
    return found[-1] if found else None


def distill(teacher, student, data, *, alpha: float = 0.5, temperature: float = 2.0, steps: int = 100,
            lr: float = 1e-4, batch_size: int = 4, weight_decay: float = 0.0,
            masks: Union[str, dict, None] = "auto", checkpoint_dir=None, checkpoint_every: int = 50,
            log_every: int = 10, progress: Optional[bool] = True, device: str = "cpu") -> DistillResult:
    """Train ``student`` to match ``teacher`` on token windows ``data`` [W, S] (rows cycled in order).

    teacher: an nn.Module, a Graph or a CompiledModel (frozen: no_grad, eval mode). student: an nn.Module
    or a Graph (trained as a GraphModule, returned as a Graph). ``masks``: "auto" (see the module doc), an
    explicit {param name: bool tensor} (graph param names for a Graph student), or None.
    ``progress``: a line on stderr every ``log_every`` steps (step, loss, tokens/s); None shows it only when
    stderr is a terminal. With ``checkpoint_dir``, the student, optimizer and step are saved every
    ``checkpoint_every`` steps (and at the end), and a run finds its latest checkpoint there and resumes.
    The student trains in eval mode (no dropout): this is recovery of a compressed copy, not pre-training.
    """
    data = _check(alpha, temperature, steps, lr, batch_size, checkpoint_every, log_every, data)
    import torch  # deferred: `import llmasos` (which imports this module) stays torch-free


    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise DistillError(f"bad device {device!r}: {e}") from None
    if not (masks is None or masks == "auto" or isinstance(masks, dict)):
        raise DistillError(f"masks must be 'auto', a dict {{param name: bool tensor}} or None, got {masks!r}")
    if isinstance(student, Graph):
        from .backends.torch_graph import GraphModule  # deferred: imports torch
        module, graph_student = GraphModule(student, trainable=True), True
    elif isinstance(student, torch.nn.Module):
        module, graph_student = student, False
    else:
        raise DistillError(f"student must be an nn.Module or an llmasos Graph, got {type(student).__name__}")
    if not callable(teacher):
        if not isinstance(teacher, Graph):
            raise DistillError(f"teacher must be an nn.Module, a Graph or a CompiledModel, got "
                               f"{type(teacher).__name__}")
    if isinstance(teacher, torch.nn.Module):
        teacher.eval().to(dev)  # frozen by no_grad below; its requires_grad flags are left as they are
    teacher_fn = logits_fn(teacher)

    module.to(dev).eval()
    trainable = [p for p in module.parameters() if p.requires_grad]
    if not trainable:
        raise DistillError("the student has no trainable (float, requires_grad) parameters")

    # masks: graph param names for a GraphModule, parameter names for an nn.Module
    if graph_student:
        named = [(n, module.param(n)) for n in module.param_attr]
    else:
        named = list(module.named_parameters())
    lookup = dict(named)
    if masks == "auto":
        mask_dict = _auto_masks(named)
    else:
        mask_dict = {}
        for name, m in (masks or {}).items():
            if name not in lookup:
                raise DistillError(f"mask for unknown parameter {name!r}")
            m = torch.as_tensor(m)
            if m.dtype != torch.bool or tuple(m.shape) != tuple(lookup[name].shape):
                raise DistillError(f"mask for {name!r} must be bool of shape {list(lookup[name].shape)}, "
                                   f"got {m.dtype} {list(m.shape)}")
            mask_dict[name] = m
    mask_dict = {k: v.to(dev) for k, v in mask_dict.items()}
    hooks = []
    if graph_student:
        module.set_masks(mask_dict)
    else:
        for name, m in mask_dict.items():
            hooks.append(lookup[name].register_hook(lambda g, m=m: g * m))

    @torch.no_grad()
    def remask():
        if graph_student:
            module.apply_masks_()
        else:
            for name, m in mask_dict.items():
                lookup[name].mul_(m)

    remask()
    opt = torch.optim.AdamW(trainable, lr=lr, weight_decay=weight_decay)
    losses: list = []
    start = 0
    ckdir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if ckdir is not None:
        ckdir.mkdir(parents=True, exist_ok=True)
        latest = _latest_checkpoint(ckdir)
        if latest is not None:
            state = torch.load(latest, map_location=dev, weights_only=False)
            module.load_state_dict(state["student"])
            opt.load_state_dict(state["optimizer"])
            start, losses = int(state["step"]), list(state["losses"])
            remask()

    def save(step):
        path = ckdir / f"{_CKPT_PREFIX}{step:08d}.pt"
        tmp = path.with_suffix(".tmp")
        torch.save({"student": module.state_dict(), "optimizer": opt.state_dict(), "step": step,
                    "losses": losses, "alpha": alpha, "temperature": temperature}, tmp)
        tmp.rename(path)  # a crash never leaves a half-written checkpoint to resume from
        for old in ckdir.glob(f"{_CKPT_PREFIX}*.pt"):
            if old != path:
                old.unlink()  # one checkpoint is enough to resume; a 135M student's is ~1.6 GB

    show = sys.stderr.isatty() if progress is None else bool(progress)
    tty = sys.stderr.isatty()
    t0 = time.perf_counter()
    tokens = 0
    w = len(data)
    try:
        for step in range(start, steps):
            idx = (np.arange(batch_size) + step * batch_size) % w
            ids = torch.from_numpy(data[idx]).to(dev)
            with torch.no_grad():
                t_logits = teacher_fn(ids.cpu() if _runs_on_cpu(teacher) else ids).to(dev)
            s_logits = _logits(module(ids))
            loss = distillation_loss(s_logits, t_logits, ids, alpha, temperature)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"distillation loss is {loss.item()} at step {step + 1}; lower lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            remask()
            losses.append(loss.item())
            tokens += ids.numel()
            done = step + 1
            if show and (done % log_every == 0 or done == steps):
                rate = tokens / max(time.perf_counter() - t0, 1e-9)
                line = f"[distill] step {done}/{steps}  loss {losses[-1]:.4f}  {rate:.0f} tok/s"
                print(("\r" + line) if tty else line, end="" if tty else "\n", file=sys.stderr, flush=True)
            if ckdir is not None and (done % checkpoint_every == 0 or done == steps):
                save(done)
    finally:
        for h in hooks:
            h.remove()
    if show and tty:
        print(file=sys.stderr)
    seconds = time.perf_counter() - t0
    out = module.to_graph() if graph_student else module
    return DistillResult(out, losses, seconds, module, mask_dict, start)


def _runs_on_cpu(teacher) -> bool:
    # compiled models and graphs on the interpreter take CPU tensors whatever the training device
    import torch  # deferred: `import llmasos` (which imports this module) stays torch-free
    return not isinstance(teacher, torch.nn.Module)


__all__ = ["distill", "distillation_loss", "DistillResult", "DistillError"]
