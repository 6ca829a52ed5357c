"""
memory.py: where AdamW's moments live and what a training step needs on the device, for rigsa.py.

  adamw_step                 torch's AdamW step, with the two moments on the device, in host memory
                             (streamed per tensor: the same numbers) or as 8-bit codes (approximate)
  load_optimizer_state       resume.pt's AdamW state, placed (and converted) as --moments wants it
  group_names                the optimizer's tensors by name, saved beside its state in resume.pt
  check_optimizer_state      ... refused in one line where it does not fit this code's optimizer
  memory_plan, choose_moments   the estimate printed before training, and --moments auto's choice;
                             a run that cannot fit is refused in one line
Why each part costs what it does: docs/memory.md.
"""
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.optim.adam import adam as adam_update  # the per-tensor function torch.optim.AdamW runs

import qlora
from lib import interrupts
from lib import util


# 8-bit moments: bitsandbytes' dynamic codes, signed for the first moment, unsigned for the second
CODES = {"exp_avg": qlora.DYNAMIC_CODE, "exp_avg_sq": qlora.dynamic_map(signed=False)}


def quantize_8bit(x, code):
    """x float32 -> (uint8 codes, float32 absmax per block of 256): the nearest code of x / absmax,
    except that a positive value never becomes 0 in the unsigned code (the second moment): a v
    rounded to 0 under a nonzero m would make AdamW's step m / (sqrt(0) + eps), a thousandfold jump."""
    n = x.numel()
    blocks = F.pad(x.reshape(-1), (0, -n % 256)).view(-1, 256)                 # (nb, 256)
    absmax = blocks.abs().amax(1)
    scaled = (blocks / absmax.clamp(min=1e-38)[:, None]).view(-1)[:n]          # an all-zero block stays 0
    code = util.on_device(code, x.device)
    q = torch.bucketize(scaled, (code[1:] + code[:-1]) / 2, out_int32=True)
    if code[0] == 0:                                                           # unsigned: index 0 is 0
        q = torch.where((q == 0) & (scaled > 0), 1, q)
    return q.to(torch.uint8), absmax


def dequantize_8bit(codes, absmax, code, out):
    """Into out (float32, codes' shape): code[codes] * absmax of their block."""
    scaled = util.on_device(code, codes.device).index_select(0, codes.reshape(-1).int())
    blocks = F.pad(scaled, (0, -scaled.numel() % 256)).view(-1, 256) * absmax[:, None]
    return out.copy_(blocks.view(-1)[:scaled.numel()].view_as(out))


@torch.no_grad()
def adamw_step(opt):
    """opt.step(), with AdamW's two moments where opt.moments puts them (docs/memory.md):
      device  torch's own step (per tensor)
      host    in host memory (pinned on CUDA); each tensor's pair is copied to the device, updated by
              the per-tensor function torch.optim.AdamW(foreach=False) calls, and copied back: the
              same numbers, 8 bytes less per trainable parameter on the device, and transfer time
      8bit    8-bit codes and a float32 scale per 256 entries (bitsandbytes' and torchao's 8-bit
              AdamW): the update runs in float32 on the decoded moments, which are then rounded to
              the nearest code. 2.03 bytes per parameter instead of 8; not the same numbers."""
    if opt.moments == "device":
        return opt.step()
    host = opt.moments == "host"
    for group in opt.param_groups:
        beta1, beta2 = group["betas"]
        for p in group["params"]:
            if p.grad is None:
                continue
            st = opt.state[p]
            if not st:  # as torch's lazy init: the step count on the CPU, the moments zero
                st["step"] = torch.tensor(0.0)
                for k in CODES:
                    zero = torch.zeros_like(p)
                    if host:
                        st[k] = zero.cpu().pin_memory() if p.is_cuda else zero
                    else:
                        st[k], st[k + "_absmax"] = quantize_8bit(zero, CODES[k])
            m, v = _staging(opt, p)
            for k, buf in zip(CODES, (m, v)):
                buf.copy_(st[k], non_blocking=True) if host else dequantize_8bit(st[k], st[k + "_absmax"], CODES[k], buf)
            adam_update([p], [p.grad], [m], [v], [], [st["step"]], foreach=False, decoupled_weight_decay=True,
                        amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"],
                        weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)
            for k, buf in zip(CODES, (m, v)):
                if host:
                    st[k].copy_(buf, non_blocking=True)  # in stream order: the next copy into buf waits for it
                else:
                    st[k], st[k + "_absmax"] = quantize_8bit(buf, CODES[k])
    if host:   # the host copies are complete before anything reads them (a save), on every device used
        for dev in {p.device for group in opt.param_groups for p in group["params"] if p.is_cuda}:
            torch.cuda.synchronize(dev)


def _staging(opt, p):
    """Two float32 buffers on p's device, the size of the largest trainable tensor, reused by every
    tensor's moments in turn. -> views of them shaped like p."""
    st = getattr(opt, "staging", None)
    if st is None or st.device != p.device or st.shape[1] < p.numel():
        opt.staging = torch.empty(2, max(q.numel() for g in opt.param_groups for q in g["params"]), device=p.device)
    return opt.staging[0, :p.numel()].view_as(p), opt.staging[1, :p.numel()].view_as(p)


def group_names(model, opt):
    """The names of opt's tensors in the model, group by group, in their order: what resume.pt records
    beside the optimizer's state, whose moments are known by position only."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [[names.get(id(p), "?") for p in g["params"]] for g in opt.param_groups]


def check_optimizer_state(opt, state, names=None, model=None):
    """Refuse, in one line, resume.pt's AdamW state where it does not fit opt: another grouping or order
    of the tensors (make_optimizer edited since the save), which would put moments on the wrong tensors
    or give torch's raw error. With the names resume.pt recorded (group_names) every tensor is compared
    by name; a resume.pt without them (an older version's) by the tensors' count per group and sizes.
    rigsa.setup calls it, before the run directory is touched; load_optimizer_state trusts it."""
    saved = [len(g["params"]) for g in state["param_groups"]]
    ours = [len(g["params"]) for g in opt.param_groups]
    params = [p for g in opt.param_groups for p in g["params"]]
    what = None if saved == ours else f"tensors per group {saved}, this optimizer's {ours}"
    if what is None and names is not None and model is not None:
        now = group_names(model, opt)
        g, i = next(((g, i) for g, (a, b) in enumerate(zip(names, now)) for i, (x, y) in enumerate(zip(a, b))
                     if x != y), (None, None))
        what = None if g is None else f"group {g}'s tensor {i} was {names[g][i]}, here {now[g][i]}"
    for i, st in state["state"].items():   # 8-bit codes are flat, one per entry: compare entry counts
        n = next((v.numel() for k, v in st.items() if k in CODES), None)
        if what is None and n is not None and n != params[i].numel():
            what = f"its tensor {i} has {n} entries, this optimizer's {params[i].numel()}"
    if what:
        raise ValueError(f"resume.pt: its AdamW state does not fit the optimizer this code makes ({what}): "
                         f"make_optimizer changed since the run was saved; resume with the code that saved it, "
                         f"or train the run again")


def load_optimizer_state(opt, state):
    """opt.load_state_dict(state), with the moments placed, and converted, as opt.moments wants them
    whichever placement wrote them (a run may resume with another --moments): torch's own load would
    copy every moment to the device first, which host moments exist to avoid, and would read 8-bit
    codes as float values. That the state fits opt is check_optimizer_state's, called before."""
    params = [p for g in opt.param_groups for p in g["params"]]
    coded = any(k + "_absmax" in st for st in state["state"].values() for k in CODES)
    if opt.moments == "device" and not coded:
        return opt.load_state_dict(state)
    for g, sg in zip(opt.param_groups, state["param_groups"]):
        g.update({k: v for k, v in sg.items() if k != "params"})
    for i, st in state["state"].items():
        p, new = params[i], {"step": st["step"]}
        for k in CODES:
            v, absmax = st[k], st.get(k + "_absmax")
            if opt.moments == "8bit" and absmax is not None:       # codes stay codes
                new[k], new[k + "_absmax"] = v.to(p.device), absmax.to(p.device)
                continue
            if absmax is not None:                                  # 8-bit codes -> float32 values
                v = dequantize_8bit(v, absmax, CODES[k], torch.empty(p.shape, dtype=torch.float32))   # flat codes: p.shape
            if opt.moments == "8bit":
                new[k], new[k + "_absmax"] = quantize_8bit(v.to(p.device), CODES[k])
            elif opt.moments == "host":
                new[k] = v.pin_memory() if p.is_cuda else v
            else:
                new[k] = v.to(p.device)
        opt.state[p] = new


GB = 1e9
MOMENT_BYTES = {"device": 8.0, "host": 0.0, "8bit": 2 * (1 + 4 / 256)}  # per trainable entry, on the device


@torch.no_grad()
def saved_bytes(model, n_tokens, device, amp, checkpoint=None):
    """Bytes autograd saves for backward in one forward of n_tokens random tokens (parameters and
    buffers not counted; a storage saved twice counted once). With checkpointed decoder layers
    (checkpoint, default model.checkpoint_layers): what the checkpoints save (each layer's input)
    plus what one layer saves again while the backward recomputes it, the peak."""
    checkpoint = model.checkpoint_layers if checkpoint is None else checkpoint
    g = torch.Generator().manual_seed(0)  # not the global generator: the run's RNG stays as it was
    ids = torch.randint(3, model.config.vocab_size, (1, n_tokens), generator=g).to(device)
    was = model.checkpoint_layers
    try:
        model.checkpoint_layers = checkpoint
        total = forward_saved(model, ids, amp)
        if checkpoint:   # the last layer run plainly (layer 0's input needs no gradient: it saves less)
            model.checkpoint_layers = False
            total += forward_saved(model, ids, amp, inside=model.model.layers[-1])
        return total
    finally:
        model.checkpoint_layers = was


def forward_saved(model, ids, amp, inside=None):
    """saved_bytes of one forward; inside: only what that module's forward saves beyond its inputs."""
    own = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    seen, on = {}, [inside is None]

    def pack(t):
        s = t.untyped_storage()
        if on[0] and s.data_ptr() not in own:
            seen[s.data_ptr()] = s.nbytes()
        return t

    def enter(m, args):   # the layer's inputs are the checkpoint's, counted there
        own.update(a.untyped_storage().data_ptr() for a in args if torch.is_tensor(a))
        on[0] = True
    hooks = [inside.register_forward_pre_hook(enter),
             inside.register_forward_hook(lambda *_: on.__setitem__(0, False))] if inside is not None else []
    try:
        with torch.enable_grad(), amp, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            h = model(ids, hidden_only=True)
            model.lm_head(h[0, -2:]).float().sum()    # the supervised positions only, as batch_loss
    finally:
        for hk in hooks:
            hk.remove()
    return sum(seen.values())


def memory_plan(model, layers, device, amp, tokens):
    """What one training step needs on `device` for each placement of AdamW's moments, by part:
    {moments: {part: bytes}}. make bench-memory compares it with measured peaks. Its forward passes
    leave the run's random state as it was (LoRA's dropout draws from it, and their number depends on
    --checkpoint-activations)."""
    with torch.random.fork_rng(devices=[device] if torch.device(device).type == "cuda" else []):
        return _memory_plan(model, layers, device, amp, tokens)


def _memory_plan(model, layers, device, amp, tokens):
    """memory_plan's parts:
      base         every tensor of the model that does not train, as loaded (bfloat16, NF4, ...)
      adapters     per trainable entry its value and gradient (4 + 4 bytes) and AdamW's moments
                   (MOMENT_BYTES), plus the packed masks
      activations  what one micro-batch of `tokens` tokens saves for backward: measured on two short
                   forwards (a + b * tokens: the saved free-entry positions do not grow with tokens);
                   with model.checkpoint_layers, the layers' inputs and one layer recomputed (saved_bytes)
      transients   one layer at a time: its dense m * dW, their copies and gradient, the optimizer's
                   per-tensor buffers: 32 bytes per entry of the largest adapted layer (bench-memory)"""
    train = [p for p in model.parameters() if p.requires_grad]
    base = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers())
               if not t.requires_grad)
    n = sum(p.numel() for p in train)
    s1, s2 = saved_bytes(model, 16, device, amp), saved_bytes(model, 32, device, amp)
    acts = s1 + (s2 - s1) / 16 * (tokens - 16)
    largest = max([L.numel() for L in layers.values()] + [p.numel() for p in train])
    return {m: {"base": base, "adapters": n * (8 + b), "activations": acts, "transients": 32 * largest}
            for m, b in MOMENT_BYTES.items()}


def capacity(device):
    """Bytes the device can give this run: CUDA's free memory plus what this process's caching
    allocator already holds (reserved, in use or not: mem_get_info counts neither as free); on the
    CPU, the available RAM plus this process's resident set."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device)
    rss = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") if os.path.exists("/proc/self/statm") else 0
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") + rss


def choose_moments(plan, device, want, checkpointed=True, micro_batch=None):
    """--moments auto: on the device if the step fits there; else in host memory (exact, slower) if
    the host also has room for them (each process on this machine pins its own); else 8-bit. Prints
    the estimate; a run that cannot fit is refused in one line, naming the placements and the flags
    that would help (checkpointed: --checkpoint-activations is on already; micro_batch: --micro-batch,
    None: unknown), not by an OOM. On the CPU host memory is the device's: host moments take the room
    device moments take (the plan counts them on a GPU's side), so auto is device, else 8-bit, and the
    5% margin kept on a GPU is not kept there: a CPU run takes 8-bit moments, whose numbers differ,
    only where device moments would not fit at all. Under torchrun every rank decides on the smallest
    device and host among them, so that all choose alike."""
    cpu = torch.device("cpu")
    have = torch.tensor([capacity(device), capacity(cpu)], dtype=torch.float64)
    if util.world()[1] > 1:
        have = have.to(device) if dist.get_backend() == "nccl" else have
        dist.all_reduce(have, op=dist.ReduceOp.MIN)
    have, host_have = have.tolist()
    gpu = device.type == "cuda"
    plan = plan if gpu else {**plan, "host": plan["device"]}
    total = {m: sum(parts.values()) for m, parts in plan.items()}
    pinning = interrupts.env_count("LOCAL_WORLD_SIZE", 1) if interrupts.env_count("WORLD_SIZE", 1) > 1 else 1
    host_need = (plan["device"]["adapters"] - plan["host"]["adapters"]) * pinning   # each process on this machine
    host_ok = not gpu or host_need <= 0.9 * host_have
    fits = {m: total[m] <= (0.95 if gpu else 1.0) * have and (m != "host" or host_ok) for m in total}
    if want != "auto":
        moments = want
    else:
        moments = "device" if fits["device"] else "host" if fits["host"] else "8bit"   # on the CPU: as device
    parts = ", ".join(f"{k} {v / GB:.2f}" for k, v in plan[moments].items())
    util.say(f"memory: ~{total[moments] / GB:.1f} GB on {device} with AdamW's moments {moments} ({parts}); "
             f"{have / GB:.1f} GB available" + (f"; {host_need / GB:.1f} GB of host memory, {host_have / GB:.1f} "
                                                f"available" if moments == "host" and gpu else ""))
    places = [f"--moments {m} (~{size(total[m])})" for m in ("host", "8bit") if m != moments and fits[m]]
    if total[moments] > have:   # activations shrink too: checkpointing, a smaller micro-batch
        fix = (places + ([] if checkpointed else ["--checkpoint-activations"])
               + (["a smaller --micro-batch"] if micro_batch is None or micro_batch > 1 else []))
        raise ValueError(f"memory: the run needs ~{size(total[moments], have)} on {device}, which has "
                         f"{size(have, total[moments])}; " + (f"try {' or '.join(fix)}" if fix else
                         "no flag of this run makes it smaller: a device with more memory, or a smaller model"))
    if moments == "host" and not host_ok:   # only another placement of the moments frees host memory
        raise ValueError(f"memory: --moments host needs ~{size(host_need, host_have)} of host memory, which has "
                         f"{size(host_have, host_need)}; try {' or '.join(places) or '--moments 8bit'}")
    return moments


def size(n, other=None):
    """Bytes as a refusal shows them: GB to 0.1, or MB below 1 GB, with more digits where `other` would
    otherwise read the same (a shortfall of a few MB)."""
    unit, div = ("GB", GB) if max(n, other or 0) >= GB else ("MB", 1e6)
    digits = next((d for d in range(1, 7) if other is None or f"{n / div:.{d}f}" != f"{other / div:.{d}f}"), 6)
    return f"{n / div:.{digits}f} {unit}"
