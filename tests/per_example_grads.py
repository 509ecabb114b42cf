"""The reference every per-example-gradient test compares Opacus against: a plain autograd loop."""

from cipherdm_torch.training.loss import per_example_loss


def reference_grads(den, x0, labels, rows, k):
    """Per-example gradients by a plain autograd loop, one example (K rows) at a time."""
    out = []
    for i in range(x0.shape[0]):
        den.zero_grad(set_to_none=True)
        r = tuple(t[i * k:(i + 1) * k] for t in rows)
        per_example_loss(den, den, x0[i:i + 1], labels[i:i + 1], k, rows=r).sum().backward()
        out.append({n: p.grad.detach().clone() for n, p in den.named_parameters()})
    den.zero_grad(set_to_none=True)
    return out
