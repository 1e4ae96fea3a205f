"""DEV ONLY: paged_decode_step_ composed from the real ops (until its kernel exists)."""
import torch
import attngate_ext
ops = torch.ops.attngate
def step(query, kp, vp, pt, ln, fp, fc, key, value, keep, valid, rk, rv, rvalid, slot, scale):
    ops.paged_append_kv_(kp, vp, pt, ln, fp, fc, key.unsqueeze(2), value.unsqueeze(2), keep.unsqueeze(2))
    rk[:, :, slot] = key
    rv[:, :, slot] = value
    rvalid[:, :, slot] = (~keep) if valid is None else (valid.unsqueeze(1) & ~keep)
    return ops.paged_decode_attention(query, kp, vp, pt, ln, scale, rk, rv, rvalid)
if not torch._C._dispatch_has_kernel_for_dispatch_key("attngate::paged_decode_step_", "CPU"):
    torch.library.impl("attngate::paged_decode_step_", "CPU")(step)
