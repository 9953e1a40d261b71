"""Batched log-domain Sinkhorn: entropic optimal transport between marginals a and b.

For cost C [B, n, m], log-marginals log a [B, n], log b [B, m] and reg ε, starting from f = g = 0:

    f_i ← ε·(log a_i − LSE_j((g_j − C_ij)/ε))        g_j ← ε·(log b_j − LSE_i((f_i − C_ij)/ε))

and P_ij = exp((f_i + g_j − C_ij)/ε). After a g-step P has exactly the column sums b; its row sums
are a_i·exp((f_i − f'_i)/ε) with f' the next f-step, so the error Σ_i |Σ_j P_ij − a_i| costs no
extra pass. Every ``check_every`` iterations (and at ``max_iter``) a matrix whose error is at most
``tol`` stops, keeping the (f, g) of that error; other matrices go on. Differentiable by autograd
(this loop is the ``unrolled`` backward).
"""

import torch


def sinkhorn(
    cost: torch.Tensor,
    log_a: torch.Tensor,
    log_b: torch.Tensor,
    reg: float,
    max_iter: int,
    tol: float,
    check_every: int,
    log_plan: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (plan or log-plan [B, n, m], f [B, n], g [B, m], iterations [B] int64, error [B] float64)."""
    f, g, iterations, error = iterate(
        cost,
        log_a,
        log_b,
        reg,
        max_iter,
        tol,
        check_every,
        lse_rows=lambda c, g: torch.logsumexp((g.unsqueeze(1) - c) / reg, dim=2),
        lse_cols=lambda c, f: torch.logsumexp((f.unsqueeze(2) - c) / reg, dim=1),
    )
    log_p = (f.unsqueeze(2) + g.unsqueeze(1) - cost) / reg
    return (log_p if log_plan else log_p.exp()), f, g, iterations, error


def iterate(cost, log_a, log_b, reg, max_iter, tol, check_every, lse_rows, lse_cols):
    """The loop of the module docstring, given the two log-sum-exps: lse_rows(C, g)[b, i] =
    LSE_j((g_j − C_ij)/reg) and lse_cols(C, f)[b, j] = LSE_i((f_i − C_ij)/reg). Returns (f, g, iterations, error)."""
    batch, n, m = cost.shape
    f = cost.new_zeros(batch, n)
    g = cost.new_zeros(batch, m)
    active = torch.ones(batch, dtype=torch.bool, device=cost.device)
    iterations = torch.zeros(batch, dtype=torch.int64, device=cost.device)
    error = torch.zeros(batch, dtype=torch.float64, device=cost.device)
    it = 0
    running = batch > 0  # read back from the device only where ``active`` changes: at the checks
    while running:
        f_next = reg * (log_a - lse_rows(cost, g))
        if it > 0 and (it % check_every == 0 or it == max_iter):
            err = (log_a.double().exp() * torch.expm1((f - f_next).double() / reg).abs()).sum(1)
            done = active & ((err <= tol) | (it == max_iter))
            error = torch.where(done, err.detach(), error)
            iterations = torch.where(done, it, iterations)
            active = active & ~done
            running = bool(active.any())
        f = torch.where(active.unsqueeze(1), f_next, f)
        g_next = reg * (log_b - lse_cols(cost, f))
        g = torch.where(active.unsqueeze(1), g_next, g)
        it += 1
    return f, g, iterations, error
